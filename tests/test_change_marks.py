"""Change marks: every kind of write to the audited tables marks the organizations it touches,
in its own transaction, with its writers (DESIGN "Change-driven runs")."""

from __future__ import annotations

import sqlite3
import uuid
from datetime import datetime, timedelta

import psycopg
import pytest
from django.db import connection, transaction

from boosts.models import BoostRule
from connections.models import ConnectionAsset, PlatformConnection
from connections.services import set_asset_selection
from orgs.models import Organization
from profiles.change_marks import (
    REALTIME_SYNC,
    SQLITE_APPLICATION_NAME,
    current_writer,
    writer,
)
from profiles.models import ChangeMark, SocialProfile
from queues.models import QueueSetting
from tests.factories import (
    AssetFactory,
    BoostRuleFactory,
    ConnectionFactory,
    OrganizationFactory,
    ProfileFactory,
    QueueSettingFactory,
    profile_for,
)

AUDITED_TABLES = [
    PlatformConnection._meta.db_table,
    ConnectionAsset._meta.db_table,
    SocialProfile._meta.db_table,
    QueueSetting._meta.db_table,
    BoostRule._meta.db_table,
]
# What our own connections call themselves on PostgreSQL (settings); SQLite has no such name, so
# writer() records one.
OUR_APPLICATION = "profile-sync-audit"


def db_uuid(value: uuid.UUID):
    """A UUID as raw SQL must bind it on this database (SQLite keeps them as hex text)."""
    return SocialProfile._meta.pk.get_db_prep_value(value, connection)


def marks() -> dict[uuid.UUID, ChangeMark]:
    return {mark.organization_id: mark for mark in ChangeMark.objects.all()}


def marked() -> set[uuid.UUID]:
    return set(ChangeMark.objects.values_list("organization_id", flat=True))


def clear_marks() -> None:
    """Forget what arranging the test marked (the triggers mark factories' writes too)."""
    ChangeMark.objects.all().delete()


def writers_of(org_id: uuid.UUID) -> list[tuple[str, str | None]]:
    return [(w["application_name"], w["writer"]) for w in ChangeMark.objects.get(pk=org_id).writers]


# --- Every kind of write -------------------------------------------------------------------------


@pytest.mark.django_db
def test_every_audited_table_carries_its_triggers():
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute(
                "SELECT tgrelid::regclass::text, tgname FROM pg_trigger "
                "WHERE tgname LIKE 'profile_sync_mark_%%' AND tgenabled = 'O'"
            )
            found = {(table, name.removeprefix("profile_sync_mark_")) for table, name in cursor}
        else:
            cursor.execute(
                "SELECT tbl_name, name FROM sqlite_master "
                "WHERE type = 'trigger' AND name LIKE 'profile_sync_mark_%%'"
            )
            found = {
                (table, name.removeprefix("profile_sync_mark_").removesuffix("_" + table))
                for table, name in cursor
            }
    assert found == {(t, op) for t in AUDITED_TABLES for op in ("insert", "update", "delete")}


@pytest.mark.django_db
def test_an_orm_save_marks_its_organization():
    org, other = OrganizationFactory(), OrganizationFactory()
    clear_marks()

    profile = SocialProfile.objects.create(organization=org, platform="facebook", external_id="1")
    assert marked() == {org.id}

    clear_marks()
    profile.name = "renamed"
    profile.save()
    assert marked() == {org.id}
    assert other.id not in marked()


def _queue_setting(org_id):
    profile = ProfileFactory(organization_id=org_id)
    clear_marks()
    return QueueSettingFactory(profile=profile)


@pytest.mark.django_db
@pytest.mark.parametrize(
    "make",
    [
        lambda org_id: ConnectionFactory(organization_id=org_id),
        lambda org_id: ProfileFactory(organization_id=org_id),
        _queue_setting,
        lambda org_id: BoostRuleFactory(organization_id=org_id),
    ],
    ids=["connection", "profile", "queue_setting", "boost_rule"],
)
def test_insert_update_and_delete_of_each_audited_table_mark_its_organization(make):
    org_id = OrganizationFactory().id
    clear_marks()

    row = make(org_id)
    assert marked() == {org_id}

    clear_marks()
    type(row).objects.filter(pk=row.pk).update(name="changed")
    assert marked() == {org_id}

    clear_marks()
    type(row).objects.filter(pk=row.pk).delete()
    assert marked() == {org_id}


