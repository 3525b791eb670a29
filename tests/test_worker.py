"""The scheduled audit through the real broker (Redis) to a real worker process consuming
``maintenance`` and ``celery``, on the test database: what beat sends, two runs at once, the soft
time limit, and sync jobs sent only after an organization's fix commits."""

import json
import uuid

import pytest
from django.conf import settings
from django.db import connection
from profiles.services.locked_run import run_locked_audit

from profiles.models import AuditRun, AuditStatus, AuditTrigger, SocialProfile
from profiles.tasks import audit_sync_task, sync_profile_task
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
    worker = CeleryWorker(tmp_path_factory.mktemp("worker")).start()
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
    assert (run.status, run.fix, run.found, run.fixed) == (AuditStatus.SUCCEEDED, True, 2, 2)
    assert not alive(orphan)
    # The missing profile: created by the sync job the run sent to the `celery` queue.
    wait_for(
        lambda: SocialProfile.objects.filter(external_id=asset.external_id).alive().exists(),
        what="the dispatched sync job to create the missing profile",
    )
    completed = wait_for(
        lambda: find_event(worker.log_dir, "profile_audit.task_completed", task_id=sent.id),
        what="the task's completion event",
    )
    assert completed["queue"] == "maintenance"
    assert completed["summary"] == "Profile-connection sync audit completed"
    assert completed["run_id"] == str(run.id)
    wait_for(lock_is_free, what="the lock to be released")


def test_two_runs_at_once_one_fixes_and_the_other_is_skipped(worker, tmp_path):
    profile = orphaned_profile()
    with hold_organization(profile.organization_id):
        audit_sync_task.delay()
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


def test_soft_time_limit_stops_after_the_organization_in_progress(worker):
    fixed_first, in_progress, never_reached = (
        orphaned_profile(uuid.UUID(int=n)) for n in (1, 2, 3)
    )
    with hold_organization(in_progress.organization_id):
        sent = audit_sync_task.apply_async(soft_time_limit=2, time_limit=60)
        wait_for(
            lambda: f"exceeded for profiles.audit_sync[{sent.id}]" in worker.text(),
            what="the worker to reach the soft time limit",
        )
    run = wait_for(finished_scheduled_run, what="the scheduled run to finish")
    assert run.status == AuditStatus.PARTIAL
    assert run.error == "stopped early: soft time limit reached (2 s)"
    if connection.vendor == "postgresql":
        # Held inside the second organization's fix: that one completes and commits, the first
        # stays committed, the third is never started.
        assert [alive(p) for p in (fixed_first, in_progress, never_reached)] == [
            False,
            False,
            True,
        ]
    else:
        # SQLite has one write lock for the whole database: the run was held before its first
        # write, so it stops before its first organization.
        assert [alive(p) for p in (fixed_first, in_progress, never_reached)] == [True] * 3
    wait_for(lock_is_free, what="the lock to be released")
    completed = wait_for(
        lambda: find_event(worker.log_dir, "profile_audit.task_completed", task_id=sent.id),
        what="the task's completion event",
    )
    assert completed["status"] == AuditStatus.PARTIAL
    assert worker.scheduled() == []  # not retried
    assert AuditRun.objects.count() == 1


def test_hard_time_limit_kills_the_run_and_records_it_failed(worker):
    profile = orphaned_profile()
    with hold_organization(profile.organization_id):
        sent = audit_sync_task.apply_async(soft_time_limit=1, time_limit=2)
        wait_for(
            lambda: (
                f"Hard time limit (2s) exceeded for profiles.audit_sync[{sent.id}]" in worker.text()
            ),
            what="the worker to kill the task",
        )
    failed = wait_for(
        lambda: find_event(worker.log_dir, "profile_audit.task_failed", task_id=sent.id),
        what="the failure to be logged",
    )
    assert failed["summary"] == "Profile-connection sync audit failed"
    assert failed["error"].startswith("TimeLimitExceeded")
    assert alive(profile)
    if connection.vendor == "postgresql":
        # Killed inside the organization's fix: its record is closed by the worker.
        run = AuditRun.objects.get()
        assert run.status == AuditStatus.FAILED
        assert run.error.startswith("killed at the hard time limit")
        assert failed["runs_closed"] == 1
    # On SQLite the process was killed while waiting for the database's single write lock to
    # create its record, a race with the worker's clean-up that the test does not judge.
    assert worker.ping()  # the pool replaced the killed process


def test_sync_jobs_are_sent_only_when_the_organizations_fix_commits(worker):
    broken = OrganizationFactory(id=uuid.UUID(int=1))  # fixed first
    broken_asset = AssetFactory(connection__organization=broken)
    broken_orphan = ProfileFactory(organization=broken)
    healthy = OrganizationFactory(id=uuid.UUID(int=2))
    healthy_asset = AssetFactory(connection__organization=healthy)
    with break_commits_of(broken.id):
        report = run_locked_audit(org_id=None, fix=True, scopes=None, trigger="command")
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
            if e.get("event") == "profile_sync.completed" and e["external_id"] == asset.external_id
        ]

    events = wait_for(lambda: len(sync_events()) == 2 and sync_events(), what="both sync jobs")
    assert sorted(e["action"] for e in events) == ["created", "unchanged"]
    assert SocialProfile.objects.filter(external_id=asset.external_id).count() == 1
