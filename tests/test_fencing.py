"""DESIGN "Fencing": the lease lives where the data lives. Whoever takes the fixing-run lock
raises an epoch in the database, and every fixing transaction proves it before it commits."""

import json
import os
import signal
import uuid
from datetime import timedelta
from io import StringIO

import pytest
from django.conf import settings
from django.core.management import CommandError, call_command
from django.db import connection, transaction
from django.utils import timezone

from profiles.models import (
    AuditFinding,
    AuditRun,
    AuditStatus,
    FindingOutcome,
    FixingRunLease,
    SocialProfile,
)
from profiles.services.audit import AuditRequest, start_run, work_shard
from profiles.services.lease import LeaseLost, prove
from profiles.services.run_lock import force_release_fixing_run_lock
from tests.support import (
    hold_organization,
    orphaned_organizations,
    process_stat,
    redis_client,
    start_command,
    wait_for,
)

pytestmark = pytest.mark.django_db(transaction=True)


def alive_orphans() -> int:
    return SocialProfile.objects.filter(deleted_at__isnull=True).count()


def test_a_fixing_transaction_commits_only_with_the_leases_epoch():
    orphaned_organizations(1)
    run = start_run(AuditRequest(fix=True))
    with transaction.atomic():
        prove(epoch=run.lock_epoch)  # ours: nothing raised
    with pytest.raises(LeaseLost, match="another run took it over"), transaction.atomic():
        SocialProfile.objects.update(name="written by a holder that lost its lease")
        prove(epoch=run.lock_epoch - 1)
    assert not SocialProfile.objects.filter(name__startswith="written").exists()


def test_a_forced_release_fences_its_run_out_and_it_commits_nothing_more():
    orphaned_organizations(3)
    run = start_run(AuditRequest(fix=True))

    assert force_release_fixing_run_lock(token=run.lock_token)
    work_shard(shard_id=run.shards.get().id)

    run.refresh_from_db()
    assert run.status == AuditStatus.FAILED
    assert "lost the fixing-run lease" in run.error
    assert (run.fixed, alive_orphans()) == (0, 3)


def test_a_fix_without_redis_beside_a_redis_locked_run_refuses_to_run(tmp_path):
    """A shell without REDIS_URL against the production database takes a file lock: it must not
    run beside the live Redis-locked run, close it, or leave its lock held."""
    orphaned_organizations(2)
    live = start_run(AuditRequest(fix=True))  # the Redis lock, and the lease
    command = start_command(
        tmp_path,
        "--fix",
        "--format",
        "json",
        REDIS_URL="",
        PROFILE_AUDIT_LOCK_REDIS_URL="",
        PROFILE_AUDIT_LOCK_FILE=str(tmp_path / "fixing-run.lock"),
    )
    out, err = command.communicate(timeout=120)

    assert command.returncode == 75, err
    assert "held through a redis lock" in err and "same" in err and "REDIS_URL" in err
    assert json.loads(out)["status"] == "skipped"
    live.refresh_from_db()
    assert live.status == AuditStatus.RUNNING
    assert redis_client().get(settings.PROFILE_AUDIT_LOCK_KEY).decode() == live.lock_token
    assert alive_orphans() == 2
    work_shard(shard_id=live.shards.get().id)  # and the live run finishes its work
    live.refresh_from_db()
    assert (live.status, live.fixed) == (AuditStatus.SUCCEEDED, 2)


def test_a_redis_lock_restarted_empty_does_not_let_another_run_in():
    """Redis restarted without persistence lost the lock's key: the lease in the database still
    belongs to the live run, so a newcomer is skipped and the live run takes its key again."""
    orphaned_organizations(2)
    live = start_run(AuditRequest(fix=True))
    redis_client().delete(settings.PROFILE_AUDIT_LOCK_KEY)

    newcomer = start_run(AuditRequest(fix=True))

    assert newcomer.status == AuditStatus.SKIPPED
    assert "lease in the database is held" in newcomer.error
    work_shard(shard_id=live.shards.get().id)
    live.refresh_from_db()
    assert (live.status, live.fixed) == (AuditStatus.SUCCEEDED, 2)


