"""The scheduled audit through the real broker (Redis) to a real worker process consuming
``maintenance`` and ``celery``, on the test database: what beat sends, two runs at once, the
time limits as a backstop (the shard goes on from its cursor), and sync jobs sent only after an
organization's fix commits."""

import json
import uuid

import pytest
from django.conf import settings

from profiles.models import AuditFinding, AuditRun, AuditStatus, AuditTrigger, SocialProfile
from profiles.services.audit import AuditRequest, run_audit, start_run
from profiles.tasks import audit_shard_task, audit_sync_task, sync_profile_task
from tests.factories import AssetFactory, OrganizationFactory, ProfileFactory
from tests.support import (
    BEAT_ENTRY,
    CeleryWorker,
    beat_scheduler,
    break_commits_of,
    find_event,
    hold_organization,
    read_events,
    redis_client,
    start_command,
    wait_for,
)

pytestmark = [pytest.mark.real_worker, pytest.mark.django_db(transaction=True)]


@pytest.fixture(scope="module")
def worker(django_db_setup, tmp_path_factory):
    # Chunks of one organization: tests hold one organization and see the others go by.
    worker = CeleryWorker(tmp_path_factory.mktemp("worker"), PROFILE_AUDIT_CHUNK_SIZE="1").start()
    yield worker
    worker.stop()


def orphaned_profile(org_id=None):
    org = OrganizationFactory(id=org_id) if org_id else OrganizationFactory()
    return ProfileFactory(organization=org)


def alive(profile) -> bool:
    profile.refresh_from_db()
    return profile.deleted_at is None


def finished_scheduled_run() -> AuditRun | None:
    return (
        AuditRun.objects.filter(trigger=AuditTrigger.SCHEDULE)
        .exclude(status=AuditStatus.RUNNING)
        .first()
    )


def lock_is_free() -> bool:
    return not redis_client().exists(settings.PROFILE_AUDIT_LOCK_KEY)


def test_what_beat_sends_is_run_from_maintenance_and_fixes(worker):
    orphan = ProfileFactory()
    asset = AssetFactory()
    with beat_scheduler() as scheduler:
        entry = scheduler.schedule[BEAT_ENTRY]
        sent = scheduler.apply_async(entry)  # what beat does when the entry is due
    run = wait_for(finished_scheduled_run, what="the scheduled run to finish")
    assert (run.status, run.fix, run.found) == (AuditStatus.SUCCEEDED, True, 2)
    assert not alive(orphan)
    # The missing profile: created by the sync job the run sent to the `celery` queue, which
    # then counts it fixed on the run (closed by then, or not).
    wait_for(
        lambda: SocialProfile.objects.filter(external_id=asset.external_id).alive().exists(),
        what="the dispatched sync job to create the missing profile",
    )
    run.refresh_from_db()
    assert run.fixed == 2
    assert run.by_type["missing"] == {"found": 1, "fixed": 1, "sync_sent": 0}
    completed = wait_for(
        lambda: find_event(worker.log_dir, "profile_audit.task_completed", task_id=sent.id),
        what="the task's completion event",
    )
    assert completed["queue"] == "maintenance"
    assert completed["run_id"] == str(run.id)
    assert run.task_id == sent.id
    # The run's completion event, from whichever shard finished it.
    finished = wait_for(
        lambda: find_event(worker.log_dir, "profile_audit.completed", run_id=str(run.id)),
        what="the run's completion event",
    )
    # Written when the run closed, before its sync job confirmed the missing profile.
    assert (finished["total_issues_found"], finished["total_issues_fixed"]) == (2, 1)
    assert finished["fix_mode"] is True
    wait_for(lock_is_free, what="the lock to be released")