@pytest.mark.django_db
def test_a_queryset_update_marks_every_organization_it_touches():
    orgs = OrganizationFactory.create_batch(3)
    untouched = OrganizationFactory()
    for org in [*orgs, untouched]:
        ProfileFactory.create_batch(2, organization=org)
    clear_marks()

    updated = SocialProfile.objects.filter(organization__in=orgs).update(name="bulk")

    assert updated == 6
    assert marked() == {org.id for org in orgs}
    assert {m.writes for m in marks().values()} == {2}


@pytest.mark.django_db
def test_bulk_create_marks_every_organization_of_the_batch():
    orgs = OrganizationFactory.create_batch(3)
    clear_marks()

    SocialProfile.objects.bulk_create(
        SocialProfile(organization=org, platform="facebook", external_id=f"{org.id}-{n}")
        for org in orgs
        for n in range(4)
    )

    assert marked() == {org.id for org in orgs}
    assert {m.writes for m in marks().values()} == {4}


@pytest.mark.django_db
def test_bulk_update_marks_every_organization_of_the_batch():
    orgs = OrganizationFactory.create_batch(2)
    rules = [BoostRuleFactory(organization=org) for org in orgs for _ in range(3)]
    clear_marks()

    for rule in rules:
        rule.profile_ids = [str(uuid.uuid4())]
    BoostRule.objects.bulk_update(rules, ["profile_ids"])

    assert marked() == {org.id for org in orgs}


@pytest.mark.django_db
def test_deleting_a_connection_marks_what_its_cascade_and_set_null_touch():
    connection_ = ConnectionFactory()
    AssetFactory.create_batch(2, connection=connection_)
    # A profile of another organization pointing at this connection (bad data the audit
    # reports): Django's SET NULL on it is a write to that other organization.
    elsewhere = ProfileFactory(connection=connection_)
    bystander = OrganizationFactory()
    clear_marks()

    connection_.delete()

    elsewhere.refresh_from_db()
    assert elsewhere.connection_id is None
    assert marked() == {connection_.organization_id, elsewhere.organization_id}
    assert bystander.id not in marked()


@pytest.mark.django_db
def test_deleting_an_organization_marks_it_through_its_rows():
    org = OrganizationFactory()
    asset = AssetFactory(connection=ConnectionFactory(organization=org))
    profile = profile_for(asset)
    QueueSettingFactory(profile=profile)
    BoostRuleFactory(organization=org, profile_ids=[str(profile.id)])
    clear_marks()

    org_id = org.id
    org.delete()

    mark = ChangeMark.objects.get(pk=org_id)
    # Its asset, connection, queue setting, profile and boost rule deleted, and the profile's
    # connection set to null (SET_NULL) before: six rows written.
    assert mark.writes == 6
    assert not Organization.objects.filter(pk=org_id).exists()


@pytest.mark.django_db
def test_raw_sql_marks_the_organizations_it_writes():
    first, second = ProfileFactory(), ProfileFactory()
    clear_marks()

    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {SocialProfile._meta.db_table} SET name = 'raw' WHERE id IN (%s, %s)",
            [
                db_uuid(first.id),
                db_uuid(second.id),
            ],
        )

    assert marked() == {first.organization_id, second.organization_id}


@pytest.mark.django_db
def test_a_row_moved_between_organizations_marks_both():
    source, target = OrganizationFactory(), OrganizationFactory()
    profile = ProfileFactory(organization=source)
    clear_marks()

    SocialProfile.objects.filter(pk=profile.pk).update(organization=target)

    assert marked() == {source.id, target.id}
    assert {m.writes for m in marks().values()} == {1}


@pytest.mark.django_db
def test_an_asset_write_marks_its_connections_organization():
    asset = AssetFactory()
    org_id = asset.connection.organization_id
    clear_marks()

    ConnectionAsset.objects.filter(pk=asset.pk).update(is_selected=False)
    assert marked() == {org_id}

    clear_marks()
    AssetFactory(connection=asset.connection)
    assert marked() == {org_id}

    clear_marks()
    asset.delete()
    assert marked() == {org_id}


@pytest.mark.django_db
def test_an_asset_moved_to_another_organizations_connection_marks_both():
    asset = AssetFactory()
    elsewhere = ConnectionFactory()
    clear_marks()

    ConnectionAsset.objects.filter(pk=asset.pk).update(connection=elsewhere)

    assert marked() == {asset.connection.organization_id, elsewhere.organization_id}


