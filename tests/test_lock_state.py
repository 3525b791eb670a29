"""The fixing-run lock as the dashboard and /metrics read it, without taking it, and its forced
release: for the Redis lock and for the file lock of the embedded default."""

import pytest

from profiles.services.run_lock import (
    FileRunLock,
    RedisRunLock,
    fixing_run_lock,
    fixing_run_lock_state,
    force_release_fixing_run_lock,
)


@pytest.fixture
def file_lock_settings(settings, tmp_path):
    settings.PROFILE_AUDIT_LOCK_REDIS_URL = ""
    settings.PROFILE_AUDIT_LOCK_FILE = tmp_path / "fixing-run.lock"
    return settings


def test_the_redis_lock_is_read_without_being_taken():
    assert not fixing_run_lock_state().held
    lock = fixing_run_lock()
    assert isinstance(lock, RedisRunLock) and lock.acquire()
    try:
        state = fixing_run_lock_state()
        assert state.held and state.reachable
        assert state.token == lock.client.get(lock.key).decode()
        assert state.holder == state.token.rsplit(":", 1)[0]
        assert 0 < state.expires_in <= 3600
        assert lock.still_held()  # reading it took nothing away
    finally:
        lock.release()


def test_an_unreachable_redis_is_reported_not_raised(settings):
    settings.PROFILE_AUDIT_LOCK_REDIS_URL = "redis://127.0.0.1:1/0"
    state = fixing_run_lock_state()
    assert not state.reachable and "ConnectionError" in state.error


@pytest.mark.django_db  # a forced release also fences the holder's run out, in the database
def test_the_file_lock_is_read_and_released_by_token(file_lock_settings):
    lock = fixing_run_lock()
    assert isinstance(lock, FileRunLock)
    assert not fixing_run_lock_state().held
    assert lock.acquire()
    state = fixing_run_lock_state()
    assert state.held and state.expires_in is None
    assert not force_release_fixing_run_lock(token="someone-else:1:abc")
    assert lock.still_held()

    assert force_release_fixing_run_lock(token=state.token)
    # The holder sees it lost the lock; the next run takes a fresh one.
    assert not lock.still_held()
    assert not fixing_run_lock_state().held
    other = fixing_run_lock()
    assert other.acquire()
    other.release()
    lock.release()


def test_a_released_file_lock_is_no_longer_held(file_lock_settings):
    lock = fixing_run_lock()
    assert lock.acquire()
    lock.release()
    assert not fixing_run_lock_state().held