def test_two_runs_at_once_one_fixes_and_the_other_is_skipped(worker, tmp_path):
    profile = orphaned_profile()
    with hold_organization(profile.organization_id):
        audit_sync_task.delay(trigger="schedule")
        wait_for(lambda: not lock_is_free(), what="the task to take the lock")
        command = start_command(tmp_path, "--fix", "--format", "json")
        wait_for(
            lambda: (
                command.poll() is not None
                or find_event(tmp_path, "profile_audit.skipped", trigger="command")
            ),
            what="the command to find the lock held",
        )
    out, err = command.communicate(timeout=60)
    assert command.returncode == 75, err
    skipped = json.loads(out)
    assert skipped["status"] == "skipped"
    assert "skipped: another fixing run holds the lock" in err
    run = wait_for(finished_scheduled_run, what="the scheduled run to finish")
    assert (run.status, run.fixed) == (AuditStatus.SUCCEEDED, 1)
    assert not alive(profile)
    runs = dict(AuditRun.objects.values_list("trigger", "status"))
    assert runs == {"schedule": AuditStatus.SUCCEEDED, "command": AuditStatus.SKIPPED}
    wait_for(lock_is_free, what="the lock to be released")


def scheduled_run_with_one_shard():
    run = start_run(AuditRequest(fix=True, trigger=AuditTrigger.SCHEDULE))
    return run, run.shards.get()


def test_the_soft_time_limit_is_a_backstop_the_shard_goes_on_from_its_cursor(worker):
    fixed_first, held, after = (orphaned_profile(uuid.UUID(int=n)) for n in (1, 2, 3))
    run, shard = scheduled_run_with_one_shard()
    with hold_organization(held.organization_id):
        sent = audit_shard_task.apply_async(args=[str(shard.id)], soft_time_limit=2, time_limit=60)
        wait_for(
            lambda: f"exceeded for profiles.audit_shard[{sent.id}]" in worker.text(),
            what="the worker to reach the soft time limit",
        )
    run = wait_for(finished_scheduled_run, what="the run to finish")
    # The chunk in flight rolled back and its continuation did it: each organization once.
    assert (run.status, run.found, run.fixed) == (AuditStatus.SUCCEEDED, 3, 3)
    assert AuditFinding.objects.filter(run=run).count() == 3
    assert not any(alive(p) for p in (fixed_first, held, after))
    shard.refresh_from_db()
    assert shard.attempts == 0  # a soft time limit is a clean pause, not a delivery that died
    wait_for(lock_is_free, what="the lock to be released")


def test_sync_jobs_are_sent_only_when_the_organizations_fix_commits(worker):
    broken = OrganizationFactory(id=uuid.UUID(int=1))  # fixed first
    broken_asset = AssetFactory(connection__organization=broken)
    broken_orphan = ProfileFactory(organization=broken)
    healthy = OrganizationFactory(id=uuid.UUID(int=2))
    healthy_asset = AssetFactory(connection__organization=healthy)
    with break_commits_of(broken.id):
        report = run_audit(AuditRequest(fix=True))
    assert report.run.status == AuditStatus.PARTIAL
    assert list(report.run.failed_organizations) == [str(broken.id)]
    # The healthy organization's job was sent after any job of the broken one; the worker runs
    # them in order, so once it is done, a job for the broken organization would be too.
    wait_for(
        lambda: SocialProfile.objects.filter(external_id=healthy_asset.external_id).exists(),
        what="the healthy organization's sync job",
    )
    assert not SocialProfile.objects.filter(external_id=broken_asset.external_id).exists()
    assert alive(broken_orphan)


def test_a_sync_job_delivered_twice_creates_one_profile(worker):
    asset = AssetFactory()
    org_id = str(asset.connection.organization_id)
    for _ in range(2):
        sync_profile_task.delay(org_id, "facebook", asset.external_id)

    def sync_events():
        return [
            e
            for e in read_events(worker.log_dir)
            if e.get("event") == "profile_sync.completed"
            and e.get("external_id") == asset.external_id
        ]

    events = wait_for(lambda: len(sync_events()) == 2 and sync_events(), what="both sync jobs")
    assert sorted(e["action"] for e in events) == ["created", "unchanged"]
    assert SocialProfile.objects.filter(external_id=asset.external_id).count() == 1
