"""Retention: old runs and their findings are pruned in batches, never the latest run of an
organization (nor the latest all-organization run)."""

import json
from datetime import timedelta
from io import StringIO

import pytest
from celery.schedules import crontab
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import CommandError
from django.utils import timezone

from profiles.models import AuditFinding, AuditRun, AuditTrigger, FindingOutcome
from profiles.services.retention import prune_audit_runs
from profiles.tasks import prune_audit_runs_task
from tests.factories import OrganizationFactory

pytestmark = pytest.mark.django_db


def run(org=None, *, days_ago: float, findings: int = 3, **fields) -> AuditRun:
    audit_run = AuditRun.objects.create(
        trigger=AuditTrigger.SCHEDULE,
        organization=org,
        fix=True,
        status="succeeded",
        started_at=timezone.now() - timedelta(days=days_ago),
        **fields,
    )
    AuditFinding.objects.bulk_create(
        AuditFinding(
            run=audit_run,
            seq=n + 1,
            organization=org,
            type="orphaned",
            action="soft_delete",
            model="profiles.SocialProfile",
            outcome=FindingOutcome.FIXED,
        )
        for n in range(findings)
    )
    return audit_run


def remaining() -> set:
    return set(AuditRun.objects.values_list("id", flat=True))


def test_old_runs_go_with_their_findings_and_the_latest_of_each_organization_stays():
    busy, quiet = OrganizationFactory(), OrganizationFactory()
    busy_old = [run(busy, days_ago=d) for d in (400, 200, 100)]
    busy_recent = run(busy, days_ago=10)
    quiet_only = run(quiet, days_ago=300)  # its only run: the last thing done there
    all_old = [run(days_ago=d) for d in (500, 95)]
    all_latest = run(days_ago=91)  # the latest all-organization run, old as it is

    report = prune_audit_runs(older_than_days=90, batch_size=2)

    assert remaining() == {busy_recent.id, quiet_only.id, all_latest.id}
    assert report.runs_deleted == len(busy_old) + len(all_old)
    assert report.findings_deleted == 3 * report.runs_deleted
    assert AuditFinding.objects.count() == 3 * 3


def test_the_latest_run_of_an_organization_stays_even_when_every_run_is_old():
    org = OrganizationFactory()
    older, latest = run(org, days_ago=300), run(org, days_ago=200)

    prune_audit_runs(older_than_days=90, batch_size=1)

    assert remaining() == {latest.id}
    assert not AuditFinding.objects.filter(run_id=older.id).exists()


def test_recent_runs_are_kept_and_a_second_prune_finds_nothing():
    org = OrganizationFactory()
    runs = [run(org, days_ago=d) for d in (1, 30, 89)]

    assert prune_audit_runs(older_than_days=90).runs_deleted == 0
    assert remaining() == {r.id for r in runs}


def test_a_revert_outlives_the_run_it_reverted():
    org = OrganizationFactory()
    reverted = run(org, days_ago=200)
    revert = run(org, days_ago=5, reverted_run=reverted)

    prune_audit_runs(older_than_days=90)

    revert.refresh_from_db()
    assert remaining() == {revert.id} and revert.reverted_run_id is None


def test_the_daily_task_prunes_with_the_retention_setting(settings):
    settings.PROFILE_AUDIT_RETENTION_DAYS = 30
    org = OrganizationFactory()
    run(org, days_ago=40)
    latest = run(org, days_ago=31)

    result = prune_audit_runs_task.delay().get()

    assert result["runs_deleted"] == 1 and remaining() == {latest.id}


def test_beat_sends_the_prune_task_daily_to_the_maintenance_queue():
    entry = settings.CELERY_BEAT_SCHEDULE["prune-audit-runs"]
    assert entry["task"] == prune_audit_runs_task.name == "profiles.prune_audit_runs"
    assert entry["schedule"] == crontab(minute=30, hour=3)
    assert entry["options"]["queue"] == "maintenance"
    assert settings.PROFILE_AUDIT_RETENTION_DAYS == 90  # the default


def test_the_command_prunes_and_reports():
    org = OrganizationFactory()
    run(org, days_ago=20)
    latest = run(org, days_ago=15)

    out = StringIO()
    call_command("prune_audit_runs", "--days", "10", "--format", "json", stdout=out)

    assert json.loads(out.getvalue())["runs_deleted"] == 1
    assert remaining() == {latest.id}
    with pytest.raises(CommandError, match="at least 1"):
        call_command("prune_audit_runs", "--days", "0", stdout=StringIO())
