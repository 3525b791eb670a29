"""Rule 7, whatever the data (issue 8): one row's content never stops a run. It is reported
and contained to its organization; the others are audited and fixed; the row is left as it is."""

import pytest
from django.db import connection

from boosts.models import BoostRule
from profiles.models import AuditStatus, FindingOutcome, SocialProfile
from profiles.services.audit import AuditRequest, run_audit
from profiles.services.revert import revert_run
from tests.factories import BoostRuleFactory, OrganizationFactory, ProfileFactory

pytestmark = pytest.mark.django_db


DEPTH = 2000
"""Deeper than Python decodes or encodes (its recursion limit is 1,000); both databases take it."""


def nested_too_deep(rule: BoostRule) -> str:
    """Store profile_ids nested ``DEPTH`` levels deep, through SQL: Django cannot write it."""
    text = "[" * DEPTH + "]" * DEPTH
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


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("fix", [False, True], ids=["dry run", "fix"])
def test_rule_7_a_boost_rule_nested_too_deep_is_left_and_the_rest_of_its_organization_fixed(fix):
    from tests.test_logging import events_of_run

    before, bad, after = sorted((OrganizationFactory() for _ in range(3)), key=lambda o: o.id)
    orphans = [ProfileFactory(organization=org) for org in (before, bad, after)]
    rule = BoostRuleFactory(organization=bad)
    text = nested_too_deep(rule)
    # The same organization's other rule is still cleaned up.
    junk = BoostRuleFactory(organization=bad, profile_ids=["junk"])

    run = run_audit(AuditRequest(fix=fix)).run

    assert run.status == AuditStatus.SUCCEEDED
    assert run.failed_organizations == {}
    assert run.organizations_audited == 3
    # Three orphans and the junk entry; the unreadable rule is no finding: nothing can be done.
    assert run.found == 4
    assert run.fixed == (4 if fix else 0)
    for profile in orphans:
        profile.refresh_from_db()
        assert (profile.deleted_at is not None) == fix
    junk.refresh_from_db()
    assert junk.profile_ids == ([] if fix else ["junk"])
    assert stored_text(rule) == text, "the unreadable row is left exactly as it was"
    [warning] = [
        e for e in events_of_run(str(run.id)) if e["event"] == "profile_audit.boost_rule_unreadable"
    ]
    assert warning["org_id"] == str(bad.id)
    assert warning["boost_rule_id"] == str(rule.id)
    # 3.11 stops at its recursion limit; 3.13 decodes it and the audit's own depth cap refuses it.
    assert warning["reason"] in ("RecursionError", "nested deeper than 100 levels")


def set_json_null(rule: BoostRule) -> None:
    """JSON ``null`` (not SQL NULL: the column is NOT NULL), as another program could write it."""
    with connection.cursor() as cursor:
        value = "'null'::jsonb" if connection.vendor == "postgresql" else "'null'"
        cursor.execute(
            f"UPDATE boosts_boostrule SET profile_ids = {value} WHERE id = %s",
            [rule.id.hex if connection.vendor == "sqlite" else rule.id],
        )


def test_a_json_null_rule_is_fixed_to_empty_and_its_revert_puts_back_json_null():
    org = OrganizationFactory()
    orphans = [ProfileFactory(organization=org) for _ in range(8)]
    rule = BoostRuleFactory(organization=org)
    set_json_null(rule)
    assert stored_text(rule) == "null"

    run = run_audit(AuditRequest(fix=True, organization_id=org.id, force=True)).run
    assert (run.found, run.fixed) == (9, 9)
    assert stored_text(rule) == "[]"

    report = revert_run(run_id=run.id, fix=True)

    assert report.run.status == AuditStatus.SUCCEEDED
    assert (report.put_back, report.conflicts, report.failed) == (9, 0, 0)
    assert stored_text(rule) == "null", "exactly the JSON that was there: JSON null"
    assert SocialProfile.objects.filter(id__in=[p.id for p in orphans]).alive().count() == 8
    # And the revert of that revert fixes it again, exactly.
    again = revert_run(run_id=report.run.id, fix=True)
    assert (again.put_back, again.conflicts) == (9, 0)
    assert stored_text(rule) == "[]"


def test_a_revert_puts_back_exactly_the_json_that_was_there():
    org = OrganizationFactory()
    values = {'{"a":1}': {"a": 1}, '"text"': "text", "3": 3, "1.5": 1.5, "true": True}
    rules = {text: BoostRuleFactory(organization=org, profile_ids=v) for text, v in values.items()}
    listed = BoostRuleFactory(organization=org, profile_ids=["junk", 1, None, [2], {"b": 2}])
    run = run_audit(AuditRequest(fix=True, organization_id=org.id)).run
    assert run.fixed == len(rules) + 1

    revert_run(run_id=run.id, fix=True)

    for text, rule in rules.items():
        assert stored_text(rule) == text
    listed.refresh_from_db()
    assert listed.profile_ids == ["junk", 1, None, [2], {"b": 2}]


def test_a_rule_nested_too_deep_since_the_fix_is_a_conflict_and_the_rest_is_put_back():
    org = OrganizationFactory()
    orphan = ProfileFactory(organization=org)
    rule = BoostRuleFactory(organization=org, profile_ids=["junk"])
    run = run_audit(AuditRequest(fix=True, organization_id=org.id)).run
    assert run.fixed == 2
    text = nested_too_deep(rule)

    report = revert_run(run_id=run.id, fix=True)

    assert report.run.status == AuditStatus.PARTIAL
    assert report.run.failed_organizations == {}
    assert (report.put_back, report.conflicts) == (1, 1)
    conflict = report.run.findings.get(outcome=FindingOutcome.CONFLICT)
    assert conflict.object_id == rule.id
    assert any(
        f"profile_ids is unreadable JSON ({why})" in conflict.detail
        for why in ("RecursionError", "nested deeper than 100 levels")
    )
    assert stored_text(rule) == text
    orphan.refresh_from_db()
    assert orphan.deleted_at is None


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
