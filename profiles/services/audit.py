"""Audit runs: one entry point (``AuditRequest``), shards, and the run's life from start to finish.

A run is cut into shards of consecutive organizations (``start_run``). Each shard is worked
chunk by chunk (``work_shard``; ``profiles.services.chunks``), in this process or as
``profiles.audit_shard`` tasks on any number of workers (``send_shards``); whoever closes the
last open shard finishes the run. A fixing run holds the fixing-run lock from its start to its
finish; its shards renew it. The semantics live in ``profiles.plan``; nothing here decides what
is inconsistent.
"""

from __future__ import annotations

import enum
import itertools
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from functools import cached_property
from uuid import UUID

from celery import signature
from django.conf import settings
from django.db import DatabaseError, transaction
from django.db.models import Count, Sum
from django.utils import timezone
from structlog.stdlib import BoundLogger

from audit_project.celery import app as celery_app
from audit_project.log_config import audit_logger
from orgs.models import Organization
from profiles.models import (
    OPEN_SHARD_STATUSES,
    AuditFinding,
    AuditRun,
    AuditShard,
    AuditStatus,
    AuditTrigger,
    FindingOutcome,
    ShardStatus,
)
from profiles.plan import SCOPES, Finding, Guard, OrgPlan, plan_organization, types_for_scopes
from profiles.selectors import (
    load_snapshots,
    organization_id_chunks,
    shard_starts,
    unsettled_organizations,
)
from profiles.services import runs
from profiles.services.change_runs import beat, shard_lists, take_work_list
from profiles.services.chunks import (
    ChunkOutcome,
    RunBudget,
    collector_paused,
    fix_chunk,
    plan_chunk,
    record_dry_chunk,
)
from profiles.services.lease import FixingLease, LeaseHeld, LeaseLost
from profiles.services.recording import FindingRow, empty_counts, mark_findings_failed
from profiles.services.run_lock import RunLockUnavailable
from profiles.services.runs import (
    SYNC_NOT_SENT,
    Claim,
    LeaseTaken,
    ShardCursor,
    ShardMoved,
    add_shard_failure,
    claim_shard,
    create_run,
    end_shard,
    fail_run,
    finish_run_if_complete,
    lease_of,
    pause_shard,
    record_unstarted,
    stop_run,
    take_lease,
)

SHARD_TASK = "profiles.audit_shard"
SYNC_TASK = "profiles.sync_profiles"

ProgressCallback = Callable[[int, int], None]
"""Called with (organizations done, organizations in all) after each chunk."""


class UnknownOrganization(ValueError):
    pass


# --- The request and the budget -----------------------------------------------------------------


@dataclass(frozen=True)
class AuditRequest:
    """Everything that defines a run, from whichever interface asked for it."""

    fix: bool = False
    organization_id: UUID | None = None
    scopes: tuple[str, ...] = ()
    """``--type`` values; empty means all."""
    force: bool = False
    trigger: str = AuditTrigger.COMMAND
    requested_by: str = ""
    requested_host: str = field(default_factory=socket.gethostname)
    task_id: str = ""
    deadline: timedelta | None = None
    """Shards not finished this long after the start are skipped (scheduled runs)."""
    changed: bool = False
    """A change-driven run: only the organizations marked or unsettled (trigger ``changes``)."""

    def __post_init__(self) -> None:
        if self.changed and self.organization_id is not None:
            raise ValueError("a change-driven run audits what changed; it takes no organization")
        unknown = set(self.scopes) - set(SCOPES)
        if unknown:
            raise ValueError(f"unknown finding types: {', '.join(sorted(unknown))}")
        object.__setattr__(self, "scopes", tuple(sorted(set(self.scopes or SCOPES))))


