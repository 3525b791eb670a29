"""The audit: detect (one plan per organization), report it, and with ``fix`` apply it.

The command, the Celery task and the admin are thin interfaces over
``ProfileConnectionAuditService``. The semantics live in ``profiles.plan``; this module decides
nothing of its own: it walks organizations, records every run and finding, and applies each
organization's plan in its own transaction under the organization's lock, after re-checking it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from uuid import UUID

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from audit_project.log_config import audit_logger
from orgs.models import Organization
from profiles.models import (
    AuditFinding,
    AuditRun,
    AuditStatus,
    AuditTrigger,
    FindingOutcome,
    FindingType,
)
from profiles.plan import (
    ALL_TYPES,
    SCOPES,
    Finding,
    Guard,
    OrgPlan,
    find_cleanup_findings,
    find_profile_findings,
    plan_organization,
    types_for_scopes,
)
from profiles.selectors import load_snapshots, organization_id_chunks
from profiles.services.changes import (
    Change,
    apply_cleanup_findings,
    apply_profile_findings,
    planned_change,
)
from profiles.services.organization_lock import lock_organization
from profiles.services.soft_delete import ProfileSoftDeleteService

ProgressCallback = Callable[[int, int], None]
"""Called with (organizations done, organizations in all) after each chunk."""
StopCheck = Callable[[], str | None]
"""Called before each organization is fixed; a returned reason stops the run there."""


class UnknownOrganization(ValueError):
    pass


# --- Reports ------------------------------------------------------------------------------------


def empty_counts() -> dict[str, dict[str, int]]:
    """{type: {"found": 0, "fixed": 0}} for every finding type: the shape of ``by_type``."""
    return {t.value: {"found": 0, "fixed": 0} for t in ALL_TYPES}


@dataclass
class OrgReport:
    organization_id: UUID
    by_type: dict[str, dict[str, int]] = field(default_factory=empty_counts)
    guarded: bool = False
    error: str = ""

    @property
    def found(self) -> int:
        return sum(c["found"] for c in self.by_type.values())

    @property
    def fixed(self) -> int:
        return sum(c["fixed"] for c in self.by_type.values())

    def as_json(self) -> dict[str, object]:
        return {
            "org_id": str(self.organization_id),
            "totals": {"found": self.found, "fixed": self.fixed},
            "by_type": self.by_type,
            "guarded": self.guarded,
            "error": self.error or None,
        }


@dataclass
class RunReport:
    """A finished run: its record, and the organizations that had something to report."""

    run: AuditRun
    organizations: list[OrgReport]
    findings_recorded: int = 0

    def as_json(self) -> dict[str, object]:
        run = self.run
        return {
            "run_id": str(run.id),
            "fix": run.fix,
            "status": run.status,
            "organization": str(run.organization_id) if run.organization_id else None,
            "types": run.types,
            "organizations_audited": run.organizations_audited,
            "totals": {"found": run.found, "fixed": run.fixed},
            "by_type": run.by_type,
            "organizations": [o.as_json() for o in self.organizations],
            "duration_seconds": run.duration_seconds,
            "error": run.error or None,
        }


# --- Recording ----------------------------------------------------------------------------------


class RunRecorder:
    """Writes a run's findings and keeps its counts; ``finish`` closes the AuditRun."""

    def __init__(self, run: AuditRun) -> None:
        self.run = run
        self.seq = 0
        self.by_type = empty_counts()
        self.organizations: list[OrgReport] = []
        self.failed: dict[str, str] = {}
        self.audited = 0
        self._started = time.monotonic()

    def findings(
        self,
        organization_id: UUID,
        entries: Iterable[tuple[Change, str, str]],
    ) -> tuple[OrgReport, list[AuditFinding]]:
        """Unsaved AuditFinding rows for (change, outcome, detail) entries, counted."""
        report = OrgReport(organization_id)
        rows = []
        for change, outcome, detail in entries:
            finding = change.finding
            self.seq += 1
            platform, external_id = finding.key or ("", "")
            rows.append(
                AuditFinding(
                    run=self.run,
                    seq=self.seq,
                    organization_id=organization_id,
                    type=finding.type,
                    action=finding.action,
                    model=finding.model,
                    object_id=finding.object_id,
                    platform=platform,
                    external_id=external_id,
                    before=change.before,
                    after=change.after,
                    outcome=outcome,
                    detail=detail,
                )
            )
            for counts in (self.by_type[finding.type], report.by_type[finding.type]):
                counts["found"] += 1
                counts["fixed"] += outcome == FindingOutcome.FIXED
        return report, rows

    def keep(self, report: OrgReport) -> None:
        if report.found or report.error or report.guarded:
            self.organizations.append(report)

    def save(self, rows: Sequence[AuditFinding]) -> None:
        AuditFinding.objects.bulk_create(rows, batch_size=1000)

    def finish(self, *, status: str | None = None, error: str = "") -> AuditRun:
        run = self.run
        if status is None:
            partial = self.failed or any(o.guarded for o in self.organizations)
            status = AuditStatus.PARTIAL if partial or error else AuditStatus.SUCCEEDED
        run.status = status
        run.error = error or "; ".join(f"organization {o}: {e}" for o, e in self.failed.items())
        run.failed_organizations = self.failed
        run.by_type = self.by_type
        run.found = sum(c["found"] for c in self.by_type.values())
        run.fixed = sum(c["fixed"] for c in self.by_type.values())
        run.organizations_audited = self.audited
        run.finished_at = timezone.now()
        run.duration_seconds = round(time.monotonic() - self._started, 3)
        run.save()
        return run


