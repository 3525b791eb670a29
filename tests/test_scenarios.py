"""The original feature's eight scenario groups, on the real database."""

from datetime import timedelta

import pytest
from django.db.models import JSONField, Value
from django.utils import timezone

from boosts.models import BoostRule
from connections.models import ConnectionStatus
from profiles.models import AuditFinding, AuditRun, AuditStatus, FindingOutcome, SocialProfile
from profiles.services.audit import ProfileConnectionAuditService
from tests.factories import (
    AssetFactory,
    BoostRuleFactory,
    ConnectionFactory,
    OrganizationFactory,
    ProfileFactory,
    QueueSettingFactory,
    profile_for,
)

pytestmark = pytest.mark.django_db


@pytest.fixture
def audit():
    return ProfileConnectionAuditService()


@pytest.fixture
def org():
    return OrganizationFactory()


def ids(findings):
    return {f.object_id for f in findings}


def keys(findings):
    return {f.key for f in findings}


class TestOrphanedProfiles:
    def test_profile_of_a_deleted_connection_is_orphaned(self, audit, org):
        connection = ConnectionFactory(organization=org, deleted_at=timezone.now())
        profile = profile_for(AssetFactory(connection=connection))

        assert ids(audit.find_orphaned_profiles(org_id=org.id)) == {profile.id}

    @pytest.mark.parametrize("status", ["inactive", "expired", "revoked"])
    def test_profile_of_an_inactive_connection_is_orphaned(self, audit, org, status):
        connection = ConnectionFactory(organization=org, status=status)
        profile = profile_for(AssetFactory(connection=connection))

        assert ids(audit.find_orphaned_profiles(org_id=org.id)) == {profile.id}

    def test_profile_without_connection_is_orphaned(self, audit, org):
        profile = ProfileFactory(organization=org, connection=None)

        assert ids(audit.find_orphaned_profiles(org_id=org.id)) == {profile.id}

    def test_profile_of_an_active_connection_is_not_orphaned(self, audit, org):
        profile_for(AssetFactory(connection=ConnectionFactory(organization=org)))

        assert audit.find_orphaned_profiles(org_id=org.id) == []

    def test_fix_soft_deletes_orphaned_profile(self, audit, org):
        connection = ConnectionFactory(organization=org, status=ConnectionStatus.EXPIRED)
        profile = profile_for(AssetFactory(connection=connection))

        assert audit.soft_delete_orphaned_profiles(org_id=org.id) == 1

        profile.refresh_from_db()
        assert profile.deleted_at is not None
        assert SocialProfile.objects.filter(id=profile.id).exists(), "soft delete, never a delete"


class TestMissingProfiles:
    def test_selected_asset_without_profile_is_missing(self, audit, org):
        asset = AssetFactory(connection=ConnectionFactory(organization=org), external_id="123")

        assert keys(audit.find_missing_profiles(org_id=org.id)) == {("facebook", "123")}
        assert asset.is_selected

    def test_several_asset_types(self, audit, org):
        connection = ConnectionFactory(organization=org)
        for asset_type in ["page", "instagram_account", "youtube_channel", "linkedin_page"]:
            AssetFactory(connection=connection, asset_type=asset_type, external_id="42")

        assert keys(audit.find_missing_profiles(org_id=org.id)) == {
            ("facebook", "42"),
            ("instagram", "42"),
            ("youtube", "42"),
            ("linkedin", "42"),
        }

    def test_fix_creates_profile_on_backing_connection_named_after_asset(
        self, audit, org, committed
    ):
        older = ConnectionFactory(organization=org, created_at=timezone.now() - timedelta(days=2))
        newer = ConnectionFactory(organization=org)
        AssetFactory(connection=newer, external_id="7", name="Newer name")
        AssetFactory(connection=older, external_id="7", name="Bakery")

        assert committed(audit.create_missing_profiles, org_id=org.id) == 1

        profile = SocialProfile.objects.get(organization=org, external_id="7")
        assert (profile.connection_id, profile.name, profile.platform) == (
            older.id,
            "Bakery",
            "facebook",
        )

    def test_unselected_asset_is_not_missing(self, audit, org):
        AssetFactory(connection=ConnectionFactory(organization=org), is_selected=False)

        assert audit.find_missing_profiles(org_id=org.id) == []

    def test_unknown_asset_type_never_backs_a_profile(self, audit, org):
        AssetFactory(connection=ConnectionFactory(organization=org), asset_type="myspace_page")

        assert audit.plan_organization(org_id=org.id).findings == ()