class Budget:
    """What a unit of work may still spend. Checked between chunks: once spent, the shard stops
    cleanly after the chunk it has committed (a task sends its continuation from the cursor;
    an in-process run stops ``partial``). Time limits are only a backstop."""

    def __init__(
        self, *, seconds: float | None = None, check: Callable[[], str | None] | None = None
    ) -> None:
        self.seconds = seconds
        self._deadline = time.monotonic() + seconds if seconds else None
        self._check = check

    def spent(self) -> str | None:
        if self._check and (reason := self._check()):
            return reason
        if self._deadline is not None and time.monotonic() >= self._deadline:
            return f"time budget spent ({self.seconds:g} s)"
        return None


# --- Reports (read back from the records, never kept in memory during a run) ---------------------


def sync_sent(by_type: dict[str, dict[str, int]] | None) -> int:
    """Missing profiles sent to their sync job and not yet confirmed to exist."""
    return sum(c.get("sync_sent", 0) for c in (by_type or {}).values())


@dataclass
class OrgReport:
    organization_id: UUID
    by_type: dict[str, dict[str, int]] = field(default_factory=empty_counts)
    guarded: bool = False
    held: int = 0
    """Findings held: their fingerprints fight another writer (DESIGN "Drift history")."""
    error: str = ""

    @property
    def found(self) -> int:
        return sum(c["found"] for c in self.by_type.values())

    @property
    def fixed(self) -> int:
        return sum(c["fixed"] for c in self.by_type.values())

    @property
    def sync_sent(self) -> int:
        return sync_sent(self.by_type)

    def as_json(self) -> dict[str, object]:
        return {
            "org_id": str(self.organization_id),
            "totals": {"found": self.found, "fixed": self.fixed, "sync_sent": self.sync_sent},
            "by_type": self.by_type,
            "guarded": self.guarded,
            "held": self.held,
            "error": self.error or None,
        }


@dataclass
class RunReport:
    """A run's record, and per organization what it found and fixed (read on demand)."""

    run: AuditRun

    @property
    def findings_recorded(self) -> int:
        return self.run.findings_recorded

    @cached_property
    def organizations(self) -> list[OrgReport]:
        """Organizations that had something to report, by id."""
        reports: dict[UUID, OrgReport] = {}
        for org, type_, outcome, n in (
            AuditFinding.objects.filter(run_id=self.run.id)
            .order_by()
            .values_list("organization_id", "type", "outcome")
            .annotate(n=Count("id"))
        ):
            if org is None:
                continue
            report = reports.setdefault(org, OrgReport(org))
            counts = report.by_type.setdefault(type_, {"found": 0, "fixed": 0})
            counts["found"] += n
            counts["fixed"] += n if outcome == FindingOutcome.FIXED else 0
            if outcome == FindingOutcome.SENT:
                counts["sync_sent"] = counts.get("sync_sent", 0) + n
            report.guarded |= outcome == FindingOutcome.GUARDED
            report.held += n if outcome == FindingOutcome.HELD else 0
        for org, error in (self.run.failed_organizations or {}).items():
            reports.setdefault(UUID(org), OrgReport(UUID(org))).error = error
        return [reports[org] for org in sorted(reports)]

    def as_json(self) -> dict[str, object]:
        run = self.run
        return {
            "run_id": str(run.id),
            "fix": run.fix,
            "status": run.status,
            "organization": str(run.organization_id) if run.organization_id else None,
            "types": run.types,
            "organizations_audited": run.organizations_audited,
            "missed_by_changes": run.missed_by_changes,
            "totals": {
                "found": run.found,
                "fixed": run.fixed,
                "sync_sent": sync_sent(run.by_type),
            },
            "by_type": run.by_type,
            "organizations": [o.as_json() for o in self.organizations],
            "duration_seconds": run.duration_seconds,
            "error": run.error or None,
        }


@dataclass(frozen=True)
class NoRun:
    """A change-driven check that recorded no run: nothing was marked or unsettled, or a fixing
    run holds the lease (it takes the marks of what it audits; the next check goes on)."""

    fix: bool
    reason: str
    backlog: int

    def as_json(self) -> dict[str, object]:
        return {
            "run_id": None,
            "fix": self.fix,
            "status": "idle",
            "reason": self.reason,
            "backlog": self.backlog,
            "organizations_audited": 0,
            "totals": {"found": 0, "fixed": 0, "sync_sent": 0},
            "by_type": empty_counts(),
            "organizations": [],
            "duration_seconds": 0.0,
        }


