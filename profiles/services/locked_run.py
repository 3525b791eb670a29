"""Audit runs as the command and the scheduled task start them: a fixing run first takes the
fixing-run lock (``run_lock``), or is recorded as skipped when another run holds it. Dry runs
take no lock: they write nothing but their own record.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import timedelta
from uuid import UUID

from django.db import DatabaseError
from django.utils import timezone

from audit_project.log_config import audit_logger
from profiles.models import AuditRun, AuditStatus
from profiles.plan import SCOPES
from profiles.services.audit import (
    ProfileConnectionAuditService,
    ProgressCallback,
    RunReport,
    StopCheck,
    empty_counts,
)
from profiles.services.run_lock import RunLock, RunLockUnavailable, fixing_run_lock


def run_locked_audit(
    *,
    org_id: UUID | None,
    fix: bool,
    scopes: Iterable[str] | None,
    trigger: str,
    force: bool = False,
    progress: ProgressCallback | None = None,
    should_stop: StopCheck | None = None,
    service: ProfileConnectionAuditService | None = None,
) -> RunReport:
    """Run the audit over one organization (``org_id``) or all of them.

    A fixing run holds the fixing-run lock from before its record is created until it ends, and
    checks before each organization that the lock is still its own; losing it stops the run
    there (``partial``). Lock held by another run: a ``skipped`` record, no fix. Lock service
    unreachable: a ``failed`` record and ``RunLockUnavailable`` (never a fix without the lock).
    """
    service = service or ProfileConnectionAuditService()
    scopes = sorted(set(scopes or SCOPES))

    def audit(stop: StopCheck | None) -> RunReport:
        options = dict(fix=fix, scopes=scopes, trigger=trigger, force=force, should_stop=stop)
        if org_id is not None:
            return service.run_full_audit(org_id=org_id, **options)
        return service.run_audit_for_all_orgs(progress=progress, **options)

    if not fix:
        return audit(should_stop)

    lock = fixing_run_lock()
    log = audit_logger().bind(fix_mode=True, trigger=trigger, lock=lock.description)
    try:
        acquired = lock.acquire()
    except RunLockUnavailable as exc:
        log.error("profile_audit.lock_unavailable", org_id=_str(org_id), error=str(exc))
        try:
            _record_unstarted(
                org_id=org_id,
                scopes=scopes,
                trigger=trigger,
                force=force,
                status=AuditStatus.FAILED,
                error=str(exc),
            )
        except DatabaseError:
            # The lock's failure is the one to report; the database's is only logged.
            log.exception("profile_audit.record_failed")
        raise
    if not acquired:
        return _skip(lock, org_id=org_id, scopes=scopes, trigger=trigger, force=force, log=log)

    try:
        return audit(_stop_check(should_stop, lock, log))
    finally:
        _release(lock, log)


def _stop_check(should_stop: StopCheck | None, lock: RunLock, log) -> StopCheck:
    """The caller's stop check (the task's soft time limit), then the lease: a run whose lock
    expired or was taken over stops before its next organization instead of writing on."""

    def check() -> str | None:
        if should_stop and (reason := should_stop()):
            return reason
        try:
            held = lock.still_held()
        except RunLockUnavailable as exc:
            log.error("profile_audit.lock_unavailable", error=str(exc))
            return f"the fixing-run lock can no longer be checked: {exc}"
        if not held:
            log.warning("profile_audit.lock_lost")
            return f"lost the fixing-run lock ({lock.description}) to expiry or another run"
        return None

    return check


def _skip(lock: RunLock, *, org_id, scopes, trigger, force, log) -> RunReport:
    run_id = uuid.uuid4()
    holder = lock.holder()
    # Logged before the record is written: the decision is taken here, whatever happens next.
    log.info("profile_audit.skipped", run_id=str(run_id), org_id=_str(org_id), held_by=holder)
    run = _record_unstarted(
        run_id=run_id,
        org_id=org_id,
        scopes=scopes,
        trigger=trigger,
        force=force,
        status=AuditStatus.SKIPPED,
        error=f"another fixing run holds the lock ({lock.description}; held by {holder})",
    )
    return RunReport(run, [])


def _release(lock: RunLock, log) -> None:
    try:
        released = lock.release()
    except RunLockUnavailable as exc:
        # The key expires by itself; the run's own outcome is what the caller needs.
        log.error("profile_audit.lock_release_failed", error=str(exc))
        return
    if not released:
        log.warning("profile_audit.lock_lost_before_release")


def _record_unstarted(
    *,
    org_id: UUID | None,
    scopes: list[str],
    trigger: str,
    force: bool,
    status: str,
    error: str,
    run_id: UUID | None = None,
) -> AuditRun:
    """The record of a fixing run that never started: skipped, or failed for want of its lock."""
    now = timezone.now()
    return AuditRun.objects.create(
        id=run_id or uuid.uuid4(),
        trigger=trigger,
        organization_id=org_id,
        types=scopes,
        fix=True,
        forced=force,
        status=status,
        started_at=now,
        finished_at=now,
        duration_seconds=0.0,
        by_type=empty_counts(),
        error=error,
    )


def fail_killed_runs(*, trigger: str, time_limit: float, error: str) -> int:
    """Close the record of a fixing run whose process was killed at its hard time limit, which
    cannot close it itself. It is the fixing run of this trigger still ``running`` that started
    within the limit: the fixing-run lock, which the dead process holds until it expires, keeps
    any other fixing run from having started since."""
    now = timezone.now()
    return AuditRun.objects.filter(
        trigger=trigger,
        fix=True,
        status=AuditStatus.RUNNING,
        started_at__gte=now - timedelta(seconds=time_limit + 60),
    ).update(status=AuditStatus.FAILED, finished_at=now, error=error)


def _str(value: UUID | None) -> str | None:
    return str(value) if value else None
