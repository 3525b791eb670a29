"""factory-boy factories for the domain models."""

import uuid

import factory
from django.utils import timezone

from boosts.models import BoostRule
from connections.models import ConnectionAsset, ConnectionStatus, PlatformConnection, Provider
from connections.platforms import ASSET_TYPE_PLATFORM
from orgs.models import Organization
from profiles.models import DriftRecord, SocialProfile
from queues.models import QueueSetting


class OrganizationFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Organization

    name = factory.Sequence(lambda n: f"Organization {n}")


class ConnectionFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = PlatformConnection

    organization = factory.SubFactory(OrganizationFactory)
    provider = Provider.META
    status = ConnectionStatus.ACTIVE
    name = factory.Sequence(lambda n: f"Connection {n}")
    created_at = factory.LazyFunction(timezone.now)


class AssetFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = ConnectionAsset

    connection = factory.SubFactory(ConnectionFactory)
    asset_type = "page"
    external_id = factory.Sequence(lambda n: f"ext-{n}")
    name = factory.Sequence(lambda n: f"Asset {n}")
    is_selected = True


class ProfileFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = SocialProfile

    organization = factory.SubFactory(OrganizationFactory)
    connection = None
    platform = "facebook"
    external_id = factory.Sequence(lambda n: f"ext-p{n}")
    name = factory.Sequence(lambda n: f"Profile {n}")


def profile_for(asset: ConnectionAsset, **overrides) -> SocialProfile:
    """A profile for this asset's key, on the asset's connection unless told otherwise."""
    fields = {
        "organization": asset.connection.organization,
        "connection": asset.connection,
        "platform": ASSET_TYPE_PLATFORM[asset.asset_type],
        "external_id": asset.external_id,
        **overrides,
    }
    return ProfileFactory(**fields)


class QueueSettingFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = QueueSetting

    profile = factory.SubFactory(ProfileFactory)
    organization = factory.LazyAttribute(lambda o: o.profile.organization)
    name = factory.Sequence(lambda n: f"Queue {n}")
    slots = factory.LazyFunction(lambda: [{"day": "mon", "time": "09:00"}])


class BoostRuleFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = BoostRule

    organization = factory.SubFactory(OrganizationFactory)
    name = factory.Sequence(lambda n: f"Boost {n}")
    profile_ids = factory.LazyFunction(list)


class DriftRecordFactory(factory.django.DjangoModelFactory):
    """A finding fingerprint's history: an orphaned profile's, found once and open."""

    class Meta:
        model = DriftRecord

    organization = factory.SubFactory(OrganizationFactory)
    type = "orphaned"
    model = "profiles.SocialProfile"
    object_id = factory.LazyFunction(uuid.uuid4)
    platform = ""
    external_id = ""
    key = factory.LazyAttribute(
        lambda r: str(r.object_id) if r.object_id else f"{r.platform}:{r.external_id}"
    )
    state = "open"
    times_found = 1