# --- Starting a run -----------------------------------------------------------------------------


class ChangeRunsHoldLease(Exception):
    """A change-driven run holds the lease and the caller asked not to wait for it here (a task
    on the worker that may have to run that very run's shards): send it again shortly."""


class WhenChangeRunHolds(enum.Enum):
    """What a fixing run does when a change-driven run holds the lease."""

    WAIT = "wait"  # for it to end (at most CHANGE_RUN_WAIT): the command
    DEFER = "defer"  # raise ChangeRunsHoldLease, nothing recorded: the task sends itself again
    SKIP = "skip"  # recorded skipped, as for any other holder


def start_run(
    request: AuditRequest,
    *,
    in_process: bool = False,
    change_run_holds: WhenChangeRunHolds = WhenChangeRunHolds.WAIT,
) -> AuditRun:
    """Record the run and its shards. A fixing run first takes the fixing-run lease, which
    closes the runs it fenced out (``interrupted``); if another run holds it, the run is
    recorded ``skipped`` and nothing else happens. Raises ``RunLockUnavailable`` (recorded as a
    failed run) when the lock's service does not answer: never a fix without the lease.
    ``in_process``: this process works every shard (the run lives exactly as long as it).
    A change-driven run holding the lease is dealt with as ``change_run_holds`` says."""
    if request.organization_id is not None and not (
        Organization.objects.filter(id=request.organization_id).exists()
    ):
        raise UnknownOrganization(f"no organization with id {request.organization_id}")
    log = audit_logger().bind(fix_mode=request.fix, trigger=request.trigger)
    lease = None
    if request.fix:
        try:
            taken = take_lease(log=log)
            if (
                isinstance(taken, LeaseHeld)
                and request.trigger != AuditTrigger.CHANGES
                and change_run_holds is not WhenChangeRunHolds.SKIP
                and change_runs_running()
            ):
                if change_run_holds is WhenChangeRunHolds.DEFER:
                    raise ChangeRunsHoldLease(
                        f"a change-driven run holds the lease ({taken.reason})"
                    )
                taken = wait_for_change_runs(taken, log=log)
        except RunLockUnavailable as exc:
            error = f"{exc}; nothing was fixed"
            log.error("profile_audit.lock_unavailable", org_id=_str(request.organization_id))
            try:
                record_unstarted(
                    fields=_run_fields(request), status=AuditStatus.FAILED, error=error
                )
            except DatabaseError:
                log.exception("profile_audit.record_failed")
            raise RunLockUnavailable(error) from exc
        if isinstance(taken, LeaseHeld):
            log.info(
                "profile_audit.skipped", org_id=_str(request.organization_id), held_by=taken.reason
            )
            return record_unstarted(
                fields=_run_fields(request),
                status=AuditStatus.SKIPPED,
                error=f"another fixing run holds the lock ({taken.reason})",
            )
        lease = taken.lease
        log = log.bind(lock=lease.description)
    try:
        run = _create_run(request, lease=lease, in_process=in_process)
    except BaseException:
        if lease is not None:
            lease.release()
        raise
    log.info(
        "profile_audit.started",
        run_id=str(run.id),
        org_id=_str(request.organization_id),
        types=list(request.scopes),
        shards=run.shards.count(),
        organizations=run.organizations_total,
        lock_epoch=run.lock_epoch,
    )
    return run


# How long a fixing run waits for change-driven runs that hold the lease: they are short (a
# minute's marks), and the six-hourly sweep falls due in the same minute as one four times a day.
# Well within the scheduled task's soft time limit.
CHANGE_RUN_WAIT = 300.0


