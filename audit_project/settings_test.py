"""Settings for the test suite: the real services on loopback unless told otherwise.

pytest-django imports this before any conftest runs, so the defaults live here. By default the
suite runs on PostgreSQL and Redis (DESIGN "Services and where they run");
``PROFILE_AUDIT_TEST_DB=sqlite`` runs it on SQLite (``make test-sqlite``). Redis is used either
way: the broker and lock tests depend on it.
"""

import os
from pathlib import Path

if os.environ.get("PROFILE_AUDIT_TEST_DB", "postgres") == "sqlite":
    os.environ.pop("DATABASE_URL", None)
else:
    os.environ.setdefault("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/profile_sync_audit")
os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:6379/9")
# Not a secret: the suite runs with DEBUG off, which refuses the development placeholder.
os.environ.setdefault("DJANGO_SECRET_KEY", "test-suite-only-" + "x" * 50)
os.environ.setdefault(
    "PROFILE_AUDIT_LOG_DIR", str(Path(__file__).resolve().parent.parent / "var" / "test-logs")
)

from audit_project.settings import *  # noqa: F403
