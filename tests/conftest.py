"""Fixtures shared by the suite."""

from unittest import mock

import pytest
import redis
from django.conf import settings
from django.db import transaction

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
    (the profile sync job sent for a missing profile) run when its outermost transaction ends,
    as they would in production (an eager sync job then runs before the next chunk). Tests run
    inside a transaction that never commits, so without this those hooks would never fire."""

    def call(fn, *args, **kwargs):
        base = len(transaction.get_connection().atomic_blocks)
        exit_atomic = transaction.Atomic.__exit__

        def exit_and_run_hooks(self, exc_type, exc_value, traceback):
            result = exit_atomic(self, exc_type, exc_value, traceback)
            db = transaction.get_connection(self.using)
            if len(db.atomic_blocks) == base and db.run_on_commit:
                hooks, db.run_on_commit = db.run_on_commit, []
                for _, hook, _ in hooks:
                    hook()
            return result

        with (
            mock.patch.object(transaction.Atomic, "__exit__", exit_and_run_hooks),
            django_capture_on_commit_callbacks(execute=True),
        ):
            return fn(*args, **kwargs)

    return call


@pytest.fixture(autouse=True)
def free_fixing_run_lock():
    """No test starts with the fixing-run lock held by an earlier one."""
    client = redis.Redis.from_url(settings.REDIS_URL)
    client.delete(settings.PROFILE_AUDIT_LOCK_KEY)
    client.close()
    yield
