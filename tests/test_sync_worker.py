"""The missing-profile sync job over real prefork workers and the real broker (issue 13 point 2):
delivered twice at once it creates each profile once; a database outage during a fanned-out
fix's sync jobs never shows a profile as created that is not, and the jobs retry and complete
when the database is back; a job lost with the broker is sent again by the daily maintenance."""

import sqlite3
import uuid
from collections import Counter
from contextlib import contextmanager
from datetime import timedelta

import psycopg
import pytest
from django.db import connection
from django.utils import timezone

from profiles.models import AuditFinding, AuditRun, AuditStatus, FindingOutcome, SocialProfile
from profiles.services.audit import AuditRequest, run_audit, send_shards, start_run
from profiles.tasks import prune_audit_runs_task, sync_profiles_task
from tests.support import (
    CeleryWorker,
    database_env,
    purge_broker,
    read_events,
    redis_client,
    wait_for,
)
from tests.test_sync_batch import selected_without_profiles

pytestmark = [pytest.mark.real_worker, pytest.mark.django_db(transaction=True)]


def alive_keys() -> Counter:
    return Counter(
        SocialProfile.objects.alive().values_list("organization_id", "platform", "external_id")
    )


def missing_findings(run: AuditRun) -> Counter:
    return Counter(run.findings.filter(type="missing").values_list("outcome", flat=True))


def test_a_sync_job_delivered_twice_at_once_creates_each_profile_once(tmp_path):
    keys = selected_without_profiles(orgs=60, per_org=10)
    message = [[str(org), platform, external_id] for org, platform, external_id in keys]
    worker = CeleryWorker(tmp_path, concurrency=2, queues="celery").start()
    try:
        sync_profiles_task.delay(message)
        sync_profiles_task.delay(message)

        def both_done():
            done = [e for e in read_events(tmp_path) if e["event"] == "profile_sync.completed"]
            return len(done) == 2 and done

        events = wait_for(both_done, timeout=60, what="both deliveries of the sync job")
    finally:
        worker.stop()

    assert alive_keys() == Counter(keys)
    assert sorted(e.get("created", 0) for e in events) == [0, len(keys)]
    assert sorted(e.get("unchanged", 0) for e in events) == [0, len(keys)]


@contextmanager
def database_refusing(worker_env: dict[str, str]):
    """The sync worker's database goes away until the block ends. PostgreSQL: the worker logs
    in as a role of its own, which is refused (NOLOGIN) and whose sessions are terminated;
    SQLite: the database's write lock is held, so its writes fail "database is locked" after
    the worker's short busy timeout."""
    if connection.vendor == "postgresql":
        url = database_env()["DATABASE_URL"]
        role = f"psa_sync_worker_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute(f"CREATE ROLE {role} LOGIN")
            admin.execute(f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {role}")
            admin.execute(f"GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {role}")
            worker_env["DATABASE_URL"] = url.replace("://postgres", f"://{role}", 1)
            admin.execute(f"ALTER ROLE {role} NOLOGIN")
            try:
                yield lambda: _let_in(admin, role)
            finally:
                _let_in(admin, role)
                admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                    [role],
                )
                admin.execute(f"DROP OWNED BY {role}")
                admin.execute(f"DROP ROLE {role}")
        return
    worker_env["SQLITE_BUSY_TIMEOUT"] = "0.05"
    holder = sqlite3.connect(connection.settings_dict["NAME"], isolation_level=None, timeout=30)
    holder.execute("BEGIN IMMEDIATE")
    held = [True]

    def release():
        if held[0]:
            holder.execute("ROLLBACK")
            held[0] = False

    try:
        yield release
    finally:
        release()
        holder.close()


def _let_in(admin, role: str) -> None:
    admin.execute(f"ALTER ROLE {role} LOGIN")


