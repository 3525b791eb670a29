"""Reverting a run (DESIGN "Nothing is lost"): put back what it changed, finding by finding in
reverse order, where the object is still as the run left it; anything changed since is a
conflict, recorded and left alone.

The decisions are ``profiles.revert_plan``'s; this service claims the run, then per
organization locks it, loads what its findings touched (set-based), plans, applies the rows in
bulk (one statement per kind of change) and records. A revert is itself a recorded run (trigger
``revert``, ``reverted_run`` the run it undoes); its findings record before/after in the audit's
shapes, so a revert can be reverted in turn. The command (``profiles_audit_sync --revert``) and
the admin are thin interfaces over ``revert_run``.
"""

from __future__ import annotations

import itertools
import json
import socket
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from django.db import connection, transaction
from django.db.models import Count, TextField
from django.db.models.functions import Cast
from django.utils import timezone

from audit_project.log_config import audit_logger
from boosts.models import BoostRule
from profiles.change_marks import AUDIT_REVERT, writer
from profiles.models import (
    AuditFinding,
    AuditRun,
    AuditStatus,
    AuditTrigger,
    FindingAction,
    FindingOutcome,
    FindingType,
    SocialProfile,
    StaleQueueSettingDeletion,
)
from profiles.revert_plan import (
    BOOST_RULE,
    PROFILE,
    QUEUE_SETTING,
    ProfileNow,
    RecordedChange,
    Result,
    RevertRows,
    RevertSnapshot,
    RowsToLoad,
    RuleNow,
    SettingNow,
    parse_change,
    plan_revert,
    rows_to_load,
)
from profiles.selectors import (
    connection_organizations,
    decode_json,
    fixed_findings_newest_first,
)
from profiles.services import runs
from profiles.services.bulk import update_rows
from profiles.services.drift import forget_fixes
from profiles.services.lease import FixingLease, LeaseHeld, LeaseLost, prove
from profiles.services.organization_lock import lock_organization
from profiles.services.recording import ABANDONED_AFTER, FindingRow, record_findings
from queues.models import QueueSetting

# Findings read, decided and written per step; keeps IN lists and memory small.
CHUNK_SIZE = 1000
RUNS_HINT = "find run ids in the admin under Audit runs"
# A revert that has not progressed for this long lost its process (as the audit's lock
# expires after 60 minutes): it no longer stops the run from being reverted again.
REVERT_ABANDONED_AFTER = ABANDONED_AFTER


class RevertRejected(ValueError):
    """This run cannot be reverted; the message says why and what to do. Nothing was written."""


class RevertLockHeld(RevertRejected):
    """Another fixing run holds the fixing-run lease: a revert is a fixing run, so it waits for
    that one to finish (the command exits 75, as for any fixing run)."""


@dataclass
class RevertReport:
    """A finished revert: its own run record and what it put back."""

    run: AuditRun
    reverted_run: AuditRun | None
    """None only for a revert run whose target is gone (``perform_revert`` returns it as is)."""
    put_back: int = 0
    """Findings put back (a dry run: that would be put back)."""
    conflicts: int = 0
    failed: int = 0

    @property
    def found(self) -> int:
        return self.put_back + self.conflicts + self.failed

    def as_json(self) -> dict[str, object]:
        run = self.run
        return {
            "run_id": str(run.id),
            "reverted_run_id": str(self.reverted_run.id) if self.reverted_run else None,
            "fix": run.fix,
            "status": run.status,
            "totals": {"found": run.found, "fixed": run.fixed},
            "put_back": self.put_back,
            "conflicts": self.conflicts,
            "failed": self.failed,
            "by_type": run.by_type,
            "duration_seconds": run.duration_seconds,
            "error": run.error or None,
        }


