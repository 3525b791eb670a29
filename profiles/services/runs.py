"""The run's life in one place: every write to ``AuditRun`` and ``AuditShard`` happens here.

A run is created with its shards (audit) or alone (revert); its fixing lease is taken first and
held until it finishes. A shard is claimed by a delivery, worked chunk by chunk (each chunk's
commit moves its cursor and adds to the run's counts, proving the lease when the run fixes),
paused (its continuation is sent), ended, and whoever ends the last open shard finishes the run.
Runs whose process died are closed ``interrupted`` once they can no longer commit.
"""

from __future__ import annotations

import contextlib
import enum
import os
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from uuid import UUID

from django.conf import settings
from django.db import transaction
from django.db.models import Case, F, Q, Value, When
from django.utils import timezone
from structlog.stdlib import BoundLogger

from audit_project.log_config import audit_logger
from profiles.models import (
    OPEN_SHARD_STATUSES,
    AuditRun,
    AuditShard,
    AuditStatus,
    AuditTrigger,
    ShardStatus,
)
from profiles.plan import ALL_TYPES
from profiles.services.change_runs import clear_marks, settle
from profiles.services.drift import DriftBook
from profiles.services.lease import (
    FixingLease,
    LeaseHeld,
    current_epoch,
    process_alive,
    prove,
    this_process,
)
from profiles.services.recording import (
    ABANDONED_AFTER,
    FindingRow,
    close_run,
    left_alone,
    record_findings,
    shard_failures,
)
from profiles.services.run_lock import RunLockUnavailable, fixing_run_lock

SYNC_NOT_SENT = "profile sync not sent"


class ShardMoved(Exception):
    """Another delivery of this shard committed past our cursor, or the run was closed: this
    delivery's chunk is rolled back and it stops (a re-delivery never repeats work)."""


class Claim(enum.Enum):
    CLAIMED = "claimed"
    CLOSED = "closed"
    """The shard is no longer open (done, skipped, failed): nothing to do."""
    GAVE_UP = "gave_up"
    """Its deliveries died too often: it is failed."""


# --- Leases of the runs this process holds ------------------------------------------------------

# A file lock belongs to the process that took it: in-process shards renew and release it through
# this object; shards in other processes adopt the lease from the run's record.
_held: dict[UUID, FixingLease] = {}


def lease_of(run: AuditRun) -> FixingLease:
    lease = _held.get(run.id)
    if lease is None:
        lease = FixingLease()
        lease.adopt(token=run.lock_token, epoch=run.lock_epoch)
    return lease


@dataclass(frozen=True)
class LeaseTaken:
    lease: FixingLease
    interrupted: list[AuditRun]
    """The runs it fenced out, closed ``interrupted``."""


def take_lease(*, log: BoundLogger) -> LeaseTaken | LeaseHeld:
    """Take the fixing-run lease for a new fixing run, then close the runs it fenced out (they
    can no longer commit). Raises ``RunLockUnavailable``."""
    lease = FixingLease()
    taken = lease.take()
    if isinstance(taken, LeaseHeld):
        return taken
    try:
        interrupted = close_fenced_runs(epoch=taken, log=log)
    except BaseException:
        lease.release()
        raise
    return LeaseTaken(lease, interrupted)


def hold(run: AuditRun, lease: FixingLease) -> None:
    _held[run.id] = lease


# --- Creating runs ------------------------------------------------------------------------------


def create_run(
    *,
    fields: dict[str, object],
    lease: FixingLease | None,
    ranges: Sequence[tuple[UUID | None, UUID | None]] = (),
    lists: Sequence[tuple[Sequence[UUID], Mapping[str, int]]] = (),
    organizations_total: int | None = None,
    deadline: timedelta | None = None,
    in_process: bool = False,
) -> AuditRun:
    """Record a run that starts now (an audit with its shards, or a revert without), holding
    ``lease`` if it fixes. Shards are id ``ranges``, or ``lists`` of organizations with the change
    marks taken for them (a change-driven run)."""
    now = timezone.now()
    with transaction.atomic():
        run = AuditRun.objects.create(
            **fields,
            started_at=now,
            last_progress_at=now,
            deadline=now + deadline if deadline else None,
            organizations_total=organizations_total,
            lock_token=lease.token if lease else "",
            lock_epoch=lease.epoch if lease else None,
            process=this_process() if in_process else "",
        )
        AuditShard.objects.bulk_create(
            [
                *(
                    AuditShard(
                        run=run, index=i, first_organization_id=first, end_organization_id=end
                    )
                    for i, (first, end) in enumerate(ranges)
                ),
                *(
                    AuditShard(
                        run=run,
                        index=i,
                        organization_ids=[str(o) for o in organizations],
                        taken_marks=dict(marks),
                    )
                    for i, (organizations, marks) in enumerate(lists, start=len(ranges))
                ),
            ]
        )
    if lease is not None:
        hold(run, lease)
    return run