class TestDeselectedProfiles:
    def test_profile_of_unselected_asset_is_flagged(self, audit, org):
        asset = AssetFactory(connection=ConnectionFactory(organization=org), is_selected=False)
        profile = profile_for(asset)

        assert ids(audit.find_profiles_to_soft_delete(org_id=org.id)) == {profile.id}

    def test_profile_of_selected_asset_is_not_flagged(self, audit, org):
        profile_for(AssetFactory(connection=ConnectionFactory(organization=org)))

        assert audit.find_profiles_to_soft_delete(org_id=org.id) == []

    def test_asset_selected_on_another_live_connection_is_not_deselected(self, audit, org):
        first, second = ConnectionFactory(organization=org), ConnectionFactory(organization=org)
        profile = profile_for(AssetFactory(connection=first, external_id="9", is_selected=False))
        AssetFactory(connection=second, external_id="9")

        assert audit.find_profiles_to_soft_delete(org_id=org.id) == []
        assert ids(audit.find_profiles_to_relink(org_id=org.id)) == {profile.id}


class TestRestoreProfiles:
    def test_soft_deleted_profile_of_selected_asset_is_restored(self, audit, org):
        asset = AssetFactory(connection=ConnectionFactory(organization=org))
        profile = profile_for(asset, deleted_at=timezone.now())

        assert ids(audit.find_profiles_to_restore(org_id=org.id)) == {profile.id}
        assert audit.restore_selected_profiles(org_id=org.id) == 1
        profile.refresh_from_db()
        assert profile.deleted_at is None
        assert profile.connection_id == asset.connection_id

    def test_soft_deleted_profile_of_unselected_asset_is_not_restored(self, audit, org):
        asset = AssetFactory(connection=ConnectionFactory(organization=org), is_selected=False)
        profile_for(asset, deleted_at=timezone.now())

        assert audit.find_profiles_to_restore(org_id=org.id) == []

    def test_most_recently_deleted_profile_comes_back(self, audit, org):
        asset = AssetFactory(connection=ConnectionFactory(organization=org))
        now = timezone.now()
        profile_for(asset, deleted_at=now - timedelta(days=3))
        latest = profile_for(asset, deleted_at=now - timedelta(days=1))

        assert ids(audit.find_profiles_to_restore(org_id=org.id)) == {latest.id}

    def test_restore_points_profile_at_backing_connection(self, audit, org):
        dead_connection = ConnectionFactory(organization=org, deleted_at=timezone.now())
        live = ConnectionFactory(organization=org)
        AssetFactory(connection=live, external_id="5")
        profile = ProfileFactory(
            organization=org,
            connection=dead_connection,
            external_id="5",
            deleted_at=timezone.now(),
        )

        audit.restore_selected_profiles(org_id=org.id)

        profile.refresh_from_db()
        assert (profile.deleted_at, profile.connection_id) == (None, live.id)