def revert_outcomes(run: AuditRun) -> tuple[int, int, int]:
    """(put back, conflicts, failed) of a revert's run, counted from its findings (a dry run's
    put-backs are its planned ones)."""
    outcomes = dict(
        AuditFinding.objects.filter(run_id=run.id)
        .order_by()
        .values_list("outcome")
        .annotate(n=Count("id"))
    )
    put_back = outcomes.get(FindingOutcome.FIXED if run.fix else FindingOutcome.PLANNED, 0)
    return (
        put_back,
        outcomes.get(FindingOutcome.CONFLICT, 0),
        outcomes.get(FindingOutcome.FAILED, 0),
    )


# --- Which runs can be reverted -------------------------------------------------------------


def revert_blocker(*, run: AuditRun) -> str | None:
    """Why this run cannot be reverted now (one line saying what to do), or None."""
    if run.status == AuditStatus.RUNNING:
        return f"run {run.id} is still running; wait for it to finish, then revert it"
    if not run.fix:
        return f"run {run.id} is a dry run and changed nothing; there is nothing to revert"
    abandoned_before = timezone.now() - REVERT_ABANDONED_AFTER
    for revert in run.reverts.filter(fix=True).exclude(
        status__in=[AuditStatus.FAILED, AuditStatus.INTERRUPTED]
    ):
        if revert.status == AuditStatus.RUNNING:
            if (revert.last_progress_at or revert.started_at) > abandoned_before:
                return f"run {run.id} is being reverted right now (run {revert.id}); wait for it"
            continue  # its process died; what it committed shows up as conflicts next time
        # A revert that failed in some organization rolled those back: it may be run again.
        if not revert.failed_organizations:
            return (
                f"run {run.id} was already reverted by run {revert.id}; to undo that revert, "
                f"revert run {revert.id}"
            )
    # The findings, not the run's totals: a run that died may have fixed more than it counted.
    if not AuditFinding.objects.filter(
        run_id=run.id, outcome__in=(FindingOutcome.FIXED, FindingOutcome.SENT)
    ).exists():
        return f"run {run.id} changed nothing (no fixed findings); there is nothing to revert"
    return None


def claim_revert(
    *, run_id: UUID | str, fix: bool, requested_by: str = "", requested_host: str = ""
) -> AuditRun:
    """Record a revert of run ``run_id`` (its own run, ``running``) to be carried out by
    ``perform_revert`` — in a task, for the admin. Raises ``RevertRejected`` when it cannot be."""
    _, run = _claim_run(
        run_id=run_id, fix=fix, requested_by=requested_by, requested_host=requested_host
    )
    return run


def _claim_run(
    *,
    run_id: UUID | str,
    fix: bool,
    requested_by: str = "",
    requested_host: str = "",
    in_process: bool = False,
) -> tuple[AuditRun, AuditRun]:
    """Check the run can be reverted and record the revert run, atomically: two reverts of one
    run started at once are serialized on the run's row, and the second is rejected."""
    try:
        run_id = run_id if isinstance(run_id, UUID) else UUID(str(run_id))
    except ValueError:
        raise RevertRejected(f"{run_id!r} is not an audit run id (a UUID); {RUNS_HINT}") from None
    if not AuditRun.objects.filter(id=run_id).exists():
        raise RevertRejected(f"no audit run with id {run_id}; {RUNS_HINT}")
    # A revert that fixes is a fixing run: it takes the lease first, which closes the runs that
    # can no longer commit (a killed command's run among them) before the target is judged.
    lease = None
    if fix:
        taken = runs.take_lease(log=audit_logger().bind(trigger=AuditTrigger.REVERT))
        if isinstance(taken, LeaseHeld):
            raise RevertLockHeld(
                f"skipped: another fixing run holds the lock ({taken.reason}); nothing was "
                "changed: revert when it has finished"
            )
        lease = taken.lease
    try:
        with transaction.atomic():
            target = AuditRun.objects.select_for_update().get(id=run_id)
            reason = revert_blocker(run=target)
            if reason:
                raise RevertRejected(reason)
            run = create_revert_run(
                target=target,
                fix=fix,
                requested_by=requested_by,
                requested_host=requested_host or socket.gethostname(),
                lease=lease,
                in_process=in_process,
            )
    except BaseException:
        if lease is not None:
            lease.release()
        raise
    return target, run


