"""Reads for operating the audit: the last runs, the state of the schedule, open shards. One
module behind /metrics, /health/ and the admin's dashboard, so the three never disagree."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from django.db import connection
from django.db.models import Count, QuerySet
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from orgs.models import Organization
from profiles.models import (
    OPEN_SHARD_STATUSES,
    AuditFinding,
    AuditRun,
    AuditShard,
    AuditStatus,
    AuditTrigger,
    ChangeLoop,
    ChangeMark,
    DriftRecord,
    DriftState,
    FindingOutcome,
    ShardStatus,
    UnsettledOrganization,
)

# A scheduled run "completed" when it went through its organizations: all fixed (succeeded) or
# some guarded, failed on their own data or cut off (partial). Failed, interrupted and skipped
# runs did not, and running ones have not yet.
COMPLETED = (AuditStatus.SUCCEEDED, AuditStatus.PARTIAL)


def last_run_per_trigger() -> dict[str, AuditRun]:
    """The latest run (by start) of each trigger that has one: one indexed query per trigger."""
    latest = {}
    for trigger in AuditTrigger.values:
        run = AuditRun.objects.filter(trigger=trigger).order_by("-started_at").first()
        if run is not None:
            latest[trigger] = run
    return latest


def last_scheduled_run() -> AuditRun | None:
    return AuditRun.objects.filter(trigger=AuditTrigger.SCHEDULE).order_by("-started_at").first()


def last_completed_scheduled_run() -> AuditRun | None:
    return (
        AuditRun.objects.filter(trigger=AuditTrigger.SCHEDULE, status__in=COMPLETED)
        .order_by("-started_at")
        .first()
    )


# A run "finished" when it ended one way or another, not counting runs that never started work
# because the lock was held (skipped): the alerts judge the last of these.
FINISHED = (*COMPLETED, AuditStatus.FAILED, AuditStatus.INTERRUPTED)


def last_finished_scheduled_run() -> AuditRun | None:
    """The latest scheduled run that ran and ended (succeeded, partial, failed, interrupted): a
    failure stays the last word until a later run ends, not until a retry starts."""
    return (
        AuditRun.objects.filter(trigger=AuditTrigger.SCHEDULE, status__in=FINISHED)
        .order_by("-started_at")
        .first()
    )


def failed_shards(run: AuditRun) -> int:
    return AuditShard.objects.filter(run=run, status=ShardStatus.FAILED).count()


def last_successful_scheduled_run() -> AuditRun | None:
    return (
        AuditRun.objects.filter(trigger=AuditTrigger.SCHEDULE, status=AuditStatus.SUCCEEDED)
        .order_by("-started_at")
        .first()
    )


def runs_by_trigger_and_status() -> dict[tuple[str, str], int]:
    rows = AuditRun.objects.values_list("trigger", "status").annotate(n=Count("id")).order_by()
    return {(trigger, status): n for trigger, status, n in rows}


def open_shards_by_status() -> dict[str, int]:
    rows = (
        AuditShard.objects.filter(status__in=OPEN_SHARD_STATUSES)
        .values_list("status")
        .annotate(n=Count("id"))
        .order_by()
    )
    counts: dict[str, int] = {status: 0 for status in OPEN_SHARD_STATUSES}
    counts.update(dict(rows))
    return counts


def guarded_organization_ids(run: AuditRun) -> list[str]:
    """Organizations the guard or the run budget held in this run: those the run listed, and
    those with guarded findings (one indexed query on (run, outcome))."""
    from_findings = (
        AuditFinding.objects.filter(run=run, outcome=FindingOutcome.GUARDED)
        .exclude(organization_id__isnull=True)
        .values_list("organization_id", flat=True)
        .distinct()
    )
    ids = dict.fromkeys(str(i) for i in run.guarded_organizations or [])
    ids.update(dict.fromkeys(str(i) for i in from_findings))
    return list(ids)


def failed_organization_errors(run: AuditRun) -> dict[str, str]:
    return {str(k): str(v) for k, v in (run.failed_organizations or {}).items()}


def run_holding_lock(token: str) -> AuditRun | None:
    """The run that recorded this lock token as its own, if any (a command may hold the lock
    for a moment before its record exists)."""
    if not token:
        return None
    return AuditRun.objects.filter(lock_token=token).order_by("-started_at").first()


def recent_runs(*, limit: int) -> list[AuditRun]:
    """The last ``limit`` runs that audited something (skipped runs did not), oldest first."""
    runs = list(
        AuditRun.objects.exclude(status=AuditStatus.SKIPPED)
        .exclude(trigger=AuditTrigger.REVERT)
        .order_by("-started_at")
        .only("id", "started_at", "trigger", "fix", "status", "found", "fixed")[:limit]
    )
    runs.reverse()
    return runs


@dataclass(frozen=True)
class NamedOrganization:
    id: str
    name: str | None  # None: the organization is gone


def organizations_named(ids: list[str], *, limit: int) -> tuple[list[NamedOrganization], int]:
    """The first ``limit`` of these organization ids with their names (one query), and how many
    there are in all."""
    shown = ids[:limit]
    names: dict[uuid.UUID | None, str] = dict(
        Organization.objects.filter(
            id__in=[_uuid_or_none(i) for i in shown if _uuid_or_none(i)]
        ).values_list("id", "name")
    )
    named = [NamedOrganization(i, names.get(_uuid_or_none(i))) for i in shown]
    return named, len(ids)


def _uuid_or_none(value: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(str(value))
    except ValueError:
        return None


# --- Change-driven runs ----------------------------------------------------------------------


@dataclass(frozen=True)
class ChangeBacklog:
    """What the change-driven runs have still to audit, read now, and their loop's heartbeat."""

    marked: int
    unsettled: int
    organizations: int
    oldest_mark_at: datetime | None
    last_checked_at: datetime | None


