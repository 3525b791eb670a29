"""Runs at any size (DESIGN "Runs at scale"): a run fanned out over a real prefork worker with
two processes, a pool process killed mid-shard, and an admin revert of a large run carried out
as a task while its pages stay responsive."""

import json
import os
import signal
import uuid
from datetime import timedelta
from io import StringIO

import pytest
from django.conf import settings
from django.core.management import call_command
from django.db import connection
from django.utils import timezone

from orgs.models import Organization
from profiles.models import (
    AuditFinding,
    AuditRun,
    AuditStatus,
    AuditTrigger,
    FindingAction,
    FindingOutcome,
    FindingType,
    ShardStatus,
    SocialProfile,
)
from profiles.services.audit import AuditRequest, run_audit
from profiles.tasks import audit_sync_task
from tests.factories import OrganizationFactory
from tests.support import (
    CeleryWorker,
    hold_organization,
    orphaned_organizations,
    redis_client,
    stopped_midway,
    wait_for,
)
from tests.test_design_rules import every_finding_type

pytestmark = [pytest.mark.real_worker, pytest.mark.django_db(transaction=True)]


@pytest.fixture(scope="module")
def worker(django_db_setup, tmp_path_factory):
    # Two pool processes; chunks of one organization, so a held organization stops a shard
    # exactly there.
    worker = CeleryWorker(
        tmp_path_factory.mktemp("two-process-worker"), concurrency=2, PROFILE_AUDIT_CHUNK_SIZE="1"
    ).start()
    yield worker
    worker.stop()


def findings_of(run_id) -> list[tuple]:
    return sorted(
        (str(f.organization_id), f.type, str(f.object_id), f.platform, f.external_id, f.outcome)
        for f in AuditFinding.objects.filter(run_id=run_id)
    )


def lock_is_free() -> bool:
    return not redis_client().exists(settings.PROFILE_AUDIT_LOCK_KEY)


def test_a_fanned_out_run_finds_what_an_in_process_run_finds(worker, settings):
    settings.PROFILE_AUDIT_SHARD_SIZE = 100
    for _ in range(12):
        every_finding_type(OrganizationFactory())
    Organization.objects.bulk_create(Organization(name=f"quiet {n}") for n in range(230))
    in_process = run_audit(AuditRequest()).run

    out = StringIO()
    call_command("profiles_audit_sync", "--fan-out", "--format", "json", stdout=out)

    report = json.loads(out.getvalue())
    fanned = AuditRun.objects.get(id=report["run_id"])
    assert fanned.shards.count() == 3  # 242 organizations, 100 a shard
    assert set(fanned.shards.values_list("status", flat=True)) == {ShardStatus.DONE}
    assert (report["status"], report["organizations_audited"]) == ("succeeded", 242)
    assert report["totals"] == {"found": in_process.found, "fixed": 0, "sync_sent": 0}
    assert in_process.found == 96
    assert report["by_type"] == in_process.by_type
    assert findings_of(fanned.id) == findings_of(in_process.id)
    # Numbered without gaps or repeats, though two processes wrote them.
    seqs = sorted(AuditFinding.objects.filter(run=fanned).values_list("seq", flat=True))
    assert seqs == list(range(1, 97))


def test_a_pool_process_killed_mid_shard_is_resumed_by_another(worker):
    total = 200
    orphaned_organizations(total)
    sent = None

    def shard_under_way():
        return AuditRun.objects.filter(task_id=sent.id, fixed__gte=2).first() if sent else None

    if connection.vendor != "postgresql":
        sent = audit_sync_task.delay(trigger=AuditTrigger.SCHEDULE)
    # PostgreSQL: the third organization is held, the shard waits exactly there.
    with stopped_midway(uuid.UUID(int=3), progressed=shard_under_way):
        sent = sent or audit_sync_task.delay(trigger=AuditTrigger.SCHEDULE)
        run = wait_for(shard_under_way, what="the shard to fix two organizations")
        shard = run.shards.get()
        pid = int(shard.worker.split(":")[1])
        assert pid in _pool(worker)
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: pid not in _pool(worker), what="the killed process to be gone")
    run = wait_for(
        lambda: AuditRun.objects.exclude(status=AuditStatus.RUNNING).filter(id=run.id).first(),
        timeout=120,
        what="the re-delivered shard to finish the run",
    )
    assert (run.status, run.found, run.fixed) == (AuditStatus.SUCCEEDED, total, total)
    assert AuditFinding.objects.filter(run=run).count() == total  # nothing done twice
    shard.refresh_from_db()
    assert shard.attempts == 1  # one delivery died
    assert SocialProfile.objects.filter(deleted_at__isnull=True).count() == 0
    wait_for(lock_is_free, what="the lock to be released")


def _pool(worker) -> list[int]:
    from tests.support import pool_children

    return pool_children(worker.proc.pid)


