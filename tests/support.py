"""Helpers for the tests that cross process boundaries: a real Celery worker, a second
``manage.py`` process, and ways to hold an organization's fix or break its commit on purpose."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import redis
from django.conf import settings
from django.db import connection
from django_celery_beat.schedulers import DatabaseScheduler

from audit_project.celery import app as celery_app
from audit_project.log_config import LOG_FILE_NAME
from profiles.services.organization_lock import _LOCK_NAMESPACE, _signed_int32

BASE_DIR = Path(settings.BASE_DIR)
T = TypeVar("T")

# The broker's keys in the test Redis database: the two queues and kombu's unacked bookkeeping.
BROKER_KEYS = ("maintenance", "celery", "unacked", "unacked_index", "unacked_mutex")
BEAT_ENTRY = "profile-connection-sync-audit"


def wait_for(condition: Callable[[], T], *, timeout: float = 30.0, what: str = "condition") -> T:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        pause.wait(0.05)


def free_port() -> int:
    """A loopback port nothing listens on now, for a server a test starts: never a fixed one,
    since another suite (.ci/run runs several at once) may be running the same test."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def redis_client() -> redis.Redis:
    return redis.Redis.from_url(os.environ["REDIS_URL"])


def purge_broker() -> None:
    """Drop every message the test Redis database holds for our queues (a retry left waiting by
    a stopped worker must not be run by the next one)."""
    client = redis_client()
    client.delete(*BROKER_KEYS)
    client.close()


def database_env() -> dict[str, str]:
    """Environment variables that point another process at the test database."""
    db = connection.settings_dict
    if connection.vendor == "postgresql":
        auth = db["USER"] + (f":{db['PASSWORD']}" if db.get("PASSWORD") else "")
        url = f"postgres://{auth}@{db['HOST']}:{db['PORT']}/{db['NAME']}"
        return {"DATABASE_URL": url}
    return {"SQLITE_PATH": str(db["NAME"])}


def process_env(log_dir: Path, **overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "SQLITE_PATH")}
    env.update(database_env())
    env.update(
        DJANGO_SETTINGS_MODULE="audit_project.settings",
        PROFILE_AUDIT_LOG_DIR=str(log_dir),
        PROFILE_AUDIT_CONSOLE_LEVEL="INFO",
        PYTHONUNBUFFERED="1",
    )
    env.update(overrides)
    return env


def read_events(log_dir: Path) -> list[dict[str, Any]]:
    path = log_dir / LOG_FILE_NAME
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def find_event(log_dir: Path, event: str, **fields: Any) -> dict[str, Any] | None:
    for entry in read_events(log_dir):
        if entry.get("event") == event and all(entry.get(k) == v for k, v in fields.items()):
            return entry
    return None


@contextmanager
def beat_scheduler() -> Iterator[DatabaseScheduler]:
    """The scheduler beat runs, set up as at beat's start: it reads the entries `migrate` created
    (and would upsert CELERY_BEAT_SCHEDULE, empty on purpose). Needs a committing test: it closes
    connections left in a transaction."""
    scheduler = DatabaseScheduler(app=celery_app)
    try:
        yield scheduler
    finally:
        scheduler.sync()
        scheduler._finalize.cancel()  # no sync at interpreter exit: the test database is gone


class CeleryWorker:
    """``celery worker -Q maintenance,celery`` in a subprocess, on the test database and the
    test Redis database. Prefork with one child: soft time limits are signalled as in
    production, and tasks run one at a time in the order they were queued."""

    def __init__(
        self, log_dir: Path, *, concurrency: int = 1, queues: str = "maintenance,celery", **env: str
    ) -> None:
        self.log_dir = log_dir
        self.concurrency = concurrency
        self.queues = queues
        self.nodename = f"psa-test-{uuid.uuid4().hex[:8]}@localhost"
        self.output = log_dir / "worker-output.log"
        self.env = process_env(log_dir, **env)
        self.proc: subprocess.Popen | None = None

    def start(self, *, purge: bool = True, broker_url: str | None = None) -> CeleryWorker:
        """Start it; ``purge=False`` keeps the messages already queued (for it to take).
        ``broker_url``: a Redis of the test's own (then readiness is read from the worker's
        output, not pinged through the test's broker)."""
        if purge:
            purge_broker()
        self.broker_url = broker_url
        with self.output.open("wb") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "celery",
                    "-A",
                    "audit_project",
                    "worker",
                    "-Q",
                    self.queues,
                    "--pool",
                    "prefork",
                    "--concurrency",
                    str(self.concurrency),
                    "-n",
                    self.nodename,
                    "--without-gossip",
                    "--without-mingle",
                    "--without-heartbeat",
                    "-l",
                    "info",
                ],
                cwd=BASE_DIR,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            wait_for(self._answers_ping, timeout=60, what=f"worker {self.nodename} to start")
        except AssertionError:
            self.stop()
            raise AssertionError(f"the worker did not start:\n{self.text()[-4000:]}") from None
        return self

    def _answers_ping(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"the worker exited:\n{self.text()[-4000:]}")
        if self.broker_url:
            return " ready." in self.text()
        return self.ping()

    def ping(self) -> bool:
        return bool(celery_app.control.ping(destination=[self.nodename], timeout=0.5))

    def text(self) -> str:
        return self.output.read_text(errors="replace") if self.output.exists() else ""

    def scheduled(self) -> list[dict[str, Any]]:
        """The ETA messages (retries) the worker holds."""
        replies = celery_app.control.inspect(destination=[self.nodename], timeout=1).scheduled()
        return (replies or {}).get(self.nodename, [])

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.proc = None
        purge_broker()


