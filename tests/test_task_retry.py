"""A worker whose lock Redis does not answer: the scheduled run fails closed and the task is
retried two minutes later (its own module: the worker runs with a different environment)."""

import json
from datetime import datetime, timedelta

import pytest

from profiles.models import AuditRun, AuditStatus
from profiles.tasks import audit_sync_task
from tests.factories import ProfileFactory
from tests.support import (
    BEAT_ENTRY,
    CeleryWorker,
    beat_scheduler,
    find_event,
    redis_client,
    wait_for,
)

pytestmark = [pytest.mark.real_worker, pytest.mark.django_db(transaction=True)]


@pytest.fixture(scope="module")
def worker_without_lock_redis(django_db_setup, tmp_path_factory):
    worker = CeleryWorker(
        tmp_path_factory.mktemp("worker-without-lock-redis"),
        PROFILE_AUDIT_LOCK_REDIS_URL="redis://127.0.0.1:1/3",
    ).start()
    yield worker
    worker.stop()  # also drops the retry it holds, so no later worker runs it


def test_unreachable_lock_redis_fixes_nothing_and_retries_in_two_minutes(
    worker_without_lock_redis,
):
    worker = worker_without_lock_redis
    orphan = ProfileFactory()
    with beat_scheduler() as scheduler:
        sent = scheduler.apply_async(scheduler.schedule[BEAT_ENTRY])  # as beat sends it
    failed = wait_for(
        lambda: AuditRun.objects.filter(status=AuditStatus.FAILED).first(),
        what="the first attempt to fail",
    )
    assert "cannot reach Redis at redis://127.0.0.1:1/3" in failed.error
    orphan.refresh_from_db()
    assert orphan.deleted_at is None

    retry = wait_for(
        lambda: [s for s in worker.scheduled() if s["request"]["id"] == sent.id],
        what="the worker to hold the retry",
    )[0]
    delay = (datetime.fromisoformat(retry["eta"]) - failed.finished_at).total_seconds()
    assert 118 <= delay <= 122  # 120 s, no jitter
    assert retry["request"]["delivery_info"]["routing_key"] == "maintenance"
    # The retry message itself, as the broker holds it for the worker: it keeps the expiry of
    # beat's message, and that expiry leaves room for this attempt and the last retry.
    headers = held_message(sent.id)
    assert headers["retries"] == 1
    eta, expires = (datetime.fromisoformat(headers[k]) for k in ("eta", "expires"))
    last_retry_at_the_latest = eta + timedelta(
        seconds=audit_sync_task.time_limit + audit_sync_task.default_retry_delay
    )
    assert expires > last_retry_at_the_latest
    event = wait_for(
        lambda: find_event(worker.log_dir, "profile_audit.task_retrying", task_id=sent.id),
        what="the retry to be logged",
    )
    assert (event["retry"], event["max_retries"], event["countdown"]) == (1, 2, 120)
    assert "RunLockUnavailable" in event["error"]
    # The lock failure itself, logged before any run existed, names the attempt.
    assert find_event(worker.log_dir, "profile_audit.lock_unavailable", task_id=sent.id)


def held_message(task_id: str) -> dict:
    """Headers of the message with this task id among those the worker received and has not
    acknowledged yet (kombu's Redis transport keeps them in the ``unacked`` hash)."""
    for raw in redis_client().hvals("unacked"):
        message, _exchange, _routing_key = json.loads(raw)
        if message["headers"]["id"] == task_id:
            return message["headers"]
    raise AssertionError(f"no unacknowledged message for task {task_id}")