def test_a_run_stopped_inside_a_chunk_past_its_expiry_commits_nothing_and_its_successor_completes(
    tmp_path, settings
):
    """A fixing command is stopped (SIGSTOP: a VM pause, a GC pause, a debugger) inside a chunk's
    transaction and stays stopped past its lease's expiry. A successor takes the lease over,
    ends the stopped transaction that holds the organizations' locks (it can never commit), and
    fixes everything; continued, the stopped command commits nothing."""
    postgres = connection.vendor == "postgresql"
    total = 8 if postgres else 40  # SQLite: enough chunks that it is stopped midway
    orphaned_organizations(total)
    ttl = 3
    settings.PROFILE_AUDIT_LOCK_TTL = ttl
    settings.PROFILE_AUDIT_ORG_LOCK_WAIT = 1
    env = {
        "PROFILE_AUDIT_CHUNK_SIZE": "2",
        "PROFILE_AUDIT_LOCK_TTL": str(ttl),
        # The settings keep shard budget < soft limit < hard limit <= the lock's TTL.
        "PROFILE_AUDIT_TIME_LIMIT": str(ttl),
        "PROFILE_AUDIT_SOFT_TIME_LIMIT": str(ttl - 1),
        "PROFILE_AUDIT_SHARD_BUDGET": "1",
    }

    def first_chunk_committed():
        return AuditRun.objects.filter(status=AuditStatus.RUNNING, fixed__gte=2).first()

    held = uuid.UUID(int=3)  # the first organization of the second chunk
    command = None if postgres else start_command(tmp_path, "--fix", **env)
    if not postgres:
        # SQLite has one write lock: hold it once the first chunk committed, so the command waits
        # for it right at its next write, and stop it there.
        wait_for(first_chunk_committed, what="the command to commit its first chunk")
    with hold_organization(held):
        command = command or start_command(tmp_path, "--fix", **env)
        stopped = wait_for(first_chunk_committed, what="the command to commit its first chunk")
        if postgres:
            wait_for(
                lambda: _waits_for_an_advisory_lock(), what="the command to wait inside a chunk"
            )
        else:
            # Stopped while it waits for the write lock, not halfway through a read (whose
            # shared lock would block every writer, the successor included, while it is stopped).
            wait_for(_idle_since(command.pid), what="the command to wait for SQLite's write lock")
        os.kill(command.pid, signal.SIGSTOP)
    stopped.refresh_from_db()
    committed = stopped.fixed
    assert 2 <= committed < total and (committed == 2 or not postgres)
    try:
        # PostgreSQL: the stopped command's transaction now holds the second chunk's locks.
        wait_for(
            lambda: not redis_client().exists(settings.PROFILE_AUDIT_LOCK_KEY),
            timeout=ttl * 5,
            what="the stopped holder's lock to expire",
        )
        FixingRunLease.objects.update(
            renewed_at=timezone.now() - timedelta(seconds=ttl + 1)
        )  # as its TTL without a renewal leaves it (the key above went at the same moment)

        out = StringIO()
        call_command("profiles_audit_sync", "--fix", "--format", "json", stdout=out)
        successor = json.loads(out.getvalue())
    finally:
        os.kill(command.pid, signal.SIGCONT)
    command.communicate(timeout=60)

    stopped.refresh_from_db()
    assert stopped.status == AuditStatus.INTERRUPTED
    # What it committed before it was stopped, and nothing after.
    assert stopped.fixed == committed
    fixed = AuditFinding.objects.filter(run=stopped, outcome=FindingOutcome.FIXED).count()
    assert fixed == committed
    assert successor["status"] == "succeeded", successor
    assert successor["totals"] == {
        "found": total - committed,
        "fixed": total - committed,
        "sync_sent": 0,
    }
    assert alive_orphans() == 0
    assert command.returncode != 0


def _idle_since(pid: int):
    """A condition: the process has been asleep, using no CPU, over the last few checks (it
    waits in SQLite's busy handler)."""
    samples: list[tuple[str, int]] = []

    def idle() -> bool:
        fields = process_stat(pid)
        samples.append((fields[0], int(fields[11]) + int(fields[12])))  # state, utime + stime
        recent = samples[-4:]
        return len(recent) == 4 and all(s == "S" for s, _ in recent) and len(set(recent)) == 1

    return idle


def _waits_for_an_advisory_lock() -> bool:
    """A session of the test database waits for an advisory lock (pg_locks spans the cluster:
    another suite's database, which may be running this test too, does not count)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        )
        return cursor.fetchone()[0] > 0


def test_a_skipped_fix_exits_75_through_command_error(settings):
    orphaned_organizations(1)
    start_run(AuditRequest(fix=True))
    with pytest.raises(CommandError, match=r"^skipped: another fixing run holds") as error:
        call_command("profiles_audit_sync", "--fix", stdout=StringIO(), stderr=StringIO())
    assert error.value.returncode == 75
