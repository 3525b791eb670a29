"""The fixing-run lock: at most one fixing audit at a time, on any number of servers (DESIGN
"Running it"). A Redis lock when a Redis URL is configured; a file lock on one machine otherwise.

Non-blocking by design: a run that finds the lock held is skipped, never queued behind it.
"""

from __future__ import annotations

import fcntl
import os
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit, urlunsplit

import redis
from django.conf import settings
from redis.backoff import NoBackoff
from redis.exceptions import LockError, LockNotOwnedError
from redis.retry import Retry

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def redis_start_hint(url: str) -> str:
    """What to do when the lock's Redis does not answer, for the host and port the URL names
    (never its password): on this machine, the command that starts it there."""
    try:
        parts = urlsplit(url)
        if parts.scheme == "unix":
            return f"check that Redis listens on the socket {parts.path}"
        host, port = parts.hostname or "127.0.0.1", parts.port or 6379
    except ValueError:  # a port that is not a number: the URL itself is what to fix
        return f"fix the URL ({_redacted(url)})"
    if host not in LOOPBACK_HOSTS:
        return f"check that Redis on {host} port {port} is up and reachable from this host"
    return (
        f'start it with: redis-server --daemonize yes --bind {host} --port {port} --save ""'
        " --appendonly no"
    )


class RunLockUnavailable(RuntimeError):
    """The lock's service did not answer. Fixing runs fail closed: no lock, no fix."""


class RunLock(Protocol):
    description: str
    """Where the lock lives, for messages (never a password)."""
    kind: str
    """``redis`` or ``file``: a run with one kind never runs beside a run with the other."""

    def acquire(self) -> bool:
        """Take the lock without waiting; False when another run holds it."""

    def still_held(self) -> bool:
        """Whether this run still owns the lock (renewing its lease where it has one)."""

    def release(self) -> bool:
        """Give the lock up; False when it was no longer this run's to give."""

    def holder(self) -> str:
        """Who holds the lock, best effort, for the record of a skipped run."""

    @property
    def token(self) -> str:
        """This holder's token (after ``acquire``): the run records it so that its shards, in
        any process, can renew and release the lock it took."""

    def adopt(self, token: str) -> None:
        """Act for the holder of ``token`` (a shard of the run that took the lock)."""

    def current_token(self) -> str | None:
        """Whoever's token holds the lock now; None when it is free."""

    def retake(self) -> bool:
        """Take the lock again with this holder's token if nobody holds it (Redis lost the key);
        False when another holder has it."""

    def force_release(self, *, token: str) -> bool:
        """Free the lock if ``token`` still holds it; False if it is free or another's."""

    def state(self) -> LockState:
        """Who holds the lock, read without taking it."""


def fixing_run_lock() -> RunLock:
    """The lock every fixing run takes: Redis when ``PROFILE_AUDIT_LOCK_REDIS_URL`` (by default
    ``REDIS_URL``) is set, else a file lock (the embedded default, one machine)."""
    if settings.PROFILE_AUDIT_LOCK_REDIS_URL:
        return RedisRunLock(
            url=settings.PROFILE_AUDIT_LOCK_REDIS_URL,
            key=settings.PROFILE_AUDIT_LOCK_KEY,
            ttl=settings.PROFILE_AUDIT_LOCK_TTL,
            socket_timeout=settings.PROFILE_AUDIT_LOCK_SOCKET_TIMEOUT,
        )
    return FileRunLock(path=Path(settings.PROFILE_AUDIT_LOCK_FILE))


def _holder_token() -> str:
    # Unique per acquisition (the uuid), and readable by whoever finds the lock held.
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex}"


