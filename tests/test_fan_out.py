"""A fanned-out run survives what its broker and its database do to it (issue 13, points 1 and 5):
shards are durable in PostgreSQL and their messages are not, so lost messages are sent again; a
shard continues any number of times and fails only when its deliveries die; the waiting command
never hangs and rides out a database that stops answering."""

import json
import signal
import subprocess
import time
import uuid

import psycopg
import pytest
import redis as redis_py

from profiles.models import AuditRun, AuditShard, AuditStatus, ShardStatus, SocialProfile
from profiles.services.audit import AuditRequest, start_run, work_shard
from tests.support import (
    BROKER_KEYS,
    CeleryWorker,
    database_env,
    orphaned_organizations,
    purge_broker,
    redis_client,
    start_command,
    stopped_midway,
    wait_for,
)
from tests.test_outages import own_redis  # noqa: F401 (a fixture)

pytestmark = [pytest.mark.real_worker, pytest.mark.django_db(transaction=True)]


def alive_orphans() -> int:
    return SocialProfile.objects.filter(deleted_at__isnull=True).count()


def running_run() -> AuditRun | None:
    return AuditRun.objects.filter(status=AuditStatus.RUNNING).first()


def queued(client: redis_py.Redis, queue: str = "maintenance") -> int:
    return client.llen(queue)


def test_a_shard_that_continues_ten_times_over_a_real_worker_finishes(tmp_path):
    """Continuations are not deliveries that died: a budget spent after every chunk, twelve
    times over, never trips PROFILE_AUDIT_SHARD_MAX_ATTEMPTS (5)."""
    orphaned_organizations(12)
    worker = CeleryWorker(
        tmp_path, PROFILE_AUDIT_CHUNK_SIZE="1", PROFILE_AUDIT_SHARD_BUDGET="0.000001"
    ).start()
    try:
        command = start_command(tmp_path, "--fix", "--fan-out", "--format", "json")
        out, err = command.communicate(timeout=180)
    finally:
        worker.stop()
    assert command.returncode == 0, err
    report = json.loads(out)
    assert (report["status"], report["totals"]) == (
        "succeeded",
        {"found": 12, "fixed": 12, "sync_sent": 0},
    )
    shard = AuditShard.objects.get(run_id=report["run_id"])
    assert (shard.status, shard.attempts) == (ShardStatus.DONE, 0)
    assert alive_orphans() == 0


def test_a_shard_whose_deliveries_die_past_the_limit_is_failed(settings):
    """A delivery that dies leaves its shard running; the next one counts it. The fifth death
    fails the shard and the run says why."""
    orphaned_organizations(3)
    run = start_run(AuditRequest(fix=True))
    shard = run.shards.get()
    # Four deliveries died working it (a kill -9 of the pool process each time).
    AuditShard.objects.filter(id=shard.id).update(
        status=ShardStatus.RUNNING, attempts=settings.PROFILE_AUDIT_SHARD_MAX_ATTEMPTS - 2
    )
    assert work_shard(shard_id=shard.id) == "done"  # the fourth death counted, one left
    run.refresh_from_db()
    assert run.status == AuditStatus.SUCCEEDED

    orphaned_organizations_beyond(3)
    run = start_run(AuditRequest(fix=True))
    shard = run.shards.get()
    AuditShard.objects.filter(id=shard.id).update(
        status=ShardStatus.RUNNING, attempts=settings.PROFILE_AUDIT_SHARD_MAX_ATTEMPTS - 1
    )
    work_shard(shard_id=shard.id)

    shard.refresh_from_db()
    run.refresh_from_db()
    assert shard.status == ShardStatus.FAILED
    assert f"{settings.PROFILE_AUDIT_SHARD_MAX_ATTEMPTS} deliveries died" in shard.error
    assert run.status == AuditStatus.FAILED and "deliveries died" in run.error


def orphaned_organizations_beyond(count: int) -> None:
    from orgs.models import Organization

    start = Organization.objects.count() + 1
    orgs = Organization.objects.bulk_create(
        Organization(id=uuid.UUID(int=n), name=f"org {n}") for n in range(start, start + count)
    )
    SocialProfile.objects.bulk_create(
        SocialProfile(organization=org, platform="facebook", external_id=f"late-{org.id}")
        for org in orgs
    )


def test_lost_shard_messages_are_sent_again_and_the_run_finishes(tmp_path):
    orphaned_organizations(30)
    purge_broker()
    command = start_command(
        tmp_path,
        "--fix",
        "--fan-out",
        "--format",
        "json",
        PROFILE_AUDIT_SHARD_SIZE="10",
        # Sent again after 10 s without progress; the command gives up 10 s after that, which
        # leaves the worker started below (a few seconds) all the time it needs.
        PROFILE_AUDIT_SHARD_STALE_AFTER="10",
    )
    client = redis_client()
    wait_for(lambda: queued(client) == 3, what="the command to send its three shards")
    client.delete(*BROKER_KEYS)  # the broker restarted without persistence: the messages are gone
    worker = CeleryWorker(tmp_path, PROFILE_AUDIT_SHARD_SIZE="10")
    worker.start(purge=False)  # nothing to take: the messages are lost
    try:
        out, err = command.communicate(timeout=180)
    finally:
        worker.stop()
    assert command.returncode == 0, err
    assert "sent its 3 open shards again" in err
    report = json.loads(out)
    assert (report["status"], report["totals"]) == (
        "succeeded",
        {"found": 30, "fixed": 30, "sync_sent": 0},
    )
    assert alive_orphans() == 0