def change_runs_running() -> bool:
    return AuditRun.objects.filter(
        status=AuditStatus.RUNNING, fix=True, trigger=AuditTrigger.CHANGES
    ).exists()


def wait_for_change_runs(
    held: LeaseHeld, *, log: BoundLogger, pause: Callable[[float], None] = time.sleep
) -> LeaseTaken | LeaseHeld:
    """While change-driven runs hold the lease, wait for them (at most CHANGE_RUN_WAIT) and take
    it then: a sweep or an operator's fix is not skipped for a run that ends within seconds.
    Any other holder: ``held`` as it was (the run is skipped)."""
    deadline = time.monotonic() + min(CHANGE_RUN_WAIT, settings.PROFILE_AUDIT_SOFT_TIME_LIMIT / 2)
    taken: LeaseTaken | LeaseHeld = held
    waited = False
    while isinstance(taken, LeaseHeld) and change_runs_running() and time.monotonic() < deadline:
        if not waited:
            log.info("profile_audit.waiting_for_change_run", held_by=taken.reason)
            waited = True
        pause(0.5)
        taken = take_lease(log=log)
    return taken


def start_change_run(request: AuditRequest, *, in_process: bool = False) -> AuditRun | NoRun:
    """Start a change-driven run: take the lease (fixing), then the work list — the marks with
    their versions and the unsettled organizations — and record the run over exactly those, in
    shards that carry the marks they may clear. Nothing to audit, or the lease held by another
    fixing run: no run is recorded, only the loop's heartbeat."""
    log = audit_logger().bind(fix_mode=request.fix, trigger=AuditTrigger.CHANGES)
    lease = None
    if request.fix:
        taken = take_lease(log=log)  # RunLockUnavailable: the caller's retry
        if isinstance(taken, LeaseHeld):
            work = take_work_list()
            beat(work=work, run=None)
            log.info("profile_audit.changes_waiting", held_by=taken.reason)
            return NoRun(
                fix=True,
                reason=f"another fixing run holds the lease ({taken.reason}); marks wait",
                backlog=len(work.organizations),
            )
        lease = taken.lease
    try:
        work = take_work_list()
        if not work.organizations:
            beat(work=work, run=None)
            if lease is not None:
                lease.release()
            return NoRun(fix=request.fix, reason="nothing changed since the last audit", backlog=0)
        run = create_run(
            fields={**_run_fields(request), "oldest_mark_at": work.oldest_mark_at},
            lease=lease,
            lists=list(shard_lists(work, shard_size=settings.PROFILE_AUDIT_SHARD_SIZE)),
            organizations_total=len(work.organizations),
            in_process=in_process,
        )
        beat(work=work, run=run)
    except BaseException:
        if lease is not None:
            lease.release()
        raise
    log.info(
        "profile_audit.started",
        run_id=str(run.id),
        organizations=run.organizations_total,
        marked=len(work.marks),
        unsettled=len(work.unsettled),
        oldest_mark_at=work.oldest_mark_at.isoformat() if work.oldest_mark_at else None,
        lock_epoch=run.lock_epoch,
    )
    return run


def _create_run(request: AuditRequest, *, lease: FixingLease | None, in_process: bool) -> AuditRun:
    if request.organization_id is not None:
        org = request.organization_id
        # [org, org + 1): exactly this organization.
        ranges: list[tuple[UUID | None, UUID | None]] = [
            (org, UUID(int=org.int + 1) if org.int < (1 << 128) - 1 else None)
        ]
        total = 1
    else:
        starts, total = shard_starts(shard_size=settings.PROFILE_AUDIT_SHARD_SIZE)
        bounds: list[UUID | None] = [None, *starts[1:], None]
        ranges = list(itertools.pairwise(bounds)) if starts else [(None, None)]
    return create_run(
        fields=_run_fields(request),
        lease=lease,
        ranges=ranges,
        organizations_total=total,
        deadline=request.deadline,
        in_process=in_process,
    )