class RedisRunLock:
    """redis-py's ``Lock``: a token-owned key with a TTL. Release and renewal check the token,
    so a run never frees or extends a lock that has passed to another run, and a holder that
    dies leaves the key to expire after ``ttl`` seconds."""

    kind = "redis"

    def __init__(self, *, url: str, key: str, ttl: float, socket_timeout: float) -> None:
        self.description = f"Redis lock {key!r} at {_redacted(url)}"
        self.key = key
        # Fail fast: short socket timeouts and no client-side retries, so an unreachable Redis
        # is an error within seconds rather than a run that hangs.
        self.client = redis.Redis.from_url(
            url,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            retry=Retry(NoBackoff(), 0),
        )
        self.lock = self.client.lock(key, timeout=ttl, blocking=False, thread_local=False)
        self._url = url
        self._token = ""

    @property
    def token(self) -> str:
        return self._token

    def acquire(self) -> bool:
        token = _holder_token()
        try:
            acquired = bool(self.lock.acquire(token=token))
        except redis.RedisError as exc:
            raise self._unavailable(exc) from exc
        if acquired:
            self._token = token
        return acquired

    def adopt(self, token: str) -> None:
        self._token = token
        self.lock.local.token = token.encode()

    def current_token(self) -> str | None:
        try:
            value = self.client.get(self.key)
        except redis.RedisError as exc:
            raise self._unavailable(exc) from exc
        # The client does not decode responses: bytes (redis types get() as bytes | str).
        return value.decode(errors="replace") if value is not None else None  # type: ignore[union-attr]

    def still_held(self) -> bool:
        try:
            # Atomically: still our token? then reset the TTL to its full length.
            self.lock.reacquire()
        except LockNotOwnedError:
            return False
        except redis.RedisError as exc:
            raise self._unavailable(exc) from exc
        return True

    def retake(self) -> bool:
        if not self._token:
            return False
        try:
            return bool(self.lock.acquire(token=self._token))
        except redis.RedisError as exc:
            raise self._unavailable(exc) from exc

    def release(self) -> bool:
        try:
            self.lock.release()
        except LockNotOwnedError:
            return False
        except LockError:  # never acquired, or already released
            return False
        except redis.RedisError as exc:
            raise self._unavailable(exc) from exc
        finally:
            self.client.close()
        return True

    def force_release(self, *, token: str) -> bool:
        # redis-py's own token-checked release, acting for ``token``: a run that took the lock
        # after the operator looked is not the one released.
        if not token:
            return False
        self.adopt(token)
        return self.release()

    def state(self) -> LockState:
        try:
            with self.client.pipeline(transaction=True) as pipe:
                # A pipeline's commands return the pipeline (redis types them as the result).
                token, ttl_ms = pipe.get(self.key).pttl(self.key).execute()  # type: ignore[union-attr]
        except redis.RedisError as exc:
            return LockState(where=self.description, reachable=False, error=_error(exc))
        finally:
            self.client.close()
        if token is None:
            return LockState(where=self.description)
        expires = max(ttl_ms, 0) / 1000 if ttl_ms is not None and ttl_ms >= 0 else None
        return LockState(
            where=self.description,
            held=True,
            token=token.decode(errors="replace"),
            expires_in=expires,
        )

    def holder(self) -> str:
        try:
            token = self.client.get(self.key)
            ttl_ms = self.client.pttl(self.key)
        except redis.RedisError:
            return "unknown"
        if token is None:
            return "nobody (released meanwhile)"
        # bytes: the client does not decode responses (redis types get() as bytes | str).
        name = token.decode(errors="replace").rsplit(":", 1)[0]  # type: ignore[union-attr]
        return f"{name}, expires in {max(ttl_ms, 0) / 1000:.0f} s"

    def _unavailable(self, exc: redis.RedisError) -> RunLockUnavailable:
        return RunLockUnavailable(
            f"cannot reach Redis at {_redacted(self._url)} for the fixing-run lock "
            f"({type(exc).__name__}: {exc}). Check "
            f"PROFILE_AUDIT_LOCK_REDIS_URL / REDIS_URL, or {redis_start_hint(self._url)}"
        )


