"""The data model's contract: soft deletion, unfiltered managers, uniqueness among alive rows."""

from datetime import timedelta

import pytest
from django.db import IntegrityError, transaction
from django.utils import timezone

from boosts.models import BoostRule
from connections.models import PlatformConnection
from profiles.models import SocialProfile
from queues.models import QueueSetting
from tests.factories import (
    BoostRuleFactory,
    ConnectionFactory,
    OrganizationFactory,
    ProfileFactory,
    QueueSettingFactory,
)

pytestmark = pytest.mark.django_db


@pytest.mark.parametrize(
    "factory",
    [ConnectionFactory, ProfileFactory, QueueSettingFactory, BoostRuleFactory],
    ids=["connection", "profile", "queue_setting", "boost_rule"],
)
def test_default_manager_sees_dead_rows_and_alive_dead_filter(factory):
    alive, dead = factory(), factory()
    dead.soft_delete()
    model = type(alive)

    assert set(model.objects.values_list("id", flat=True)) >= {alive.id, dead.id}
    assert dead.id not in set(model.objects.alive().values_list("id", flat=True))
    assert set(model.objects.dead().values_list("id", flat=True)) == {dead.id}

    dead.restore()
    assert model.objects.get(id=dead.id).deleted_at is None


def test_only_one_alive_profile_per_key():
    org = OrganizationFactory()
    ProfileFactory(organization=org, platform="facebook", external_id="1")
    ProfileFactory(
        organization=org, platform="facebook", external_id="1", deleted_at=timezone.now()
    )
    ProfileFactory(organization=OrganizationFactory(), platform="facebook", external_id="1")

    with pytest.raises(IntegrityError), transaction.atomic():
        ProfileFactory(organization=org, platform="facebook", external_id="1")


def test_created_at_can_be_set_by_tests():
    then = timezone.now() - timedelta(days=400)
    assert ConnectionFactory(created_at=then).created_at == then
    assert ProfileFactory(created_at=then).created_at == then


def test_deleting_a_connection_row_keeps_its_profiles():
    connection = ConnectionFactory()
    profile = ProfileFactory(organization=connection.organization, connection=connection)

    PlatformConnection.objects.filter(id=connection.id).delete()

    profile.refresh_from_db()
    assert profile.connection_id is None


def test_models_have_uuid_primary_keys():
    for model in (PlatformConnection, SocialProfile, QueueSetting, BoostRule):
        assert model._meta.pk.get_internal_type() == "UUIDField"


def test_a_deleted_organizations_runs_go_with_it_and_all_org_runs_stay():
    from profiles.models import AuditRun

    org = OrganizationFactory()
    own = AuditRun.objects.create(trigger="command", organization=org)
    everyone = AuditRun.objects.create(trigger="command", organization=None)

    org.delete()

    assert not AuditRun.objects.filter(id=own.id).exists()
    assert AuditRun.objects.filter(id=everyone.id).exists()