@pytest.mark.django_db
def test_a_connection_moved_between_organizations_marks_both():
    connection_ = ConnectionFactory()
    target = OrganizationFactory()
    clear_marks()

    PlatformConnection.objects.filter(pk=connection_.pk).update(organization=target)

    assert marked() == {connection_.organization_id, target.id}


@pytest.mark.django_db(transaction=True)
def test_a_rolled_back_write_marks_nothing_and_a_committed_one_stays_marked():
    profile = ProfileFactory()
    clear_marks()

    with pytest.raises(RuntimeError), transaction.atomic():
        SocialProfile.objects.filter(pk=profile.pk).update(name="never")
        assert marked() == {profile.organization_id}  # seen inside the writing transaction
        raise RuntimeError("the write fails after it was made")

    assert marked() == set()
    assert SocialProfile.objects.get(pk=profile.pk).name != "never"

    with transaction.atomic():
        SocialProfile.objects.filter(pk=profile.pk).update(name="kept")
    assert marked() == {profile.organization_id}


@pytest.mark.django_db
def test_a_write_in_a_rolled_back_savepoint_marks_nothing():
    profile = ProfileFactory()
    clear_marks()

    with pytest.raises(RuntimeError), transaction.atomic():
        profile.soft_delete()
        raise RuntimeError("rolled back to the savepoint")

    assert marked() == set()


# --- Versions: what a run takes and clears ---------------------------------------------------------


@pytest.mark.django_db
def test_the_version_rises_on_every_write_and_never_repeats():
    profile = ProfileFactory()
    org_id = profile.organization_id
    clear_marks()
    seen = []
    for n in range(3):
        SocialProfile.objects.filter(pk=profile.pk).update(name=f"v{n}")
        seen.append(ChangeMark.objects.get(pk=org_id).version)
    # Cleared and written again, a mark still gets a version never used before.
    clear_marks()
    SocialProfile.objects.filter(pk=profile.pk).update(name="again")
    seen.append(ChangeMark.objects.get(pk=org_id).version)

    assert seen == sorted(set(seen))
    assert ChangeMark.objects.get(pk=org_id).writes == 1


@pytest.mark.django_db
def test_clearing_the_marks_a_run_took_leaves_those_written_after():
    quiet, busy = ProfileFactory(), ProfileFactory()
    clear_marks()
    SocialProfile.objects.filter(pk__in=[quiet.pk, busy.pk]).update(name="before the take")
    taken = dict(ChangeMark.objects.values_list("organization_id", "version"))
    marks_before = marks()

    # Written after the run took its marks, before it clears them.
    SocialProfile.objects.filter(pk=busy.pk).update(name="after the take")
    with connection.cursor() as cursor:
        for org_id, version in taken.items():
            cursor.execute(
                f"DELETE FROM {ChangeMark._meta.db_table} WHERE organization_id = %s AND version = %s",
                [db_uuid(org_id), version],
            )

    left = marks()
    assert set(left) == {busy.organization_id}
    assert (
        left[busy.organization_id].first_marked_at
        == marks_before[busy.organization_id].first_marked_at
    )
    assert left[busy.organization_id].writes == 2


# --- Writers -------------------------------------------------------------------------------------------


def our_application() -> str:
    return OUR_APPLICATION if connection.vendor == "postgresql" else SQLITE_APPLICATION_NAME


@pytest.mark.django_db
def test_a_mark_names_the_writer_tag_and_the_application():
    profile = ProfileFactory()
    clear_marks()

    with writer("partner-sync"):
        SocialProfile.objects.filter(pk=profile.pk).update(name="partner")

    assert writers_of(profile.organization_id) == [(our_application(), "partner-sync")]
    mark = ChangeMark.objects.get(pk=profile.organization_id)
    written_at = datetime.fromisoformat(mark.writers[0]["at"])
    assert abs(written_at - mark.last_marked_at) < timedelta(seconds=1)


@pytest.mark.django_db
def test_writer_tags_nest_and_end_with_their_block():
    profile = ProfileFactory()
    clear_marks()

    with transaction.atomic():
        with writer("outer"):
            SocialProfile.objects.filter(pk=profile.pk).update(name="1")
            with writer("inner"):
                assert current_writer() == "inner"
                SocialProfile.objects.filter(pk=profile.pk).update(name="2")
            assert current_writer() == "outer"
            SocialProfile.objects.filter(pk=profile.pk).update(name="3")
        assert current_writer() is None
        SocialProfile.objects.filter(pk=profile.pk).update(name="4")

    writers = writers_of(profile.organization_id)
    # Distinct writers, the latest last: "outer" moved after "inner" when it wrote again.
    assert [tag for _, tag in writers] == ["inner", "outer", None]
    assert ChangeMark.objects.get(pk=profile.organization_id).writes == 4