class FileRunLock:
    """``flock`` on a file: the embedded default's lock, for runs on one machine. The kernel
    drops it when its holder dies, so a dead holder never blocks anyone."""

    kind = "file"

    def __init__(self, *, path: Path) -> None:
        self.path = path
        self.description = f"file lock {path}"
        self._fd: int | None = None
        self._token = ""

    @property
    def token(self) -> str:
        return self._token

    def adopt(self, token: str) -> None:
        # flock belongs to the process that took it: another process cannot act for it (and,
        # without a broker, every shard runs in the process that took it).
        self._token = token

    def current_token(self) -> str | None:
        # Read without taking it: probing the lock would make a run starting at that moment
        # find it held and skip.
        state = _file_lock_state(self)
        return (state.token or "unknown") if state.held else None

    def acquire(self) -> bool:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise RunLockUnavailable(
                f"cannot open the fixing-run lock file {self.path} ({exc})"
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        token = _holder_token()
        os.ftruncate(fd, 0)
        os.write(fd, token.encode())
        self._fd = fd
        self._token = token
        return True

    def still_held(self) -> bool:
        # The lock belongs to the inode we opened: if the file was removed or replaced, another
        # run can lock the new one, so ours no longer excludes anybody.
        if self._fd is None:
            return False
        try:
            current = os.stat(self.path)
        except FileNotFoundError:
            return False
        ours = os.fstat(self._fd)
        return (current.st_dev, current.st_ino) == (ours.st_dev, ours.st_ino)

    def release(self) -> bool:
        if self._fd is None:
            return False
        held = self.still_held()
        # The file stays: removing it would let two runs lock two different inodes.
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None
        return held

    def holder(self) -> str:
        try:
            token = self.path.read_text(errors="replace").strip()
        except OSError:
            return "unknown"
        return token.rsplit(":", 1)[0] or "unknown"

    def retake(self) -> bool:
        # A flock is never lost while its holder lives; once replaced, it is another run's.
        return False

    def force_release(self, *, token: str) -> bool:
        # A flock cannot be taken from another process; removing the file does the same job:
        # the holder's still_held() sees another inode and stops, and the next run locks a new
        # file.
        state = self.state()
        if not token or not state.held or state.token != token:
            return False
        try:
            self.path.unlink()
        except FileNotFoundError:
            return False
        return True

    def state(self) -> LockState:
        return _file_lock_state(self)


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


# --- The lock as operators see it: state for the dashboard and /metrics, and a forced release -


@dataclass(frozen=True)
class LockState:
    """Who holds the fixing-run lock, read without taking it."""

    where: str
    reachable: bool = True
    held: bool = False
    token: str = ""
    expires_in: float | None = None  # seconds; None for a file lock (no expiry)
    error: str = ""

    @property
    def holder(self) -> str:
        """``host:pid`` of the holder (the token without its per-acquisition part)."""
        return self.token.rsplit(":", 1)[0] if self.token else ""


def fixing_run_lock_state() -> LockState:
    return fixing_run_lock().state()


def force_release_fixing_run_lock(*, token: str) -> bool:
    """Free the lock if ``token`` still holds it, and fence its run out (its epoch is raised, so
    it commits nothing more); False if it is free or held by another run. The run that held it
    notices at its next chunk and stops there."""
    from profiles.services.lease import fence_out

    released = fixing_run_lock().force_release(token=token)
    fenced = fence_out(token=token) if token else False
    return released or fenced


def _file_lock_state(lock: FileRunLock) -> LockState:
    try:
        stat = os.stat(lock.path)
        token = lock.path.read_text(errors="replace").strip()
    except FileNotFoundError:
        return LockState(where=lock.description)
    except OSError as exc:
        return LockState(where=lock.description, reachable=False, error=_error(exc))
    return LockState(
        where=lock.description, held=_flocked(stat), token=token if _flocked(stat) else ""
    )


def _flocked(stat: os.stat_result) -> bool:
    """Whether some process holds a flock on this inode (Linux: /proc/locks), without taking it:
    trying the lock would make a run starting at that moment find it held and skip."""
    wanted = f"{os.major(stat.st_dev):02x}:{os.minor(stat.st_dev):02x}:{stat.st_ino}"
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return False
    for line in lines:
        fields = line.split()
        if "FLOCK" in fields and any(f == wanted for f in fields):
            return True
    return False


def _error(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"
