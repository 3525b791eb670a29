"""Celery tasks of the profiles app: thin wrappers over the services. Queues come from
``CELERY_TASK_ROUTES``; services send these tasks by name and never import this module."""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from typing import Any
from uuid import UUID

import redis
import structlog
from billiard.einfo import ExceptionInfo
from celery import Task, shared_task
from celery.app.task import Context
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from django.conf import settings
from django.db import DatabaseError, InterfaceError, OperationalError

from audit_project.log_config import audit_logger
from profiles.models import AuditRun, AuditStatus, AuditTrigger
from profiles.services.audit import (
    CONTINUE,
    AuditRequest,
    Budget,
    ChangeRunsHoldLease,
    NoRun,
    WhenChangeRunHolds,
    close_dead_runs,
    fail_shard,
    resend_stale_shards,
    send_shards,
    start_change_run,
    start_run,
    work_shard,
)
from profiles.services.retention import prune_audit_runs
from profiles.services.revert import perform_revert
from profiles.services.run_lock import RunLockUnavailable
from profiles.services.runs import pause_shard
from profiles.services.sync import resend_unconfirmed_syncs, sync_profile, sync_profiles

# Worth a retry two minutes later: the database or Redis did not answer. Nothing else is — not a
# held lock (a normal, skipped run) and not a time limit.
TRANSIENT_ERRORS = (
    OperationalError,
    InterfaceError,
    RunLockUnavailable,
    redis.ConnectionError,
    redis.TimeoutError,
)


# Declared once: every task of the audit that works on the database retries transient errors
# the same way (a fixed delay: no exponential backoff, none of Celery's default jitter), acks
# late, and is bounded by the same time limits.
RETRYING: dict[str, Any] = {
    "autoretry_for": TRANSIENT_ERRORS,
    "max_retries": settings.PROFILE_AUDIT_MAX_RETRIES,
    "default_retry_delay": settings.PROFILE_AUDIT_RETRY_DELAY,
    "retry_backoff": False,
    "retry_jitter": False,
    "acks_late": True,
    "soft_time_limit": settings.PROFILE_AUDIT_SOFT_TIME_LIMIT,
    "time_limit": settings.PROFILE_AUDIT_TIME_LIMIT,
}


class RetriesLogged(Task):
    """Logs each retry and the failure for good, under the task's own event names."""

    retrying_event = ""
    failed_event = ""
    # What a person reads first in the event (the audit's own tasks carry one).
    retrying_summary: str | None = None
    failed_summary: str | None = None

    def on_retry(
        self,
        exc: Exception,
        task_id: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        einfo: ExceptionInfo,
    ) -> None:
        audit_logger().warning(
            self.retrying_event,
            **_summary(self.retrying_summary),
            task_id=task_id,
            error=f"{type(exc).__name__}: {exc}",
            retry=self.request.retries + 1,
            max_retries=self.max_retries,
            countdown=self.default_retry_delay,
        )

    def on_failure(
        self,
        exc: Exception,
        task_id: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        einfo: ExceptionInfo,
    ) -> None:
        audit_logger().error(
            self.failed_event,
            **_summary(self.failed_summary),
            task_id=task_id,
            error=f"{type(exc).__name__}: {exc}",
            retries=self.request.retries,
        )


def _summary(text: str | None) -> dict[str, str]:
    return {"summary": text} if text else {}