class TestStaleData:
    def test_queue_settings_of_deleted_profiles_are_soft_deleted(self, audit, org):
        dead = ProfileFactory(organization=org, deleted_at=timezone.now())
        stale = QueueSettingFactory(profile=dead)
        kept = QueueSettingFactory(
            profile=profile_for(AssetFactory(connection=ConnectionFactory(organization=org)))
        )

        assert ids(audit.find_stale_queue_settings(org_id=org.id)) == {stale.id}
        assert audit.cleanup_stale_data(org_id=org.id)["stale_queue_setting"] == 1

        stale.refresh_from_db()
        kept.refresh_from_db()
        assert stale.deleted_at is not None
        assert kept.deleted_at is None

    def test_boost_rules_lose_invalid_references_and_keep_the_rest_in_order(self, audit, org):
        connection = ConnectionFactory(organization=org)
        first = profile_for(AssetFactory(connection=connection))
        second = profile_for(AssetFactory(connection=connection))
        dead = ProfileFactory(organization=org, deleted_at=timezone.now())
        foreign = ProfileFactory()
        rule = BoostRuleFactory(
            organization=org,
            profile_ids=[
                str(second.id),
                str(dead.id),
                "not-a-uuid",
                str(foreign.id),
                str(first.id),
                None,
                "00000000-0000-0000-0000-000000000000",
            ],
        )

        assert ids(audit.find_invalid_boost_rule_refs(org_id=org.id)) == {rule.id}
        assert audit.cleanup_stale_data(org_id=org.id)["invalid_boost_ref"] == 1

        rule.refresh_from_db()
        assert rule.profile_ids == [str(second.id), str(first.id)]

    def test_valid_boost_rule_is_left_alone(self, audit, org):
        profile = profile_for(AssetFactory(connection=ConnectionFactory(organization=org)))
        BoostRuleFactory(organization=org, profile_ids=[str(profile.id)])

        assert audit.find_invalid_boost_rule_refs(org_id=org.id) == []

    def test_dead_rules_and_settings_are_not_audited(self, audit, org):
        dead_profile = ProfileFactory(organization=org, deleted_at=timezone.now())
        QueueSettingFactory(profile=dead_profile, deleted_at=timezone.now())
        BoostRuleFactory(organization=org, profile_ids=["junk"], deleted_at=timezone.now())

        assert audit.plan_organization(org_id=org.id).findings == ()


class TestFullAudit:
    @pytest.fixture
    def messy_org(self, org):
        connection = ConnectionFactory(organization=org)
        expired = ConnectionFactory(organization=org, status=ConnectionStatus.EXPIRED)
        AssetFactory(connection=connection, external_id="missing")
        profile_for(AssetFactory(connection=connection, is_selected=False))
        profile_for(AssetFactory(connection=expired))
        return org

    def test_dry_run_finds_without_fixing(self, audit, messy_org):
        before = set(SocialProfile.objects.values_list("id", "deleted_at", "connection_id"))

        report = audit.run_full_audit(org_id=messy_org.id)

        assert report.run.found == 3
        assert report.run.fixed == 0
        assert set(SocialProfile.objects.values_list("id", "deleted_at", "connection_id")) == before
        assert set(report.run.findings.values_list("outcome", flat=True)) == {"planned"}

    def test_fix_mode_fixes(self, audit, messy_org, committed):
        report = committed(audit.run_full_audit, org_id=messy_org.id, fix=True)

        assert (report.run.found, report.run.fixed) == (3, 3)
        assert report.run.status == AuditStatus.SUCCEEDED
        assert audit.run_full_audit(org_id=messy_org.id).run.found == 0

    def test_duration_is_recorded(self, audit, messy_org):
        run = audit.run_full_audit(org_id=messy_org.id).run

        run.refresh_from_db()
        assert run.duration_seconds is not None and run.duration_seconds >= 0
        assert run.finished_at >= run.started_at