def record_unstarted(*, fields: dict[str, object], status: str, error: str) -> AuditRun:
    """The record of a fixing run that never started: skipped, or failed for want of its lock."""
    now = timezone.now()
    return AuditRun.objects.create(
        **fields,
        status=status,
        started_at=now,
        finished_at=now,
        duration_seconds=0.0,
        error=error,
    )


# --- Shards -------------------------------------------------------------------------------------


def claim_shard(shard: AuditShard, *, worker: str) -> Claim:
    """Claim an open shard for this delivery. A shard found ``running`` was left so by a
    delivery that died (a paused or retried one is put back to ``pending``): only those count
    towards PROFILE_AUDIT_SHARD_MAX_ATTEMPTS, so a shard may continue any number of times."""
    now = timezone.now()
    claimed = AuditShard.objects.filter(id=shard.id, status__in=OPEN_SHARD_STATUSES).update(
        # Only a delivery that died leaves its shard running.
        attempts=F("attempts")
        + Case(When(status=ShardStatus.RUNNING, then=Value(1)), default=Value(0)),
        status=ShardStatus.RUNNING,
        worker=worker or f"{socket.gethostname()}:{os.getpid()}",
        started_at=shard.started_at or now,
        heartbeat_at=now,
    )
    if not claimed:
        return Claim.CLOSED
    attempts = AuditShard.objects.filter(id=shard.id).values_list("attempts", flat=True).get()
    shard.status = ShardStatus.RUNNING
    if attempts >= settings.PROFILE_AUDIT_SHARD_MAX_ATTEMPTS:
        end_shard(shard, ShardStatus.FAILED, f"gave up: {attempts} deliveries died working it")
        return Claim.GAVE_UP
    return Claim.CLAIMED


def pause_shard(shard_id: UUID) -> None:
    """The delivery stops cleanly (budget spent, soft time limit, a transient error before its
    retry): the shard waits for its continuation, and this delivery did not die."""
    AuditShard.objects.filter(id=shard_id, status=ShardStatus.RUNNING).update(
        status=ShardStatus.PENDING
    )


def end_shard(
    shard: AuditShard, status: str, error: str = "", *, log: BoundLogger | None = None
) -> None:
    AuditShard.objects.filter(id=shard.id, status__in=OPEN_SHARD_STATUSES).update(
        status=status, error=error, finished_at=timezone.now()
    )
    if log is not None and status != ShardStatus.DONE:
        log.warning("profile_audit.shard_ended", status=status, error=error)
    finish_run_if_complete(shard.run_id)


def stop_run(run: AuditRun, *, reason: str) -> None:
    """Skip the run's open shards (an in-process run whose budget is spent) and finish it."""
    for shard in run.shards.filter(status__in=OPEN_SHARD_STATUSES):
        end_shard(shard, ShardStatus.SKIPPED, f"stopped early: {reason}")


def stale_shards(run: AuditRun) -> list[UUID]:
    """Open shards of a running run that nobody has worked for PROFILE_AUDIT_SHARD_STALE_AFTER:
    their messages were lost (a broker restarted without persistence) or their worker is gone."""
    before = timezone.now() - timedelta(seconds=settings.PROFILE_AUDIT_SHARD_STALE_AFTER)
    return list(
        AuditShard.objects.filter(run_id=run.id, status__in=OPEN_SHARD_STATUSES)
        .filter(
            Q(heartbeat_at__lt=before) | Q(heartbeat_at__isnull=True, run__started_at__lt=before)
        )
        .order_by("index")
        .values_list("id", flat=True)
    )


# --- A chunk's commit ---------------------------------------------------------------------------