def _run_fields(request: AuditRequest) -> dict[str, object]:
    """What every record of a run takes from the request that asked for it."""
    return {
        "trigger": AuditTrigger.CHANGES if request.changed else request.trigger,
        "organization_id": request.organization_id,
        "types": list(request.scopes),
        "fix": request.fix,
        "forced": request.force,
        "by_type": empty_counts(),
        "requested_by": request.requested_by,
        "requested_host": request.requested_host,
        "task_id": request.task_id,
    }


def send_shards(run: AuditRun) -> int:
    """Fan the run out: one ``profiles.audit_shard`` task per open shard, on ``maintenance``
    (without a broker, tasks run eagerly: the same code path, in this process)."""
    shard_ids = list(
        run.shards.filter(status__in=OPEN_SHARD_STATUSES)
        .order_by("index")
        .values_list("id", flat=True)
    )
    return resend_shards(run, shard_ids)


def resend_shards(run: AuditRun, shard_ids: Iterable[UUID]) -> int:
    """Send these shards of the run again (their messages were lost, or never sent): a shard
    delivered twice resumes from its cursor once, so sending too many is harmless."""
    sent = 0
    for shard_id in shard_ids:
        signature(
            SHARD_TASK, args=(str(shard_id),), kwargs={"run_id": str(run.id)}, app=celery_app
        ).apply_async()
        sent += 1
    return sent


# --- Working a shard ----------------------------------------------------------------------------

DONE, CONTINUE, STOPPED = "done", "continue", "stopped"


