"""Retention of audit records: runs older than the retention period go, with their findings,
in short batches; the latest run of each scope (each organization's own runs, and the
all-organization runs) always stays.

What a restore needs outlives its run: a queue setting an audit soft-deleted because its profile
was dead comes back with the profile however long ago that was (DESIGN "Nothing is lost"), so
before a run's findings go, those deletions are kept as ``StaleQueueSettingDeletion`` records.
Runs themselves go whole: a run in the admin always shows every finding it recorded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from uuid import UUID

from django.conf import settings
from django.utils import timezone

from audit_project.log_config import audit_logger
from profiles.models import AuditFinding, AuditRun, AuditStatus, StaleQueueSettingDeletion
from profiles.selectors import prunable_runs, stale_queue_setting_deletions
from profiles.services.drift import prune_quiet_records


@dataclass(frozen=True)
class PruneReport:
    runs_deleted: int
    findings_deleted: int
    cutoff: str
    queue_setting_deletions_kept: int = 0
    """Stale queue setting deletions kept, from pruned findings, for a later restore."""
    dry_run_findings_deleted: int = 0
    dry_run_cutoff: str = ""
    drift_records_deleted: int = 0
    """Drift records not seen for PROFILE_AUDIT_DRIFT_RETENTION_DAYS (they outlive runs)."""

    def as_json(self) -> dict[str, object]:
        return {
            "runs_deleted": self.runs_deleted,
            "findings_deleted": self.findings_deleted,
            "cutoff": self.cutoff,
            "queue_setting_deletions_kept": self.queue_setting_deletions_kept,
            "dry_run_findings_deleted": self.dry_run_findings_deleted,
            "dry_run_cutoff": self.dry_run_cutoff,
            "drift_records_deleted": self.drift_records_deleted,
        }


def prune_dry_run_findings(*, older_than_days: int, batch_size: int = 5000) -> tuple[int, str]:
    """Delete the findings of dry runs that finished before the cutoff, in short batches. A
    dry run changed nothing, so nothing needs them to be undone; the run and its counts stay
    (for the chart, the metrics and the run list) until the runs' own retention."""
    if older_than_days < 1 or batch_size < 1:
        raise ValueError("older_than_days and batch_size must be at least 1")
    cutoff = timezone.now() - timedelta(days=older_than_days)
    old_dry_runs = AuditRun.objects.filter(fix=False, finished_at__lt=cutoff).exclude(
        status=AuditStatus.RUNNING
    )
    deleted = 0
    while finding_ids := list(
        AuditFinding.objects.filter(run__in=old_dry_runs).values_list("id", flat=True)[:batch_size]
    ):
        deleted += AuditFinding.objects.filter(id__in=finding_ids).delete()[0]
    return deleted, cutoff.isoformat()


def prune_audit_runs(
    *, older_than_days: int, batch_size: int = 5000, dry_run_findings_days: int | None = None
) -> PruneReport:
    """Delete prunable runs and their findings, at most ``batch_size`` rows per statement, each
    statement its own short transaction, so a large backlog never holds locks for long."""
    if older_than_days < 1 or batch_size < 1:
        raise ValueError("older_than_days and batch_size must be at least 1")
    cutoff = timezone.now() - timedelta(days=older_than_days)
    runs_deleted = findings_deleted = kept = 0
    while run_ids := list(
        prunable_runs(cutoff=cutoff)
        .order_by("started_at")
        .values_list("id", flat=True)[:batch_size]
    ):
        # Before any of their findings go (and idempotent: a prune cut short after this step
        # keeps nothing twice when it runs again).
        kept += _keep_queue_setting_deletions(run_ids=run_ids, batch_size=batch_size)
        while finding_ids := list(
            AuditFinding.objects.filter(run_id__in=run_ids).values_list("id", flat=True)[
                :batch_size
            ]
        ):
            findings_deleted += AuditFinding.objects.filter(id__in=finding_ids).delete()[0]
        # A revert of a pruned run stays; its reverted_run becomes empty (SET_NULL).
        _, deleted = AuditRun.objects.filter(id__in=run_ids).delete()
        runs_deleted += deleted.get(AuditRun._meta.label, 0)
    dry_days = (
        settings.PROFILE_AUDIT_DRY_RUN_RETENTION_DAYS
        if dry_run_findings_days is None
        else dry_run_findings_days
    )
    dry_deleted, dry_cutoff = prune_dry_run_findings(
        older_than_days=min(dry_days, older_than_days), batch_size=batch_size
    )
    # Drift records are small and outlive the findings that link them (never sooner than runs).
    quiet_days = max(settings.PROFILE_AUDIT_DRIFT_RETENTION_DAYS, older_than_days)
    drift_deleted = prune_quiet_records(
        before=timezone.now() - timedelta(days=quiet_days), batch_size=batch_size
    )
    report = PruneReport(
        runs_deleted,
        findings_deleted,
        cutoff.isoformat(),
        queue_setting_deletions_kept=kept,
        dry_run_findings_deleted=dry_deleted,
        dry_run_cutoff=dry_cutoff,
        drift_records_deleted=drift_deleted,
    )
    audit_logger().info("profile_audit.pruned", older_than_days=older_than_days, **report.as_json())
    return report


def _keep_queue_setting_deletions(*, run_ids: Sequence[UUID], batch_size: int) -> int:
    """Record, apart from these runs, the queue settings their fixes soft-deleted as stale: a
    restore recognises them by these records once the findings are gone. Every such deletion is
    kept, whatever the setting's state now: a revert can put back exactly that ``deleted_at``
    later, and a restore after it must then bring the setting back."""
    kept = 0
    last: UUID | None = None
    while page := stale_queue_setting_deletions(
        run_ids=run_ids, after_finding=last, limit=batch_size
    ):
        records = [
            StaleQueueSettingDeletion(
                queue_setting_id=setting_id, deleted_at=deleted_at, run_id=run
            )
            for _, setting_id, after, run in page
            # The setting exists (the selector's join), so its finding names it.
            if setting_id is not None and (deleted_at := _deleted_at(after)) is not None
        ]
        StaleQueueSettingDeletion.objects.bulk_create(records, ignore_conflicts=True)
        kept += len(records)
        last = page[-1][0]
    return kept


def _deleted_at(after: object) -> datetime | None:
    """The ``deleted_at`` a fix recorded; None when the record is malformed (bad data is
    skipped, never fatal)."""
    value = after.get("deleted_at") if isinstance(after, dict) else None
    try:
        return datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        return None