def test_a_database_outage_during_the_sync_jobs_never_shows_a_profile_created_that_is_not(
    tmp_path,
):
    keys = selected_without_profiles(orgs=250, per_org=2)  # three chunks: three sync jobs
    shards = CeleryWorker(tmp_path / "shards", queues="maintenance")
    (tmp_path / "shards").mkdir()
    (tmp_path / "sync").mkdir()
    shards.start()
    sync_env = {"PROFILE_AUDIT_SYNC_RETRY_DELAY": "1", "PROFILE_AUDIT_SYNC_MAX_RETRIES": "60"}
    sync_worker = None
    try:
        # The fanned-out fix: its shards on the `maintenance` worker; the sync jobs it sends
        # wait in `celery` for the sync worker.
        run = start_run(AuditRequest(fix=True))
        send_shards(run)
        wait_for(
            lambda: AuditRun.objects.exclude(status=AuditStatus.RUNNING).filter(id=run.id),
            timeout=120,
            what="the fanned-out fix to finish",
        )
        with database_refusing(sync_env) as database_back:
            sync_worker = CeleryWorker(tmp_path / "sync", queues="celery", **sync_env)
            sync_worker.start(purge=False)

            def retries():
                return [
                    e
                    for e in read_events(tmp_path / "sync")
                    if e["event"] == "profile_sync.retrying"
                ]

            wait_for(
                lambda: len({e["task_id"] for e in retries()}) == 3,
                timeout=60,
                what="each of the three sync jobs to fail and retry",
            )
            # During the outage the records claim nothing the database does not hold.
            run.refresh_from_db()
            assert run.status == AuditStatus.SUCCEEDED
            assert (run.found, run.fixed) == (len(keys), 0)
            assert run.by_type["missing"] == {"found": 500, "fixed": 0, "sync_sent": 500}
            assert missing_findings(run) == {FindingOutcome.SENT: 500}
            assert not SocialProfile.objects.exists()
            database_back()

            wait_for(
                lambda: (
                    not AuditFinding.objects.filter(run=run, outcome=FindingOutcome.SENT).exists()
                ),
                timeout=60,
                what="the retried sync jobs to confirm every profile",
            )
    finally:
        if sync_worker is not None:
            sync_worker.stop()
        shards.stop()

    run.refresh_from_db()
    assert alive_keys() == Counter(keys)
    assert missing_findings(run) == {FindingOutcome.FIXED: 500}
    assert (run.found, run.fixed) == (500, 500)
    assert run.by_type["missing"] == {"found": 500, "fixed": 500, "sync_sent": 0}


def test_a_sync_job_lost_with_the_broker_is_sent_again_by_the_daily_maintenance(tmp_path):
    keys = selected_without_profiles(orgs=150, per_org=2)  # two chunks: two sync jobs
    purge_broker()
    run = run_audit(AuditRequest(fix=True)).run  # here; its sync jobs go to the broker
    assert redis_client().llen("celery") == 2
    purge_broker()  # Redis restarted without persistence: the jobs are gone
    assert missing_findings(run) == {FindingOutcome.SENT: 300}

    # Not yet: its run has only just finished (the jobs may still be on their way).
    assert prune_audit_runs_task.apply().get()["sync_resent_findings"] == 0
    AuditRun.objects.filter(id=run.id).update(finished_at=timezone.now() - timedelta(hours=1))
    report = prune_audit_runs_task.apply().get()

    assert (report["sync_resent_findings"], report["sync_resent_jobs"]) == (300, 1)
    worker = CeleryWorker(tmp_path, queues="celery").start(purge=False)
    try:
        wait_for(
            lambda: not AuditFinding.objects.filter(run=run, outcome=FindingOutcome.SENT).exists(),
            timeout=60,
            what="the re-sent sync job to create and confirm the profiles",
        )
    finally:
        worker.stop()
    run.refresh_from_db()
    assert alive_keys() == Counter(keys)
    assert (run.found, run.fixed) == (300, 300)
    assert run.by_type["missing"] == {"found": 300, "fixed": 300, "sync_sent": 0}
