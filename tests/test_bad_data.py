"""Rule 7, whatever the data (issue 8): one row's content never stops a run. It is reported
and contained to its organization; the others are audited and fixed; the row is left as it is."""

import pytest
from django.db import connection

from boosts.models import BoostRule
from profiles.models import AuditStatus
from profiles.services.audit import AuditRequest, run_audit
from tests.factories import BoostRuleFactory, OrganizationFactory, ProfileFactory

pytestmark = pytest.mark.django_db


def nested_too_deep(rule: BoostRule) -> str:
    """Store profile_ids nested deeper than Python decodes (the database accepts it)."""
    # SQLite's JSON_VALID accepts up to 1,000 levels; PostgreSQL takes thousands.
    depth = 5000 if connection.vendor == "postgresql" else 999
    text = "[" * depth + "]" * depth
    with connection.cursor() as cursor:
        cast = "::jsonb" if connection.vendor == "postgresql" else ""
        cursor.execute(
            f"UPDATE boosts_boostrule SET profile_ids = %s{cast} WHERE id = %s",
            [text, rule.id.hex if connection.vendor == "sqlite" else rule.id],
        )
    return text


def stored_text(rule: BoostRule) -> str:
    with connection.cursor() as cursor:
        cast = "::text" if connection.vendor == "postgresql" else ""
        cursor.execute(
            f"SELECT profile_ids{cast} FROM boosts_boostrule WHERE id = %s",
            [rule.id.hex if connection.vendor == "sqlite" else rule.id],
        )
        return cursor.fetchone()[0].replace(" ", "")


@pytest.mark.parametrize("fix", [False, True], ids=["dry run", "fix"])
def test_rule_7_a_boost_rule_nested_too_deep_is_contained_to_its_organization(fix):
    before, bad, after = sorted((OrganizationFactory() for _ in range(3)), key=lambda o: o.id)
    orphans = [ProfileFactory(organization=org) for org in (before, bad, after)]
    rule = BoostRuleFactory(organization=bad)
    text = nested_too_deep(rule)

    run = run_audit(AuditRequest(fix=fix)).run

    assert run.status == AuditStatus.PARTIAL
    assert run.organizations_audited == 3
    assert list(run.failed_organizations) == [str(bad.id)]
    assert (
        "profile_ids cannot be read (RecursionError); left as it is"
        in (run.failed_organizations[str(bad.id)])
    )
    # The organizations before and after it are audited (and, with --fix, fixed).
    assert run.found == 2
    assert run.fixed == (2 if fix else 0)
    for org, profile in zip((before, bad, after), orphans, strict=True):
        profile.refresh_from_db()
        assert (profile.deleted_at is not None) == (fix and org != bad)
    assert stored_text(rule) == text, "the unreadable row is left exactly as it was"


@pytest.mark.django_db(transaction=True)
def test_a_chunk_is_read_in_one_consistent_snapshot():
    """A real-time sync that deselects an asset and retires its profile, committing between
    two of the snapshot's reads, is seen whole or not at all: never a selected asset with a
    dead profile (a false 'restore')."""
    from connections.models import ConnectionAsset
    from profiles.models import SocialProfile
    from tests.factories import AssetFactory, profile_for

    asset = AssetFactory()
    profile = profile_for(asset)
    committed = []

    def sync_commits_between_reads(execute, sql, params, many, context):
        result = execute(sql, params, many, context)
        if "connections_connectionasset" in sql and not committed:
            committed.append(_commit_elsewhere(asset.id, profile.id))
        return result

    with connection.execute_wrapper(sync_commits_between_reads):
        run = run_audit(AuditRequest()).run

    assert run.found == 0, "the snapshot mixed the state before and after the sync"
    if connection.vendor == "postgresql":
        assert committed == [True]  # it committed meanwhile; the snapshot did not see it
    else:
        assert committed == [False]  # SQLite held it off until the reads were done
    ConnectionAsset.objects.filter(id=asset.id).update(is_selected=False)
    SocialProfile.objects.filter(id=profile.id).update(deleted_at="2026-01-01T00:00:00Z")
    assert run_audit(AuditRequest()).run.found == 0


def _commit_elsewhere(asset_id, profile_id) -> bool:
    """Deselect the asset and retire its profile in one transaction of another connection;
    False if the database would not let it write now."""
    import sqlite3

    import psycopg

    from tests.support import database_env

    if connection.vendor == "postgresql":
        with psycopg.connect(database_env()["DATABASE_URL"]) as other:
            other.execute(
                "UPDATE connections_connectionasset SET is_selected = false WHERE id = %s",
                [asset_id],
            )
            other.execute(
                "UPDATE profiles_socialprofile SET deleted_at = now() WHERE id = %s", [profile_id]
            )
        return True
    other = sqlite3.connect(connection.settings_dict["NAME"], timeout=0.2)
    try:
        other.execute(
            "UPDATE connections_connectionasset SET is_selected = 0 WHERE id = ?", [asset_id.hex]
        )
        other.commit()
        return True
    except sqlite3.OperationalError:
        return False
    finally:
        other.close()
