"""The audit of one chunk of organizations (at most 100, consecutive by id, of one shard).

A chunk is read together (five queries, and its change marks), planned organization
by organization (``profiles.plan``), and then either recorded (a dry run) or fixed, in one
transaction that holds every organization's lock, reads again and re-plans the organizations
written since they were planned (their mark's version moved), applies what still holds with one
statement per kind of change, writes its findings, and moves the shard's cursor past it (DESIGN
rules 4 and 8). A chunk whose fix fails is redone one organization per transaction, so one
organization's failure stays its own (rule 6).

In the same transaction the chunk's drift records are read and updated (one upsert,
``profiles.services.drift``): a fixing chunk leaves alone, as ``held``, what fights another
writer. What a fix sent to the sync job is returned (``ChunkOutcome.to_sync``) for the caller
to dispatch once committed.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any
from uuid import UUID

from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.db import InterfaceError, OperationalError, connection, transaction
from django.db.models import F
from django.utils import timezone

from profiles.change_marks import AUDIT_FIX, writer
from profiles.models import (
    AuditRun,
    FindingAction,
    FindingOutcome,
    FindingType,
)
from profiles.plan import (
    BadData,
    Finding,
    Guard,
    OrgPlan,
    OrgSnapshot,
    find_cleanup_findings,
    find_profile_findings,
    plan_organization,
    profiles_whose_settings_can_be_stale,
)
from profiles.selectors import (
    add_queue_settings,
    change_marks_with_writers,
    consistent_reads,
    load_snapshots,
)
from profiles.services.changes import (
    Change,
    apply_cleanup_findings,
    apply_profile_findings,
    planned_change,
)
from profiles.services.drift import DriftBook
from profiles.services.lease import LeaseLost, end_fenced_transactions, mark_fencing_epoch
from profiles.services.organization_lock import lock_organizations, lock_timed_out
from profiles.services.recording import FindingRow
from profiles.services.runs import ShardCursor, ShardMoved
from profiles.services.soft_delete import ProfileSoftDeleteService
from profiles.services.sync import confirm_sent_findings

STALE = "no longer held when re-checked under the organization's lock"
GUARDED = "mass-deletion guard"
WAITS_ON_HELD = "held: waits on a profile fix that is held (fighting)"
DRY_FIGHTING = "fighting: a fixing run holds it until it is resumed in the admin"
OVER_BUDGET = (
    "run budget: its deletions do not fit in what is left of PROFILE_AUDIT_RUN_MAX_DELETIONS"
)


# Not an organization's failure, so never recorded as one (rule 6 contains the rest): the
# shard stops and is resumed from its cursor — by its continuation (the soft time limit) or by
# the task's retry (the database went away).
NOT_CONTAINED = (ShardMoved, LeaseLost, SoftTimeLimitExceeded, OperationalError, InterfaceError)

BUSY = "organization locks held by another transaction for {seconds:g} s (PROFILE_AUDIT_ORG_LOCK_WAIT); audited again by the next run"


class OrganizationsBusy(Exception):
    """The chunk's organization locks were not had within PROFILE_AUDIT_ORG_LOCK_WAIT: another
    transaction holds them (a stopped holder, a slow writer). Bounded, and contained: those
    organizations are recorded failed and the shard goes on."""


@contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector held off while one chunk is worked. A chunk allocates
    some hundred thousand small objects (rows, findings) that reference counting frees when it
    ends; meanwhile the collector would run hundreds of times and rescan every object the
    process holds (Django's, Celery's): a fifth of a dry run's time. A chunk's memory is bounded
    by its size, and the collector runs again between chunks."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


class RunBudget:
    """The run's deletion budget (DESIGN "Run budget"), shared by all its shards: a chunk's
    organizations reserve their planned soft deletions in one short statement before the chunk's
    transaction (so parallel shards never wait on the run's row while they write), first come
    first served in id order; what a fix did not use (stale findings) is given back after it."""

    def __init__(self, *, run_id: UUID, limit: int) -> None:
        self.run_id = run_id
        self.limit = limit

    def reserve(self, plans: Sequence[OrgPlan]) -> tuple[set[UUID], int]:
        """(organizations that do not fit, deletions reserved for the others)."""
        wanted = [
            (p.organization_id, planned_deletions(p))
            for p in plans
            if p.findings and not p.guarded and not p.error
        ]
        wanted = [(org, n) for org, n in wanted if n]
        if not wanted:
            return set(), 0
        runs = AuditRun.objects.filter(id=self.run_id)
        while True:
            reserved = runs.values_list("deletions_reserved", flat=True).get()
            over, total = set(), 0
            for org, n in wanted:
                if reserved + total + n <= self.limit:
                    total += n
                else:
                    over.add(org)
            if not total:
                return over, 0
            # Compare and set: another shard reserving meanwhile makes us read again.
            if runs.filter(deletions_reserved=reserved).update(
                deletions_reserved=F("deletions_reserved") + total
            ):
                return over, total

    def give_back(self, unused: int) -> None:
        if unused > 0:
            AuditRun.objects.filter(id=self.run_id).update(
                deletions_reserved=F("deletions_reserved") - unused
            )


def planned_deletions(plan: OrgPlan) -> int:
    return sum(
        1
        for f in plan.findings
        if f.soft_deletes_profile or f.type == FindingType.STALE_QUEUE_SETTING
    )


@dataclass
class OrgOutcome:
    """What one organization's audit came to, for its log event."""

    plan: OrgPlan
    found: int = 0
    fixed: int = 0
    guarded: bool = False
    error: str = ""
    seconds: float = 0.0
    deleted: int = 0
    over_budget: bool = False


@dataclass
class ChunkOutcome:
    organizations: list[OrgOutcome] = field(default_factory=list)
    to_sync: list[FindingRow] = field(default_factory=list)
    """Missing profiles recorded ``sent`` by committed transactions: the caller dispatches
    their sync job (one message per chunk)."""

    @property
    def deleted(self) -> int:
        return sum(o.deleted for o in self.organizations)

    def add(self, part: ChunkOutcome) -> None:
        self.organizations += part.organizations
        self.to_sync += part.to_sync


def plan_chunk(
    organization_ids: Sequence[UUID], *, types: frozenset[FindingType], guard: Guard
) -> list[OrgPlan]:
    """Read the chunk once and plan each organization (with the time its planning took).

    Queue settings, most of a chunk's rows, are read once its profiles are planned, in the same
    consistent read: only those of profiles dead now or deleted by the plan, the only ones that
    can be stale. So are the organizations' change marks (``OrgPlan.mark_version``, and
    ``mark_writers``): what a sweep takes, how a fix knows an organization was not written
    since, and whom a dry run's drift records name.
    """
    wholes: dict[UUID, tuple[Finding, ...] | None] = {}
    seconds: dict[UUID, float] = {}
    with consistent_reads():
        marks = change_marks_with_writers(organization_ids)
        snapshots = load_snapshots(organization_ids, queue_settings=False)
        candidates: list[UUID] = []
        for org in organization_ids:
            started = time.monotonic()
            try:
                whole = wholes[org] = find_profile_findings(snapshots[org])
                candidates += profiles_whose_settings_can_be_stale(snapshots[org], whole)
            except Exception:
                wholes[org] = None  # planned again below, which records its failure
            seconds[org] = time.monotonic() - started
        add_queue_settings(snapshots, profile_ids=candidates)
    plans = []
    for org in organization_ids:
        started = time.monotonic()
        plan = _plan_or_failure(snapshots[org], types=types, guard=guard, whole=wholes[org])
        plans.append(
            replace(
                plan,
                planning_seconds=seconds[org] + time.monotonic() - started,
                mark_version=marks[org][0] if org in marks else None,
                mark_writers=marks[org][1] if org in marks else (),
            )
        )
    return plans


def _plan_or_failure(
    snapshot: OrgSnapshot,
    *,
    types: frozenset[FindingType],
    guard: Guard,
    whole: tuple[Finding, ...] | None = None,
) -> OrgPlan:
    """The organization's plan; whatever its data, a failure to plan it is its own (rule 7):
    a plan with no findings and the error, recorded as the organization's failure."""
    try:
        return plan_organization(snapshot, types=types, guard=guard, whole=whole)
    except Exception as exc:
        return OrgPlan(
            organization_id=snapshot.organization_id,
            profile_findings=(),
            cleanup_findings=(),
            alive_profiles=0,
            error=str(exc) if isinstance(exc, BadData) else f"{type(exc).__name__}: {exc}",
        )


def _failures(plans: Sequence[OrgPlan]) -> dict[str, str]:
    return {str(p.organization_id): p.error for p in plans if p.error}


def _time_shares(outcome: ChunkOutcome, *, since: float, organizations: int) -> None:
    """Each organization's time for its log event: its planning, and its share of the chunk's
    writes (the chunk's reads are shared and not counted)."""
    share = (time.monotonic() - since) / organizations
    for org in outcome.organizations:
        org.seconds = org.plan.planning_seconds + share


def finding_row(
    change: Change, *, organization_id: UUID, outcome: str, detail: str = ""
) -> FindingRow:
    finding = change.finding
    platform, external_id = finding.key or ("", "")
    return FindingRow(
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


# --- Dry run ------------------------------------------------------------------------------------


def record_dry_chunk(
    plans: Sequence[OrgPlan], *, position: ShardCursor, now: datetime
) -> ChunkOutcome:
    """Record the plans as they are: what ``--fix`` would do from this state (rule 2)."""
    started = time.monotonic()
    # What each restore would bring back with its profile is part of the plan.
    queue_settings = ProfileSoftDeleteService().queue_settings_to_restore(
        profile_ids=[
            f.object_id
            for p in plans
            for f in p.profile_findings
            if f.type == FindingType.RESTORE and f.object_id is not None
        ]
    )
    outcome = ChunkOutcome()
    rows: list[FindingRow] = []
    for plan in plans:
        result = FindingOutcome.GUARDED if plan.guarded else FindingOutcome.PLANNED
        rows += (
            finding_row(
                planned_change(
                    f,
                    now=now,
                    queue_settings=queue_settings.get(f.object_id)
                    if f.object_id is not None
                    else None,
                ),
                organization_id=plan.organization_id,
                outcome=result,
            )
            for f in plan.findings
        )
        outcome.organizations.append(
            OrgOutcome(plan, found=len(plan.findings), guarded=plan.guarded, error=plan.error)
        )
    with transaction.atomic():
        drift = DriftBook.read(
            [p.organization_id for p in plans],
            mark_writers={p.organization_id: list(p.mark_writers) for p in plans},
        )
        for row in rows:
            if drift.fighting(row):
                row.detail = DRY_FIGHTING
        position.commit(
            last=plans[-1].organization_id,
            organizations=len(plans),
            rows=rows,
            failed=_failures(plans),
            drift=drift,
        )
    position.cursor = plans[-1].organization_id
    _time_shares(outcome, since=started, organizations=len(plans))
    return outcome


# --- Fix ----------------------------------------------------------------------------------------


def fix_chunk(
    plans: Sequence[OrgPlan],
    *,
    position: ShardCursor,
    types: frozenset[FindingType],
    guard: Guard,
    budget: RunBudget | None = None,
    into: ChunkOutcome | None = None,
) -> ChunkOutcome:
    """Apply the chunk's plans in one transaction; if that fails, one organization at a time,
    recording an organization that fails on its own as failed and going on (rule 6). With a
    ``budget``, organizations whose deletions do not fit in it are guarded, not fixed.

    ``into`` (returned) is filled as each transaction commits — so what is given back of the
    budget, and what the caller must dispatch (``to_sync``), is right even if the shard is
    interrupted halfway through the fall-back."""
    # Earlier runs' missing profiles that exist by now are confirmed fixed (usually none).
    # Before this chunk's fix: after it, the lookup would find this run's own findings just
    # recorded sent, whose sync job (not sent yet) confirms them.
    confirm_sent_findings(organization_ids=[p.organization_id for p in plans])
    over, reserved = budget.reserve(plans) if budget else (set(), 0)
    outcome = ChunkOutcome() if into is None else into
    try:
        _fix_chunk(
            plans,
            position=position,
            types=types,
            guard=guard,
            over=over,
            into=outcome,
        )
    finally:
        if budget:
            budget.give_back(reserved - outcome.deleted)
    return outcome


def _fix_chunk(
    plans: Sequence[OrgPlan],
    *,
    position: ShardCursor,
    types: frozenset[FindingType],
    guard: Guard,
    over: set[UUID],
    into: ChunkOutcome,
) -> None:
    options: dict[str, Any] = dict(position=position, types=types, guard=guard, over=over)
    try:
        into.add(_fix_in_one_transaction(plans, **options))
        return
    except OrganizationsBusy as exc:
        # One bounded wait per chunk, not one per organization.
        into.add(_record_busy(plans, position=position, error=str(exc)))
        return
    except NOT_CONTAINED:
        raise
    except Exception as exc:
        if len(plans) == 1:
            into.add(_record_failure(plans[0], position=position, exc=exc))
            return
    for plan in plans:
        try:
            part = _fix_in_one_transaction([plan], **options)
        except OrganizationsBusy as exc:
            part = _record_busy([plan], position=position, error=str(exc))
        except NOT_CONTAINED:
            raise
        except Exception as exc:
            part = _record_failure(plan, position=position, exc=exc)
        into.add(part)


def _fix_in_one_transaction(
    plans: Sequence[OrgPlan],
    *,
    position: ShardCursor,
    types: frozenset[FindingType],
    guard: Guard,
    over: set[UUID],
) -> ChunkOutcome:
    started = time.monotonic()
    now = timezone.now()
    org_ids = [p.organization_id for p in plans]
    outcome = ChunkOutcome()
    # The fix's writes are tagged: its change marks (and later findings) name the audit.
    with transaction.atomic(), writer(AUDIT_FIX):
        _lock_within_bound(org_ids, epoch=position.epoch)
        marks = change_marks_with_writers(org_ids)
        # Their drift history, read before the fix writes (its marks name the other writers).
        drift = DriftBook.read(
            org_ids, now=now, mark_writers={org: w for org, (_, w) in marks.items()}
        )
        # Rule 4, under the locks: every write to an organization raises its change mark's
        # version in the writing transaction (the triggers), so an organization whose version
        # is the one it was planned at was not written since, and its plan holds as it is. The
        # others are read and planned again — and so are those with a finding to hold, whose
        # cleanup is judged again without it.
        again = [
            p.organization_id
            for p in plans
            if p.findings
            and (
                marks.get(p.organization_id, (None,))[0] != p.mark_version
                or _held(drift, p.organization_id, p.findings)
            )
        ]
        fresh = load_snapshots(again) if again else {}
        decided: list[tuple[OrgPlan, list[tuple[Finding, str, str]]]] = []
        decisions: list[Finding] = []
        cleanup: list[Finding] = []
        failed = _failures(plans)
        for plan in plans:
            if not plan.findings:
                decided.append((plan, []))
                continue
            snapshot = fresh.get(plan.organization_id)
            # What holds now, under the lock; the guard is judged again on it.
            now_plan = (
                plan if snapshot is None else _plan_or_failure(snapshot, types=types, guard=guard)
            )
            if now_plan.error:  # its data turned bad meanwhile: nothing is written there
                failed[str(plan.organization_id)] = now_plan.error
                decided.append((plan, []))
                continue
            if plan.guarded or now_plan.guarded or plan.organization_id in over:
                why = GUARDED if plan.guarded or now_plan.guarded else OVER_BUDGET
                decided.append((plan, [(f, FindingOutcome.GUARDED, why) for f in plan.findings]))
                continue
            if snapshot is None:
                decisions += plan.profile_findings
                cleanup += plan.cleanup_findings
                decided.append((plan, [(f, _applied_outcome(f), "") for f in plan.findings]))
                continue
            still = set(now_plan.profile_findings)
            # A fingerprint that fights another writer is left alone (and what waits on it).
            held = _held(drift, plan.organization_id, [f for f in plan.findings if f in still])
            org_decisions = [f for f in plan.profile_findings if f in still and id(f) not in held]
            still_cleanup = set(find_cleanup_findings(snapshot, org_decisions, types))
            if held:
                all_decisions = [f for f in plan.profile_findings if f in still]
                would = set(find_cleanup_findings(snapshot, all_decisions, types)) - still_cleanup
                held.update((id(f), WAITS_ON_HELD) for f in plan.cleanup_findings if f in would)
                held.update(
                    _held(
                        drift,
                        plan.organization_id,
                        [f for f in plan.cleanup_findings if f in still_cleanup],
                    )
                )
            org_cleanup = [
                f for f in plan.cleanup_findings if f in still_cleanup and id(f) not in held
            ]
            decisions += org_decisions
            cleanup += org_cleanup
            applied = {id(f) for f in (*org_decisions, *org_cleanup)}
            decided.append(
                (
                    plan,
                    [
                        (f, _applied_outcome(f), "")
                        if id(f) in applied
                        else (f, FindingOutcome.HELD, held[id(f)])
                        if id(f) in held
                        else (f, FindingOutcome.STALE, STALE)
                        for f in plan.findings
                    ],
                )
            )
        changes = apply_profile_findings(
            decisions,
            now=now,
            # The sync job is sent once this transaction commits.
            on_missing=lambda f: planned_change(f, now=now),
        )
        changes += apply_cleanup_findings(cleanup, now=now)
        change_of = {id(c.finding): c for c in changes}

        rows: list[FindingRow] = []
        for plan, entries in decided:
            org_rows = [
                finding_row(
                    change_of.get(id(f)) or planned_change(f, now=now),
                    organization_id=plan.organization_id,
                    outcome=result,
                    detail=detail,
                )
                for f, result, detail in entries
            ]
            rows += org_rows
            outcome.organizations.append(
                OrgOutcome(
                    plan,
                    found=len(org_rows),
                    fixed=sum(1 for r in org_rows if r.fixed),
                    guarded=any(r.outcome == FindingOutcome.GUARDED for r in org_rows),
                    error=failed.get(str(plan.organization_id), ""),
                    deleted=sum(
                        1 for r in org_rows if r.fixed and r.action == FindingAction.SOFT_DELETE
                    ),
                    over_budget=any(r.detail == OVER_BUDGET for r in org_rows),
                )
            )
        position.commit(
            last=org_ids[-1], organizations=len(plans), rows=rows, failed=failed, drift=drift
        )
    # Committed: their sync job is the caller's to send.
    outcome.to_sync = [r for r in rows if r.outcome == FindingOutcome.SENT]
    position.cursor = org_ids[-1]
    _time_shares(outcome, since=started, organizations=len(plans))
    return outcome


def _held(drift: DriftBook, organization_id: UUID, findings: Sequence[Finding]) -> dict[int, str]:
    """{id(finding): why} for those of ``findings`` whose fingerprint is fighting."""
    held = {}
    for f in findings:
        why = drift.holds(organization_id, type=f.type, object_id=f.object_id, key=f.key)
        if why:
            held[id(f)] = why
    return held


def _lock_within_bound(org_ids: Sequence[UUID], *, epoch: int | None) -> None:
    """Take the organizations' locks, waiting at most PROFILE_AUDIT_ORG_LOCK_WAIT (PostgreSQL's
    ``lock_timeout``, for this transaction only); SQLite's writers queue on its busy timeout.

    A fixing run's transaction also marks itself with its epoch (a shared advisory lock): when
    the wait times out, the transactions of runs whose lease was taken over (they can never
    commit) are ended, and the locks are asked for once more."""
    if connection.vendor != "postgresql":
        lock_organizations(org_ids)
        return
    wait = settings.PROFILE_AUDIT_ORG_LOCK_WAIT
    with connection.cursor() as cursor:
        cursor.execute("SELECT set_config('lock_timeout', %s, true)", [f"{int(wait * 1000)}ms"])
        if epoch is not None:
            mark_fencing_epoch(cursor, epoch)
    try:
        with transaction.atomic():  # a savepoint: a timeout leaves the transaction usable
            lock_organizations(org_ids)
    except OperationalError as exc:
        if not lock_timed_out(exc):
            raise
        if epoch is None or not end_fenced_transactions(epoch):
            raise OrganizationsBusy(BUSY.format(seconds=wait)) from exc
        try:
            lock_organizations(org_ids)
        except OperationalError as again:
            if lock_timed_out(again):
                raise OrganizationsBusy(BUSY.format(seconds=wait)) from again
            raise
    with connection.cursor() as cursor:
        cursor.execute("SELECT set_config('lock_timeout', '0', true)")


def _record_busy(plans: Sequence[OrgPlan], *, position: ShardCursor, error: str) -> ChunkOutcome:
    """Every organization of the chunk waited out its bound: recorded failed, in one commit."""
    now = timezone.now()
    rows = [
        finding_row(
            planned_change(f, now=now),
            organization_id=p.organization_id,
            outcome=FindingOutcome.FAILED,
            detail=error,
        )
        for p in plans
        for f in p.findings
    ]
    with transaction.atomic():
        position.commit(
            last=plans[-1].organization_id,
            organizations=len(plans),
            rows=rows,
            failed={str(p.organization_id): error for p in plans},
        )
    position.cursor = plans[-1].organization_id
    return ChunkOutcome([OrgOutcome(p, found=len(p.findings), error=error) for p in plans])


def _applied_outcome(finding: Finding) -> str:
    """A missing profile is only sent to its sync job here: its finding is fixed once the
    profile exists (the job confirms it), never before."""
    return FindingOutcome.SENT if finding.type == FindingType.MISSING else FindingOutcome.FIXED


def _record_failure(plan: OrgPlan, *, position: ShardCursor, exc: Exception) -> ChunkOutcome:
    """The organization's fix rolled back: record what was intended, as failed, and move on."""
    error = f"{type(exc).__name__}: {exc}"
    now = timezone.now()
    rows = [
        finding_row(
            planned_change(f, now=now),
            organization_id=plan.organization_id,
            outcome=FindingOutcome.FAILED,
            detail=error,
        )
        for f in plan.findings
    ]
    with transaction.atomic():
        position.commit(
            last=plan.organization_id,
            organizations=1,
            rows=rows,
            failed={str(plan.organization_id): error},
        )
    position.cursor = plan.organization_id
    return ChunkOutcome([OrgOutcome(plan, found=len(rows), error=error)])