class ShardCursor:
    """Where a shard stands: chunks commit only if the shard is still where we read it, and a
    fixing run's chunks only while its lease has the run's epoch."""

    def __init__(
        self,
        *,
        run_id: UUID,
        shard_id: UUID,
        cursor: UUID | None,
        epoch: int | None = None,
        fix: bool | None = None,
        types: Iterable[str] = ALL_TYPES,
    ) -> None:
        self.run_id = run_id
        # The finding types the run looks for: only their drift records resolve when not found.
        self.types = frozenset(str(t) for t in types)
        self.shard_id = shard_id
        self.cursor = cursor
        self.epoch = epoch
        self.fencing = epoch is not None
        self.fix = self.fencing if fix is None else fix
        # Set for each chunk (work_shard): its organizations, the change marks taken for them
        # (a fixing chunk clears those), and a sweep's findings in unmarked organizations.
        self.chunk: Sequence[UUID] = ()
        self.marks: Mapping[UUID, int] = {}
        self.missed: Mapping[UUID, int] = {}

    def take_chunk(
        self,
        chunk: Sequence[UUID],
        *,
        marks: Mapping[UUID, int],
        missed: Mapping[UUID, int] | None = None,
    ) -> None:
        self.chunk, self.marks, self.missed = chunk, marks, missed or {}

    def commit(
        self,
        *,
        last: UUID,
        organizations: int,
        rows: Sequence[FindingRow],
        failed: dict[str, str] | None = None,
        drift: DriftBook | None = None,
    ) -> None:
        """Inside the chunk's transaction: update the drift records of its organizations (with
        ``drift``, the book the fix read them into; else read here), count it on the run, move
        the cursor (compare and set), and — fixing — prove the lease last, just before the
        commit. Run row before shard row, the order every writer takes them in."""
        covered = [o for o in self.chunk if (self.cursor is None or o > self.cursor) and o <= last]
        audited = [o for o in covered if str(o) not in (failed or {})]
        if drift is None:
            drift = DriftBook.read(covered)
        drift.record(rows, audited=audited, types=self.types, run_id=self.run_id, fix=self.fix)
        first_seq = record_findings(run_id=self.run_id, rows=rows, organizations=organizations)
        drift.write_from_findings(
            run_id=self.run_id, first_seq=first_seq, last_seq=first_seq + len(rows) - 1
        )
        shards = AuditShard.objects.filter(id=self.shard_id, status=ShardStatus.RUNNING)
        shards = (
            shards.filter(cursor__isnull=True)
            if self.cursor is None
            else shards.filter(cursor=self.cursor)
        )
        updated = shards.update(
            cursor=last,
            organizations_audited=F("organizations_audited") + organizations,
            found=F("found") + len(rows),
            fixed=F("fixed") + sum(1 for r in rows if r.fixed),
            heartbeat_at=timezone.now(),
        )
        if not updated:
            raise ShardMoved(f"shard {self.shard_id} moved on or was closed")
        if failed:
            shard = AuditShard.objects.get(id=self.shard_id)
            shard.failed_organizations = {**shard.failed_organizations, **failed}
            shard.save(update_fields=["failed_organizations"])
        if self.fix and covered:
            clear_marks({o: self.marks[o] for o in covered if o in self.marks})
            settle(organization_ids=covered, left_undone=_left_undone(rows, failed or {}))
        if missed := sum(self.missed.get(o, 0) for o in covered):
            AuditRun.objects.filter(id=self.run_id).update(
                missed_by_changes=F("missed_by_changes") + missed
            )
        if self.fencing:
            prove(epoch=self.epoch)


# Outcomes that leave an organization unsettled: change-driven runs audit it again.
NOT_DONE = ("failed", "guarded", "stale", "sent", "held")


def _left_undone(rows: Sequence[FindingRow], failed: Mapping[str, str]) -> dict[UUID, str]:
    undone = {UUID(org): "failed" for org in failed}
    for row in rows:
        if row.outcome in NOT_DONE and row.organization_id is not None:
            undone.setdefault(row.organization_id, str(row.outcome))
    return undone


def add_shard_failure(*, run_id: UUID, organization_id: UUID, error: str) -> None:
    """An organization failed after its chunk committed (its sync job could not be sent)."""
    with transaction.atomic():
        shard = (
            AuditShard.objects.select_for_update()
            .filter(run_id=run_id)
            .exclude(first_organization_id__gt=organization_id)
            .order_by("-index")
            .first()
        )
        if shard is not None:
            shard.failed_organizations = {**shard.failed_organizations, str(organization_id): error}
            shard.save(update_fields=["failed_organizations"])


# --- Finishing ----------------------------------------------------------------------------------


def finish_run_if_complete(run_id: UUID) -> AuditRun | None:
    """Finish the run once no shard is open: status, counts recounted from its findings, the
    completion event, the lease's release. Whoever closes the last shard calls it; only one
    caller finishes (``close_run`` is conditional on the run still running)."""
    if AuditShard.objects.filter(run_id=run_id, status__in=OPEN_SHARD_STATUSES).exists():
        return None
    run = AuditRun.objects.filter(id=run_id, status=AuditStatus.RUNNING).first()
    if run is None:
        return None
    failed, unfinished = shard_failures(run.id)
    shards = run.shards.count()
    if unfinished and len(unfinished) == shards and not run.organizations_audited:
        status = AuditStatus.FAILED
    elif unfinished or failed or left_alone(run.id):
        status = AuditStatus.PARTIAL
    else:
        status = AuditStatus.SUCCEEDED
    error = "; ".join([*unfinished, *(f"organization {o}: {e}" for o, e in failed.items())])
    return finish_run(run, status=status, error=error, failed=failed)