def change_backlog() -> ChangeBacklog:
    """One query: marks (how many, the oldest), unsettled organizations (and those of them no
    mark names), and the loop's last check."""
    marks, unsettled = ChangeMark._meta.db_table, UnsettledOrganization._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT (SELECT count(*) FROM {marks}), (SELECT min(first_marked_at) FROM {marks}), "
            f"(SELECT count(*) FROM {unsettled}), "
            f"(SELECT count(*) FROM {unsettled} u WHERE NOT EXISTS "
            f"(SELECT 1 FROM {marks} m WHERE m.organization_id = u.organization_id)), "
            f"(SELECT last_checked_at FROM {ChangeLoop._meta.db_table} WHERE name = %s)",
            ["changes"],
        )
        marked, oldest, unsettled_n, unmarked_unsettled, checked = cursor.fetchone()
    return ChangeBacklog(
        marked=marked,
        unsettled=unsettled_n,
        organizations=marked + unmarked_unsettled,
        oldest_mark_at=_moment(oldest),
        last_checked_at=_moment(checked),
    )


def _moment(value: object) -> datetime | None:
    """A datetime read by raw SQL: PostgreSQL gives one; SQLite gives its text (stored in UTC)."""
    if value is None or isinstance(value, datetime):
        return value
    parsed = parse_datetime(str(value))
    if parsed is not None and timezone.is_naive(parsed):
        parsed = timezone.make_aware(parsed, UTC)
    return parsed


def last_finished_change_run() -> AuditRun | None:
    return (
        AuditRun.objects.filter(trigger=AuditTrigger.CHANGES, status__in=FINISHED)
        .order_by("-started_at")
        .first()
    )


def last_successful_change_run() -> AuditRun | None:
    return (
        AuditRun.objects.filter(trigger=AuditTrigger.CHANGES, status=AuditStatus.SUCCEEDED)
        .order_by("-started_at")
        .first()
    )


# --- Drift history (DESIGN "Drift history and fights") ---------------------------------------

# "This week": recurring drift is judged on records that came back within this window.
RECURRING_WINDOW = timedelta(days=7)
# Drift that came back after a fix or a resolution: recurring, or fighting (fixing held).
COMES_BACK = (DriftState.RECURRING, DriftState.FIGHTING)
# How a record with no named writer is counted (the triggers named nobody, or no mark was left).
UNKNOWN_WRITER = "unknown"
OTHER_WRITERS = "other"


def drift_by_state_and_type() -> dict[tuple[str, str], int]:
    """Drift records per (state, type): one grouped query."""
    rows = DriftRecord.objects.values_list("state", "type").annotate(n=Count("id")).order_by()
    return {(state, type_): n for state, type_, n in rows}


def fights() -> QuerySet[DriftRecord]:
    """Records whose fixing is held: fighting another writer (until resumed, or resolved for one
    window; a held record may read *resolved* meanwhile)."""
    return DriftRecord.objects.filter(held_since__isnull=False)


def fights_held() -> int:
    return fights().count()


def recurring_drift(*, now: datetime | None = None) -> QuerySet[DriftRecord]:
    """Records recurring or fighting seen within the last RECURRING_WINDOW (a scan: the table is
    small, and an index on the columns every run rewrites would cost the runs more)."""
    since = (now or timezone.now()) - RECURRING_WINDOW
    # (seen_at: with_sightings' annotation, which django-stubs does not follow into a method.)
    return DriftRecord.objects.with_sightings().filter(  # type: ignore[misc]
        state__in=COMES_BACK, seen_at__gte=since
    )


def recurring_drift_by_writer(*, now: datetime | None = None) -> dict[str, int]:
    """Recurring drift of the last RECURRING_WINDOW per writer that undid it (``undone_by``;
    UNKNOWN_WRITER for none), most first: one grouped query."""
    rows = (
        recurring_drift(now=now)
        .values_list("undone_by")
        .annotate(n=Count("id"))
        .order_by()  # sorted below, once '' and UNKNOWN_WRITER are one
    )
    counts: dict[str, int] = {}
    for writer, n in rows:
        name = writer or UNKNOWN_WRITER
        counts[name] = counts.get(name, 0) + n
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def bounded_writers(counts: dict[str, int], *, top: int) -> dict[str, int]:
    """The ``top`` writers by count; the rest summed as OTHER_WRITERS, UNKNOWN_WRITER apart
    (always present, as is OTHER_WRITERS): at most ``top`` + 2 label values whatever the
    writers."""
    named = [(w, n) for w, n in counts.items() if w not in (UNKNOWN_WRITER, OTHER_WRITERS)]
    bounded = dict(named[:top])
    bounded[OTHER_WRITERS] = sum(n for _, n in named[top:]) + counts.get(OTHER_WRITERS, 0)
    bounded[UNKNOWN_WRITER] = counts.get(UNKNOWN_WRITER, 0)
    return bounded


def recurring_drift_by_organization(
    *, limit: int, now: datetime | None = None
) -> list[tuple[NamedOrganization, int]]:
    """The ``limit`` organizations with the most recurring drift of the last RECURRING_WINDOW,
    with their names: two queries."""
    rows = list(
        recurring_drift(now=now)
        .values_list("organization_id")
        .annotate(n=Count("id"))
        .order_by("-n", "organization_id")[:limit]
    )
    named, _ = organizations_named([str(org) for org, _ in rows], limit=limit)
    return [(org, n) for org, (_, n) in zip(named, rows, strict=True)]
