"""The admin pages of the domain models: they render, filter by state and organization."""

import pytest
from django.urls import reverse
from django.utils import timezone

from tests.factories import (
    AssetFactory,
    BoostRuleFactory,
    ConnectionFactory,
    OrganizationFactory,
    ProfileFactory,
    QueueSettingFactory,
)

pytestmark = pytest.mark.django_db

CHANGELISTS = [
    "admin:orgs_organization_changelist",
    "admin:connections_platformconnection_changelist",
    "admin:connections_connectionasset_changelist",
    "admin:profiles_socialprofile_changelist",
    "admin:queues_queuesetting_changelist",
    "admin:boosts_boostrule_changelist",
]


@pytest.fixture
def two_orgs():
    orgs = [OrganizationFactory(name=f"Org {n}") for n in range(2)]
    for org in orgs:
        connection = ConnectionFactory(organization=org, name=f"{org.name} connection")
        AssetFactory(connection=connection, external_id=f"{org.name}-asset")
        profile = ProfileFactory(
            organization=org, connection=connection, name=f"{org.name} profile"
        )
        QueueSettingFactory(profile=profile, name=f"{org.name} queue")
        BoostRuleFactory(organization=org, name=f"{org.name} boost", profile_ids=[str(profile.id)])
    return orgs


@pytest.mark.parametrize("url_name", CHANGELISTS)
def test_changelists_render_and_filter_by_organization(admin_client, two_orgs, url_name):
    first, _ = two_orgs
    url = reverse(url_name)

    everything = admin_client.get(url)
    assert everything.status_code == 200
    assert "Org 0" in everything.content.decode() and "Org 1" in everything.content.decode()

    if url_name != "admin:orgs_organization_changelist":
        filtered = admin_client.get(url, {"organization": str(first.id)}).content.decode()
        assert "Org 0" in filtered
        assert "Org 1" not in filtered
        assert 'placeholder="organization id or name"' in filtered


def test_profiles_filter_alive_and_dead(admin_client):
    ProfileFactory(name="Still here")
    ProfileFactory(name="Gone away", deleted_at=timezone.now())
    url = reverse("admin:profiles_socialprofile_changelist")

    dead = admin_client.get(url, {"state": "dead"}).content.decode()
    alive = admin_client.get(url, {"state": "alive"}).content.decode()

    assert "Gone away" in dead and "Still here" not in dead
    assert "Still here" in alive and "Gone away" not in alive


def test_organization_filter_takes_a_name_too(admin_client, two_orgs):
    url = reverse("admin:profiles_socialprofile_changelist")

    assert "Org 0 profile" not in admin_client.get(url, {"organization": "nope"}).content.decode()
    by_name = admin_client.get(url, {"organization": "org 1"}).content.decode()
    assert "Org 1 profile" in by_name and "Org 0 profile" not in by_name


def test_domain_admin_is_refused_to_non_staff(client, django_user_model):
    user = django_user_model.objects.create_user("viewer", password="pw", is_staff=False)
    client.force_login(user)

    response = client.get(reverse("admin:profiles_socialprofile_changelist"))

    assert response.status_code == 302
    assert "/admin/login/" in response["Location"]
