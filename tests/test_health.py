"""/health/ (readiness): green when PostgreSQL and Redis answer and the scheduled audit completed
recently; 503, naming the failing check, when Redis is down or the last scheduled run is too old.
/health/live/ (liveness): green whatever Redis and the schedule, as long as the process reaches
its database. Both answer whatever the Host and name no internal host or port."""

import json
import shutil
import subprocess
from datetime import timedelta

import pytest
import redis
from django.utils import timezone
from django_celery_beat.models import PeriodicTask

from profiles.models import AuditRun, AuditStatus, AuditTrigger
from profiles.schedule import AUDIT_ENTRY
from tests.support import free_port, wait_for

pytestmark = pytest.mark.django_db


def health(client, path="/health/", **headers) -> tuple[int, dict[str, str]]:
    response = client.get(f"{path}?format=json", **headers)
    return response.status_code, json.loads(response.content)


def check(report: dict[str, str], name: str) -> str:
    return next(value for key, value in report.items() if key.startswith(name))


def scheduled_run(*, hours_ago: float, status=AuditStatus.SUCCEEDED) -> AuditRun:
    finished = timezone.now() - timedelta(hours=hours_ago)
    return AuditRun.objects.create(
        trigger=AuditTrigger.SCHEDULE,
        fix=True,
        status=status,
        started_at=finished - timedelta(minutes=5),
        finished_at=finished,
        duration_seconds=300,
    )


def test_green_with_a_recent_scheduled_run(client):
    scheduled_run(hours_ago=5)
    status, report = health(client)
    assert status == 200, report
    assert check(report, "Database") == "OK"
    assert check(report, "Redis") == "OK"
    assert check(report, "ScheduledAudit") == "OK"


def test_red_when_the_last_scheduled_run_is_older_than_the_period_plus_grace(client):
    scheduled_run(hours_ago=7)
    scheduled_run(hours_ago=1, status=AuditStatus.FAILED)  # failed runs do not count
    status, report = health(client)
    assert status == 503
    assert "more than 6.5 h ago" in check(report, "ScheduledAudit")
    assert check(report, "Database") == "OK"
    # Not a reason to restart the process or take the admin away: liveness stays green.
    assert health(client, "/health/live/") == (200, {"Database": "OK"})


def test_a_new_install_is_green_until_its_first_run_is_overdue(client):
    # migrate created the entry just now: no run is expected yet.
    assert health(client)[0] == 200
    PeriodicTask.objects.filter(name=AUDIT_ENTRY).update(
        date_changed=timezone.now() - timedelta(hours=7)
    )
    status, report = health(client)
    assert status == 503
    assert "no scheduled run has completed since the schedule was set" in check(
        report, "ScheduledAudit"
    )


def test_a_schedule_switched_off_in_the_admin_is_not_a_failure(client):
    scheduled_run(hours_ago=30)
    PeriodicTask.objects.filter(name=AUDIT_ENTRY).update(enabled=False)
    assert health(client)[0] == 200


@pytest.fixture
def own_redis():
    """A Redis of this test's own, on a free port, that the test may stop."""
    port = free_port()
    server = shutil.which("redis-server")
    assert server, "redis-server is needed (apt-get install redis-server)"
    proc = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"

    def answers() -> bool:
        try:
            return redis.Redis.from_url(url, socket_connect_timeout=0.2).ping()
        except redis.RedisError:
            return False

    wait_for(answers, timeout=10, what="the test's own redis-server to answer")
    yield url, proc
    if proc.poll() is None:
        proc.terminate()
        proc.wait(timeout=10)