def work_shard(
    *,
    shard_id: UUID,
    budget: Budget | None = None,
    progress: Callable[[int], None] | None = None,
    worker: str = "",
) -> str:
    """Work the shard from its cursor, a chunk at a time, until it is done (``DONE``), the
    budget is spent (``CONTINUE``: send it again to go on), or it must stop (``STOPPED``:
    another delivery is ahead, the run was closed, the lock was lost, or the deadline passed).
    ``progress`` is called with the organizations of each committed chunk."""
    shard = AuditShard.objects.select_related("run").filter(id=shard_id).first()
    if shard is None:
        return STOPPED
    if shard.status not in OPEN_SHARD_STATUSES:
        # Done already: finish the run if whoever closed this shard died before doing so.
        finish_run_if_complete(shard.run_id)
        return STOPPED
    run = shard.run
    log = audit_logger().bind(run_id=str(run.id), shard=shard.index, fix_mode=run.fix)
    if run.status != AuditStatus.RUNNING:
        end_shard(shard, ShardStatus.SKIPPED, f"the run is {run.status}")
        return STOPPED
    if _past_deadline(run):
        end_shard(shard, ShardStatus.SKIPPED, "not finished by the run's deadline", log=log)
        return STOPPED
    # Claim it only while it is open: a shard the run's closing skipped meanwhile stays closed.
    if claim_shard(shard, worker=worker) is not Claim.CLAIMED:
        return STOPPED

    types = types_for_scopes(run.types)
    guard = Guard(
        minimum=settings.PROFILE_AUDIT_GUARD_MIN,
        ratio=settings.PROFILE_AUDIT_GUARD_RATIO,
        force=run.forced,
    )
    position = ShardCursor(
        run_id=run.id,
        shard_id=shard.id,
        cursor=shard.cursor,
        epoch=run.lock_epoch if run.fix else None,
        types=types,
    )
    lease = lease_of(run) if run.fix else None
    budget_of_run = (
        RunBudget(run_id=run.id, limit=deletions_left(run)) if run.fix and not run.forced else None
    )
    among = None if shard.organization_ids is None else [UUID(o) for o in shard.organization_ids]
    # A sweep (every organization) counts what the change marks missed.
    sweep = among is None and run.organization_id is None
    worked = False
    try:
        for chunk in organization_id_chunks(
            chunk_size=settings.PROFILE_AUDIT_CHUNK_SIZE,
            first=shard.first_organization_id,
            end=shard.end_organization_id,
            after=shard.cursor,
            among=among,
        ):
            with collector_paused():
                unsettled = unsettled_organizations(chunk) if sweep else set()
                plans = plan_chunk(chunk, types=types, guard=guard)
                # A change-driven run clears the marks it took when it started; any other run
                # takes them as they were in the snapshot it planned from (read with it): the
                # audit saw at least their writes.
                if among is not None:
                    marks = {
                        o: shard.taken_marks[str(o)] for o in chunk if str(o) in shard.taken_marks
                    }
                elif run.fix or sweep:
                    marks = {
                        p.organization_id: p.mark_version
                        for p in plans
                        if p.mark_version is not None
                    }
                else:
                    marks = {}
                position.take_chunk(
                    chunk,
                    marks=marks,
                    missed={
                        p.organization_id: len(p.findings)
                        for p in plans
                        if sweep
                        and p.findings
                        and p.organization_id not in marks
                        and p.organization_id not in unsettled
                    },
                )
                reason = budget.spent() if budget else None
                if reason and worked:
                    return _paused(shard, reason=reason, position=position, log=log)
                if _past_deadline(run):
                    end_shard(
                        shard, ShardStatus.SKIPPED, "not finished by the run's deadline", log=log
                    )
                    return STOPPED
                if lease is not None and (lost := lease.renew()):
                    log.warning("profile_audit.lock_lost", reason=lost)
                    end_shard(shard, ShardStatus.FAILED, f"stopped: {lost}", log=log)
                    return STOPPED
                if run.fix:
                    outcome = ChunkOutcome()
                    try:
                        fix_chunk(
                            plans,
                            position=position,
                            types=types,
                            guard=guard,
                            budget=budget_of_run,
                            into=outcome,
                        )
                    finally:
                        # What committed is sent, even if the chunk stopped halfway.
                        if outcome.to_sync:
                            dispatch_sync(run, outcome.to_sync)
                else:
                    outcome = record_dry_chunk(plans, position=position, now=run.started_at)
                worked = True
                _log_organizations(log, outcome)
                if progress:
                    progress(len(chunk))
                if reason:  # spent on the first chunk: that one is done, the rest waits
                    return _paused(shard, reason=reason, position=position, log=log)
    except ShardMoved as exc:
        log.info("profile_audit.shard_superseded", reason=str(exc))
        return STOPPED
    except LeaseLost as exc:
        log.warning("profile_audit.lock_lost", reason=str(exc))
        end_shard(shard, ShardStatus.FAILED, f"stopped: {exc}", log=log)
        return STOPPED
    end_shard(shard, ShardStatus.DONE, log=log)
    return DONE


def deletions_left(run: AuditRun) -> int:
    """What the run may soft-delete: one PROFILE_AUDIT_RUN_MAX_DELETIONS per schedule period for
    all fixing runs together (sweep and change-driven), so a platform-wide revocation costs one
    budget, not one a minute. Fixing runs never overlap (the lease): the others' reservations
    are final."""
    since = run.started_at - timedelta(seconds=settings.PROFILE_AUDIT_SCHEDULE_PERIOD)
    used = (
        AuditRun.objects.filter(fix=True, forced=False, started_at__gte=since)
        .exclude(id=run.id)
        .aggregate(n=Sum("deletions_reserved"))["n"]
    )
    return max(0, settings.PROFILE_AUDIT_RUN_MAX_DELETIONS - (used or 0))


def _paused(shard: AuditShard, *, reason: str, position: ShardCursor, log: BoundLogger) -> str:
    log.info("profile_audit.shard_paused", reason=reason, cursor=str(position.cursor))
    pause_shard(shard.id)
    return CONTINUE


def fail_shard(*, shard_id: UUID, error: str) -> None:
    """The shard's task failed for good (not a contained organization failure): close it, and
    the run if it was the last one open."""
    shard = AuditShard.objects.select_related("run").filter(id=shard_id).first()
    if shard is not None and shard.status in OPEN_SHARD_STATUSES:
        end_shard(shard, ShardStatus.FAILED, error)


