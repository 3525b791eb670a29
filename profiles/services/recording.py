"""Run records, shared by the audit and by revert: findings and counts are written in the same
transaction as the work they describe, so a run's record never lags behind what it changed, and
a run is closed by recounting its findings — also a run whose process died (``interrupted``).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any
from uuid import UUID

from django.db import connection, transaction
from django.db.models import Count, F
from django.utils import timezone

from profiles.models import (
    OPEN_SHARD_STATUSES,
    AuditFinding,
    AuditRun,
    AuditShard,
    AuditStatus,
    FindingOutcome,
    FindingType,
    ShardStatus,
)
from profiles.plan import ALL_TYPES
from profiles.selectors import FINDING_CHANGE_FIELDS

# A run that has not progressed for this long has lost its process (the fixing-run lock
# expires after as long): dry runs and reverts, which hold no lock, are judged dead by it.
ABANDONED_AFTER = timedelta(minutes=60)


def empty_counts() -> dict[str, dict[str, int]]:
    """{type: {"found": 0, "fixed": 0}} for every finding type: the shape of ``by_type``; a
    missing profile's also counts ``sync_sent`` (sent to its sync job, not yet confirmed)."""
    counts = {t.value: {"found": 0, "fixed": 0} for t in ALL_TYPES}
    counts[FindingType.MISSING]["sync_sent"] = 0
    return counts


# Not frozen (a frozen dataclass pays object.__setattr__ per field, per finding); never changed.
@dataclass(slots=True)
class FindingRow:
    """One finding as recorded, before it has its place (``seq``) in the run."""

    organization_id: UUID | None
    type: str
    action: str
    model: str
    object_id: UUID | None
    platform: str
    external_id: str
    before: Any
    after: Any
    outcome: str
    detail: str = ""
    id: UUID = field(default_factory=uuid.uuid4)
    # Its drift record, whether it came back, and who changed its organization before
    # (profiles.services.drift fills them in the chunk's transaction).
    drift_id: UUID | None = None
    recurring: bool = False
    writers: list[dict[str, Any]] | None = None

    @property
    def fixed(self) -> bool:
        return self.outcome == FindingOutcome.FIXED


FINDING_COLUMNS = (
    "id",
    "run_id",
    "seq",
    *FINDING_CHANGE_FIELDS,
    "outcome",
    "detail",
    "drift_id",
    "recurring",
    "writers",
)


def record_findings(*, run_id: UUID, rows: Sequence[FindingRow], organizations: int) -> int:
    """Add ``rows`` to the run, numbered after its findings so far, and add them (and
    ``organizations`` audited) to its counts. Call it inside the transaction of the work the
    rows describe: the run's row stays locked until that commits, so concurrent shards number
    their findings without gaps or overlaps. Returns the first row's number (``seq``)."""
    found = len(rows)
    fixed = sum(1 for r in rows if r.fixed)
    if connection.vendor == "postgresql":
        # One round trip: the counts, and where this unit's findings start.
        with connection.cursor() as cursor:
            cursor.execute(
                f"UPDATE {AuditRun._meta.db_table} SET found = found + %s, fixed = fixed + %s, "
                "organizations_audited = organizations_audited + %s, "
                "findings_recorded = findings_recorded + %s, last_progress_at = %s "
                "WHERE id = %s RETURNING findings_recorded",
                [found, fixed, organizations, found, timezone.now(), run_id],
            )
            (last,) = cursor.fetchone()
    else:
        AuditRun.objects.filter(id=run_id).update(
            found=F("found") + found,
            fixed=F("fixed") + fixed,
            organizations_audited=F("organizations_audited") + organizations,
            findings_recorded=F("findings_recorded") + found,
            last_progress_at=timezone.now(),
        )
        last = AuditRun.objects.filter(id=run_id).values_list("findings_recorded", flat=True).get()
    first_seq: int = last - found + 1
    if rows:
        _insert(run_id, rows, first_seq=first_seq)
    return first_seq


