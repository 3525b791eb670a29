"""Fixtures shared by the suite."""

import pytest
import redis
from django.conf import settings

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


@pytest.fixture(autouse=True)
def free_fixing_run_lock():
    """No test starts with the fixing-run lock held by an earlier one."""
    client = redis.Redis.from_url(settings.REDIS_URL)
    client.delete(settings.PROFILE_AUDIT_LOCK_KEY)
    client.close()
    yield