def _past_deadline(run: AuditRun) -> bool:
    return run.deadline is not None and timezone.now() >= run.deadline


def _log_organizations(log: BoundLogger, outcome: ChunkOutcome) -> None:
    for org in outcome.organizations:
        plan = org.plan
        org_id = str(plan.organization_id)
        if plan.unknown_asset_types:
            # Logged, never fatal (DESIGN): information for whoever maps asset types, not an
            # alert, and not noise in front of the report at a terminal.
            log.info(
                "profile_audit.unknown_asset_types",
                org_id=org_id,
                asset_types=dict(plan.unknown_asset_types),
            )
        for rule_id, reason in plan.unreadable_boost_rules.items():
            # Rule 7: left as it is, the rest of the organization audited; a person must
            # correct it, so it is a warning in every run that meets it.
            log.warning(
                "profile_audit.boost_rule_unreadable",
                org_id=org_id,
                boost_rule_id=str(rule_id),
                reason=reason,
            )
        if org.over_budget:
            log.warning(
                "profile_audit.org_over_budget",
                org_id=org_id,
                max_deletions=settings.PROFILE_AUDIT_RUN_MAX_DELETIONS,
            )
        elif org.guarded:
            log.warning(
                "profile_audit.org_guarded",
                org_id=org_id,
                deletions=plan.deletions,
                alive_profiles=plan.alive_profiles,
                guard_min=settings.PROFILE_AUDIT_GUARD_MIN,
                guard_ratio=settings.PROFILE_AUDIT_GUARD_RATIO,
            )
        if org.error:
            log.error("profile_audit.org_failed", org_id=org_id, error=org.error)
        if org.found or org.error:
            log.info(
                "profile_audit.org_completed",
                org_id=org_id,
                total_issues_found=org.found,
                total_issues_fixed=org.fixed,
                guarded=org.guarded,
                duration_seconds=round(org.seconds, 4),
            )


def dispatch_sync(run: AuditRun, rows: Sequence[FindingRow]) -> None:
    """Send a chunk's committed missing profiles to the sync job (after the transaction around
    the call, if any, commits): one message, sent once (no publish retries), so a broker that is
    down costs one refusal per chunk. Their findings were recorded ``sent``; the job makes them
    ``fixed`` when it creates the profiles. If it cannot be sent, they become failures, and the
    run goes on."""
    rows = list(rows)
    transaction.on_commit(lambda: _send_sync(run, rows))


def _send_sync(run: AuditRun, rows: Sequence[FindingRow]) -> None:
    keys = [[str(r.organization_id), r.platform, r.external_id] for r in rows]
    try:
        signature(
            SYNC_TASK, args=(keys,), kwargs={"run_id": str(run.id)}, app=celery_app
        ).apply_async(retry=False)
    except Exception as exc:
        error = f"{SYNC_NOT_SENT}: {type(exc).__name__}: {exc}"
        audit_logger().error(
            "profile_audit.sync_dispatch_failed",
            run_id=str(run.id),
            org_ids=sorted({k[0] for k in keys}),
            profiles=len(keys),
            error=error,
        )
        mark_findings_failed(run_id=run.id, finding_ids=[r.id for r in rows], error=error)
        # A sent row is a missing profile's, recorded with its organization.
        for org in {r.organization_id for r in rows if r.organization_id is not None}:
            add_shard_failure(run_id=run.id, organization_id=org, error=error)


def close_dead_runs() -> list[AuditRun]:
    """The daily maintenance's part (``profiles.services.runs.close_dead_runs``)."""
    return runs.close_dead_runs()


def resend_stale_shards() -> int:
    """Send again the open shards of fanned-out runs that nobody has worked for
    PROFILE_AUDIT_SHARD_STALE_AFTER (their messages were lost with a broker restarted without
    persistence). Shards are durable in the database; their messages are not."""
    sent = 0
    for run in AuditRun.objects.filter(status=AuditStatus.RUNNING, process=""):
        if stale := runs.stale_shards(run):
            audit_logger().warning(
                "profile_audit.shards_resent", run_id=str(run.id), shards=len(stale)
            )
            sent += resend_shards(run, stale)
    return sent


