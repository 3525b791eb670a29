"""The profile sync unit and the real-time selection change that calls it."""

import threading

import pytest
from django.db import connection
from django.utils import timezone

from connections.services import set_asset_selection
from profiles.models import SocialProfile
from profiles.services.audit import ProfileConnectionAuditService
from profiles.services.soft_delete import ProfileSoftDeleteService
from profiles.services.sync import SyncResult, sync_profile
from profiles.tasks import sync_profile_task
from queues.models import QueueSetting
from tests.factories import (
    AssetFactory,
    ConnectionFactory,
    OrganizationFactory,
    QueueSettingFactory,
    profile_for,
)


def key_of(asset):
    return {"platform": "facebook", "external_id": asset.external_id}


@pytest.mark.django_db
def test_sync_creates_profile_on_backing_connection_named_after_asset():
    asset = AssetFactory(name="Corner Bakery")
    org_id = asset.connection.organization_id

    result = sync_profile(organization_id=org_id, **key_of(asset))

    profile = SocialProfile.objects.get(id=result.profile_id)
    assert result.action == "created"
    assert (profile.name, profile.connection_id, profile.organization_id) == (
        "Corner Bakery",
        asset.connection_id,
        org_id,
    )


@pytest.mark.django_db
def test_sync_is_idempotent():
    asset = AssetFactory()
    org_id = asset.connection.organization_id

    first = sync_profile(organization_id=org_id, **key_of(asset))
    second = sync_profile(organization_id=org_id, **key_of(asset))

    assert (first.action, second.action) == ("created", "unchanged")
    assert second.profile_id == first.profile_id
    assert SocialProfile.objects.filter(organization_id=org_id).count() == 1


@pytest.mark.django_db
def test_sync_soft_deletes_profile_of_key_selected_nowhere():
    asset = AssetFactory(is_selected=False)
    profile = profile_for(asset)

    result = sync_profile(organization_id=profile.organization_id, **key_of(asset))

    profile.refresh_from_db()
    assert result.action == "deleted"
    assert profile.deleted_at is not None


@pytest.mark.django_db
def test_sync_task_runs_the_unit():
    asset = AssetFactory()

    sync_profile_task.delay(str(asset.connection.organization_id), "facebook", asset.external_id)
    sync_profile_task.delay(str(asset.connection.organization_id), "facebook", asset.external_id)

    assert SocialProfile.objects.filter(external_id=asset.external_id).count() == 1


@pytest.mark.django_db(transaction=True)
def test_sync_run_twice_at_once_creates_one_profile():
    asset = AssetFactory()
    org_id = asset.connection.organization_id
    start = threading.Barrier(2, timeout=30)
    results, errors = [], []

    def run():
        try:
            start.wait()
            results.append(sync_profile(organization_id=org_id, **key_of(asset)))
        except Exception as exc:  # surfaced by the assertion below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert errors == []
    assert sorted(r.action for r in results) == ["created", "unchanged"]
    assert SocialProfile.objects.filter(organization_id=org_id).count() == 1


@pytest.mark.django_db
def test_is_asset_selected_in_any_connection():
    org = OrganizationFactory()
    AssetFactory(connection=ConnectionFactory(organization=org), external_id="a")
    AssetFactory(connection=ConnectionFactory(organization=org), external_id="b", is_selected=False)
    AssetFactory(connection=ConnectionFactory(organization=org, status="revoked"), external_id="c")
    AssetFactory(connection=ConnectionFactory(), external_id="d")  # another organization's
    service = ProfileSoftDeleteService()

    def selected(external_id):
        return service.is_asset_selected_in_any_connection(
            organization_id=org.id, platform="facebook", external_id=external_id
        )

    assert [selected(x) for x in "abcd"] == [True, False, False, False]


@pytest.mark.django_db
def test_real_time_deselect_and_reselect_keep_the_profile_and_its_audited_queue(committed):
    """Deselect: the profile goes at once; the audit then retires its queue setting. Reselect:
    the profile comes back with the queue settings the audit took, not the one a user deleted."""
    asset = AssetFactory()
    connection_ = asset.connection
    profile = profile_for(asset)
    audited_queue = QueueSettingFactory(profile=profile)
    user_deleted_queue = QueueSettingFactory(profile=profile, deleted_at=timezone.now())

    results = set_asset_selection(connection=connection_, asset_ids=[asset.id], selected=False)
    assert results[("facebook", asset.external_id)].action == "deleted"
    committed(ProfileConnectionAuditService().run_audit_for_all_orgs, fix=True)
    audited_queue.refresh_from_db()
    assert audited_queue.deleted_at is not None

    results = set_asset_selection(connection=connection_, asset_ids=[asset.id], selected=True)

    assert results[("facebook", asset.external_id)].action == "restored"
    profile.refresh_from_db()
    audited_queue.refresh_from_db()
    user_deleted_queue.refresh_from_db()
    assert profile.deleted_at is None
    assert audited_queue.deleted_at is None
    assert user_deleted_queue.deleted_at is not None
    assert QueueSetting.objects.filter(profile=profile).alive().count() == 1


@pytest.mark.django_db
def test_selecting_an_asset_creates_its_profile_at_once():
    asset = AssetFactory(is_selected=False)

    results = set_asset_selection(connection=asset.connection, asset_ids=[asset.id], selected=True)

    asset.refresh_from_db()
    assert asset.is_selected
    profile = SocialProfile.objects.alive().get(external_id=asset.external_id)
    assert results == {("facebook", asset.external_id): SyncResult("created", profile.id)}
