"""Retention: old runs and their findings are pruned in batches, never the latest run of an
organization (nor the latest all-organization run), and never what a restore still needs."""

import json
from datetime import timedelta
from io import StringIO

import pytest
from celery.schedules import crontab
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import DatabaseError
from django.db.models import QuerySet
from django.utils import timezone

from connections.models import ConnectionAsset
from connections.services import set_asset_selection
from profiles.models import (
    AuditFinding,
    AuditRun,
    AuditTrigger,
    FindingOutcome,
    FindingType,
    SocialProfile,
    StaleQueueSettingDeletion,
)
from profiles.services.audit import ProfileConnectionAuditService
from profiles.services.retention import prune_audit_runs
from profiles.services.revert import revert_run
from profiles.tasks import prune_audit_runs_task
from queues.models import QueueSetting
from tests.factories import (
    AssetFactory,
    OrganizationFactory,
    ProfileFactory,
    QueueSettingFactory,
    profile_for,
)

pytestmark = pytest.mark.django_db


def run(org=None, *, days_ago: float, findings: int = 3, **fields) -> AuditRun:
    audit_run = AuditRun.objects.create(
        trigger=AuditTrigger.SCHEDULE,
        organization=org,
        fix=fields.pop("fix", True),
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
    entry = settings.PROFILE_AUDIT_BEAT_ENTRIES["prune-audit-runs"]
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


# --- What a restore needs outlives the run that recorded it --------------------------------


def scheduled_fix(*, days_ago: float) -> AuditRun:
    """An all-organization fixing run, as beat sends it, started ``days_ago``."""
    run = (
        ProfileConnectionAuditService()
        .run_audit_for_all_orgs(fix=True, trigger=AuditTrigger.SCHEDULE)
        .run
    )
    AuditRun.objects.filter(id=run.id).update(started_at=timezone.now() - timedelta(days=days_ago))
    return run


def alive_settings(org) -> set:
    return set(QueueSetting.objects.filter(organization=org).alive().values_list("id", flat=True))


@pytest.fixture
def pruned_deletion():
    """Only scheduled runs touch this organization. An old one soft-deleted its deselected
    profile and, as stale, two of the profile's queue settings; a later scheduled run exists,
    so retention prunes the old one. Two settings must stay dead whatever happens: one a user
    deleted, one the audit deleted and a user touched since."""
    asset = AssetFactory(is_selected=False)
    org = asset.connection.organization
    profile = profile_for(asset)
    by_audit = [QueueSettingFactory(profile=profile, name=f"by audit {n}") for n in range(2)]
    touched = QueueSettingFactory(profile=profile, name="touched since")
    by_user = QueueSettingFactory(
        profile=profile, name="by user", deleted_at=timezone.now() - timedelta(days=300)
    )
    deleting = scheduled_fix(days_ago=200)
    assert deleting.by_type[FindingType.STALE_QUEUE_SETTING]["fixed"] == 3
    QueueSetting.objects.filter(id=touched.id).update(deleted_at=timezone.now())
    scheduled_fix(days_ago=100)

    report = prune_audit_runs(older_than_days=90, batch_size=1)

    assert deleting.id not in remaining()
    assert not AuditFinding.objects.filter(run_id=deleting.id).exists()
    assert report.queue_setting_deletions_kept == 3
    return {
        "asset": asset,
        "org": org,
        "profile": profile,
        "by_audit": {s.id for s in by_audit},
        "stay_dead": {touched.id, by_user.id},
    }


def test_reconnecting_after_retention_pruned_the_deleting_run_brings_the_queue_settings_back(
    pruned_deletion,
):
    state = pruned_deletion
    asset = state["asset"]

    result = set_asset_selection(connection=asset.connection, asset_ids=[asset.id], selected=True)

    assert result[("facebook", asset.external_id)].action == "restored"
    assert alive_settings(state["org"]) == state["by_audit"]


def test_the_audit_restore_after_retention_pruned_the_deleting_run_brings_the_settings_back(
    pruned_deletion,
):
    state = pruned_deletion
    ConnectionAsset.objects.filter(id=state["asset"].id).update(is_selected=True)
    dry = ProfileConnectionAuditService().run_full_audit(org_id=state["org"].id).run
    planned = dry.findings.get(type=FindingType.RESTORE)

    run = ProfileConnectionAuditService().run_full_audit(org_id=state["org"].id, fix=True).run

    assert alive_settings(state["org"]) == state["by_audit"]
    restore = run.findings.get(type=FindingType.RESTORE)
    assert set(restore.before["queue_settings"]) == {str(i) for i in state["by_audit"]}
    assert planned.before == restore.before  # the dry run planned the same


def test_a_revert_after_retention_pruned_the_deleting_run_brings_the_settings_back():
    """An old scheduled run deleted a dead profile's setting as stale; someone brought the
    profile back by hand; a later run deleted it as orphaned. Retention prunes the first run;
    reverting the last restores the profile and, still, the setting the first one deleted."""
    profile = ProfileFactory(deleted_at=timezone.now() - timedelta(days=300))
    org = profile.organization
    setting = QueueSettingFactory(profile=profile)
    by_user = QueueSettingFactory(profile=profile, deleted_at=timezone.now() - timedelta(days=9))
    deleting = scheduled_fix(days_ago=200)
    SocialProfile.objects.filter(id=profile.id).update(deleted_at=None)
    orphaning = ProfileConnectionAuditService().run_full_audit(org_id=org.id, fix=True).run
    assert orphaning.by_type[FindingType.ORPHANED]["fixed"] == 1
    scheduled_fix(days_ago=100)
    prune_audit_runs(older_than_days=90)
    assert deleting.id not in remaining()

    revert_run(run_id=orphaning.id, fix=True)

    profile.refresh_from_db()
    assert profile.deleted_at is None
    assert alive_settings(org) == {setting.id}
    assert by_user.id not in alive_settings(org)


def test_a_prune_cut_short_finishes_when_run_again_and_keeps_each_deletion_once(monkeypatch):
    asset = AssetFactory(is_selected=False)
    setting = QueueSettingFactory(profile=profile_for(asset))
    scheduled_fix(days_ago=200)
    scheduled_fix(days_ago=100)

    def connection_lost(queryset):
        raise DatabaseError("server closed the connection unexpectedly")

    with monkeypatch.context() as patched:
        patched.setattr(QuerySet, "delete", connection_lost)
        with pytest.raises(DatabaseError):
            prune_audit_runs(older_than_days=90)
    report = prune_audit_runs(older_than_days=90)

    assert report.runs_deleted == 1
    assert StaleQueueSettingDeletion.objects.filter(queue_setting=setting).count() == 1
    set_asset_selection(connection=asset.connection, asset_ids=[asset.id], selected=True)
    assert alive_settings(asset.connection.organization) == {setting.id}


def test_dry_runs_lose_their_findings_sooner_than_fixing_runs(settings):
    settings.PROFILE_AUDIT_DRY_RUN_RETENTION_DAYS = 14
    org = OrganizationFactory()
    old_dry = run(org, days_ago=20, fix=False, finished_at=timezone.now() - timedelta(days=20))
    old_fix = run(org, days_ago=20, finished_at=timezone.now() - timedelta(days=20))
    recent_dry = run(org, days_ago=2, fix=False, finished_at=timezone.now() - timedelta(days=2))

    result = prune_audit_runs_task.delay().get()

    assert result["dry_run_findings_deleted"] == 3
    # The dry run's record and counts stay; only its findings went.
    assert remaining() == {old_dry.id, old_fix.id, recent_dry.id}
    assert not AuditFinding.objects.filter(run=old_dry).exists()
    assert AuditFinding.objects.filter(run=old_fix).count() == 3
    assert AuditFinding.objects.filter(run=recent_dry).count() == 3
