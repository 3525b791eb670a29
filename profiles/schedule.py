"""The beat schedule lives in django-celery-beat's tables, where the admin edits it. Its entries
(``PROFILE_AUDIT_BEAT_ENTRIES``) are created after ``migrate`` when they are missing, and never
touched again, so what an operator sets in the admin stays set. Also: when the scheduled audit
is next due, for the dashboard."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.apps import AppConfig
from django.conf import settings
from django.db import transaction
from django.utils import timezone
from django_celery_beat.models import CrontabSchedule, IntervalSchedule, PeriodicTask

from profiles import run_state

AUDIT_ENTRY = "profile-connection-sync-audit"
CHANGES_ENTRY = "profile-connection-sync-audit-changes"
KEPT_OPTIONS = ("queue", "exchange", "routing_key", "priority", "expire_seconds")


def install_beat_entries(*, using: str = "default") -> list[str]:
    """Create every declared entry that does not exist yet; return the names created."""
    created = []
    with transaction.atomic(using=using):
        existing = set(PeriodicTask.objects.using(using).values_list("name", flat=True))
        for name, entry in settings.PROFILE_AUDIT_BEAT_ENTRIES.items():
            if name in existing:
                continue
            PeriodicTask.objects.using(using).create(
                name=name, **_periodic_task_fields(entry, using=using)
            )
            created.append(name)
    return created


def _periodic_task_fields(entry: dict[str, Any], *, using: str) -> dict[str, Any]:
    schedule = entry["schedule"]
    if hasattr(schedule, "run_every"):
        interval = IntervalSchedule.from_schedule(schedule)
        interval.save(using=using)
        when = {"interval": interval}
    else:
        crontab = CrontabSchedule.from_schedule(schedule)
        crontab.save(using=using)
        when = {"crontab": crontab}
    options = entry.get("options", {})
    unknown = set(options) - set(KEPT_OPTIONS)
    if unknown:
        raise ValueError(f"beat entry options not stored by django-celery-beat: {sorted(unknown)}")
    return {
        "task": entry["task"],
        "args": json.dumps(entry.get("args", [])),
        "kwargs": json.dumps(entry.get("kwargs", {})),
        "description": entry.get("description", ""),
        **{key: options[key] for key in KEPT_OPTIONS if key in options},
        **when,
    }


def install_beat_entries_after_migrate(
    sender: AppConfig, *, using: str = "default", **kwargs: Any
) -> None:
    """post_migrate receiver (also after a test database flush, which empties the tables).
    Skipped when beat's tables are not there (``migrate django_celery_beat zero``)."""
    if _beat_tables_exist(using):
        install_beat_entries(using=using)


def _beat_tables_exist(using: str) -> bool:
    from django.db import connections

    return PeriodicTask._meta.db_table in connections[using].introspection.table_names()


def scheduled_audit_problem() -> str | None:
    """Why the scheduled audit counts as late, or None: the last scheduled run completed
    (succeeded or partial) longer ago than the period plus the grace; before the first one,
    measured from when the entry was created or last changed. Switched off: not late."""
    now = timezone.now()
    allowed = timedelta(
        seconds=settings.PROFILE_AUDIT_SCHEDULE_PERIOD + settings.PROFILE_AUDIT_SCHEDULE_GRACE
    )
    entry = PeriodicTask.objects.filter(name=AUDIT_ENTRY).values("enabled", "date_changed").first()
    if entry is None:
        return (
            f"the schedule entry {AUDIT_ENTRY!r} is missing; run `manage.py migrate` to create it"
        )
    if not entry["enabled"]:
        return None
    run = run_state.last_completed_scheduled_run()
    if run is not None and run.finished_at is not None:
        since = run.finished_at
        what = f"the last scheduled run completed at {since:%Y-%m-%d %H:%M} UTC"
    else:
        since = entry["date_changed"]
        what = f"no scheduled run has completed since the schedule was set at {since:%Y-%m-%d %H:%M} UTC"
    if now - since > allowed:
        return f"{what}, more than {_hours(allowed)} ago (period plus grace)"
    return None


def _hours(delta: timedelta) -> str:
    return f"{delta.total_seconds() / 3600:g} h"


@dataclass(frozen=True)
class ScheduleState:
    """The scheduled audit's entry as beat sees it."""

    exists: bool
    enabled: bool = False
    description: str = ""
    next_due: datetime | None = None
    last_sent: datetime | None = None
    admin_id: int | None = None


def audit_schedule_state(*, now: datetime | None = None) -> ScheduleState:
    now = now or timezone.now()
    task = (
        PeriodicTask.objects.select_related("crontab", "interval", "solar", "clocked")
        .filter(name=AUDIT_ENTRY)
        .first()
    )
    if task is None:
        return ScheduleState(exists=False)
    described = str(task.crontab or task.interval or task.solar or task.clocked or "")
    if not task.enabled:
        return ScheduleState(
            exists=True,
            enabled=False,
            description=described,
            admin_id=task.pk,
            last_sent=task.last_run_at,
        )
    schedule = task.schedule
    # Beat's own arithmetic: the time left from the last send (or, never sent, from now).
    remaining = schedule.remaining_estimate(task.last_run_at or now)
    # Rounded: the estimate is taken a moment after `now`, and the schedule is in whole minutes.
    next_due = _round_to_second(now + max(remaining, timedelta(0)))
    return ScheduleState(
        exists=True,
        enabled=True,
        description=described,
        next_due=next_due,
        last_sent=task.last_run_at,
        admin_id=task.pk,
    )


def _round_to_second(value: datetime) -> datetime:
    return (value + timedelta(microseconds=500_000)).replace(microsecond=0)


def change_backlog_problem(backlog: run_state.ChangeBacklog | None = None) -> str | None:
    """Why the change-driven runs count as behind, or None: a change mark older than
    PROFILE_AUDIT_CHANGES_MAX_BACKLOG_AGE is still not cleared. Their beat entry switched off:
    not behind (the sweep still resyncs)."""
    entry = PeriodicTask.objects.filter(name=CHANGES_ENTRY).values("enabled").first()
    if entry is None or not entry["enabled"]:
        return None
    oldest = (backlog or run_state.change_backlog()).oldest_mark_at
    limit = timedelta(seconds=settings.PROFILE_AUDIT_CHANGES_MAX_BACKLOG_AGE)
    if oldest is not None and timezone.now() - oldest > limit:
        age = (timezone.now() - oldest).total_seconds()
        return (
            f"the change-driven runs are behind: the oldest change mark is {age:.0f} s old, "
            f"more than PROFILE_AUDIT_CHANGES_MAX_BACKLOG_AGE ({limit.total_seconds():g} s); "
            "is a worker taking the maintenance queue, and beat running?"
        )
    return None
