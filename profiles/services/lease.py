"""The fixing-run lease: the lock (Redis across hosts, a file on one machine) plus a fencing
epoch in the database (DESIGN "Fencing").

Whoever takes the lock raises the epoch in ``FixingRunLease``; every fixing transaction proves,
just before it commits, that the lease still has its run's epoch (``prove``), and rolls back
otherwise. So the lock keeps runs apart quickly, and the database decides: a holder that lost
the lock (paused past its expiry, cut off from Redis, Redis restarted without persistence)
commits nothing once another run took the lease, and a run with the other kind of lock cannot
take a lease that a live run of the right kind holds.

A lease is live while its holder renews it (every chunk); it can be taken over when it has not
been renewed for the lock's TTL, or when its run was worked in one process on this host and that
process is gone (a killed command).
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from django.conf import settings
from django.db import DatabaseError, OperationalError, connection, transaction
from django.db.backends.utils import CursorWrapper
from django.db.models import F
from django.utils import timezone

from profiles.models import AuditRun, AuditStatus, FixingRunLease
from profiles.services.organization_lock import lock_timed_out
from profiles.services.run_lock import RunLock, RunLockUnavailable, fixing_run_lock


class LeaseLost(Exception):
    """This run's epoch is no longer the lease's: another run took it. Whatever the caller's
    transaction did is rolled back."""


@dataclass(frozen=True)
class LeaseHeld:
    """Another run holds the lease: why, for the record of the skipped run."""

    reason: str


def this_process() -> str:
    """``host:pid:start`` of this process: the start time (clock ticks since boot) tells a live
    process from a later one that got the same pid."""
    return f"{socket.gethostname()}:{os.getpid()}:{_start_ticks(os.getpid())}"


def process_alive(process: str) -> bool | None:
    """Whether the process named by ``this_process()`` is alive; None when it is on another host
    (only its lease's expiry can tell then)."""
    host, _, rest = process.partition(":")
    pid, _, start = rest.partition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return None
    return _start_ticks(int(pid)) == start and start != ""


def _start_ticks(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    # Field 22, counted after the command name (which may hold spaces) in parentheses.
    return stat.rsplit(")", 1)[1].split()[19]


class FixingLease:
    """The lease a fixing run takes, renews and releases; shards of the run in other processes
    adopt it from the run's record (``lock_token``, ``lock_epoch``)."""

    def __init__(self, lock: RunLock | None = None, *, name: str | None = None) -> None:
        self.lock = lock or fixing_run_lock()
        self.name = name or settings.PROFILE_AUDIT_LOCK_KEY
        self.epoch: int | None = None

    @property
    def description(self) -> str:
        return self.lock.description

    @property
    def token(self) -> str:
        return self.lock.token

    # --- Taking it ---------------------------------------------------------------------------

    def take(self) -> int | LeaseHeld:
        """Take the lock and raise the epoch: the new epoch, or why another run holds it.
        Raises ``RunLockUnavailable`` when the lock's service does not answer, or when the lease
        row stays locked past ``PROFILE_AUDIT_LEASE_WAIT`` (a stopped transaction)."""
        if not self.lock.acquire():
            dead = self._dead_holder()
            if dead is None or not self.lock.force_release(token=dead) or not self.lock.acquire():
                return LeaseHeld(f"{self.lock.description}; held by {self.lock.holder()}")
        try:
            outcome = self._raise_epoch()
        except BaseException:
            self.lock.release()
            raise
        if isinstance(outcome, LeaseHeld):
            self.lock.release()
        return outcome

    def _dead_holder(self) -> str | None:
        """The lock's token when its run was worked in one process of this host that is gone:
        the lock is that dead run's, and nobody else can renew it."""
        token = self.lock.current_token()
        if not token:
            return None
        run = (
            AuditRun.objects.filter(lock_token=token, status=AuditStatus.RUNNING)
            .exclude(process="")
            .only("process")
            .first()
        )
        return token if run is not None and process_alive(run.process) is False else None

    def _raise_epoch(self) -> int | LeaseHeld:
        deadline = time.monotonic() + settings.PROFILE_AUDIT_LEASE_WAIT
        while True:
            try:
                with transaction.atomic():
                    return self._raise_epoch_once()
            except OperationalError as exc:
                if not lock_timed_out(exc) or time.monotonic() >= deadline:
                    if lock_timed_out(exc):
                        raise RunLockUnavailable(
                            f"the fixing-run lease stayed locked for "
                            f"{settings.PROFILE_AUDIT_LEASE_WAIT:g} s by a stopped transaction; "
                            "nothing was fixed"
                        ) from exc
                    raise
                self.lock.still_held()  # keep our lock while we wait

    def _raise_epoch_once(self) -> int | LeaseHeld:
        FixingRunLease.objects.bulk_create([FixingRunLease(name=self.name)], ignore_conflicts=True)
        _bounded_lock_wait()
        lease = FixingRunLease.objects.select_for_update().get(name=self.name)
        now = timezone.now()
        if lease.token and lease.token != self.token and self._live(lease, now):
            kind = lease.lock_kind
            other = f"a {kind} lock" if kind != self.lock.kind else "its lock"
            return LeaseHeld(
                f"the fixing-run lease in the database is held through {other} "
                f"({lease.where}; renewed {_ago(lease.renewed_at, now)})"
                + (
                    f"; this run has a {self.lock.kind} lock: run it with the same "
                    "REDIS_URL / PROFILE_AUDIT_LOCK_REDIS_URL as the others"
                    if kind != self.lock.kind
                    else ""
                )
            )
        lease.epoch += 1
        lease.token = self.token
        lease.lock_kind = self.lock.kind
        lease.where = self.lock.description[:255]
        lease.taken_at = lease.renewed_at = now
        lease.save()
        self.epoch = lease.epoch
        return lease.epoch

    def _live(self, lease: FixingRunLease, now: datetime) -> bool:
        if lease.renewed_at is None or now - lease.renewed_at > timedelta(
            seconds=settings.PROFILE_AUDIT_LOCK_TTL
        ):
            return False
        run = (
            AuditRun.objects.filter(lock_token=lease.token, status=AuditStatus.RUNNING)
            .only("process")
            .first()
        )
        if run is None:  # released, or its run was closed: nothing can commit with it
            return False
        return not (run.process and process_alive(run.process) is False)

    # --- Holding it --------------------------------------------------------------------------

    def adopt(self, *, token: str, epoch: int | None) -> None:
        """Act for the run that took the lease (a shard in another process)."""
        self.lock.adopt(token)
        self.epoch = epoch

    def renew(self) -> str | None:
        """Renew the lease (between chunks); why this run must stop, or None.

        The database decides: while the lease has our epoch, a lock that Redis lost (restarted
        without persistence) is taken again, and a Redis that does not answer is waited out by
        the next renewal; once another run raised the epoch, we stop."""
        # Django reads `epoch=None` (adopted without one) as IS NULL: no lease; the stubs take
        # ints only.
        updated = FixingRunLease.objects.filter(name=self.name, epoch=self.epoch).update(  # type: ignore[misc]
            renewed_at=timezone.now()
        )
        if not updated:
            return f"lost the fixing-run lease ({self.description}) to another run"
        try:
            if not self.lock.still_held() and not self.lock.retake():
                return f"lost the fixing-run lock ({self.description}) to another run"
        except RunLockUnavailable:
            pass  # the epoch still proves the lease; Redis is checked again next time
        return None

    def release(self) -> None:
        """Give the lease up: a later run need not wait for its expiry."""
        # `epoch=None` is IS NULL to Django (no lease), a type error to the stubs.
        FixingRunLease.objects.filter(name=self.name, epoch=self.epoch, token=self.token).update(  # type: ignore[misc]
            token="", renewed_at=None
        )
        with contextlib.suppress(RunLockUnavailable):  # the key expires by itself
            self.lock.release()


def prove(*, name: str | None = None, epoch: int | None) -> None:
    """Inside a fixing transaction, just before it commits: raise ``LeaseLost`` unless the lease
    still has ``epoch``. On PostgreSQL the row is held FOR SHARE until the commit, so a successor
    raising the epoch waits for this commit (concurrent shards of one run do not wait for each
    other); SQLite serializes writers anyway."""
    if not connection.in_atomic_block:
        raise RuntimeError("prove() must be called inside transaction.atomic()")
    name = name or settings.PROFILE_AUDIT_LOCK_KEY
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute(
                f"SELECT epoch FROM {FixingRunLease._meta.db_table} WHERE name = %s FOR SHARE",
                [name],
            )
            row = cursor.fetchone()
        current = row[0] if row else None
    else:
        current = FixingRunLease.objects.filter(name=name).values_list("epoch", flat=True).first()
    if epoch is None or current != epoch:
        raise LeaseLost(
            f"the fixing-run lease has epoch {current}, this run took {epoch}: another run took "
            "it over; this transaction is rolled back"
        )


def fence_out(*, name: str | None = None, token: str) -> bool:
    """Raise the epoch of a lease ``token`` holds (a forced release): its run commits nothing
    more. False when ``token`` does not hold it."""
    return bool(
        FixingRunLease.objects.filter(name=name or settings.PROFILE_AUDIT_LOCK_KEY, token=token)
        .exclude(token="")
        .update(epoch=F("epoch") + 1, token="", renewed_at=None)
    )


# PostgreSQL advisory-lock namespace of the fencing marks ("PSA2"; organizations' are "PSA1").
_EPOCH_NAMESPACE = 0x50534132


def mark_fencing_epoch(cursor: CursorWrapper, epoch: int) -> None:
    """Mark this fixing transaction with its run's epoch (a shared advisory lock, visible in
    ``pg_locks`` until the transaction ends), so a successor can end it once it is fenced out."""
    cursor.execute(
        "SELECT pg_advisory_xact_lock_shared(%s, %s)", [_EPOCH_NAMESPACE, epoch % (1 << 31)]
    )


def end_fenced_transactions(epoch: int) -> int:
    """End the transactions marked with an epoch below ``epoch``: their runs' lease was taken
    over, so they can never commit, yet they may hold organization locks (a process paused in a
    chunk). How many were ended (0 without the privilege to end them)."""
    with connection.cursor() as cursor:
        try:
            with transaction.atomic():
                cursor.execute(
                    # pg_locks spans the cluster: only this database's runs share our epochs.
                    "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_locks "
                    "WHERE locktype = 'advisory' AND classid = %s AND objsubid = 2 "
                    "AND objid::bigint < %s AND pid <> pg_backend_pid() "
                    "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
                    [_EPOCH_NAMESPACE, epoch % (1 << 31)],
                )
                ended: int
                (ended,) = cursor.fetchone()
        except DatabaseError:
            return 0
    return ended


def current_epoch(*, name: str | None = None) -> int | None:
    return (
        FixingRunLease.objects.filter(name=name or settings.PROFILE_AUDIT_LOCK_KEY)
        .values_list("epoch", flat=True)
        .first()
    )


def _bounded_lock_wait() -> None:
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT set_config('lock_timeout', %s, true)",
                [f"{int(settings.PROFILE_AUDIT_ORG_LOCK_WAIT * 1000)}ms"],
            )


def _ago(when: datetime | None, now: datetime) -> str:
    if when is None:
        return "never"
    return f"{(now - when).total_seconds():.0f} s ago"
