"""Every run can be undone (DESIGN "Nothing is lost"): a fixing command killed midway leaves a
record whose counts are those of what it committed; the next fixing run that takes the lock, or
the daily maintenance, closes it ``interrupted``; and its revert puts every table back."""

import json
import os
import signal
import uuid
from datetime import timedelta
from io import StringIO

import pytest
from django.conf import settings
from django.core.management import call_command
from django.db import connection
from django.utils import timezone

from profiles.models import (
    AuditFinding,
    AuditRun,
    AuditStatus,
    FindingOutcome,
    FixingRunLease,
    SocialProfile,
)
from profiles.services.audit import AuditRequest, close_dead_runs, start_run
from profiles.tasks import prune_audit_runs_task
from tests.domain import domain_state
from tests.factories import OrganizationFactory, ProfileFactory
from tests.support import (
    orphaned_organizations,
    redis_client,
    start_command,
    stopped_midway,
    wait_for,
)

pytestmark = pytest.mark.django_db(transaction=True)


def expire_lease() -> None:
    """What 60 minutes without a renewal leave: the lock's key gone, the lease not renewed."""
    redis_client().delete(settings.PROFILE_AUDIT_LOCK_KEY)
    FixingRunLease.objects.update(
        renewed_at=timezone.now() - timedelta(seconds=settings.PROFILE_AUDIT_LOCK_TTL + 1)
    )


def orphans(n: int) -> list:
    """n organizations, ids in order, each with one orphaned profile."""
    return [
        ProfileFactory(organization=OrganizationFactory(id=uuid.UUID(int=i + 1))) for i in range(n)
    ]


def fix(*args: str) -> dict:
    out = StringIO()
    call_command("profiles_audit_sync", "--fix", "--format", "json", *args, stdout=out)
    return json.loads(out.getvalue())


def test_a_fixing_command_killed_midway_is_closed_interrupted_and_reverted_whole(tmp_path):
    total = 300
    orphaned_organizations(total)
    before = domain_state()
    command = None

    def committed_three():
        return AuditRun.objects.filter(status=AuditStatus.RUNNING, fixed__gte=3).first()

    # Chunks of one organization; on PostgreSQL the fourth is held, as a real-time sync in
    # progress would hold it.
    if connection.vendor == "postgresql":
        command_started_inside = True
    else:
        command = start_command(tmp_path, "--fix", PROFILE_AUDIT_CHUNK_SIZE="1")
        command_started_inside = False
    with stopped_midway(uuid.UUID(int=4), progressed=committed_three):
        if command_started_inside:
            command = start_command(tmp_path, "--fix", PROFILE_AUDIT_CHUNK_SIZE="1")
        killed = wait_for(committed_three, what="the command to commit three organizations")
        os.kill(command.pid, signal.SIGKILL)
        command.wait(timeout=30)
    # The record never lags: what it committed is counted, though the process is gone.
    killed.refresh_from_db()
    committed = AuditFinding.objects.filter(run=killed, outcome=FindingOutcome.FIXED).count()
    assert killed.status == AuditStatus.RUNNING
    assert 3 <= killed.fixed == committed < total
    assert SocialProfile.objects.filter(deleted_at__isnull=False).count() == committed
    # Its Redis lock outlives it for an hour; but its run was worked in one process of this
    # host, which is gone: the next fixing run takes the lock and the lease over at once.
    assert redis_client().exists(settings.PROFILE_AUDIT_LOCK_KEY)

    second = fix()

    killed.refresh_from_db()
    assert killed.status == AuditStatus.INTERRUPTED
    assert (killed.found, killed.fixed) == (committed, committed)
    assert killed.by_type["orphaned"] == {"found": committed, "fixed": committed}
    assert "closed as interrupted" in killed.error
    assert killed.finished_at is not None
    left = total - committed
    assert (second["status"], second["totals"]) == (
        "succeeded",
        {"found": left, "fixed": left, "sync_sent": 0},
    )

    # Undo both, newest first: every table is as it was before the first fix.
    for run_id in (second["run_id"], str(killed.id)):
        call_command("profiles_audit_sync", "--revert", run_id, "--fix", stdout=StringIO())
    assert domain_state() == before