@pytest.mark.django_db
def test_a_tag_rolled_back_with_its_block_does_not_leak():
    profile = ProfileFactory()
    clear_marks()

    with transaction.atomic():
        with pytest.raises(RuntimeError), writer("failing-job"):
            SocialProfile.objects.filter(pk=profile.pk).update(name="undone")
            raise RuntimeError("the job fails")
        assert current_writer() is None
        SocialProfile.objects.filter(pk=profile.pk).update(name="after")

    assert writers_of(profile.organization_id) == [(_untagged_application(), None)]


def _untagged_application() -> str:
    # Without writer(), SQLite knows no application name.
    return OUR_APPLICATION if connection.vendor == "postgresql" else ""


@pytest.mark.django_db
def test_a_mark_keeps_the_last_ten_distinct_writers():
    profile = ProfileFactory()
    clear_marks()

    for n in range(12):
        with writer(f"job-{n}"):
            SocialProfile.objects.filter(pk=profile.pk).update(name=str(n))
    with writer("job-5"):
        SocialProfile.objects.filter(pk=profile.pk).update(name="again")

    tags = [tag for _, tag in writers_of(profile.organization_id)]
    assert tags == [f"job-{n}" for n in (2, 3, 4, 6, 7, 8, 9, 10, 11, 5)]
    assert len(tags) == 10
    assert ChangeMark.objects.get(pk=profile.organization_id).writes == 13


@pytest.mark.django_db
def test_the_real_time_selection_change_is_tagged():
    asset = AssetFactory(is_selected=False)
    OrganizationFactory()
    clear_marks()

    set_asset_selection(connection=asset.connection, asset_ids=[asset.id], selected=True)

    assert SocialProfile.objects.filter(external_id=asset.external_id).exists()
    mark = ChangeMark.objects.get(pk=asset.connection.organization_id)
    assert writers_of(mark.organization_id) == [(our_application(), REALTIME_SYNC)]
    assert mark.writes == 2  # the asset and the profile it created
    assert marked() == {mark.organization_id}


@pytest.mark.django_db
def test_an_empty_tag_is_refused():
    with pytest.raises(ValueError, match="cannot be empty"), writer(""):
        pass


@pytest.mark.django_db(transaction=True)
def test_another_programs_raw_writes_are_marked_with_its_own_name():
    """A program that is not Django (its own connection, its own SQL) is seen, and named by
    what it can tell the database: its application_name on PostgreSQL, nothing on SQLite."""
    profile = ProfileFactory()
    clear_marks()
    table = SocialProfile._meta.db_table
    settings_dict = connection.settings_dict

    if connection.vendor == "postgresql":
        with (
            psycopg.connect(
                host=settings_dict["HOST"],
                port=settings_dict["PORT"] or 5432,
                user=settings_dict["USER"],
                dbname=settings_dict["NAME"],
                application_name="partner-etl",
            ) as other,
            other.transaction(),
        ):
            other.execute("SET LOCAL profile_sync.writer = 'nightly-import'")
            other.execute(f"UPDATE {table} SET name = 'etl' WHERE id = %s", [profile.id])
        expected = [("partner-etl", "nightly-import")]
    else:
        other = sqlite3.connect(settings_dict["NAME"], timeout=30)
        with other:
            other.execute(f"UPDATE {table} SET name = 'etl' WHERE id = ?", [profile.id.hex])
        other.close()
        expected = [("", None)]

    assert writers_of(profile.organization_id) == expected


@pytest.mark.django_db(transaction=True)
def test_a_tag_around_a_transaction_is_committed_with_its_writes_and_ends_with_them():
    profile = ProfileFactory()
    clear_marks()

    with writer("partner-sync"), transaction.atomic():
        SocialProfile.objects.filter(pk=profile.pk).update(name="tagged")
    # Outside any transaction now: the next write is nobody's in particular.
    assert current_writer() is None
    SocialProfile.objects.filter(pk=profile.pk).update(name="untagged")

    assert writers_of(profile.organization_id) == [
        (our_application(), "partner-sync"),
        (_untagged_application(), None),
    ]
