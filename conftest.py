"""Before any test: PostgreSQL and Redis must answer, or the run stops with the command that
starts the one that does not (the defaults are in ``audit_project/settings_test.py``)."""

import os

PG_START = "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"
REDIS_START = 'redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no'


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
