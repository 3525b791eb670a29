"""Test-suite wiring: the real services on loopback, and a clear message when one is down.

By default the suite runs on PostgreSQL and Redis (DESIGN "Services and where they run");
``PROFILE_AUDIT_TEST_DB=sqlite`` runs it on SQLite instead (``make test-sqlite``). Redis is used
either way: the broker and lock tests depend on it.
"""

import os

PG_START = "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"
REDIS_START = 'redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no'

if os.environ.get("PROFILE_AUDIT_TEST_DB", "postgres") == "sqlite":
    os.environ.pop("DATABASE_URL", None)
else:
    os.environ.setdefault("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/profile_sync_audit")
os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:6379/9")
os.environ.setdefault(
    "PROFILE_AUDIT_LOG_DIR", os.path.join(os.path.dirname(__file__), "var", "test-logs")
)


def pytest_sessionstart(session):
    import pytest

    problems = []
    url = os.environ.get("DATABASE_URL")
    if url:
        import psycopg

        try:
            dsn = url.rsplit("/", 1)[0] + "/postgres"
            psycopg.connect(dsn, connect_timeout=3).close()
        except psycopg.Error as exc:
            problems.append(
                f"PostgreSQL at {url} is not answering ({exc.__class__.__name__}); "
                f"start it with: {PG_START}"
            )
    import redis

    try:
        redis.Redis.from_url(os.environ["REDIS_URL"], socket_connect_timeout=3).ping()
    except redis.RedisError as exc:
        problems.append(
            f"Redis at {os.environ['REDIS_URL']} is not answering ({exc.__class__.__name__}); "
            f"start it with: {REDIS_START}"
        )
    if problems:
        pytest.exit("\n".join(problems), returncode=3)
