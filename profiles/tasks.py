"""Celery tasks of the profiles app: thin wrappers over the services."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from uuid import UUID

import redis
import structlog
from billiard.pool import soft_timeout_sighandler
from celery import Task, shared_task
from celery.exceptions import TimeLimitExceeded
from django.conf import settings
from django.db import DatabaseError, InterfaceError, OperationalError

from audit_project.log_config import audit_logger
from profiles.models import AuditTrigger
from profiles.services.locked_run import fail_killed_runs, run_locked_audit
from profiles.services.retention import prune_audit_runs
from profiles.services.run_lock import RunLockUnavailable
from profiles.services.sync import sync_profile

# Worth a retry two minutes later: the database or Redis did not answer. Nothing else is — not a
# held lock (a normal, skipped run) and not a time limit.
TRANSIENT_ERRORS = (
    OperationalError,
    InterfaceError,
    RunLockUnavailable,
    redis.ConnectionError,
    redis.TimeoutError,
)


class SoftTimeLimit:
    """The task's soft time limit as a stop check: once reached, the audit stops before its
    next organization (``should_stop``) and ends ``partial``, releasing its lock.

    billiard signals the soft limit to the process running the task (SIGUSR1), and its handler
    raises ``SoftTimeLimitExceeded`` wherever the task is — possibly inside an organization's
    transaction, mid-query. ``installed()`` turns that signal into a flag instead; the deadline
    covers pools that do not signal (solo, threads) and eager runs.
    """

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self._deadline = time.monotonic() + seconds if seconds else None
        self._signalled = False

    def __call__(self) -> str | None:
        if self._signalled or (self._deadline is not None and time.monotonic() >= self._deadline):
            return f"soft time limit reached ({self.seconds:g} s)"
        return None

    @contextmanager
    def installed(self) -> Iterator[SoftTimeLimit]:
        sig = getattr(signal, "SIGUSR1", None)
        ours = (
            sig is not None
            and threading.current_thread() is threading.main_thread()
            and signal.getsignal(sig) is soft_timeout_sighandler
        )
        if not ours:  # not a prefork child: SIGUSR1 is not the soft limit here
            yield self
            return
        previous = signal.signal(sig, self._on_signal)
        try:
            yield self
        finally:
            signal.signal(sig, previous)

    def _on_signal(self, signum, frame) -> None:
        self._signalled = True


class AuditTask(Task):
    """Logs the outcome of each attempt, as the original's onSuccess/onFailure did."""

    def on_success(self, retval, task_id, args, kwargs) -> None:
        audit_logger().info(
            "profile_audit.task_completed",
            summary="Profile-connection sync audit completed",
            task_id=task_id,
            queue=_queue(self.request),
            **retval,
        )

    def on_retry(self, exc, task_id, args, kwargs, einfo) -> None:
        audit_logger().warning(
            "profile_audit.task_retrying",
            summary="Profile-connection sync audit failed; retrying",
            task_id=task_id,
            error=f"{type(exc).__name__}: {exc}",
            retry=self.request.retries + 1,
            max_retries=self.max_retries,
            countdown=self.default_retry_delay,
        )

    def on_failure(self, exc, task_id, args, kwargs, einfo) -> None:
        error = f"{type(exc).__name__}: {exc}"
        killed = 0
        if isinstance(exc, TimeLimitExceeded):
            # Called in the worker's main process: the one that ran the audit was killed.
            try:
                killed = fail_killed_runs(
                    trigger=AuditTrigger.SCHEDULE,
                    time_limit=self.time_limit,
                    error=f"killed at the hard time limit ({error}); the fixing-run lock is "
                    "left to expire",
                )
            except DatabaseError:
                audit_logger().exception("profile_audit.record_failed", task_id=task_id)
        audit_logger().error(
            "profile_audit.task_failed",
            summary="Profile-connection sync audit failed",
            task_id=task_id,
            error=error,
            retries=self.request.retries,
            runs_closed=killed,
        )


@shared_task(
    bind=True,
    base=AuditTask,
    name="profiles.audit_sync",  # queue: maintenance (CELERY_TASK_ROUTES)
    soft_time_limit=settings.PROFILE_AUDIT_SOFT_TIME_LIMIT,
    time_limit=settings.PROFILE_AUDIT_TIME_LIMIT,
    autoretry_for=TRANSIENT_ERRORS,
    max_retries=settings.PROFILE_AUDIT_MAX_RETRIES,
    default_retry_delay=settings.PROFILE_AUDIT_RETRY_DELAY,
    # A fixed delay: no exponential backoff, and none of Celery's default jitter.
    retry_backoff=False,
    retry_jitter=False,
    acks_late=True,
)
def audit_sync_task(self: AuditTask, fix: bool = True) -> dict[str, Any]:
    """The scheduled audit of every organization (beat entry "profile-connection-sync-audit")."""
    _, soft_limit = self.request.timelimit or (None, None)
    stop = SoftTimeLimit(soft_limit or self.soft_time_limit)
    # Every event of this attempt carries the task id, also those logged before a run exists.
    with stop.installed(), structlog.contextvars.bound_contextvars(task_id=self.request.id):
        report = run_locked_audit(
            org_id=None, fix=fix, scopes=None, trigger=AuditTrigger.SCHEDULE, should_stop=stop
        )
    run = report.run
    return {
        "run_id": str(run.id),
        "status": run.status,
        "fix_mode": run.fix,
        "total_issues_found": run.found,
        "total_issues_fixed": run.fixed,
        "duration_seconds": run.duration_seconds,
    }


@shared_task(name="profiles.sync_profile", acks_late=True)
def sync_profile_task(organization_id: str, platform: str, external_id: str) -> dict[str, str]:
    """The profile sync job the audit dispatches for a missing profile (idempotent)."""
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
    """Retention: delete audit runs (and findings) older than PROFILE_AUDIT_RETENTION_DAYS,
    keeping the latest run of each organization."""
    report = prune_audit_runs(
        older_than_days=settings.PROFILE_AUDIT_RETENTION_DAYS,
        batch_size=settings.PROFILE_AUDIT_PRUNE_BATCH_SIZE,
    )
    return report.as_json()


def _queue(request) -> str | None:
    return (request.delivery_info or {}).get("routing_key")