# --- In this process ----------------------------------------------------------------------------


def run_audit(
    request: AuditRequest,
    *,
    progress: ProgressCallback | None = None,
    budget: Budget | None = None,
) -> RunReport | NoRun:
    """Start the run and work all its shards here, one after another. A spent budget stops the
    run there (``partial``); an error that is not contained fails it and is raised."""
    started = (start_change_run if request.changed else start_run)(request, in_process=True)
    if isinstance(started, NoRun):
        return started
    run = started
    if run.status != AuditStatus.RUNNING:
        return RunReport(run)
    done = 0

    def counted(organizations: int) -> None:
        nonlocal done
        done += organizations
        if progress:
            progress(done, run.organizations_total or 0)

    try:
        for shard_id in run.shards.order_by("index").values_list("id", flat=True):
            if work_shard(shard_id=shard_id, budget=budget, progress=counted) == CONTINUE:
                stop_run(run, reason=(budget.spent() if budget else None) or "budget spent")
                break
    except BaseException as exc:
        audit_logger().bind(run_id=str(run.id)).exception("profile_audit.failed")
        try:
            fail_run(run, error=f"{type(exc).__name__}: {exc}")
        except DatabaseError:
            audit_logger().exception("profile_audit.record_failed", run_id=str(run.id))
        raise
    run.refresh_from_db()
    if run.status == AuditStatus.RUNNING:  # another process holds a shard of it
        finish_run_if_complete(run.id)
        run.refresh_from_db()
    return RunReport(run)


# --- The original feature's service API, over the run machinery ---------------------------------


class ProfileConnectionAuditService:
    """Finds every inconsistency between connections, selected assets, profiles, queue settings
    and boost rules, and fixes them on request (DESIGN "Audit semantics" and rules 1-8). Every
    fix is a recorded run over one organization, under the fixing-run lock."""

    # --- Detection: reads only --------------------------------------------------------------

    def plan_organization(
        self, *, org_id: UUID, scopes: Iterable[str] | None = None, force: bool = False
    ) -> OrgPlan:
        snapshot = load_snapshots([org_id])[org_id]
        guard = Guard(
            minimum=settings.PROFILE_AUDIT_GUARD_MIN,
            ratio=settings.PROFILE_AUDIT_GUARD_RATIO,
            force=force,
        )
        return plan_organization(snapshot, types=types_for_scopes(scopes), guard=guard)

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
        return list(self.plan_organization(org_id=org_id, scopes=[scope], force=True).findings)

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
        should_stop: Callable[[], str | None] | None = None,
    ) -> RunReport:
        """Audit one organization; with ``fix``, apply its plan."""
        request = AuditRequest(
            fix=fix,
            organization_id=org_id,
            scopes=tuple(scopes or ()),
            force=force,
            trigger=trigger,
        )
        report = run_audit(request, budget=Budget(check=should_stop) if should_stop else None)
        assert isinstance(report, RunReport)  # only a change-driven request records no run
        return report

    def run_audit_for_all_orgs(
        self,
        *,
        fix: bool = False,
        scopes: Iterable[str] | None = None,
        trigger: str = AuditTrigger.COMMAND,
        force: bool = False,
        progress: ProgressCallback | None = None,
        should_stop: Callable[[], str | None] | None = None,
    ) -> RunReport:
        """Audit every organization, in chunks ordered by id; one chunk in memory at a time."""
        request = AuditRequest(fix=fix, scopes=tuple(scopes or ()), force=force, trigger=trigger)
        report = run_audit(
            request, progress=progress, budget=Budget(check=should_stop) if should_stop else None
        )
        assert isinstance(report, RunReport)  # only a change-driven request records no run
        return report


def _str(value: UUID | None) -> str | None:
    return str(value) if value else None