def create_revert_run(
    *,
    target: AuditRun,
    fix: bool,
    requested_by: str,
    requested_host: str,
    lease: FixingLease | None = None,
    in_process: bool = False,
) -> AuditRun:
    """The revert's own run record, ``running``, holding ``lease`` when it fixes;
    ``in_process``: carried out by this process (the command), alive exactly as long as it."""
    return runs.create_run(
        fields={
            "trigger": AuditTrigger.REVERT,
            "organization_id": target.organization_id,
            "types": target.types,
            "fix": fix,
            "reverted_run": target,
            "requested_by": requested_by,
            "requested_host": requested_host,
        },
        lease=lease,
        in_process=in_process,
    )


def finish_revert_run(
    run: AuditRun, *, report: RevertReport, failed: dict[str, str], error: str = ""
) -> None:
    """Close the revert's run record (the one place a revert run is closed): failed with
    ``error``, else partial when something was not put back, else succeeded."""
    if error:
        status = AuditStatus.FAILED
    else:
        status = AuditStatus.PARTIAL if report.conflicts or failed else AuditStatus.SUCCEEDED
        error = "; ".join(f"organization {o}: {e}" for o, e in failed.items())
    runs.finish_run(run, status=status, error=error, failed=failed)


# --- The revert -----------------------------------------------------------------------------


def revert_run(
    *, run_id: UUID | str, fix: bool, source: str = "command", requested_by: str = ""
) -> RevertReport:
    """Put back what run ``run_id`` changed (with ``fix``; without, record what would be put
    back and change nothing). Raises ``RevertRejected`` before writing anything when the run is
    unknown, a dry run, still running, already reverted or changed nothing."""
    _, run = _claim_run(run_id=run_id, fix=fix, requested_by=requested_by, in_process=True)
    return perform_revert(revert_run_id=run.id, source=source)


def perform_revert(*, revert_run_id: UUID, source: str = "task") -> RevertReport:
    """Carry out a claimed revert, one organization per transaction; its record's counts grow
    as each commits, so its page shows its progress."""
    run = AuditRun.objects.select_related("reverted_run").get(id=revert_run_id)
    target = run.reverted_run
    report = RevertReport(run=run, reverted_run=target)
    if run.status != AuditStatus.RUNNING or target is None:
        return report
    failed: dict[str, str] = {}
    log = audit_logger().bind(run_id=str(run.id), reverted_run_id=str(target.id), fix_mode=run.fix)
    log.info("profile_audit.revert_started", source=source, requested_by=run.requested_by or None)
    lease = runs.lease_of(run) if run.fix else None
    # Taken by a worker: its page says started, not queued, from now on.
    AuditRun.objects.filter(id=run.id).update(last_progress_at=timezone.now())
    try:
        findings = fixed_findings_newest_first(run_id=target.id, page_size=CHUNK_SIZE)
        # A run records organization after organization, so each group is one organization.
        for org_id, group in itertools.groupby(findings, key=lambda f: f.organization_id):
            if lease is not None and (lost := lease.renew()):
                raise LeaseLost(lost)
            error = _OrganizationRevert(
                target=target, run=run, organization_id=org_id, report=report
            ).run(group, log)
            if error:
                failed[str(org_id) if org_id else "none"] = error
    except Exception as exc:
        log.exception("profile_audit.revert_failed")
        finish_revert_run(run, report=report, failed=failed, error=f"{type(exc).__name__}: {exc}")
        raise
    finish_revert_run(run, report=report, failed=failed)
    log.info(
        "profile_audit.revert_completed",
        org_id=str(run.organization_id) if run.organization_id else None,
        status=run.status,
        total_issues_found=report.found,
        total_issues_fixed=run.fixed,
        put_back=report.put_back,
        conflicts=report.conflicts,
        duration_seconds=run.duration_seconds,
    )
    return report