def test_the_waiting_command_never_hangs_when_no_worker_takes_the_shards(tmp_path):
    orphaned_organizations(3)
    purge_broker()
    started = time.monotonic()
    command = start_command(tmp_path, "--fix", "--fan-out", PROFILE_AUDIT_SHARD_STALE_AFTER="1")
    _, err = command.communicate(timeout=120)
    purge_broker()

    assert command.returncode == 2, err
    assert time.monotonic() - started < 60
    last = err.strip().splitlines()[-1]
    assert "no progress for 2 s" in last and "0 of 3 organizations audited" in last
    assert "shard 0 pending" in last and "celery -A audit_project worker" in last
    assert "The run stays open" in last
    run = AuditRun.objects.get()
    assert run.status == AuditStatus.RUNNING  # a worker that starts later still finishes it


def test_the_waiting_command_rides_out_a_database_that_stops_answering(tmp_path):
    """PostgreSQL ends the waiting command's connections for a few seconds; the run goes on in
    the worker, and the command reports it once it can read the record again."""
    from django.db import connection

    orphaned_organizations(20)
    worker = CeleryWorker(tmp_path, PROFILE_AUDIT_CHUNK_SIZE="1").start()

    # The command's connections carry their own name, so only they are ended below.
    waiting_env = (
        {"DATABASE_URL": database_env()["DATABASE_URL"] + "?application_name=psa-waiting"}
        if connection.vendor == "postgresql"
        else {}
    )

    def start():
        return start_command(tmp_path, "--fix", "--fan-out", "--format", "json", **waiting_env)

    def under_way():
        return (r := running_run()) is not None and r.organizations_audited >= 4

    postgres = connection.vendor == "postgresql"
    command = None if postgres else start()
    try:
        with stopped_midway(uuid.UUID(int=5), progressed=under_way):
            command = command or start()
            wait_for(under_way, what="the run to be under way")
            if postgres:
                _end_connections_of("psa-waiting", seconds=3)
        out, err = command.communicate(timeout=180)
    finally:
        worker.stop()
    assert command.returncode == 0, err
    report = json.loads(out)
    assert (report["status"], report["totals"]) == (
        "succeeded",
        {"found": 20, "fixed": 20, "sync_sent": 0},
    )


def _end_connections_of(application_name: str, *, seconds: float) -> int:
    """Terminate every backend of that application on the test database for ``seconds``: a
    database that does not answer it (the worker's connections are left alone, and so are
    another suite's, which may run this test at the same time on a database of its own)."""
    ended = 0
    deadline = time.monotonic() + seconds
    with psycopg.connect(database_env()["DATABASE_URL"], autocommit=True) as conn:
        while time.monotonic() < deadline:
            row = conn.execute(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = %s AND datname = current_database()",
                [application_name],
            ).fetchone()
            ended += row[0]
            time.sleep(0.05)  # a loop that keeps the database away, not a wait for a race
    assert ended, "the waiting command never connected"
    return ended


def test_a_redis_restart_mid_run_loses_no_shard(tmp_path, own_redis):  # noqa: F811
    """The broker and lock Redis restarts empty while a fanned-out fix is under way: the shard
    in progress goes on (its lease is in the database; it takes its lock's key again), the
    messages of the others are lost and sent again, and every organization is fixed once."""
    server, url = own_redis
    port = url.rsplit(":", 1)[1].split("/")[0]
    # Enough organizations that on SQLite the run is still going when stopped_midway gets the
    # write lock, which the worker holds most of the time (40 once finished first).
    orphaned_organizations(80)
    env = {
        "REDIS_URL": url,
        "PROFILE_AUDIT_SHARD_SIZE": "10",
        "PROFILE_AUDIT_CHUNK_SIZE": "1",
        "PROFILE_AUDIT_SHARD_STALE_AFTER": "3",
    }
    worker = CeleryWorker(tmp_path, **env)
    worker.start(purge=False, broker_url=url)
    restarted = None

    def start():
        return start_command(tmp_path, "--fix", "--fan-out", "--format", "json", **env)

    def under_way():
        return (r := running_run()) is not None and r.organizations_audited >= 4

    from django.db import connection

    command = None if connection.vendor == "postgresql" else start()
    try:
        with stopped_midway(uuid.UUID(int=5), progressed=under_way):
            command = command or start()
            wait_for(under_way, what="the first shard to be under way")
            server.send_signal(signal.SIGKILL)
            server.wait(timeout=10)
            restarted = subprocess.Popen(
                [
                    *("redis-server", "--port", port, "--bind", "127.0.0.1"),
                    *("--save", "", "--appendonly", "no"),
                ],
                stdout=subprocess.DEVNULL,
            )
            client = redis_py.Redis.from_url(url)
            wait_for(lambda: _answers(client), what="Redis to be back, empty")
        out, err = command.communicate(timeout=240)
    finally:
        worker.stop()
        if restarted is not None:
            restarted.kill()
            restarted.wait(timeout=10)
    assert command.returncode == 0, err + worker.text()[-3000:]
    report = json.loads(out)
    assert (report["status"], report["totals"]) == (
        "succeeded",
        {"found": 80, "fixed": 80, "sync_sent": 0},
    )
    run = AuditRun.objects.get(id=report["run_id"])
    assert run.findings.count() == 80  # nothing done twice
    assert alive_orphans() == 0


def _answers(client: redis_py.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis_py.RedisError:
        return False