class TestMultiOrgIsolation:
    def test_audit_respects_org_boundaries(self, audit):
        first, second = OrganizationFactory(), OrganizationFactory()
        for org in (first, second):
            profile_for(
                AssetFactory(connection=ConnectionFactory(organization=org), is_selected=False)
            )

        report = audit.run_full_audit(org_id=first.id, fix=True)

        assert report.run.fixed == 1
        assert SocialProfile.objects.filter(organization=second).alive().count() == 1
        assert set(AuditFinding.objects.values_list("organization_id", flat=True)) == {first.id}

    def test_asset_selected_in_another_org_does_not_keep_a_profile(self, audit):
        first, second = OrganizationFactory(), OrganizationFactory()
        AssetFactory(connection=ConnectionFactory(organization=second), external_id="shared")
        profile = ProfileFactory(
            organization=first,
            connection=ConnectionFactory(organization=first),
            external_id="shared",
        )

        assert ids(audit.find_profiles_to_soft_delete(org_id=first.id)) == {profile.id}

    def test_boost_rule_pointing_at_another_orgs_alive_profile_loses_it(self, audit):
        first, second = OrganizationFactory(), OrganizationFactory()
        foreign = profile_for(AssetFactory(connection=ConnectionFactory(organization=second)))
        rule = BoostRuleFactory(organization=first, profile_ids=[str(foreign.id)])

        audit.run_audit_for_all_orgs(fix=True)

        rule.refresh_from_db()
        foreign.refresh_from_db()
        assert rule.profile_ids == []
        assert foreign.deleted_at is None

    def test_all_org_run_records_one_run_with_every_org(self, audit, committed):
        orgs = [OrganizationFactory() for _ in range(3)]
        for org in orgs:
            AssetFactory(connection=ConnectionFactory(organization=org))

        report = committed(audit.run_audit_for_all_orgs, fix=True)

        assert AuditRun.objects.count() == 1
        assert report.run.organizations_audited == 3
        assert {o.organization_id for o in report.organizations} == {o.id for o in orgs}
        assert SocialProfile.objects.alive().count() == 3


class TestRelinkAndFlap:
    def test_asset_on_two_connections_one_deleted_is_relinked_never_deleted(self, audit, org):
        first = ConnectionFactory(organization=org, created_at=timezone.now() - timedelta(days=9))
        second = ConnectionFactory(organization=org)
        profile = profile_for(AssetFactory(connection=first, external_id="shop"))
        AssetFactory(connection=second, external_id="shop")
        setting = QueueSettingFactory(profile=profile)
        first.soft_delete()

        report = audit.run_full_audit(org_id=org.id, fix=True)

        profile.refresh_from_db()
        setting.refresh_from_db()
        assert [(f.type, f.outcome) for f in report.run.findings.all()] == [
            ("relink", FindingOutcome.FIXED)
        ]
        assert (profile.deleted_at, profile.connection_id) == (None, second.id)
        assert setting.deleted_at is None, "the queue survives the relink"
        assert audit.run_full_audit(org_id=org.id, fix=True).run.found == 0

    def test_profile_on_connection_that_no_longer_selects_it_is_relinked(self, audit, org):
        first, second = ConnectionFactory(organization=org), ConnectionFactory(organization=org)
        profile = profile_for(AssetFactory(connection=first, external_id="x", is_selected=False))
        AssetFactory(connection=second, external_id="x")

        audit.relink_profiles(org_id=org.id)

        profile.refresh_from_db()
        assert profile.connection_id == second.id

    def test_backing_connection_tie_on_created_at_goes_to_smallest_id(self, audit, org):
        created = timezone.now() - timedelta(days=1)
        connections = [ConnectionFactory(organization=org, created_at=created) for _ in range(3)]
        for connection in connections:
            AssetFactory(connection=connection, external_id="tie")
        profile = ProfileFactory(organization=org, connection=None, external_id="tie")

        audit.relink_profiles(org_id=org.id)

        profile.refresh_from_db()
        assert profile.connection_id == min(c.id for c in connections)


class TestBoostRuleBadData:
    @pytest.mark.parametrize("value", [{"ids": []}, "a string", 17, None])
    def test_value_that_is_not_a_list_is_emptied(self, audit, org, value):
        rule = BoostRuleFactory(organization=org)
        # JSON null must be spelled out: a bare None would mean SQL NULL.
        stored = Value(None, JSONField()) if value is None else value
        BoostRule.objects.filter(id=rule.id).update(profile_ids=stored)

        report = audit.run_full_audit(org_id=org.id, fix=True)

        rule.refresh_from_db()
        assert rule.profile_ids == []
        finding = report.run.findings.get()
        assert finding.before == {"profile_ids": value}
        assert report.run.status == AuditStatus.SUCCEEDED

    def test_uppercase_id_of_alive_profile_is_kept(self, audit, org):
        profile = profile_for(AssetFactory(connection=ConnectionFactory(organization=org)))
        BoostRuleFactory(organization=org, profile_ids=[str(profile.id).upper()])

        assert audit.find_invalid_boost_rule_refs(org_id=org.id) == []