class _OrganizationRevert:
    """One organization's findings, newest first, in one transaction under its lock: per chunk,
    load, plan, apply (with fix) and record. A fix's later chunks read what its earlier ones
    wrote; a dry run carries the rows its earlier chunks would have written into the next
    chunk's snapshot, so it decides as the fix would."""

    def __init__(
        self,
        *,
        target: AuditRun,
        run: AuditRun,
        organization_id: UUID | None,
        report: RevertReport,
    ) -> None:
        self.target = target
        self.revert = run
        self.organization_id = organization_id
        self.fix = run.fix
        self.report = report
        self.now = timezone.now()
        self.rows = RevertRows()

    def run(self, findings: Iterable[AuditFinding], log: Any) -> str:
        """Revert the organization; returns its error if it failed (and rolled back)."""
        org = str(self.organization_id) if self.organization_id else None
        seen: list[AuditFinding] = []
        report_before = (self.report.put_back, self.report.conflicts)
        findings = iter(findings)
        try:
            # The revert's writes are tagged: their change marks name it (and a later finding
            # never takes it for another writer undoing the audit's fix).
            with writer(AUDIT_REVERT):
                if self.organization_id:
                    lock_organization(self.organization_id)
                for index, chunk in enumerate(_chunks(findings, CHUNK_SIZE)):
                    seen += chunk
                    self._revert_chunk(chunk, organizations=1 if index == 0 else 0)
                if self.fix:  # DESIGN "Fencing": commits only while the lease has its epoch
                    prove(epoch=self.revert.lock_epoch)
        except LeaseLost:
            raise
        except Exception as exc:
            # Contained: this organization's transaction rolled back; record what was intended.
            error = f"{type(exc).__name__}: {exc}"
            log.error("profile_audit.revert_org_failed", org_id=org, error=error, exc_info=True)
            self.report.put_back, self.report.conflicts = report_before
            failed = [*seen, *findings]
            with transaction.atomic():
                record_findings(
                    run_id=self.revert.id,
                    rows=[
                        self._row(f, FindingOutcome.FAILED, f"not put back: {error}")
                        for f in failed
                    ],
                    organizations=1,
                )
            self.report.failed += len(failed)
            return error
        log.info("profile_audit.revert_org_completed", org_id=org, findings=len(seen))
        return ""

    def _revert_chunk(self, chunk: list[AuditFinding], *, organizations: int) -> None:
        if self.organization_id is None:
            rows = [
                self._row(f, FindingOutcome.CONFLICT, "the organization no longer exists")
                for f in chunk
            ]
            self.report.conflicts += len(rows)
            record_findings(run_id=self.revert.id, rows=rows, organizations=organizations)
            return
        changes = [_recorded_change(f) for f in chunk]
        wanted = rows_to_load(changes)
        snapshot = load_revert_snapshot(organization_id=self.organization_id, wanted=wanted)
        if not self.fix:
            # Nothing was written: what the earlier chunks would have written is carried over.
            snapshot = snapshot.with_rows(self.rows, keys=wanted.keys)
        plan = plan_revert(changes, snapshot, run_started_at=self.target.started_at, now=self.now)
        if self.fix:
            apply_revert(plan.rows)
        else:
            self.rows.update(plan.rows)
        put_back = FindingOutcome.FIXED if self.fix else FindingOutcome.PLANNED
        rows = []
        for finding, decision in zip(chunk, plan.decisions, strict=True):
            done = decision.result == Result.PUT_BACK
            rows.append(
                self._row(
                    finding,
                    put_back if done else FindingOutcome.CONFLICT,
                    decision.detail,
                    object_id=decision.object_id,
                    before=decision.before,
                    after=decision.after,
                )
            )
            self.report.put_back += done
            self.report.conflicts += not done
        if self.fix:
            # What the revert put back is no fix that another writer undid (no fight).
            forget_fixes(
                run_id=self.target.id,
                drift_ids=[
                    f.drift_id
                    for f, d in zip(chunk, plan.decisions, strict=True)
                    if d.result == Result.PUT_BACK
                ],
            )
        record_findings(run_id=self.revert.id, rows=rows, organizations=organizations)

    def _row(
        self,
        f: AuditFinding,
        outcome: str,
        detail: str,
        *,
        object_id: UUID | None = None,
        before: dict[str, Any] | None = None,
        after: dict[str, Any] | None = None,
    ) -> FindingRow:
        return FindingRow(
            organization_id=self.organization_id,
            type=f.type,
            action=FindingAction.REVERT,
            model=f.model,
            object_id=object_id or f.object_id,
            platform=f.platform,
            external_id=f.external_id,
            before=before,
            after=after,
            outcome=outcome,
            detail=f"{detail} (finding {f.seq} of run {self.target.id})",
        )


