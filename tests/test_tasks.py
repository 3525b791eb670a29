"""The scheduled audit task and its beat entry, as declared and as run in-process (eager).
Crossing the real broker to a real worker: tests/test_worker.py."""

import json
from datetime import timedelta

import pytest
from celery.exceptions import Retry, SoftTimeLimitExceeded, TimeLimitExceeded
from django.conf import settings
from django.db import OperationalError
from django_celery_beat.models import PeriodicTask

from audit_project.celery import app as celery_app
from profiles.models import (
    AuditFinding,
    AuditRun,
    AuditShard,
    AuditStatus,
    AuditTrigger,
    ShardStatus,
    SocialProfile,
)
from profiles.plan import Guard
from profiles.services.audit import CONTINUE, AuditRequest, Budget, start_run, work_shard
from profiles.services.chunks import ShardCursor, ShardMoved, fix_chunk, plan_chunk
from profiles.services.run_lock import RunLockUnavailable
from profiles.tasks import TRANSIENT_ERRORS, audit_shard_task, audit_sync_task, sync_profile_task
from tests.factories import AssetFactory, ProfileFactory
from tests.support import BEAT_ENTRY as ENTRY
from tests.support import beat_scheduler, redis_client

SIX_HOURS = 6 * 3600


# --- Declaration ----------------------------------------------------------------------------


def test_the_task_is_named_and_routed_to_maintenance():
    task = celery_app.tasks["profiles.audit_sync"]
    assert task.name == audit_sync_task.name == "profiles.audit_sync"
    assert celery_app.amqp.router.route({}, task.name)["queue"].name == "maintenance"


def test_every_task_of_ours_has_a_route():
    # Routes, not the task's queue= attribute (deprecated in Celery 5.7), say where tasks run.
    ours = {name for name in celery_app.tasks if name.startswith("profiles.")}
    assert ours == set(settings.CELERY_TASK_ROUTES)
    for name, route in settings.CELERY_TASK_ROUTES.items():
        assert celery_app.amqp.router.route({}, name)["queue"].name == route["queue"]


def test_time_limits_lock_and_schedule_fit_inside_each_other():
    for task in (audit_sync_task, audit_shard_task):
        assert (task.soft_time_limit, task.time_limit) == (540, 600)
        assert task.soft_time_limit < task.time_limit < settings.PROFILE_AUDIT_LOCK_TTL < SIX_HOURS
    # A shard stops on its own budget well before the soft limit, the backstop.
    assert audit_shard_task.soft_time_limit > settings.PROFILE_AUDIT_SHARD_BUDGET
    assert settings.PROFILE_AUDIT_RUN_DEADLINE < SIX_HOURS


def test_a_shard_survives_its_worker_and_retries_transient_errors():
    task = audit_shard_task
    assert task.acks_late and task.reject_on_worker_lost
    assert set(task.autoretry_for) == set(TRANSIENT_ERRORS)
    assert celery_app.amqp.router.route({}, task.name)["queue"].name == "maintenance"


def test_retries_twice_two_minutes_apart_on_transient_errors_only():
    task = audit_sync_task
    assert (task.max_retries, task.default_retry_delay) == (2, 120)
    assert task.retry_backoff is False
    assert task.retry_jitter is False  # Celery's default would randomize the delay
    assert set(task.autoretry_for) == set(TRANSIENT_ERRORS)
    assert OperationalError in task.autoretry_for
    assert RunLockUnavailable in task.autoretry_for
    assert not issubclass(SoftTimeLimitExceeded, task.autoretry_for)


# --- The beat entry, as the DatabaseScheduler stores it ---------------------------------------