def _insert(run_id: UUID, rows: Sequence[FindingRow], *, first_seq: int) -> None:
    if connection.vendor == "postgresql":
        from psycopg.types.json import Jsonb

        table = AuditFinding._meta.db_table
        # An organization's findings share one list of writers: dumped once (as JSON text,
        # which COPY hands to the jsonb column as it is).
        writers: dict[int, str] = {}

        def writers_text(value: list[dict[str, Any]] | None) -> str | None:
            if value is None:
                return None
            if (text := writers.get(id(value))) is None:
                text = writers[id(value)] = json.dumps(value)
            return text

        # Most before/after values repeat within a chunk ({"deleted_at": null}, the time of the
        # fix): each distinct one made of strings and nulls only is dumped once, as JSON text.
        dumped: dict[tuple[tuple[str, str | None], ...], str] = {}

        def json_text(value: Any) -> Any:
            if value is None:
                return None
            if type(value) is dict and all(v is None or type(v) is str for v in value.values()):
                key = tuple(value.items())
                if (text := dumped.get(key)) is None:
                    text = dumped[key] = json.dumps(value)
                return text
            return Jsonb(value)

        with (
            connection.cursor() as cursor,
            cursor.cursor.copy(f"COPY {table} ({', '.join(FINDING_COLUMNS)}) FROM STDIN") as copy,
        ):
            for seq, r in enumerate(rows, start=first_seq):
                copy.write_row(
                    (
                        r.id,
                        run_id,
                        seq,
                        r.organization_id,
                        r.type,
                        r.action,
                        r.model,
                        r.object_id,
                        r.platform,
                        r.external_id,
                        json_text(r.before),
                        json_text(r.after),
                        r.outcome,
                        r.detail,
                        r.drift_id,
                        r.recurring,
                        writers_text(r.writers),
                    )
                )
        return
    AuditFinding.objects.bulk_create(
        [
            AuditFinding(
                id=r.id,
                run_id=run_id,
                seq=seq,
                organization_id=r.organization_id,
                type=r.type,
                action=r.action,
                model=r.model,
                object_id=r.object_id,
                platform=r.platform,
                external_id=r.external_id,
                before=r.before,
                after=r.after,
                outcome=r.outcome,
                detail=r.detail,
                drift_id=r.drift_id,
                recurring=r.recurring,
                writers=r.writers,
            )
            for seq, r in enumerate(rows, start=first_seq)
        ],
        batch_size=1000,
    )


def mark_findings_failed(*, run_id: UUID, finding_ids: Sequence[UUID], error: str) -> int:
    """Findings recorded ``sent`` whose sync job could not be sent after their commit: failed
    (they were never counted as fixed)."""
    return AuditFinding.objects.filter(
        id__in=list(finding_ids), outcome=FindingOutcome.SENT
    ).update(outcome=FindingOutcome.FAILED, detail=error)


@dataclass(frozen=True)
class SentFinding:
    """A finding recorded ``sent`` (its sync job was sent), and what became of it."""

    id: UUID
    run_id: UUID
    type: str


def settle_sent_findings(findings: Iterable[SentFinding], *, outcome: str, detail: str = "") -> int:
    """Turn ``sent`` findings into ``outcome`` (fixed: their profile exists now; stale: their
    key is no longer selected) and count them on their runs, atomically, whether a run is
    still going (its ``fixed``; ``by_type`` is recounted when it closes) or already closed (its
    ``fixed`` and ``by_type`` too). Findings no longer ``sent`` are left as they are, so two
    confirmations of one finding count it once. Returns how many changed."""
    groups: dict[tuple[UUID, str], list[UUID]] = {}
    for f in findings:
        groups.setdefault((f.run_id, f.type), []).append(f.id)
    if not groups:
        return 0
    changed = 0
    with transaction.atomic():
        # The runs' rows first, in id order (as close_run takes one): a closing run is either
        # closed before (its by_type is amended here) or recounts after this commits.
        runs = {
            run.id: run
            for run in AuditRun.objects.select_for_update()
            .filter(id__in={run_id for run_id, _ in groups})
            .order_by("id")
            .only("id", "status", "fixed", "by_type")
        }
        for (run_id, type_), ids in sorted(groups.items(), key=lambda g: (g[0][0].int, g[0][1])):
            n = AuditFinding.objects.filter(id__in=ids, outcome=FindingOutcome.SENT).update(
                outcome=outcome, detail=detail
            )
            changed += n
            run = runs.get(run_id)
            if not n or run is None:
                continue
            fixed = n if outcome == FindingOutcome.FIXED else 0
            if run.status == AuditStatus.RUNNING:
                if fixed:
                    AuditRun.objects.filter(id=run_id).update(fixed=F("fixed") + fixed)
                continue
            counts = (run.by_type or {}).setdefault(type_, {"found": 0, "fixed": 0})
            counts["fixed"] = counts.get("fixed", 0) + fixed
            counts["sync_sent"] = max(0, counts.get("sync_sent", 0) - n)
            run.fixed += fixed
            run.save(update_fields=["fixed", "by_type"])
    return changed