# --- The service --------------------------------------------------------------------------------


class ProfileConnectionAuditService:
    """Finds every inconsistency between connections, selected assets, profiles, queue settings
    and boost rules, and fixes them on request (DESIGN "Audit semantics" and rules 1-8)."""

    def __init__(
        self,
        *,
        guard_min: int | None = None,
        guard_ratio: float | None = None,
        chunk_size: int | None = None,
    ) -> None:
        self.guard_min = settings.PROFILE_AUDIT_GUARD_MIN if guard_min is None else guard_min
        self.guard_ratio = (
            settings.PROFILE_AUDIT_GUARD_RATIO if guard_ratio is None else guard_ratio
        )
        self.chunk_size = chunk_size or settings.PROFILE_AUDIT_CHUNK_SIZE

    # --- Detection: reads only --------------------------------------------------------------

    def plan_organization(
        self, *, org_id: UUID, scopes: Iterable[str] | None = None, force: bool = False
    ) -> OrgPlan:
        snapshot = load_snapshots([org_id])[org_id]
        return plan_organization(
            snapshot, types=types_for_scopes(scopes), guard=self._guard(force=force)
        )

    def find_orphaned_profiles(self, *, org_id: UUID) -> list[Finding]:
        return self._find(org_id, "orphaned")

    def find_missing_profiles(self, *, org_id: UUID) -> list[Finding]:
        return self._find(org_id, "missing")

    def find_profiles_to_soft_delete(self, *, org_id: UUID) -> list[Finding]:
        """Deselected profiles (the original feature's name for them)."""
        return self._find(org_id, "deselected")

    def find_profiles_to_relink(self, *, org_id: UUID) -> list[Finding]:
        return self._find(org_id, "relink")

    def find_profiles_to_restore(self, *, org_id: UUID) -> list[Finding]:
        return self._find(org_id, "restore")

    def find_stale_queue_settings(self, *, org_id: UUID) -> list[Finding]:
        return [f for f in self._find(org_id, "cleanup") if f.type == "stale_queue_setting"]

    def find_invalid_boost_rule_refs(self, *, org_id: UUID) -> list[Finding]:
        return [f for f in self._find(org_id, "cleanup") if f.type == "invalid_boost_ref"]

    def _find(self, org_id: UUID, scope: str) -> list[Finding]:
        return list(self.plan_organization(org_id=org_id, scopes=[scope]).findings)

    # --- Fixes: each is a recorded fixing run of one type over one organization -------------

    def soft_delete_orphaned_profiles(self, *, org_id: UUID) -> int:
        return self._fix_scope(org_id, "orphaned")

    def create_missing_profiles(self, *, org_id: UUID) -> int:
        return self._fix_scope(org_id, "missing")

    def soft_delete_deselected_profiles(self, *, org_id: UUID) -> int:
        return self._fix_scope(org_id, "deselected")

    def relink_profiles(self, *, org_id: UUID) -> int:
        return self._fix_scope(org_id, "relink")

    def restore_selected_profiles(self, *, org_id: UUID) -> int:
        return self._fix_scope(org_id, "restore")

    def cleanup_stale_data(self, *, org_id: UUID) -> dict[str, int]:
        report = self.run_full_audit(org_id=org_id, fix=True, scopes=["cleanup"])
        return {t: report.run.by_type[t]["fixed"] for t in SCOPES["cleanup"]}

    def _fix_scope(self, org_id: UUID, scope: str) -> int:
        return self.run_full_audit(org_id=org_id, fix=True, scopes=[scope]).run.fixed

    # --- Runs ------------------------------------------------------------------------------

    def run_full_audit(
        self,
        *,
        org_id: UUID,
        fix: bool = False,
        scopes: Iterable[str] | None = None,
        trigger: str = AuditTrigger.COMMAND,
        force: bool = False,
        should_stop: StopCheck | None = None,
    ) -> RunReport:
        """Audit one organization; with ``fix``, apply its plan."""
        if not Organization.objects.filter(id=org_id).exists():
            raise UnknownOrganization(f"no organization with id {org_id}")
        return self._run(
            organization_id=org_id,
            chunks=iter([[org_id]]),
            total=1,
            fix=fix,
            scopes=scopes,
            trigger=trigger,
            force=force,
            should_stop=should_stop,
        )

    def run_audit_for_all_orgs(
        self,
        *,
        fix: bool = False,
        scopes: Iterable[str] | None = None,
        trigger: str = AuditTrigger.COMMAND,
        force: bool = False,
        progress: ProgressCallback | None = None,
        should_stop: StopCheck | None = None,
    ) -> RunReport:
        """Audit every organization, in chunks ordered by id; one chunk in memory at a time."""
        return self._run(
            organization_id=None,
            chunks=organization_id_chunks(chunk_size=self.chunk_size),
            total=Organization.objects.count() if progress else 0,
            fix=fix,
            scopes=scopes,
            trigger=trigger,
            force=force,
            progress=progress,
            should_stop=should_stop,
        )

    def _guard(self, *, force: bool) -> Guard:
        return Guard(minimum=self.guard_min, ratio=self.guard_ratio, force=force)

    def _run(
        self,
        *,
        organization_id: UUID | None,
        chunks: Iterable[list[UUID]],
        total: int,
        fix: bool,
        scopes: Iterable[str] | None,
        trigger: str,
        force: bool,
        progress: ProgressCallback | None = None,
        should_stop: StopCheck | None = None,
    ) -> RunReport:
        scopes = sorted(set(scopes or SCOPES))
        types = types_for_scopes(scopes)
        guard = self._guard(force=force)
        run = AuditRun.objects.create(
            trigger=trigger,
            organization_id=organization_id,
            types=scopes,
            fix=fix,
            forced=force,
        )
        recorder = RunRecorder(run)
        log = audit_logger().bind(run_id=str(run.id), fix_mode=fix)
        log.info("profile_audit.started", org_id=_str(organization_id), types=scopes)
        stopped = ""
        try:
            for chunk in chunks:
                snapshots = load_snapshots(chunk)
                plans = [_timed_plan(snapshots[o], types=types, guard=guard) for o in chunk]
                del snapshots
                if fix:
                    stopped = self._fix_chunk(plans, types, recorder, log, should_stop)
                else:
                    self._record_dry_chunk(plans, recorder, log)
                if progress:
                    progress(recorder.audited, total)
                if stopped or (should_stop and (stopped := should_stop() or "")):
                    break
        except Exception as exc:
            log.exception("profile_audit.failed", org_id=_str(organization_id))
            recorder.finish(status=AuditStatus.FAILED, error=f"{type(exc).__name__}: {exc}")
            raise
        if stopped:
            log.warning("profile_audit.stopped", reason=stopped)
        run = recorder.finish(error=f"stopped early: {stopped}" if stopped else "")
        log.info(
            "profile_audit.completed",
            org_id=_str(organization_id),
            status=run.status,
            total_issues_found=run.found,
            total_issues_fixed=run.fixed,
            organizations_audited=run.organizations_audited,
            duration_seconds=run.duration_seconds,
        )
        return RunReport(run, recorder.organizations, recorder.seq)

    def _record_dry_chunk(self, plans: list[OrgPlan], recorder: RunRecorder, log) -> None:
        now = recorder.run.started_at
        # What each restore would bring back with its profile is part of the plan (rule 2).
        queue_settings = ProfileSoftDeleteService().queue_settings_to_restore(
            profile_ids=[
                f.object_id
                for p in plans
                for f in p.profile_findings
                if f.type == FindingType.RESTORE
            ]
        )
        rows: list[AuditFinding] = []
        for plan in plans:
            outcome = FindingOutcome.GUARDED if plan.guarded else FindingOutcome.PLANNED
            report, org_rows = recorder.findings(
                plan.organization_id,
                (
                    (
                        planned_change(f, now=now, queue_settings=queue_settings.get(f.object_id)),
                        outcome,
                        "",
                    )
                    for f in plan.findings
                ),
            )
            report.guarded = plan.guarded
            rows += org_rows
            recorder.keep(report)
            recorder.audited += 1
            self._log_org(log, plan, report, duration=plan.planning_seconds)
        recorder.save(rows)

    def _fix_chunk(
        self,
        plans: list[OrgPlan],
        types: frozenset[FindingType],
        recorder: RunRecorder,
        log,
        should_stop: StopCheck | None,
    ) -> str:
        for plan in plans:
            if should_stop and (reason := should_stop()):
                return reason
            started = time.monotonic()
            report = self._fix_organization(plan, types, recorder, log)
            recorder.keep(report)
            recorder.audited += 1
            duration = plan.planning_seconds + time.monotonic() - started
            self._log_org(log, plan, report, duration=duration)
        return ""

    def _fix_organization(
        self, plan: OrgPlan, types: frozenset[FindingType], recorder: RunRecorder, log
    ) -> OrgReport:
        org_id = plan.organization_id
        now = timezone.now()
        if not plan.findings:
            return OrgReport(org_id)
        if plan.guarded:
            report, rows = recorder.findings(
                org_id,
                (
                    (planned_change(f, now=now), FindingOutcome.GUARDED, "mass-deletion guard")
                    for f in plan.findings
                ),
            )
            report.guarded = True
            recorder.save(rows)
            log.warning(
                "profile_audit.org_guarded",
                org_id=str(org_id),
                deletions=plan.deletions,
                alive_profiles=plan.alive_profiles,
                guard_min=self.guard_min,
                guard_ratio=self.guard_ratio,
            )
            return report
        seq_before = recorder.seq
        counts_before = {t: dict(c) for t, c in recorder.by_type.items()}
        try:
            with transaction.atomic():
                lock_organization(org_id)
                entries = self._apply_rechecked(plan, types, now)
                report, rows = recorder.findings(org_id, entries)
                recorder.save(rows)
                for row in rows:
                    if row.type == FindingType.MISSING and row.outcome == FindingOutcome.FIXED:
                        transaction.on_commit(
                            lambda row=row, report=report: self._send_sync(
                                row, report, recorder, log
                            )
                        )
        except Exception as exc:
            # Contained (DESIGN rule 6): the transaction rolled back; record what was intended.
            recorder.seq, recorder.by_type = seq_before, counts_before
            error = f"{type(exc).__name__}: {exc}"
            log.error("profile_audit.org_failed", org_id=str(org_id), error=error, exc_info=True)
            report, rows = recorder.findings(
                org_id,
                ((planned_change(f, now=now), FindingOutcome.FAILED, error) for f in plan.findings),
            )
            recorder.save(rows)
            report.error = error
            recorder.failed[str(org_id)] = error
        return report

    def _apply_rechecked(
        self, plan: OrgPlan, types: frozenset[FindingType], now
    ) -> list[tuple[Change, str, str]]:
        """Re-detect under the lock; apply the planned findings that still hold, in order,
        profile decisions first and cleanup after them (DESIGN rules 1 and 4)."""
        org_id = plan.organization_id
        fresh = load_snapshots([org_id])[org_id]
        still = set(find_profile_findings(fresh, types))
        decisions = [f for f in plan.profile_findings if f in still]
        applied = apply_profile_findings(
            decisions,
            organization_id=org_id,
            now=now,
            # The sync job is sent once this transaction commits (``_send_sync``).
            on_missing=lambda f: planned_change(f, now=now),
        )
        still_cleanup = set(find_cleanup_findings(fresh, decisions, types))
        cleanup = [f for f in plan.cleanup_findings if f in still_cleanup]
        applied += apply_cleanup_findings(cleanup, now=now)
        by_finding = {id(change.finding): change for change in applied}
        stale = "no longer held when re-checked under the organization's lock"
        return [
            (by_finding[id(f)], FindingOutcome.FIXED, "")
            if id(f) in by_finding
            else (planned_change(f, now=now), FindingOutcome.STALE, stale)
            for f in plan.findings
        ]

    def _send_sync(self, row: AuditFinding, report: OrgReport, recorder: RunRecorder, log) -> None:
        """Send the profile sync job for a missing key (after the organization's commit). A
        broker that refuses it turns the finding into a failure instead of a false "fixed"."""
        from profiles.tasks import sync_profile_task

        try:
            sync_profile_task.delay(str(row.organization_id), row.platform, row.external_id)
        except Exception as exc:
            error = f"profile sync not sent: {type(exc).__name__}: {exc}"
            log.error(
                "profile_audit.sync_dispatch_failed",
                org_id=str(row.organization_id),
                platform=row.platform,
                external_id=row.external_id,
                error=error,
            )
            AuditFinding.objects.filter(id=row.id).update(
                outcome=FindingOutcome.FAILED, detail=error
            )
            for counts in (recorder.by_type[row.type], report.by_type[row.type]):
                counts["fixed"] -= 1
            report.error = error
            recorder.failed[str(row.organization_id)] = error

    def _log_org(self, log, plan: OrgPlan, report: OrgReport, *, duration: float) -> None:
        if plan.unknown_asset_types:
            log.warning(
                "profile_audit.unknown_asset_types",
                org_id=str(plan.organization_id),
                asset_types=dict(plan.unknown_asset_types),
            )
        if not (report.found or report.error):
            return
        log.info(
            "profile_audit.org_completed",
            org_id=str(plan.organization_id),
            total_issues_found=report.found,
            total_issues_fixed=report.fixed,
            guarded=report.guarded,
            duration_seconds=round(duration, 4),
        )


def _timed_plan(snapshot, *, types: frozenset[FindingType], guard: Guard) -> OrgPlan:
    """The organization's plan, with the time planning it took (its share of a dry run; the
    chunk's reads are shared and not counted)."""
    started = time.monotonic()
    plan = plan_organization(snapshot, types=types, guard=guard)
    return replace(plan, planning_seconds=time.monotonic() - started)


def _str(value: UUID | None) -> str | None:
    return str(value) if value else None
