"""Retention of audit records: runs older than the retention period go, with their findings,
in short batches; the latest run of each organization (and the latest all-organization run)
always stays, so an operator can still see and revert the last thing the audit did there."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from django.utils import timezone

from audit_project.log_config import audit_logger
from profiles.models import AuditFinding, AuditRun
from profiles.selectors import prunable_runs


@dataclass(frozen=True)
class PruneReport:
    runs_deleted: int
    findings_deleted: int
    cutoff: str

    def as_json(self) -> dict[str, object]:
        return {
            "runs_deleted": self.runs_deleted,
            "findings_deleted": self.findings_deleted,
            "cutoff": self.cutoff,
        }


def prune_audit_runs(*, older_than_days: int, batch_size: int = 5000) -> PruneReport:
    """Delete prunable runs and their findings, at most ``batch_size`` rows per statement, each
    statement its own short transaction, so a large backlog never holds locks for long."""
    if older_than_days < 1 or batch_size < 1:
        raise ValueError("older_than_days and batch_size must be at least 1")
    cutoff = timezone.now() - timedelta(days=older_than_days)
    runs_deleted = findings_deleted = 0
    while run_ids := list(
        prunable_runs(cutoff=cutoff)
        .order_by("started_at")
        .values_list("id", flat=True)[:batch_size]
    ):
        while finding_ids := list(
            AuditFinding.objects.filter(run_id__in=run_ids).values_list("id", flat=True)[
                :batch_size
            ]
        ):
            findings_deleted += AuditFinding.objects.filter(id__in=finding_ids).delete()[0]
        # A revert of a pruned run stays; its reverted_run becomes empty (SET_NULL).
        _, deleted = AuditRun.objects.filter(id__in=run_ids).delete()
        runs_deleted += deleted.get(AuditRun._meta.label, 0)
    report = PruneReport(runs_deleted, findings_deleted, cutoff.isoformat())
    audit_logger().info("profile_audit.pruned", older_than_days=older_than_days, **report.as_json())
    return report