def _recorded_change(f: AuditFinding) -> RecordedChange:
    return parse_change(
        seq=f.seq,
        type=f.type,
        action=f.action,
        model=f.model,
        object_id=f.object_id,
        platform=f.platform,
        external_id=f.external_id,
        before=f.before,
        after=f.after,
    )


# --- Reads: the snapshot of what a chunk of findings touched ---------------------------------


PROFILE_FIELDS = ("id", "platform", "external_id", "connection_id", "deleted_at", "created_at")


def load_revert_snapshot(*, organization_id: UUID, wanted: RowsToLoad) -> RevertSnapshot:
    """The organization's rows ``wanted`` names, as they are now: a fixed number of queries,
    whatever the number of findings. Nothing of another organization is read but the owner of
    a connection a finding names (to say why the profile stays off it)."""
    profiles: dict[UUID, ProfileNow] = {}

    def add(rows: Iterable[tuple[Any, ...]]) -> None:
        for id_, platform, external_id, connection_id, deleted_at, created_at in rows:
            profiles[id_] = ProfileNow(
                id_, (platform, external_id), connection_id, deleted_at, created_at
            )

    of_org = SocialProfile.objects.filter(organization_id=organization_id)
    if wanted.ids[PROFILE]:
        add(of_org.filter(id__in=list(wanted.ids[PROFILE])).values_list(*PROFILE_FIELDS))
    keys = wanted.keys | {p.key for p in profiles.values()}
    if keys:
        add(
            row
            for row in of_org.alive()
            .filter(external_id__in={external_id for _, external_id in keys})
            .values_list(*PROFILE_FIELDS)
            if (row[1], row[2]) in keys
        )

    settings: dict[UUID, SettingNow] = {}
    of_org_settings = QueueSetting.objects.filter(organization_id=organization_id)
    # Two reads rather than one with OR: each is an index lookup.
    for ids, column in (
        (wanted.ids[QUEUE_SETTING], "id__in"),
        (wanted.restorable_profiles, "profile_id__in"),
    ):
        if ids:
            for id_, profile_id, deleted_at in of_org_settings.filter(
                **{column: list(ids)}
            ).values_list("id", "profile_id", "deleted_at"):
                settings[id_] = SettingNow(id_, profile_id, deleted_at)

    rules = (
        {
            id_: RuleNow(id_, deleted_at, decode_json(text))
            for id_, deleted_at, text in BoostRule.objects.filter(
                organization_id=organization_id, id__in=list(wanted.ids[BOOST_RULE])
            ).values_list("id", "deleted_at", Cast("profile_ids", TextField()))
        }
        if wanted.ids[BOOST_RULE]
        else {}
    )

    dead_of_restorable = [
        s.id
        for s in settings.values()
        if s.deleted_at is not None and s.profile_id in wanted.restorable_profiles
    ]
    return RevertSnapshot(
        organization_id=organization_id,
        profiles=profiles,
        queue_settings=settings,
        boost_rules=rules,
        connection_owners=connection_organizations(connection_ids=wanted.connections),
        audit_deletions=_audit_deletions(dead_of_restorable),
    )