def fail_run(run: AuditRun, *, error: str) -> None:
    """The run could not go on (an in-process run hit an error that is not contained)."""
    failed, _ = shard_failures(run.id)
    finish_run(run, status=AuditStatus.FAILED, error=error, failed=failed)


def finish_run(
    run: AuditRun, *, status: str, error: str, failed: dict[str, str] | None = None
) -> AuditRun | None:
    """Close the run (conditional on it still running), log its completion, release its lease."""
    token = run.lock_token
    if not close_run(run, status=status, error=error, failed_organizations=failed or {}):
        return None
    log = audit_logger().bind(run_id=str(run.id), fix_mode=run.fix)
    log.info(
        "profile_audit.completed",
        org_id=str(run.organization_id) if run.organization_id else None,
        status=run.status,
        total_issues_found=run.found,
        total_issues_fixed=run.fixed,
        organizations_audited=run.organizations_audited,
        duration_seconds=run.duration_seconds,
        error=run.error or None,
    )
    if token:
        lease = _held.pop(run.id, None)
        if lease is None:
            lease = FixingLease()
            lease.adopt(token=token, epoch=run.lock_epoch)
        try:
            lease.release()
        except RunLockUnavailable as exc:
            log.error("profile_audit.lock_release_failed", error=str(exc))
    return run


def cut_short(run: AuditRun) -> str | None:
    """Why a finished run did not get through its work because something outside the data
    failed (a shard stopped: lost lease, Redis or the database down, a deadline; sync jobs that
    could not be sent), or None. Guarded organizations and ones that failed on their own data
    do not cut a run short (DESIGN "Operating it": exit status 2 against 0)."""
    if run.status == AuditStatus.FAILED:
        return run.error or "the run failed"
    _, unfinished = shard_failures(run.id)
    outages = [e for e in (run.failed_organizations or {}).values() if e.startswith(SYNC_NOT_SENT)]
    reasons = unfinished + outages[:1]
    return "; ".join(reasons) or None


# --- Runs whose process died --------------------------------------------------------------------


def close_fenced_runs(*, epoch: int | None, log: BoundLogger) -> list[AuditRun]:
    """Close as ``interrupted`` every run that can no longer commit: fixing runs whose epoch is
    below the lease's (``epoch``, just taken or read), and dry runs silent for an hour."""
    stale_before = timezone.now() - ABANDONED_AFTER
    closed = []
    for run in AuditRun.objects.filter(status=AuditStatus.RUNNING):
        if run.lock_epoch is not None:
            dead = epoch is not None and run.lock_epoch < epoch
        elif run.fix and run.trigger != AuditTrigger.REVERT:
            dead = epoch is not None  # a fixing run from before fencing: no lease, no commit
        else:
            dead = (run.last_progress_at or run.started_at) < stale_before or (
                bool(run.process) and process_alive(run.process) is False
            )
        if dead and _close_interrupted(run, log=log):
            closed.append(run)
    return closed


def _close_interrupted(run: AuditRun, *, log: BoundLogger) -> bool:
    failed, unfinished = shard_failures(run.id)
    error = "its process died before it finished (closed as interrupted)"
    if unfinished:
        error += "; " + "; ".join(unfinished)
    token = run.lock_token
    if not close_run(run, status=AuditStatus.INTERRUPTED, error=error, failed_organizations=failed):
        return False
    log.warning(
        "profile_audit.run_interrupted",
        interrupted_run_id=str(run.id),
        fix_mode=run.fix,
        trigger=run.trigger,
        total_issues_found=run.found,
        total_issues_fixed=run.fixed,
    )
    if token:  # its lock, if it somehow still holds it, is freed with it
        with contextlib.suppress(RunLockUnavailable):
            fixing_run_lock().force_release(token=token)
    return True


def close_dead_runs() -> list[AuditRun]:
    """The daily maintenance's part: close as ``interrupted`` the runs that can no longer
    commit. When nobody holds the lease, take it for a moment, so that a run whose holder died
    is fenced out first (never closed while it could still commit); when a live run holds it,
    close only what its epoch fenced out."""
    log = audit_logger()
    try:
        taken = take_lease(log=log)
    except RunLockUnavailable as exc:
        log.error("profile_audit.lock_unavailable", error=str(exc))
        return []
    if isinstance(taken, LeaseHeld):
        return close_fenced_runs(epoch=current_epoch(), log=log)
    taken.lease.release()
    return taken.interrupted