def large_fixed_run(*, findings: int, organizations: int) -> tuple[AuditRun, list[uuid.UUID]]:
    """A fixing run that soft-deleted ``findings`` profiles, recorded as the audit records one
    (built in bulk: factories would take minutes)."""
    deleted_at = timezone.now() - timedelta(hours=1)
    orgs = Organization.objects.bulk_create(
        Organization(id=uuid.UUID(int=n + 1), name=f"big {n}") for n in range(organizations)
    )
    run = AuditRun.objects.create(
        trigger=AuditTrigger.COMMAND,
        fix=True,
        status=AuditStatus.SUCCEEDED,
        started_at=deleted_at,
        finished_at=deleted_at,
        found=findings,
        fixed=findings,
        findings_recorded=findings,
    )
    if connection.vendor == "postgresql":
        _bulk_profiles_and_findings(run, orgs, findings, deleted_at)
        return run, [o.id for o in orgs]
    profiles, rows = [], []
    for n in range(findings):
        org = orgs[n * organizations // findings]
        profile = SocialProfile(
            id=uuid.uuid4(),
            organization=org,
            platform="facebook",
            external_id=f"big-{n}",
            deleted_at=deleted_at,
        )
        profiles.append(profile)
        rows.append(
            AuditFinding(
                run=run,
                seq=n + 1,
                organization=org,
                type=FindingType.ORPHANED,
                action=FindingAction.SOFT_DELETE,
                model="profiles.SocialProfile",
                object_id=profile.id,
                platform="facebook",
                external_id=profile.external_id,
                before={"deleted_at": None},
                after={"deleted_at": deleted_at.isoformat()},
                outcome=FindingOutcome.FIXED,
            )
        )
    SocialProfile.objects.bulk_create(profiles, batch_size=5000)
    AuditFinding.objects.bulk_create(rows, batch_size=5000)
    return run, [o.id for o in orgs]


def _bulk_profiles_and_findings(run, orgs, findings: int, deleted_at) -> None:
    """The same rows as the ORM loop builds, written by PostgreSQL itself (seconds, not a
    minute): finding n soft-deleted profile n of organization n * len(orgs) // findings."""
    with connection.cursor() as cursor:
        cursor.execute(
            """
            CREATE TEMP TABLE big ON COMMIT DROP AS
            SELECT n, gen_random_uuid() AS profile_id,
                   (%(orgs)s::uuid[])[1 + n * %(norgs)s / %(findings)s] AS org_id
            FROM generate_series(0, %(findings)s - 1) AS n;
            INSERT INTO profiles_socialprofile
                (id, organization_id, platform, external_id, name, created_at, deleted_at)
            SELECT profile_id, org_id, 'facebook', 'big-' || n, '', %(at)s, %(at)s FROM big;
            INSERT INTO profiles_auditfinding
                (id, run_id, seq, organization_id, type, action, model, object_id, platform,
                 external_id, before, after, outcome, detail)
            SELECT gen_random_uuid(), %(run)s, n + 1, org_id, 'orphaned', 'soft_delete',
                   'profiles.SocialProfile', profile_id, 'facebook', 'big-' || n,
                   '{"deleted_at": null}'::jsonb,
                   jsonb_build_object('deleted_at', %(iso)s::text), 'fixed', ''
            FROM big;
            """,
            {
                "orgs": [o.id for o in orgs],
                "norgs": len(orgs),
                "findings": findings,
                "at": deleted_at,
                "iso": deleted_at.isoformat(),
                "run": run.id,
            },
        )


def test_an_admin_revert_of_a_large_run_is_a_task_and_the_pages_stay_responsive(
    worker, admin_client
):
    # 100,000 findings on PostgreSQL; SQLite has one writer, so a smaller run shows the same.
    size = 100_000 if connection.vendor == "postgresql" else 2_000
    run, org_ids = large_fixed_run(findings=size, organizations=10)
    url = f"/admin/profiles/auditrun/{run.id}/revert/"
    if connection.vendor == "postgresql":
        # The revert undoes the newest findings first: the last organization's. Hold it, so
        # the task is still at work while the pages are asked for.
        with hold_organization(org_ids[-1]):
            response = admin_client.post(url, {"mode": "fix"})
            assert response.status_code == 302  # answered at once: the work is the task's
            revert = AuditRun.objects.get(trigger=AuditTrigger.REVERT)
            assert response["Location"].endswith(f"/{revert.id}/change/")
            page = admin_client.get(response["Location"])
            assert page.status_code == 200
            assert f"nothing of {size:,} findings put back yet" in page.content.decode()
            assert admin_client.get(f"/admin/profiles/auditrun/{run.id}/change/").status_code == 200
            revert.refresh_from_db()
            assert revert.status == AuditStatus.RUNNING
    else:
        # SQLite's single write lock cannot hold one organization: the worker's own log shows
        # that the revert was its task, not the request's work.
        response = admin_client.post(url, {"mode": "fix"})
        assert response.status_code == 302
        revert = AuditRun.objects.get(trigger=AuditTrigger.REVERT)
        wait_for(
            lambda: "profiles.revert_run" in worker.text() and "received" in worker.text(),
            what="the worker to receive the revert task",
        )
    revert = wait_for(
        lambda: AuditRun.objects.exclude(status=AuditStatus.RUNNING).filter(id=revert.id).first(),
        timeout=300,
        what="the revert task to finish",
    )
    assert (revert.status, revert.found, revert.fixed) == (AuditStatus.SUCCEEDED, size, size)
    assert SocialProfile.objects.filter(deleted_at__isnull=False).count() == 0
    page = admin_client.get(f"/admin/profiles/auditrun/{revert.id}/change/").content.decode()
    assert "Succeeded" in page