# --- Closing a run ------------------------------------------------------------------------------


def counts_from_findings(run_id: UUID) -> dict[str, dict[str, int]]:
    """The run's ``by_type`` recounted from its findings: what it really did."""
    counts = empty_counts()
    for type_, outcome, n in (
        AuditFinding.objects.filter(run_id=run_id)
        .order_by()
        .values_list("type", "outcome")
        .annotate(n=Count("id"))
    ):
        entry = counts.setdefault(type_, {"found": 0, "fixed": 0})
        entry["found"] += n
        if outcome == FindingOutcome.FIXED:
            entry["fixed"] += n
        elif outcome == FindingOutcome.SENT:
            entry["sync_sent"] = entry.get("sync_sent", 0) + n
    return counts


def guarded_organizations(run_id: UUID) -> list[str]:
    return sorted(
        str(org)
        for org in AuditFinding.objects.filter(run_id=run_id, outcome=FindingOutcome.GUARDED)
        .order_by()
        .values_list("organization_id", flat=True)
        .distinct()
        if org
    )


def left_alone(run_id: UUID) -> bool:
    """Whether the run left findings alone on purpose — guarded (the guard, the run budget) or
    held (a fight): either leaves it partial."""
    return AuditFinding.objects.filter(
        run_id=run_id, outcome__in=(FindingOutcome.GUARDED, FindingOutcome.HELD)
    ).exists()


def shard_failures(run_id: UUID) -> tuple[dict[str, str], list[str]]:
    """({organization id: error} over the run's shards, ["shard N: why"] for shards that did
    not finish)."""
    failed: dict[str, str] = {}
    unfinished = []
    for index, status, error, orgs in AuditShard.objects.filter(run_id=run_id).values_list(
        "index", "status", "error", "failed_organizations"
    ):
        failed.update(orgs or {})
        if status != ShardStatus.DONE:
            unfinished.append(f"shard {index} {status}" + (f": {error}" if error else ""))
    return failed, unfinished


def close_run(
    run: AuditRun,
    *,
    status: str,
    error: str = "",
    failed_organizations: dict[str, str] | None = None,
) -> bool:
    """Close a running run with counts recounted from its findings. False when somebody else
    closed it first (two shards finishing at once, or an interrupted run's late shard)."""
    now = timezone.now()
    with transaction.atomic():
        locked = AuditRun.objects.select_for_update().filter(id=run.id).first()
        if locked is None or locked.status != AuditStatus.RUNNING:
            return False
        by_type = counts_from_findings(run.id)
        run.status = status
        run.error = error
        run.by_type = by_type
        run.found = sum(c["found"] for c in by_type.values())
        run.fixed = sum(c["fixed"] for c in by_type.values())
        run.organizations_audited = locked.organizations_audited
        run.findings_recorded = locked.findings_recorded
        run.failed_organizations = failed_organizations or {}
        run.guarded_organizations = guarded_organizations(run.id)
        run.finished_at = now
        run.duration_seconds = round((now - run.started_at).total_seconds(), 3)
        run.lock_token = ""
        run.save()
        AuditShard.objects.filter(run_id=run.id, status__in=OPEN_SHARD_STATUSES).update(
            status=ShardStatus.SKIPPED, finished_at=now, error=f"the run was closed {status}"
        )
    return True