def test_a_dry_run_whose_process_died_is_closed_by_the_daily_maintenance():
    orphans(1)
    dead = start_run(AuditRequest(fix=False))  # started, never worked: its process died
    an_hour_ago = timezone.now() - timedelta(minutes=61)
    AuditRun.objects.filter(id=dead.id).update(started_at=an_hour_ago, last_progress_at=an_hour_ago)
    alive_run = start_run(AuditRequest(fix=False))  # still progressing: left alone

    result = prune_audit_runs_task.delay().get()

    assert result["runs_interrupted"] == 1
    dead.refresh_from_db()
    alive_run.refresh_from_db()
    assert (dead.status, alive_run.status) == (AuditStatus.INTERRUPTED, AuditStatus.RUNNING)


def test_a_fixing_run_whose_lock_is_gone_is_closed_and_one_that_holds_it_is_not():
    orphans(2)
    holding = start_run(AuditRequest(fix=True))
    assert close_dead_runs() == []
    # The holder dies; 60 minutes after its last renewal its lock and its lease expire (here:
    # now). The lock alone going (Redis restarted without persistence) closes nothing: the
    # lease in the database is still renewed by the holder, which may well be alive.
    redis_client().delete(settings.PROFILE_AUDIT_LOCK_KEY)
    assert close_dead_runs() == []
    expire_lease()

    [closed] = close_dead_runs()

    assert closed.id == holding.id
    holding.refresh_from_db()
    assert holding.status == AuditStatus.INTERRUPTED
    assert list(holding.shards.values_list("status", flat=True)) == ["skipped"]


def test_an_interrupted_run_is_reverted_from_its_findings_not_its_totals():
    [profile] = orphans(1)
    run = start_run(AuditRequest(fix=True))
    from profiles.services.audit import work_shard

    work_shard(shard_id=run.shards.get().id)  # fixes, and finishes the run
    run.refresh_from_db()
    # A run that died before its totals were right: its findings are what it did.
    AuditRun.objects.filter(id=run.id).update(status=AuditStatus.INTERRUPTED, fixed=0, found=0)
    assert AuditFinding.objects.filter(run=run, outcome=FindingOutcome.FIXED).count() == 1

    call_command("profiles_audit_sync", "--revert", str(run.id), "--fix", stdout=StringIO())

    profile.refresh_from_db()
    assert profile.deleted_at is None


def test_kill_9_then_revert_fix_closes_the_dead_run_and_reverts_exactly_what_it_committed(
    tmp_path,
):
    """A revert is a fixing run: it takes the lease (the killed command's run was worked in one
    process of this host, which is gone, so at once), closes the dead run as interrupted, and
    puts back exactly what it committed — not "still running; wait for it to finish"."""
    total = 200
    orphaned_organizations(total)
    before = domain_state()

    def committed_three():
        return AuditRun.objects.filter(status=AuditStatus.RUNNING, fixed__gte=3).first()

    postgres = connection.vendor == "postgresql"
    command = None if postgres else start_command(tmp_path, "--fix", PROFILE_AUDIT_CHUNK_SIZE="1")
    with stopped_midway(uuid.UUID(int=4), progressed=committed_three):
        command = command or start_command(tmp_path, "--fix", PROFILE_AUDIT_CHUNK_SIZE="1")
        killed = wait_for(committed_three, what="the command to commit three organizations")
        os.kill(command.pid, signal.SIGKILL)
        command.wait(timeout=30)
    killed.refresh_from_db()
    assert killed.status == AuditStatus.RUNNING  # nobody has closed it yet

    out = StringIO()
    call_command(
        "profiles_audit_sync", "--revert", str(killed.id), "--fix", "--format", "json", stdout=out
    )

    killed.refresh_from_db()
    assert killed.status == AuditStatus.INTERRUPTED
    report = json.loads(out.getvalue())
    assert report["status"] == "succeeded"
    assert (
        report["put_back"]
        == killed.fixed
        == AuditFinding.objects.filter(run=killed, outcome=FindingOutcome.FIXED).count()
    )
    assert domain_state() == before
    assert not redis_client().exists(settings.PROFILE_AUDIT_LOCK_KEY)  # the revert gave it back
