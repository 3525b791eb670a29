"""The set-based sync of a batch of keys (DESIGN "Speed on one core", "Nothing is lost"): same
decisions as one key at a time, a fixed number of statements whatever the number of keys, and
each profile created once however often and however concurrently it is asked for."""

import threading
import uuid
from collections import Counter
from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from connections.models import ConnectionAsset, PlatformConnection
from connections.services import set_asset_selection
from orgs.models import Organization
from profiles.models import SocialProfile
from profiles.services.sync import SyncKey, SyncResult, sync_profiles
from tests.factories import AssetFactory, ConnectionFactory, profile_for


def selected_without_profiles(orgs: int, per_org: int) -> list[SyncKey]:
    """``orgs`` organizations, each with a live connection selecting ``per_org`` pages that
    have no profile yet, built in bulk. Returns their keys."""
    organizations = Organization.objects.bulk_create(
        Organization(id=uuid.uuid4(), name=f"org {n}") for n in range(orgs)
    )
    connections = PlatformConnection.objects.bulk_create(
        PlatformConnection(organization=org, provider="meta") for org in organizations
    )
    ConnectionAsset.objects.bulk_create(
        ConnectionAsset(
            connection=c,
            asset_type="page",
            external_id=f"page-{n}-{slot}",
            name=f"Page {n}-{slot}",
            is_selected=True,
        )
        for n, c in enumerate(connections)
        for slot in range(per_org)
    )
    return [
        SyncKey(c.organization_id, "facebook", f"page-{n}-{slot}")
        for n, c in enumerate(connections)
        for slot in range(per_org)
    ]


def alive_keys() -> Counter:
    return Counter(
        SocialProfile.objects.alive().values_list("organization_id", "platform", "external_id")
    )


@pytest.mark.django_db
def test_a_batch_of_many_keys_creates_each_profile_once_in_a_fixed_number_of_queries():
    keys = selected_without_profiles(orgs=120, per_org=10)
    few = selected_without_profiles(orgs=2, per_org=1)

    with CaptureQueriesContext(connection) as many_queries:
        results = sync_profiles(keys=keys)
    with CaptureQueriesContext(connection) as few_queries:
        sync_profiles(keys=few)

    assert Counter(r.action for r in results.values()) == {"created": 1200}
    assert alive_keys() == Counter(keys + few)
    profile = SocialProfile.objects.get(id=results[keys[7]].profile_id)
    assert (profile.name, profile.connection.organization_id) == ("Page 0-7", keys[7][0])
    # Locks, reads and records: as many statements for 1,200 keys as for 2.
    table = SocialProfile._meta.db_table

    def not_inserts(queries):
        return [q for q in queries if not _inserts_into(q["sql"], table)]

    assert len(not_inserts(many_queries)) == len(not_inserts(few_queries))
    if connection.vendor == "postgresql":
        # One insert for all the profiles (Django batches SQLite's by its parameter limit).
        assert len([q for q in many_queries if _inserts_into(q["sql"], table)]) == 1


def _inserts_into(sql: str, table: str) -> bool:
    return sql.lstrip().replace('"', "").startswith(f"INSERT INTO {table}")


@pytest.mark.django_db
def test_a_batch_delivered_twice_creates_nothing_the_second_time():
    keys = selected_without_profiles(orgs=5, per_org=4)

    first = sync_profiles(keys=keys)
    second = sync_profiles(keys=[*keys, *keys])

    assert {r.action for r in first.values()} == {"created"}
    assert {r.action for r in second.values()} == {"unchanged"}
    assert {k: r.profile_id for k, r in second.items()} == {
        k: r.profile_id for k, r in first.items()
    }
    assert alive_keys() == Counter(keys)


@pytest.mark.django_db
def test_a_batch_decides_each_key_as_the_single_key_sync_does():
    org_connection = ConnectionFactory(created_at=timezone.now() - timedelta(days=3))
    org = org_connection.organization
    later = ConnectionFactory(organization=org)
    # created: selected on two connections, made on the older one with its asset's name.
    AssetFactory(connection=later, external_id="new", name="Later name")
    AssetFactory(connection=org_connection, external_id="new", name="Bakery")
    # deleted: selected nowhere.
    gone = profile_for(
        AssetFactory(connection=org_connection, external_id="gone", is_selected=False)
    )
    # relinked: its own connection no longer selects it.
    moved = profile_for(AssetFactory(connection=org_connection, external_id="moved"))
    ConnectionAsset.objects.filter(connection=org_connection, external_id="moved").update(
        connection=later
    )
    # restored: selected again, only a dead profile.
    back = profile_for(
        AssetFactory(connection=org_connection, external_id="back"),
        deleted_at=timezone.now() - timedelta(days=1),
    )
    # unchanged: in step already. And another organization's key with the same external id.
    fine = profile_for(AssetFactory(connection=org_connection, external_id="fine"))
    other = AssetFactory(external_id="new")

    results = sync_profiles(
        keys=[(org.id, "facebook", e) for e in ("new", "gone", "moved", "back", "fine")]
    )

    created = SocialProfile.objects.get(organization=org, external_id="new")
    assert (created.connection_id, created.name) == (org_connection.id, "Bakery")
    by_external_id = {k.external_id: r for k, r in results.items()}
    assert by_external_id == {
        "new": SyncResult("created", created.id),
        "gone": SyncResult("deleted", gone.id),
        "moved": SyncResult("relinked", moved.id),
        "back": SyncResult("restored", back.id),
        "fine": SyncResult("unchanged", fine.id),
    }
    moved.refresh_from_db()
    back.refresh_from_db()
    gone.refresh_from_db()
    assert moved.connection_id == later.id
    assert back.deleted_at is None and back.connection_id == org_connection.id
    assert gone.deleted_at is not None
    assert not SocialProfile.objects.filter(organization=other.connection.organization).exists()


@pytest.mark.django_db(transaction=True)
def test_batches_racing_each_other_and_the_real_time_sync_create_each_profile_once():
    keys = selected_without_profiles(orgs=40, per_org=5)
    assets_by_connection: dict = {}
    for asset in ConnectionAsset.objects.select_related("connection"):
        assets_by_connection.setdefault(asset.connection, []).append(asset.id)
    start = threading.Barrier(3, timeout=30)
    outcomes: list[Counter] = []
    errors: list[Exception] = []

    def batch(order):
        try:
            start.wait()
            outcomes.append(Counter(r.action for r in sync_profiles(keys=order).values()))
        except Exception as exc:  # surfaced by the assertion below
            errors.append(exc)
        finally:
            connection.close()

    def real_time():
        try:
            start.wait()
            counted = Counter()
            for connection_, asset_ids in reversed(list(assets_by_connection.items())):
                results = set_asset_selection(
                    connection=connection_, asset_ids=asset_ids, selected=True
                )
                counted.update(r.action for r in results.values())
            outcomes.append(counted)
        except Exception as exc:
            errors.append(exc)
        finally:
            connection.close()

    threads = [
        threading.Thread(target=batch, args=(keys,)),
        threading.Thread(target=batch, args=(list(reversed(keys)),)),
        threading.Thread(target=real_time),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    assert errors == []
    assert alive_keys() == Counter(keys)
    assert sum(c["created"] for c in outcomes) == len(keys)
    assert sum(c["unchanged"] for c in outcomes) == 2 * len(keys)