# django-celery-beat's scheduler closes the connection of a test wrapped in a transaction
# (close_old_connections), so these tests commit for real.
@pytest.mark.django_db(transaction=True)
def test_beat_entry_row_is_what_beat_reads():
    with beat_scheduler() as scheduler:
        row = PeriodicTask.objects.get(name=ENTRY)
        entry = scheduler.schedule[ENTRY]
    assert row.task == "profiles.audit_sync"
    assert row.enabled
    cron = row.crontab
    assert (cron.minute, cron.hour, cron.day_of_month, cron.month_of_year, cron.day_of_week) == (
        "0",
        "*/6",
        "*",
        "*",
        "*",
    )
    assert row.interval is None
    assert row.queue == "maintenance"
    assert json.loads(row.kwargs) == {"fix": True, "trigger": "schedule"}
    assert row.expire_seconds == settings.PROFILE_AUDIT_SCHEDULE_EXPIRES
    assert row.expires is None
    # What beat sends with each message.
    assert entry.kwargs == {"fix": True, "trigger": "schedule"}
    assert entry.options["queue"] == "maintenance"
    assert entry.options["expires"] == settings.PROFILE_AUDIT_SCHEDULE_EXPIRES


def test_expiry_drops_a_backlog_but_never_the_tasks_own_retries():
    # Retries keep the first message's absolute expiry (Celery copies `expires` from the
    # request), so the expiry must outlast the longest chain: each attempt up to the hard
    # limit, then the retry delay. And it must be shorter than the interval, so that at most
    # one scheduled message is ever waiting.
    task = audit_sync_task
    longest_chain = task.max_retries * (task.time_limit + task.default_retry_delay)
    assert longest_chain < settings.PROFILE_AUDIT_SCHEDULE_EXPIRES < SIX_HOURS


@pytest.mark.django_db(transaction=True)
def test_setting_up_beat_twice_keeps_one_entry():
    with beat_scheduler():
        pass
    with beat_scheduler():
        pass
    assert PeriodicTask.objects.filter(name=ENTRY).count() == 1


@pytest.mark.django_db(transaction=True)
def test_the_entry_shows_in_the_admin(admin_client):
    with beat_scheduler():
        row = PeriodicTask.objects.get(name=ENTRY)
    listing = admin_client.get("/admin/django_celery_beat/periodictask/")
    assert listing.status_code == 200
    assert ENTRY in listing.content.decode()
    page = admin_client.get(f"/admin/django_celery_beat/periodictask/{row.pk}/change/")
    assert page.status_code == 200
    assert "maintenance" in page.content.decode()


# --- Running it (eager) ---------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)  # the sync job is sent when the fix commits
def test_the_task_fixes_every_organization_as_a_scheduled_run():
    orphan = ProfileFactory()
    asset = AssetFactory()
    result = audit_sync_task.delay(trigger="schedule").get()
    orphan.refresh_from_db()
    assert orphan.deleted_at is not None
    assert SocialProfile.objects.filter(external_id=asset.external_id).alive().count() == 1
    run = AuditRun.objects.get(id=result["run_id"])
    assert (run.trigger, run.fix, run.status) == (
        AuditTrigger.SCHEDULE,
        True,
        AuditStatus.SUCCEEDED,
    )
    assert result["total_issues_found"] == result["total_issues_fixed"] == 2
    assert not redis_client().exists(settings.PROFILE_AUDIT_LOCK_KEY)


@pytest.mark.django_db
def test_lock_held_is_skipped_not_retried():
    redis_client().set(settings.PROFILE_AUDIT_LOCK_KEY, "other-host:1:token", ex=600)
    orphan = ProfileFactory()
    result = audit_sync_task.delay().get()
    assert result["status"] == AuditStatus.SKIPPED
    # A retry would have raised celery.exceptions.Retry here (eager tasks propagate it).
    assert list(AuditRun.objects.values_list("status", flat=True)) == [AuditStatus.SKIPPED]
    orphan.refresh_from_db()
    assert orphan.deleted_at is None


@pytest.mark.django_db
def test_unreachable_redis_is_retried_in_two_minutes(settings):
    # In-process, the retry shows as the exception it raises; the message a worker schedules
    # two minutes out is checked in tests/test_task_retry.py.
    settings.PROFILE_AUDIT_LOCK_REDIS_URL = "redis://127.0.0.1:1/3"
    orphan = ProfileFactory()
    with pytest.raises(Retry) as caught:
        audit_sync_task.delay()
    assert caught.value.when == 120
    assert isinstance(caught.value.exc, RunLockUnavailable)
    run = AuditRun.objects.get()
    assert run.status == AuditStatus.FAILED
    orphan.refresh_from_db()
    assert orphan.deleted_at is None