def _audit_deletions(setting_ids: Sequence[UUID]) -> frozenset[tuple[UUID, datetime]]:
    """(setting, deleted_at) of these settings' deletions as stale by an audit: from the
    findings, and from the records retention keeps once it pruned them (however old, they
    still come back with their profile)."""
    if not setting_ids:
        return frozenset()
    deletions: set[tuple[UUID, datetime]] = set()
    for object_id, after in AuditFinding.objects.filter(
        type=FindingType.STALE_QUEUE_SETTING,
        action=FindingAction.SOFT_DELETE,
        outcome=FindingOutcome.FIXED,
        object_id__in=list(setting_ids),
    ).values_list("object_id", "after"):
        deleted_at = (after or {}).get("deleted_at") if isinstance(after, dict) else None
        if isinstance(deleted_at, str) and object_id is not None:  # a setting's finding has its id
            deletions.add((object_id, datetime.fromisoformat(deleted_at)))
    deletions.update(
        StaleQueueSettingDeletion.objects.filter(
            queue_setting_id__in=list(setting_ids)
        ).values_list("queue_setting_id", "deleted_at")
    )
    return frozenset(deletions)


# --- Writes: the rows as the revert leaves them, one statement per kind ---------------------


def apply_revert(rows: RevertRows) -> None:
    """Write the rows a chunk's plan changed. Deletions first, so a profile that goes and
    another of the same key that comes back never meet in the unique index."""
    profiles = sorted(rows.profiles.values(), key=lambda p: p.id.int)
    for changes in (
        [p for p in profiles if p.deleted_at is not None],
        [p for p in profiles if p.deleted_at is None],
    ):
        update_rows(
            SocialProfile,
            ["deleted_at", "connection_id"],
            [(p.id, p.deleted_at, p.connection_id) for p in changes],
        )
    update_rows(
        QueueSetting,
        ["deleted_at"],
        [
            (s.id, s.deleted_at)
            for s in sorted(rows.queue_settings.values(), key=lambda s: s.id.int)
        ],
    )
    write_boost_rules(sorted(rows.boost_rules.values(), key=lambda r: r.id.int))


def write_boost_rules(rules: Sequence[RuleNow]) -> None:
    """Set each rule's ``deleted_at`` and ``profile_ids`` to exactly the JSON value given — JSON
    ``null`` included, which Django's JSONField would write as SQL NULL (the column is NOT
    NULL): one statement for all of them."""
    if not rules:
        return
    table = BoostRule._meta.db_table
    texts = [json.dumps(r.profile_ids) for r in rules]
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute(
                f"UPDATE {table} AS t SET deleted_at = v.deleted_at, "
                "profile_ids = v.profile_ids::jsonb "
                "FROM unnest(%s::uuid[], %s::timestamptz[], %s::text[]) "
                "AS v(id, deleted_at, profile_ids) WHERE t.id = v.id",
                [[r.id for r in rules], [r.deleted_at for r in rules], texts],
            )
            return
        ops = connection.ops
        ids = [r.id.hex for r in rules]
        cases = " ".join("WHEN %s THEN %s" for _ in rules)
        cursor.execute(
            f"UPDATE {table} SET deleted_at = CASE id {cases} END, "
            f"profile_ids = CASE id {cases} END "
            f"WHERE id IN ({', '.join('%s' for _ in rules)})",
            [
                *itertools.chain.from_iterable(
                    (id_, ops.adapt_datetimefield_value(r.deleted_at))
                    for id_, r in zip(ids, rules, strict=True)
                ),
                *itertools.chain.from_iterable(zip(ids, texts, strict=True)),
                *ids,
            ],
        )


def _chunks(items: Iterator[AuditFinding], size: int) -> Iterator[list[AuditFinding]]:
    while chunk := list(itertools.islice(items, size)):
        yield chunk
