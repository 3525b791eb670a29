"""The scheduled audit task and its beat entry, as declared and as run in-process (eager).
Crossing the real broker to a real worker: tests/test_worker.py."""

import os
import signal

import pytest
from billiard.pool import soft_timeout_sighandler
from celery.exceptions import Retry, SoftTimeLimitExceeded
from django.conf import settings
from django.db import OperationalError
from django_celery_beat.models import PeriodicTask

from audit_project.celery import app as celery_app
from profiles.models import AuditRun, AuditStatus, AuditTrigger, SocialProfile
from profiles.services.run_lock import RunLockUnavailable
from profiles.tasks import TRANSIENT_ERRORS, SoftTimeLimit, audit_sync_task, sync_profile_task
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
    task = audit_sync_task
    assert (task.soft_time_limit, task.time_limit) == (540, 600)
    assert task.soft_time_limit < task.time_limit < settings.PROFILE_AUDIT_LOCK_TTL < SIX_HOURS


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
    assert row.kwargs == '{"fix": true}'
    assert row.expire_seconds == settings.PROFILE_AUDIT_SCHEDULE_EXPIRES
    assert row.expires is None
    # What beat sends with each message.
    assert entry.kwargs == {"fix": True}
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
    result = audit_sync_task.delay().get()
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


def test_the_soft_limit_signal_becomes_a_stop_request_instead_of_an_exception():
    previous = signal.signal(signal.SIGUSR1, soft_timeout_sighandler)  # as in a prefork child
    try:
        stop = SoftTimeLimit(540)
        assert stop() is None
        with stop.installed():
            os.kill(os.getpid(), signal.SIGUSR1)  # what the pool does at the soft limit
            assert stop() == "soft time limit reached (540 s)"
        assert signal.getsignal(signal.SIGUSR1) is soft_timeout_sighandler
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_the_soft_limit_signal_is_left_alone_outside_a_prefork_child():
    previous = signal.getsignal(signal.SIGUSR1)
    with SoftTimeLimit(540).installed():
        assert signal.getsignal(signal.SIGUSR1) is previous


@pytest.mark.django_db
def test_a_reached_soft_limit_ends_the_run_partial_unlocked_and_not_retried():
    profile = ProfileFactory()
    default = audit_sync_task.soft_time_limit
    audit_sync_task.soft_time_limit = 0.001  # reached before the first organization
    try:
        result = audit_sync_task.delay().get()
    finally:
        audit_sync_task.soft_time_limit = default
    assert result["status"] == AuditStatus.PARTIAL
    run = AuditRun.objects.get()  # one record: no retry
    assert run.error == "stopped early: soft time limit reached (0.001 s)"
    profile.refresh_from_db()
    assert profile.deleted_at is None
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