@pytest.mark.django_db
def test_a_task_sent_by_hand_is_not_recorded_as_schedule():
    ProfileFactory()
    result = audit_sync_task.delay(fix=False).get()
    run = AuditRun.objects.get(id=result["run_id"])
    assert (run.trigger, run.task_id) == (AuditTrigger.COMMAND, run.task_id or "x")
    assert run.task_id


@pytest.mark.django_db
def test_a_shard_whose_budget_runs_out_continues_and_every_organization_is_audited(settings):
    """Each delivery of the shard works one chunk, then sends its continuation from the cursor
    (eager here: the continuation runs at once); no organization is skipped or done twice."""
    settings.PROFILE_AUDIT_CHUNK_SIZE = 2
    settings.PROFILE_AUDIT_SHARD_BUDGET = 1e-9  # spent as soon as it is checked
    orphans = [ProfileFactory() for _ in range(5)]

    result = audit_sync_task.delay(trigger="schedule").get()

    run = AuditRun.objects.get(id=result["run_id"])
    assert (run.status, run.organizations_audited, run.found, run.fixed) == (
        AuditStatus.SUCCEEDED,
        5,
        5,
        5,
    )
    shard = run.shards.get()
    # 5 organizations, 2 a time: three deliveries, and a fourth that finds the shard at its end;
    # none of them died, so none counts towards PROFILE_AUDIT_SHARD_MAX_ATTEMPTS.
    assert (shard.status, shard.attempts) == (ShardStatus.DONE, 0)
    for orphan in orphans:
        orphan.refresh_from_db()
        assert orphan.deleted_at is not None
    assert not redis_client().exists(settings.PROFILE_AUDIT_LOCK_KEY)


@pytest.mark.django_db
def test_a_shard_delivered_twice_changes_nothing_twice(settings):
    settings.PROFILE_AUDIT_CHUNK_SIZE = 1
    orphans = sorted((ProfileFactory() for _ in range(3)), key=lambda p: p.organization_id)
    run = start_run(AuditRequest(fix=True))
    shard = run.shards.get()
    stop_after_one = Budget(check=lambda: "enough")
    assert work_shard(shard_id=shard.id, budget=stop_after_one) == CONTINUE
    # A second delivery that read the shard before the first committed: its chunk is the one
    # already done. It is rolled back whole, and it stops.
    late = ShardCursor(run_id=run.id, shard_id=shard.id, cursor=None)
    plans = plan_chunk([orphans[0].organization_id], types=frozenset(), guard=a_guard())
    with pytest.raises(ShardMoved):
        fix_chunk(plans, position=late, types=frozenset(), guard=a_guard())
    # The first delivery resumes, and a third delivery after the end finds nothing to do.
    audit_shard_task.delay(str(shard.id))
    audit_shard_task.delay(str(shard.id))

    run.refresh_from_db()
    assert (run.status, run.found, run.fixed, run.organizations_audited) == (
        AuditStatus.SUCCEEDED,
        3,
        3,
        3,
    )
    assert AuditFinding.objects.filter(run=run).count() == 3
    assert sorted(AuditFinding.objects.filter(run=run).values_list("seq", flat=True)) == [1, 2, 3]
    assert AuditShard.objects.get(id=shard.id).status == ShardStatus.DONE


def a_guard():
    return Guard(minimum=5, ratio=0.5)


@pytest.mark.django_db
def test_a_shard_killed_at_the_hard_time_limit_is_continued_from_its_cursor(settings):
    """At the hard limit the pool kills the child and calls the task's on_failure in the
    worker's main process (celery.worker.request.Request.on_timeout), which sends the shard
    again: it resumes where the cursor is. (A real kill cannot be timed here: billiard arms the
    hard timer only once the soft limit has fired, and the shard answers that one itself.)"""
    settings.PROFILE_AUDIT_CHUNK_SIZE = 1
    orphans = [ProfileFactory() for _ in range(2)]
    run = start_run(AuditRequest(fix=True, trigger="schedule"))
    shard = run.shards.get()
    assert work_shard(shard_id=shard.id, budget=Budget(check=lambda: "killed")) == CONTINUE

    audit_shard_task.on_failure(TimeLimitExceeded(600), "task-id", (str(shard.id),), {}, None)

    run.refresh_from_db()
    assert (run.status, run.fixed) == (AuditStatus.SUCCEEDED, 2)
    assert all(SocialProfile.objects.get(id=p.id).deleted_at for p in orphans)


