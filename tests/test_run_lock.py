"""The fixing-run lock itself, on the real Redis and a real file (profiles.services.run_lock)."""

import os
import socket
import subprocess
import sys
import time

import pytest
from django.conf import settings

from profiles.services.run_lock import (
    FileRunLock,
    RedisRunLock,
    RunLockUnavailable,
    fixing_run_lock,
)
from tests.support import redis_client, wait_for

KEY = "profile-sync-audit:test-run-lock"


@pytest.fixture
def redis_key():
    client = redis_client()
    client.delete(KEY)
    yield client
    client.delete(KEY)
    client.close()


def redis_lock(url=None, *, ttl=3600, socket_timeout=5.0) -> RedisRunLock:
    return RedisRunLock(
        url=url or settings.REDIS_URL, key=KEY, ttl=ttl, socket_timeout=socket_timeout
    )


def test_the_lock_is_redis_when_a_redis_url_is_set_and_a_file_otherwise(settings, tmp_path):
    settings.PROFILE_AUDIT_LOCK_REDIS_URL = "redis://127.0.0.1:6379/3"
    assert isinstance(fixing_run_lock(), RedisRunLock)
    settings.PROFILE_AUDIT_LOCK_REDIS_URL = ""
    settings.PROFILE_AUDIT_LOCK_FILE = tmp_path / "fix.lock"
    assert isinstance(fixing_run_lock(), FileRunLock)


def test_redis_lock_excludes_a_second_holder_until_released(redis_key):
    first, second = redis_lock(), redis_lock()
    assert first.acquire()
    assert not second.acquire()
    assert f"{socket.gethostname()}:{os.getpid()}" in second.holder()
    assert first.release()
    assert redis_key.get(KEY) is None
    assert second.acquire()
    second.release()


def test_redis_lock_lives_sixty_minutes_by_default(redis_key):
    lock = fixing_run_lock()
    assert settings.PROFILE_AUDIT_LOCK_TTL == 3600
    assert lock.acquire()
    try:
        ttl = redis_client().ttl(settings.PROFILE_AUDIT_LOCK_KEY)
        assert 3590 <= ttl <= 3600
    finally:
        lock.release()


def test_a_lease_checked_in_time_is_renewed(redis_key):
    lock = redis_lock(ttl=60)
    assert lock.acquire()
    redis_key.pexpire(KEY, 2000)  # most of the lease has passed
    assert lock.still_held()
    assert redis_key.pttl(KEY) > 50_000
    lock.release()


def test_a_lost_lease_is_noticed_and_the_new_holder_keeps_its_lock(redis_key):
    lock = redis_lock()
    assert lock.acquire()
    redis_key.set(KEY, "another-host:1:token")  # expired and taken by another run
    assert not lock.still_held()
    assert not lock.release()
    assert redis_key.get(KEY) == b"another-host:1:token"


def test_an_expired_lease_is_noticed(redis_key):
    lock = redis_lock(ttl=0.2)
    assert lock.acquire()
    wait_for(lambda: redis_key.get(KEY) is None, timeout=5, what="the lease to expire")
    assert not lock.still_held()


def test_a_dead_holders_lock_blocks_until_its_ttl_passes(redis_key):
    redis_key.set(KEY, "dead-host:4242:token", px=800)
    lock = redis_lock()
    assert not lock.acquire()
    assert lock.holder().startswith("dead-host:4242")
    wait_for(lock.acquire, timeout=5, what="the dead holder's lock to expire")
    lock.release()


def test_redis_refusing_connections_fails_fast_with_the_url():
    lock = redis_lock("redis://:s3cret@127.0.0.1:1/3")
    started = time.monotonic()
    with pytest.raises(RunLockUnavailable, match=r"redis://:\*\*\*@127\.0\.0\.1:1/3") as caught:
        lock.acquire()
    assert time.monotonic() - started < 2
    assert "s3cret" not in str(caught.value)
    assert "redis-server" in str(caught.value)


def test_redis_that_never_answers_fails_within_the_socket_timeout():
    # A socket that accepts connections (the kernel's backlog) but never replies.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        lock = redis_lock(f"redis://127.0.0.1:{port}/0", socket_timeout=0.5)
        started = time.monotonic()
        with pytest.raises(RunLockUnavailable, match="Timeout"):
            lock.acquire()
        assert time.monotonic() - started < 3


def test_file_lock_excludes_a_second_holder_until_released(tmp_path):
    path = tmp_path / "fix.lock"
    first, second = FileRunLock(path=path), FileRunLock(path=path)
    assert first.acquire()
    assert not second.acquire()
    assert second.holder() == f"{socket.gethostname()}:{os.getpid()}"
    assert first.still_held()
    assert first.release()
    assert second.acquire()
    second.release()


def test_file_lock_of_a_dead_process_is_free_at_once(tmp_path):
    path = tmp_path / "fix.lock"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys\n"
            f"fd = os.open({str(path)!r}, os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "print('locked', flush=True)\n"
            "sys.stdin.read()\n",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        lock = FileRunLock(path=path)
        assert not lock.acquire()
    finally:
        holder.kill()
        holder.wait(timeout=10)
    assert lock.acquire()
    lock.release()


def test_file_lock_whose_file_was_replaced_is_no_longer_held(tmp_path):
    path = tmp_path / "fix.lock"
    lock = FileRunLock(path=path)
    assert lock.acquire()
    path.unlink()
    newcomer = FileRunLock(path=path)
    assert newcomer.acquire()  # a new inode: the old lock excludes nobody now
    assert not lock.still_held()
    assert not lock.release()
    assert newcomer.still_held()
    newcomer.release()


def test_file_lock_that_cannot_be_created_is_unavailable(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    with pytest.raises(RunLockUnavailable, match="cannot open the fixing-run lock file"):
        FileRunLock(path=blocker / "fix.lock").acquire()


def test_who_holds_the_file_lock_is_read_without_taking_it(tmp_path):
    """The daily maintenance asks who holds the lock; asking must never make a run starting at
    that moment find it held."""
    from profiles.services.run_lock import FileRunLock

    path = tmp_path / "fix.lock"
    asker = FileRunLock(path=path)
    assert asker.current_token() is None
    holder = FileRunLock(path=path)
    assert holder.acquire()
    assert asker.current_token() == holder.token
    holder.release()
    assert asker.current_token() is None
    assert FileRunLock(path=path).acquire(), "asking took nothing"
