"""The schedule belongs to the admin: its entries exist as soon as `migrate` has run (before beat
ever starts), and what an operator changes there survives beat's start and later migrations."""

import json

import pytest
from celery.schedules import crontab
from django.conf import settings
from django.core.management import call_command
from django_celery_beat.models import CrontabSchedule, PeriodicTask

from profiles.models import AuditRun, AuditTrigger
from profiles.schedule import AUDIT_ENTRY, audit_schedule_state
from profiles.tasks import audit_sync_task
from tests.factories import ProfileFactory
from tests.support import beat_scheduler


@pytest.mark.django_db
def test_the_entries_are_there_after_migrate_without_beat():
    # The test database was built by `migrate`; beat has not run in this test.
    rows = {row.name: row for row in PeriodicTask.objects.select_related("crontab")}
    assert set(settings.PROFILE_AUDIT_BEAT_ENTRIES) <= set(rows)
    audit = rows[AUDIT_ENTRY]
    assert audit.task == "profiles.audit_sync" and audit.enabled
    assert json.loads(audit.kwargs) == {"fix": True, "trigger": "schedule"}
    assert audit.queue == "maintenance"
    assert audit.expire_seconds == settings.PROFILE_AUDIT_SCHEDULE_EXPIRES
    assert (audit.crontab.minute, audit.crontab.hour) == ("0", "*/6")
    assert audit.crontab.schedule == crontab(minute="0", hour="*/6")
    prune = rows["prune-audit-runs"]
    assert (prune.crontab.minute, prune.crontab.hour) == ("30", "3")


def edit_in_admin(admin_client, task: PeriodicTask, **changes) -> None:
    """Save the entry's change form as an operator would, with some fields changed."""
    url = f"/admin/django_celery_beat/periodictask/{task.pk}/change/"
    form = admin_client.get(url).context["adminform"].form
    data = {
        name: ("" if value is None else value)
        for name, value in (
            (name, form[name].value()) for name in form.fields if form[name].value() is not None
        )
    }
    data = {k: v for k, v in data.items() if v is not False}
    data.update(changes)
    response = admin_client.post(url, data)
    assert response.status_code == 302, response.context["adminform"].form.errors


@pytest.mark.django_db(transaction=True)
def test_an_admin_edit_survives_beat_starting_and_migrate(admin_client):
    task = PeriodicTask.objects.get(name=AUDIT_ENTRY)
    every_four_hours, _ = CrontabSchedule.objects.get_or_create(
        minute="15", hour="*/4", day_of_week="*", day_of_month="*", month_of_year="*"
    )
    edit_in_admin(admin_client, task, crontab=every_four_hours.pk, enabled="")

    with beat_scheduler() as scheduler:
        # Beat reads the operator's schedule (disabled: not scheduled at all)...
        assert AUDIT_ENTRY not in scheduler.schedule
    call_command("migrate", verbosity=0)

    task.refresh_from_db()
    assert task.crontab_id == every_four_hours.pk
    assert not task.enabled
    assert PeriodicTask.objects.filter(name=AUDIT_ENTRY).count() == 1

    # ...and sends it on the edited crontab once enabled again.
    PeriodicTask.objects.filter(pk=task.pk).update(enabled=True)
    with beat_scheduler() as scheduler:
        assert scheduler.schedule[AUDIT_ENTRY].schedule == crontab(minute="15", hour="*/4")


@pytest.mark.django_db(transaction=True)
def test_a_deleted_entry_comes_back_at_the_next_migrate():
    PeriodicTask.objects.filter(name=AUDIT_ENTRY).delete()
    call_command("migrate", verbosity=0)
    assert PeriodicTask.objects.filter(name=AUDIT_ENTRY, enabled=True).exists()


@pytest.mark.django_db
def test_next_due_follows_the_crontab():
    state = audit_schedule_state()
    assert state.enabled and state.next_due is not None
    assert state.next_due.minute == 0 and state.next_due.hour % 6 == 0


@pytest.mark.django_db
def test_a_run_sent_by_hand_is_not_recorded_as_scheduled(committed):
    ProfileFactory()
    # What `celery call profiles.audit_sync` sends: no kwargs.
    committed(audit_sync_task.delay)
    # What beat sends: the entry's kwargs.
    committed(
        audit_sync_task.delay, **json.loads(PeriodicTask.objects.get(name=AUDIT_ENTRY).kwargs)
    )
    triggers = sorted(AuditRun.objects.values_list("trigger", flat=True))
    assert triggers == sorted([AuditTrigger.COMMAND, AuditTrigger.SCHEDULE])
