"""Queue settings come back with their profile (DESIGN "Nothing is lost"): restoring a profile,
by the audit, the sync unit or a revert, restores the queue settings an audit soft-deleted
because that profile was dead, and no others."""

from datetime import timedelta

import pytest
from django.utils import timezone

from connections.models import ConnectionAsset
from connections.services import set_asset_selection
from profiles.models import FindingType, SocialProfile
from profiles.services.audit import ProfileConnectionAuditService
from profiles.services.revert import revert_run
from queues.models import QueueSetting
from tests.factories import AssetFactory, ProfileFactory, QueueSettingFactory, profile_for

pytestmark = pytest.mark.django_db


def fix(org):
    return ProfileConnectionAuditService().run_full_audit(org_id=org.id, fix=True).run


def alive_settings(org) -> set:
    return set(QueueSetting.objects.filter(organization=org).alive().values_list("id", flat=True))


@pytest.fixture
def deselected_profile():
    """A profile the audit soft-deleted as deselected, with its settings soft-deleted as stale,
    next to settings that must stay dead: one a user deleted, one an audit deleted and a user
    touched since, one of another profile."""
    asset = AssetFactory(is_selected=False)
    org = asset.connection.organization
    profile = profile_for(asset)
    by_audit = QueueSettingFactory(profile=profile, name="by audit")
    touched = QueueSettingFactory(profile=profile, name="touched since")
    by_user = QueueSettingFactory(
        profile=profile, name="by user", deleted_at=timezone.now() - timedelta(days=5)
    )
    other_profile = ProfileFactory(organization=org, deleted_at=timezone.now())
    other = QueueSettingFactory(profile=other_profile, name="other profile's")

    run = fix(org)
    assert run.by_type[FindingType.STALE_QUEUE_SETTING]["fixed"] == 3
    # A user restores and deletes this one again: it is no longer as the audit left it.
    touched.refresh_from_db()
    touched.deleted_at += timedelta(seconds=1)
    touched.save()
    return {
        "asset": asset,
        "org": org,
        "profile": profile,
        "run": run,
        "by_audit": by_audit,
        "stay_dead": {touched.id, by_user.id, other.id},
    }


def test_the_audit_restore_brings_back_exactly_the_settings_the_audit_deleted(
    deselected_profile,
):
    state = deselected_profile
    ConnectionAsset.objects.filter(id=state["asset"].id).update(is_selected=True)

    run = fix(state["org"])

    assert run.by_type[FindingType.RESTORE]["fixed"] == 1
    assert alive_settings(state["org"]) == {state["by_audit"].id}
    restore = run.findings.get(type=FindingType.RESTORE)
    setting = str(state["by_audit"].id)
    assert set(restore.before["queue_settings"]) == {setting}
    assert restore.after["queue_settings"] == {setting: None}


def test_the_sync_unit_restore_brings_back_exactly_the_settings_the_audit_deleted(
    deselected_profile,
):
    state = deselected_profile
    asset = state["asset"]

    result = set_asset_selection(connection=asset.connection, asset_ids=[asset.id], selected=True)

    assert result[("facebook", asset.external_id)].action == "restored"
    assert alive_settings(state["org"]) == {state["by_audit"].id}


def test_a_revert_that_restores_a_profile_brings_back_its_audit_deleted_settings():
    """Run A deletes a dead profile's setting as stale; someone brings the profile back by
    hand (without its setting); run B deletes the profile as orphaned. Reverting B restores
    the profile and, with it, the setting A deleted, and no other."""
    org = ProfileFactory(deleted_at=timezone.now() - timedelta(days=3)).organization
    profile = SocialProfile.objects.get(organization=org)
    setting = QueueSettingFactory(profile=profile)
    by_user = QueueSettingFactory(profile=profile, deleted_at=timezone.now() - timedelta(days=9))
    fix(org)  # run A
    profile.restore()
    run_b = fix(org)
    profile.refresh_from_db()
    assert run_b.by_type[FindingType.ORPHANED]["fixed"] == 1 and profile.deleted_at

    report = revert_run(run_id=run_b.id, fix=True)

    profile.refresh_from_db()
    assert profile.deleted_at is None
    assert alive_settings(org) == {setting.id}
    (row,) = report.run.findings.all()
    assert row.before["queue_settings"] == {
        str(setting.id): row.before["queue_settings"][str(setting.id)]
    }
    assert row.after == {"deleted_at": None, "queue_settings": {str(setting.id): None}}
    assert by_user.id not in alive_settings(org)

    # And reverting that revert deletes both again, as run B and run A had left them.
    revert_run(run_id=report.run.id, fix=True)
    profile.refresh_from_db()
    assert profile.deleted_at is not None and alive_settings(org) == set()


def test_reverting_an_audit_restore_deletes_the_settings_it_brought_back(deselected_profile):
    state = deselected_profile
    org = state["org"]
    deleted = {s.id: s.deleted_at for s in QueueSetting.objects.filter(organization=org)}
    ConnectionAsset.objects.filter(id=state["asset"].id).update(is_selected=True)
    profile_deleted_at = SocialProfile.objects.get(id=state["profile"].id).deleted_at
    restore_run = fix(org)

    revert_run(run_id=restore_run.id, fix=True)

    assert {s.id: s.deleted_at for s in QueueSetting.objects.filter(organization=org)} == deleted
    assert SocialProfile.objects.get(id=state["profile"].id).deleted_at == profile_deleted_at
