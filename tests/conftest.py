"""Fixtures shared by the suite."""

import pytest

from audit_project.celery import app as celery_app


@pytest.fixture(autouse=True)
def eager_tasks(request):
    """Tasks run in-process unless a test needs them to cross the real broker."""
    if request.node.get_closest_marker("real_worker"):
        yield
        return
    previous = celery_app.conf.task_always_eager
    celery_app.conf.task_always_eager = True
    yield
    celery_app.conf.task_always_eager = previous


@pytest.fixture
def committed(django_capture_on_commit_callbacks):
    """Call ``fn`` as if its transactions committed for real: the on-commit hooks it registers
    (the profile sync job sent for a missing profile) run before this returns. Tests run inside
    a transaction that never commits, so without this those hooks would never fire."""

    def call(fn, *args, **kwargs):
        with django_capture_on_commit_callbacks(execute=True):
            return fn(*args, **kwargs)

    return call