def start_command(log_dir: Path, *args: str, **env: str) -> subprocess.Popen:
    """``manage.py profiles_audit_sync ARGS`` as another process (another server, in effect)."""
    return subprocess.Popen(
        [sys.executable, "manage.py", "profiles_audit_sync", *args],
        cwd=BASE_DIR,
        env=process_env(log_dir, **env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@contextmanager
def hold_organization(org_id: uuid.UUID) -> Iterator[None]:
    """Keep a fix of this organization waiting, as a real-time sync in progress would.

    PostgreSQL: the organization's advisory lock, from another session. SQLite serializes every
    writer, so there it is the database's write lock: every write waits, not only this
    organization's.
    """
    if connection.vendor == "postgresql":
        env = database_env()["DATABASE_URL"]
        with psycopg.connect(env, autocommit=True) as conn:
            key = [_LOCK_NAMESPACE, _signed_int32(org_id)]
            conn.execute("SELECT pg_advisory_lock(%s, %s)", key)
            try:
                yield
            finally:
                conn.execute("SELECT pg_advisory_unlock(%s, %s)", key)
        return
    database = Path(connection.settings_dict["NAME"])
    conn = sqlite3.connect(database, isolation_level=None, timeout=0)
    try:
        # A writer at work retakes the write lock within microseconds of each commit, so a
        # connection waiting for it (SQLite's busy handler) mostly loses the race: take it
        # while the others are stopped between their transactions, where nobody holds it.
        with others_stopped(database, holding=_WRITE_LOCKS):
            conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            conn.execute("ROLLBACK")
    finally:
        conn.close()


@contextmanager
def break_commits_of(org_id: uuid.UUID) -> Iterator[None]:
    """Make the commit of any transaction that records a fixed finding of this organization
    fail, as a real database error would: a trigger points the finding's run at an organization
    that does not exist, and the run's deferred foreign key rejects it at COMMIT — after the
    fix's writes and its ``on_commit`` registrations, which is what makes the failure
    interesting. (Findings' own references are not checked by the database.)"""
    nowhere = uuid.UUID(int=0)
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute(
                "CREATE FUNCTION psa_test_break_commit() RETURNS trigger LANGUAGE plpgsql AS $$ "
                f"BEGIN UPDATE profiles_auditrun SET organization_id = '{nowhere}' "
                "WHERE id = NEW.run_id; RETURN NULL; END $$"
            )
            cursor.execute(
                "CREATE TRIGGER psa_test_break_commit AFTER INSERT ON profiles_auditfinding "
                f"FOR EACH ROW WHEN (NEW.organization_id = '{org_id}' AND NEW.outcome = 'fixed') "
                "EXECUTE FUNCTION psa_test_break_commit()"
            )
        else:
            cursor.execute(
                "CREATE TRIGGER psa_test_break_commit AFTER INSERT ON profiles_auditfinding "
                f"WHEN NEW.organization_id = '{org_id.hex}' AND NEW.outcome = 'fixed' "
                f"BEGIN UPDATE profiles_auditrun SET organization_id = '{nowhere.hex}' "
                "WHERE id = NEW.run_id; END"
            )
    try:
        yield
    finally:
        with connection.cursor() as cursor:
            if connection.vendor == "postgresql":
                cursor.execute("DROP TRIGGER psa_test_break_commit ON profiles_auditfinding")
                cursor.execute("DROP FUNCTION psa_test_break_commit()")
            else:
                cursor.execute("DROP TRIGGER psa_test_break_commit")


def pool_children(pid: int) -> list[int]:
    """The processes a worker's main process started (its pool)."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in children.read_text().split()] if children.exists() else []


@contextmanager
def stopped_midway(org_id: uuid.UUID, *, progressed: Callable[[], object]) -> Iterator[None]:
    """Stop a run that is under way, after some organizations have committed.

    PostgreSQL: hold ``org_id`` (enter this before the run starts; it waits exactly there).
    SQLite has one write lock for the whole database, which a running fix retakes within
    microseconds of each commit, so waiting for it is a race the waiter mostly loses: instead,
    once ``progressed()``, every other process that has the database open is stopped (SIGSTOP)
    for the block and continued after it. The run stops wherever it then is, perhaps inside a
    transaction but never inside a commit: the block may read and may kill those processes,
    but must not write.
    """
    if connection.vendor == "postgresql":
        with hold_organization(org_id):
            yield
        return
    wait_for(progressed, what="the run to make progress")
    with others_stopped(Path(connection.settings_dict["NAME"]), holding=_COMMITTING):
        yield


# SQLite's locks are POSIX locks on bytes of the database file (os_unix.c): the PENDING byte,
# then the RESERVED byte, then the SHARED range. A connection in a write transaction holds
# RESERVED; one that is committing holds PENDING (and then the SHARED range for writing), and
# readers wait for it.
_PENDING_BYTE = 0x40000000
_RESERVED_BYTE = _PENDING_BYTE + 1
_SHARED_FIRST = _PENDING_BYTE + 2
_COMMITTING = frozenset({("any", _PENDING_BYTE), ("WRITE", _SHARED_FIRST)})
_WRITE_LOCKS = _COMMITTING | {("any", _RESERVED_BYTE)}


@contextmanager
def others_stopped(database: Path, *, holding: frozenset[tuple[str, int]]) -> Iterator[None]:
    """SQLite: every other process that has ``database`` open, stopped (SIGSTOP) at a moment
    none of them holds any of the locks ``holding`` names ((mode or "any", byte) pairs), and
    continued afterwards."""
    deadline = time.monotonic() + 30
    pause = threading.Event()
    while True:
        pids = _processes_with_open(database)
        for pid in pids:
            _signal(pid, signal.SIGSTOP)
        for pid in pids:
            wait_for(lambda pid=pid: _is_stopped(pid), timeout=10, what=f"process {pid} to stop")
        if not _holds(database, pids, holding):
            break
        for pid in pids:
            _signal(pid, signal.SIGCONT)
        assert time.monotonic() < deadline, f"no moment {database} was free to stop its users at"
        pause.wait(random.uniform(0.001, 0.005))  # not in step with the writer's own cycle
    try:
        yield
    finally:
        for pid in pids:
            _signal(pid, signal.SIGCONT)


def _holds(database: Path, pids: list[int], locks: frozenset[tuple[str, int]]) -> bool:
    """Whether any of ``pids`` holds one of ``locks`` on ``database`` (from /proc/locks)."""
    inode = f":{database.stat().st_ino}"
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if "->" in fields or len(fields) < 8 or not fields[5].endswith(inode):
            continue  # a waiter, or another file
        mode, pid, start = fields[3], int(fields[4]), int(fields[6])
        end = int(fields[7]) if fields[7] != "EOF" else 2**63
        if pid in pids and any(
            want in ("any", mode) and start <= byte <= end for want, byte in locks
        ):
            return True
    return False


def _processes_with_open(path: Path) -> list[int]:
    """Every process but this one with ``path`` open."""
    target = str(path.resolve())
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if any(os.readlink(fd) == target for fd in (entry / "fd").iterdir()):
                found.append(int(entry.name))
        except OSError:  # gone, or not ours to look at
            continue
    return found


def process_stat(pid: int) -> list[str]:
    """The fields of ``/proc/<pid>/stat`` after the command name, from the state on (so
    ``[0]`` is the state, ``[11]`` and ``[12]`` utime and stime); OSError once it is gone."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _is_stopped(pid: int) -> bool:
    """Stopped by a signal, or gone."""
    try:
        return process_stat(pid)[0] in {"T", "t", "Z", "X"}
    except OSError:
        return True


def _signal(pid: int, signum: int) -> None:
    with suppress(ProcessLookupError):
        os.kill(pid, signum)


def orphaned_organizations(count: int) -> list[uuid.UUID]:
    """``count`` organizations (ids 1..count, in order), each with one orphaned profile, built in
    bulk. Returns the profile ids."""
    from orgs.models import Organization
    from profiles.models import SocialProfile

    orgs = Organization.objects.bulk_create(
        Organization(id=uuid.UUID(int=n), name=f"org {n}") for n in range(1, count + 1)
    )
    profiles = SocialProfile.objects.bulk_create(
        SocialProfile(organization=org, platform="facebook", external_id=f"gone-{n}")
        for n, org in enumerate(orgs)
    )
    return [p.id for p in profiles]