@pytest.mark.django_db
def test_a_shard_that_fails_for_good_closes_and_finishes_its_run(settings):
    ProfileFactory()
    run = start_run(AuditRequest(fix=True, trigger="schedule"))
    shard = run.shards.get()

    audit_shard_task.on_failure(RuntimeError("boom"), "task-id", (str(shard.id),), {}, None)

    run.refresh_from_db()
    assert run.status == AuditStatus.FAILED
    assert "shard 0 failed: RuntimeError: boom" in run.error
    assert not redis_client().exists(settings.PROFILE_AUDIT_LOCK_KEY)


@pytest.mark.django_db
def test_a_scheduled_run_past_its_deadline_skips_what_did_not_start(settings):
    settings.PROFILE_AUDIT_SHARD_SIZE = 1
    orphans = [ProfileFactory() for _ in range(3)]
    run = start_run(AuditRequest(fix=True, trigger="schedule", deadline=timedelta(hours=1)))
    first, *rest = run.shards.order_by("index")
    work_shard(shard_id=first.id)
    AuditRun.objects.filter(id=run.id).update(deadline=run.started_at)  # the deadline passes
    for shard in rest:
        audit_shard_task.delay(str(shard.id))

    run.refresh_from_db()
    assert run.status == AuditStatus.PARTIAL
    assert run.fixed == 1
    assert "not finished by the run's deadline" in run.error
    assert sorted(run.shards.values_list("status", flat=True)) == [
        ShardStatus.DONE,
        ShardStatus.SKIPPED,
        ShardStatus.SKIPPED,
    ]
    assert sum(1 for p in orphans if SocialProfile.objects.get(id=p.id).deleted_at) == 1
    assert not redis_client().exists(settings.PROFILE_AUDIT_LOCK_KEY)


@pytest.mark.django_db
def test_a_sync_job_sent_twice_creates_one_profile():
    asset = AssetFactory()
    org = asset.connection.organization
    first = sync_profile_task.delay(str(org.id), "facebook", asset.external_id).get()
    second = sync_profile_task.delay(str(org.id), "facebook", asset.external_id).get()
    assert first["action"] == "created"
    assert second == {"action": "unchanged", "profile_id": first["profile_id"]}
    profiles = SocialProfile.objects.filter(organization=org, external_id=asset.external_id)
    assert [str(p.id) for p in profiles] == [first["profile_id"]]
    assert profiles.get().connection_id == asset.connection_id


@pytest.mark.django_db
def test_a_delivery_never_reopens_a_shard_the_runs_closing_skipped(settings):
    from profiles.services.recording import close_run

    ProfileFactory()
    run = start_run(AuditRequest(fix=True))
    shard = run.shards.get()
    close_run(run, status=AuditStatus.INTERRUPTED, error="its process died")

    audit_shard_task.delay(str(shard.id))  # a late delivery

    shard.refresh_from_db()
    assert (shard.status, shard.attempts, shard.cursor) == (ShardStatus.SKIPPED, 0, None)
    assert not AuditFinding.objects.filter(run=run).exists()


@pytest.mark.django_db
def test_a_delivery_of_a_done_shard_finishes_a_run_left_unfinished():
    ProfileFactory()
    run = start_run(AuditRequest(fix=True))
    shard = run.shards.get()
    # The shard was closed, and its process died before finishing the run.
    AuditShard.objects.filter(id=shard.id).update(status=ShardStatus.DONE)

    audit_shard_task.delay(str(shard.id))

    run.refresh_from_db()
    assert run.status == AuditStatus.SUCCEEDED
