"""Fixtures shared by the suite."""

from pathlib import Path

import pytest
import redis
from django.conf import settings

from audit_project.celery import app as celery_app


@pytest.fixture(scope="session")
def django_db_modify_db_settings(django_db_modify_db_settings_parallel_suffix):
    """On SQLite, a test database in a file rather than in memory, so that a worker or a second
    ``manage.py`` process started by a test sees the same data."""
    db = settings.DATABASES["default"]
    if db["ENGINE"].endswith("sqlite3"):
        path = Path(db["NAME"])
        db.setdefault("TEST", {})["NAME"] = str(path.with_name(f"test_{path.name}"))


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


@pytest.fixture(autouse=True)
def free_fixing_run_lock():
    """No test starts with the fixing-run lock held by an earlier one."""
    client = redis.Redis.from_url(settings.REDIS_URL)
    client.delete(settings.PROFILE_AUDIT_LOCK_KEY)
    client.close()
    yield
