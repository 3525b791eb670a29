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
