"""Outages tell the truth (issue 8, DESIGN "Operating it"): a run cut short by Redis or the
broker says what it committed, exits 2, and never claims that nothing was fixed; a dead broker
costs one refusal per chunk, not a blocked publish per missing profile."""

import json
import signal
import socket
import subprocess
import uuid

import pytest
from django.conf import settings

from connections.models import ConnectionAsset, PlatformConnection
from orgs.models import Organization
from profiles.models import AuditFinding, AuditRun, AuditStatus, FindingOutcome
from tests.support import (
    orphaned_organizations,
    read_events,
    start_command,
    stopped_midway,
    wait_for,
)

pytestmark = pytest.mark.django_db(transaction=True)
CLOSED_PORT = "redis://127.0.0.1:1/0"


def organizations_missing_a_profile(count: int) -> None:
    """``count`` organizations, each with one selected asset and no profile for it."""
    orgs = Organization.objects.bulk_create(
        Organization(id=uuid.UUID(int=n), name=f"org {n}") for n in range(1, count + 1)
    )
    connections = PlatformConnection.objects.bulk_create(
        PlatformConnection(organization=org, provider="meta") for org in orgs
    )
    ConnectionAsset.objects.bulk_create(
        ConnectionAsset(connection=c, asset_type="page", external_id=f"page-{n}", is_selected=True)
        for n, c in enumerate(connections)
    )


def test_a_dead_broker_costs_one_refusal_per_chunk_and_the_run_says_so(tmp_path):
    organizations_missing_a_profile(250)  # three chunks of (at most) 100
    command = start_command(
        tmp_path,
        "--fix",
        "--format",
        "json",
        REDIS_URL=CLOSED_PORT,  # the broker: nobody listens
        PROFILE_AUDIT_LOCK_REDIS_URL=settings.REDIS_URL,  # the lock's Redis is up
    )
    out, err = command.communicate(timeout=120)

    assert command.returncode == 2, err
    report = json.loads(out)
    assert report["status"] == "partial"
    assert report["totals"] == {"found": 250, "fixed": 0, "sync_sent": 0}
    assert "profile sync not sent" in err and "was cut short" in err
    run = AuditRun.objects.get(id=report["run_id"])
    assert set(run.findings.values_list("outcome", flat=True)) == {FindingOutcome.FAILED}
    refusals = [
        e for e in read_events(tmp_path) if e["event"] == "profile_audit.sync_dispatch_failed"
    ]
    assert [e["profiles"] for e in refusals] == [100, 100, 50]


@pytest.fixture
def own_redis():
    """A redis-server of this test's own on a free port, to kill (never the shared one)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    import redis

    wait_for(lambda: _answers(redis, url), what="the test's own redis-server to start")
    yield server, url
    if server.poll() is None:
        server.kill()
        server.wait(timeout=10)


def _answers(redis, url) -> bool:
    try:
        return redis.Redis.from_url(url, socket_connect_timeout=0.2).ping()
    except redis.RedisError:
        return False


def test_redis_dying_mid_run_does_not_stop_it_the_lease_in_the_database_holds(tmp_path, own_redis):
    """DESIGN "Fencing": Redis is the fast lock, the lease lives with the data. While the run
    renews its lease in the database, nobody else can take it, so losing the lock's Redis
    (restart, outage) costs the run nothing: it audits every organization and succeeds."""
    server, lock_url = own_redis
    total = 300
    orphaned_organizations(total)
    command = None

    def some_fixed():
        return AuditRun.objects.filter(status=AuditStatus.RUNNING, fixed__gte=3).first()

    def start():
        return start_command(
            tmp_path, "--fix", PROFILE_AUDIT_LOCK_REDIS_URL=lock_url, PROFILE_AUDIT_CHUNK_SIZE="1"
        )

    from django.db import connection

    if connection.vendor != "postgresql":
        command = start()
    with stopped_midway(uuid.UUID(int=4), progressed=some_fixed):
        command = command or start()
        wait_for(some_fixed, what="the run to commit three organizations")
        server.send_signal(signal.SIGKILL)  # the lock's Redis dies
        server.wait(timeout=10)
    _, err = command.communicate(timeout=120)

    assert command.returncode == 0, err
    run = AuditRun.objects.get()
    assert (run.status, run.organizations_audited, run.fixed) == (
        AuditStatus.SUCCEEDED,
        total,
        total,
    )
    assert AuditFinding.objects.filter(run=run, outcome=FindingOutcome.FIXED).count() == total