class AuditTask(RetriesLogged):
    """Logs the outcome of each attempt, as the original's onSuccess/onFailure did."""

    retrying_event = "profile_audit.task_retrying"
    retrying_summary = "Profile-connection sync audit failed; retrying"
    failed_event = "profile_audit.task_failed"
    failed_summary = "Profile-connection sync audit failed"

    def on_success(
        self, retval: Any, task_id: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        audit_logger().info(
            "profile_audit.task_completed",
            summary="Profile-connection sync audit started its shards",
            task_id=task_id,
            queue=_queue(self.request),
            **retval,
        )


@shared_task(
    bind=True,
    base=AuditTask,
    name="profiles.audit_sync",  # queue: maintenance (CELERY_TASK_ROUTES)
    # Starting a run is quick: it records the run and its shards and sends them.
    **RETRYING,
)
def audit_sync_task(
    self: AuditTask,
    fix: bool = True,
    trigger: str = AuditTrigger.COMMAND,
    requested_by: str = "",
) -> dict[str, Any]:
    """Start an audit of every organization and fan it out over the workers, one
    ``profiles.audit_shard`` task per shard (beat entry "profile-connection-sync-audit").

    A change-driven run holding the lease (both fall due in the same minute four times a day)
    is not waited for here, where this worker may be the one to run its shards: the task is
    sent again in CHANGE_RUN_RETRY_DELAY s, up to CHANGE_RUN_RETRIES times, before the run is
    recorded skipped."""
    with structlog.contextvars.bound_contextvars(task_id=self.request.id):
        try:
            run = _start_sweep(self, fix=fix, trigger=trigger, requested_by=requested_by)
        except ChangeRunsHoldLease as exc:
            raise self.retry(
                exc=exc,
                countdown=CHANGE_RUN_RETRY_DELAY,
                max_retries=self.request.retries + 1,
            ) from exc
        shards = send_shards(run) if run.status == AuditStatus.RUNNING else 0
    run.refresh_from_db()
    return {
        "run_id": str(run.id),
        "status": run.status,
        "fix_mode": run.fix,
        "shards": shards,
        "total_issues_found": run.found,
        "total_issues_fixed": run.fixed,
    }


# A sweep that finds a change-driven run holding the lease tries again this often (s), this
# many times (five minutes in all) before it is recorded skipped.
CHANGE_RUN_RETRY_DELAY = 15
CHANGE_RUN_RETRIES = 20


def _start_sweep(self: AuditTask, *, fix: bool, trigger: str, requested_by: str) -> AuditRun:
    return start_run(
        AuditRequest(
            fix=fix,
            trigger=trigger,
            requested_by=requested_by,
            task_id=self.request.id or "",
            deadline=timedelta(seconds=settings.PROFILE_AUDIT_RUN_DEADLINE)
            if trigger == AuditTrigger.SCHEDULE
            else None,
        ),
        change_run_holds=WhenChangeRunHolds.DEFER
        if self.request.retries < CHANGE_RUN_RETRIES
        else WhenChangeRunHolds.SKIP,
    )


@shared_task(
    bind=True,
    base=AuditTask,
    name="profiles.audit_changes",  # queue: maintenance (CELERY_TASK_ROUTES)
    **RETRYING,
)
def audit_changes_task(self: AuditTask, fix: bool = True) -> dict[str, Any]:
    """The change-driven run (beat entry "profile-connection-sync-audit-changes", every
    minute): audit what changed since the last audit, fanned out like the sweep. Nothing
    changed, or a fixing run holding the lease: no run is recorded, only the heartbeat."""
    with structlog.contextvars.bound_contextvars(task_id=self.request.id):
        started = start_change_run(
            AuditRequest(fix=fix, changed=True, task_id=self.request.id or "")
        )
        if isinstance(started, NoRun):
            return {
                "run_id": None,
                "status": "idle",
                "fix_mode": fix,
                "reason": started.reason,
                "shards": 0,
                "total_issues_found": 0,
                "total_issues_fixed": 0,
            }
        shards = send_shards(started) if started.status == AuditStatus.RUNNING else 0
    started.refresh_from_db()
    return {
        "run_id": str(started.id),
        "status": started.status,
        "fix_mode": started.fix,
        "shards": shards,
        "total_issues_found": started.found,
        "total_issues_fixed": started.fixed,
    }


class ShardTask(Task):
    def on_failure(
        self,
        exc: Exception,
        task_id: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        einfo: ExceptionInfo,
    ) -> None:
        """The shard's attempt failed beyond its retries, or its process was killed at the hard
        time limit (this runs in the worker's main process then): continue from the cursor while
        deliveries remain (``work_shard`` counts them), else close the shard as failed."""
        shard_id = UUID(args[0] if args else kwargs["shard_id"])
        error = f"{type(exc).__name__}: {exc}"
        log = audit_logger().bind(task_id=task_id, shard_id=str(shard_id))
        try:
            if isinstance(exc, TimeLimitExceeded):
                log.warning("profile_audit.shard_killed", error=error)
                audit_shard_task.delay(
                    str(shard_id), run_id=args[1] if len(args) > 1 else kwargs.get("run_id", "")
                )
            else:
                log.error("profile_audit.shard_failed", error=error)
                fail_shard(shard_id=shard_id, error=error)
        except (DatabaseError, *TRANSIENT_ERRORS):
            log.exception("profile_audit.record_failed")


@shared_task(
    bind=True,
    base=ShardTask,
    name="profiles.audit_shard",  # queue: maintenance (CELERY_TASK_ROUTES)
    **RETRYING,
    # A worker process that dies mid-shard (OOM, kill -9) puts the message back: another one
    # resumes from the shard's cursor; nothing committed is redone.
    reject_on_worker_lost=True,
)
def audit_shard_task(self: ShardTask, shard_id: str, run_id: str = "") -> dict[str, str]:
    """Work one shard for at most PROFILE_AUDIT_SHARD_BUDGET seconds, then send its own
    continuation from the cursor. The soft time limit is a backstop that does the same.
    ``run_id`` is for the operator's eyes (``celery inspect active``, Flower)."""
    budget = Budget(seconds=settings.PROFILE_AUDIT_SHARD_BUDGET)
    worker = f"{self.request.hostname or socket.gethostname()}:{os.getpid()}:{self.request.id}"
    with structlog.contextvars.bound_contextvars(task_id=self.request.id, run_id=run_id or None):
        try:
            outcome = work_shard(shard_id=UUID(shard_id), budget=budget, worker=worker)
        except SoftTimeLimitExceeded:
            # The chunk in flight rolled back; the cursor holds the last one committed.
            _pause(shard_id)
            outcome = CONTINUE
        except TRANSIENT_ERRORS:
            # Retried two minutes later (autoretry_for): this delivery did not die.
            _pause(shard_id)
            raise
        if outcome == CONTINUE:
            audit_shard_task.delay(shard_id, run_id=run_id)
    return {"shard_id": shard_id, "outcome": outcome}


def _pause(shard_id: str) -> None:
    try:
        pause_shard(UUID(shard_id))
    except DatabaseError:
        # The database is what failed: the next delivery counts this one as died.
        audit_logger().warning("profile_audit.shard_pause_failed", shard_id=shard_id)


@shared_task(
    name="profiles.revert_run",  # queue: maintenance (CELERY_TASK_ROUTES)
    acks_late=True,
    soft_time_limit=3 * 3600,
    time_limit=3 * 3600 + 300,
)
def revert_run_task(revert_run_id: str) -> dict[str, object]:
    """Carry out a revert the admin recorded (``claim_revert``): a request never does long
    work; the revert's page shows its progress."""
    report = perform_revert(revert_run_id=UUID(revert_run_id))
    return report.as_json()


class SyncTask(RetriesLogged):
    """Logs the sync job's retries and its failure for good (its findings stay ``sent``: the
    daily maintenance sends it again)."""

    retrying_event = "profile_sync.retrying"
    failed_event = "profile_sync.failed"


@shared_task(
    bind=True,
    base=SyncTask,
    name="profiles.sync_profiles",  # queue: celery (CELERY_TASK_ROUTES)
    autoretry_for=TRANSIENT_ERRORS,
    max_retries=settings.PROFILE_AUDIT_SYNC_MAX_RETRIES,
    default_retry_delay=settings.PROFILE_AUDIT_SYNC_RETRY_DELAY,
    retry_backoff=False,
    retry_jitter=False,
    acks_late=True,
    # A worker that dies mid-job puts the message back; the job is idempotent.
    reject_on_worker_lost=True,
    soft_time_limit=settings.PROFILE_AUDIT_SOFT_TIME_LIMIT,
    time_limit=settings.PROFILE_AUDIT_TIME_LIMIT,
)
def sync_profiles_task(
    self: SyncTask, keys: list[list[str]], run_id: str | None = None
) -> dict[str, int]:
    """The sync job the audit sends for a chunk's missing profiles, one message per chunk:
    ``keys`` are [organization id, platform, external id]; ``run_id`` the run that sent it (for
    the log). Syncs them set-based in one transaction, which also turns their ``sent`` findings
    into ``fixed`` (or ``stale``). Idempotent: delivered twice, it creates each profile once."""
    results = sync_profiles(keys=[(UUID(org), platform, ext) for org, platform, ext in keys])
    actions: dict[str, int] = {}
    for result in results.values():
        actions[result.action] = actions.get(result.action, 0) + 1
    audit_logger().info(
        "profile_sync.completed",
        task_id=self.request.id,
        run_id=run_id,
        keys=len(keys),
        org_ids=len({k[0] for k in keys}),
        **actions,
    )
    return actions


@shared_task(
    bind=True,
    base=SyncTask,
    name="profiles.sync_profile",  # queue: celery (CELERY_TASK_ROUTES)
    autoretry_for=TRANSIENT_ERRORS,
    max_retries=settings.PROFILE_AUDIT_SYNC_MAX_RETRIES,
    default_retry_delay=settings.PROFILE_AUDIT_SYNC_RETRY_DELAY,
    retry_backoff=False,
    retry_jitter=False,
    acks_late=True,
    reject_on_worker_lost=True,
)
def sync_profile_task(
    self: SyncTask, organization_id: str, platform: str, external_id: str
) -> dict[str, str]:
    """Sync one key (kept for messages sent by earlier versions; the audit sends batches)."""
    result = sync_profile(
        organization_id=UUID(organization_id), platform=platform, external_id=external_id
    )
    audit_logger().info(
        "profile_sync.completed",
        org_id=organization_id,
        platform=platform,
        external_id=external_id,
        action=result.action,
        profile_id=str(result.profile_id) if result.profile_id else None,
    )
    return {"action": result.action, "profile_id": str(result.profile_id or "")}


@shared_task(
    name="profiles.prune_audit_runs",  # queue: maintenance (CELERY_TASK_ROUTES)
    acks_late=True,
    # Daily schedule: the limits are far below the interval; batches keep each step short.
    soft_time_limit=30 * 60,
    time_limit=35 * 60,
)
def prune_audit_runs_task() -> dict[str, object]:
    """Daily maintenance: close runs whose process died (``interrupted``, so they can be
    reverted), send the sync job again for findings still unconfirmed (``sent``) after
    PROFILE_AUDIT_SYNC_RESEND_AFTER, then retention: delete audit runs (and findings) older than
    PROFILE_AUDIT_RETENTION_DAYS, keeping the latest run of each organization."""
    interrupted = close_dead_runs()
    shards_resent = resend_stale_shards()
    resent = resend_unconfirmed_syncs(
        older_than=timedelta(seconds=settings.PROFILE_AUDIT_SYNC_RESEND_AFTER),
        send=send_sync_job,
    )
    report = prune_audit_runs(
        older_than_days=settings.PROFILE_AUDIT_RETENTION_DAYS,
        batch_size=settings.PROFILE_AUDIT_PRUNE_BATCH_SIZE,
    )
    return {
        **report.as_json(),
        **resent.as_json(),
        "runs_interrupted": len(interrupted),
        "shards_resent": shards_resent,
    }


def send_sync_job(keys: list[list[str]], run_id: UUID) -> None:
    """Send one sync job (the maintenance's re-send of findings still ``sent``)."""
    sync_profiles_task.apply_async(args=(keys,), kwargs={"run_id": str(run_id)})


def _queue(request: Context) -> str | None:
    return (request.delivery_info or {}).get("routing_key")