def test_red_when_redis_stops(client, settings, own_redis):
    url, proc = own_redis
    settings.REDIS_URL = url
    scheduled_run(hours_ago=1)
    assert health(client)[0] == 200

    proc.terminate()
    proc.wait(timeout=10)

    status, report = health(client)
    assert status == 503
    redis_checks = {k: v for k, v in report.items() if k.startswith("Redis")}
    # The broker's (stopped) and the lock's (still up), by role: no host or port is shown.
    assert redis_checks["Redis (broker)"].startswith("Unavailable: Unable to connect to Redis")
    assert redis_checks["Redis (lock)"] == "OK"
    assert check(report, "ScheduledAudit") == "OK"
    port = url.split(":")[2].split("/")[0]
    for path in ("/health/", "/health/live/"):
        for accept in ("application/json", "text/html", "text/plain"):
            body = client.get(path, HTTP_ACCEPT=accept).content.decode()
            assert port not in body and "127.0.0.1" not in body, (path, accept, body)
    # Liveness: the process answers and reaches its database; Redis is not its business.
    assert health(client, "/health/live/") == (200, {"Database": "OK"})


def test_one_redis_for_broker_and_lock_is_one_check(client):
    scheduled_run(hours_ago=1)
    status, report = health(client)
    assert status == 200
    assert [k for k in report if k.startswith("Redis")] == ["Redis (broker and lock)"]


@pytest.mark.parametrize("host", ["10.0.3.7", "10.0.3.7:8000", "[fd00::7]:8000", "probe.internal"])
def test_health_answers_whatever_the_host_header(client, host):
    scheduled_run(hours_ago=1)
    assert health(client, "/health/", HTTP_HOST=host)[0] == 200
    assert health(client, "/health/live/", HTTP_HOST=host)[0] == 200
    # Every other page still checks the Host against ALLOWED_HOSTS.
    assert client.get("/metrics", HTTP_HOST=host).status_code == 400
    assert client.get("/admin/login/", HTTP_HOST=host).status_code == 400


def test_liveness_fails_with_503_when_the_database_does_not_answer(client):
    from django.db import connections

    db = connections["default"]
    saved = dict(db.settings_dict)
    # Nothing listens on port 1; no SQLite file can be opened under /proc.
    unreachable = {"PORT": "1"} if db.vendor == "postgresql" else {"NAME": "/proc/none/db.sqlite3"}
    db.close()
    db.settings_dict.update(unreachable)
    try:
        status, report = health(client, "/health/live/")
    finally:
        db.close()
        db.settings_dict.clear()
        db.settings_dict.update(saved)
    assert status == 503
    assert report["Database"].startswith("Unavailable")
    assert "127.0.0.1" not in report["Database"] and "/proc" not in report["Database"]


def test_a_person_reads_the_same_report_in_a_browser(client):
    scheduled_run(hours_ago=8)
    response = client.get("/health/", HTTP_ACCEPT="text/html")
    assert response.status_code == 503
    page = response.content.decode()
    assert "ScheduledAudit" in page and "more than 6.5 h ago" in page


def test_lateness_is_judged_against_the_configured_period(client, settings):
    scheduled_run(hours_ago=7)
    assert health(client)[0] == 503
    settings.PROFILE_AUDIT_SCHEDULE_PERIOD = 12 * 3600  # the crontab was changed to twice a day
    assert health(client)[0] == 200


def test_red_when_the_change_backlog_is_older_than_its_setting(client, settings):
    """DESIGN "Change-driven runs": /health/ turns unready when a change mark has waited longer
    than PROFILE_AUDIT_CHANGES_MAX_BACKLOG_AGE; the loop switched off in the admin is not a
    failure (the sweep still resyncs)."""
    from profiles.models import ChangeMark
    from profiles.schedule import CHANGES_ENTRY
    from tests.factories import ProfileFactory

    scheduled_run(hours_ago=1)
    profile = ProfileFactory()  # its write marks its organization
    assert health(client)[0] == 200
    ChangeMark.objects.filter(organization_id=profile.organization_id).update(
        first_marked_at=timezone.now()
        - timedelta(seconds=settings.PROFILE_AUDIT_CHANGES_MAX_BACKLOG_AGE + 60)
    )
    status, report = health(client)
    assert status == 503
    assert "the change-driven runs are behind" in check(report, "ChangeBacklog")
    assert health(client, "/health/live/")[0] == 200
    PeriodicTask.objects.filter(name=CHANGES_ENTRY).update(enabled=False)
    assert health(client)[0] == 200
