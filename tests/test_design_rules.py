"""One test per rule of DESIGN.md ("Rules that make the audit trustworthy"), named after it."""

import re
import threading
from datetime import timedelta

import pytest
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from connections.models import ConnectionAsset, ConnectionStatus
from profiles.models import AuditFinding, AuditStatus, FindingOutcome, SocialProfile
from profiles.services import chunks as chunks_module
from profiles.services.audit import ProfileConnectionAuditService
from profiles.services.organization_lock import lock_organization
from queues.models import QueueSetting
from tests.domain import DOMAIN_TABLES, domain_state
from tests.factories import (
    AssetFactory,
    BoostRuleFactory,
    ConnectionFactory,
    OrganizationFactory,
    ProfileFactory,
    QueueSettingFactory,
    profile_for,
)


def every_finding_type(org):
    """An organization with each of the seven finding types, where cleanup depends on the plan:
    a queue setting and a boost entry of a profile the plan deletes, and a boost entry of a
    profile the plan restores."""
    connection = ConnectionFactory(organization=org)
    expired = ConnectionFactory(organization=org, status=ConnectionStatus.EXPIRED)
    healthy = profile_for(AssetFactory(connection=connection))
    orphaned = profile_for(AssetFactory(connection=expired))
    deselected = profile_for(AssetFactory(connection=connection, is_selected=False))
    to_restore = profile_for(AssetFactory(connection=connection), deleted_at=timezone.now())
    relinked = ProfileFactory(
        organization=org,
        connection=expired,
        external_id=AssetFactory(connection=connection).external_id,
    )
    AssetFactory(connection=connection, asset_type="instagram_account")  # missing
    dead = ProfileFactory(organization=org, deleted_at=timezone.now())
    QueueSettingFactory(profile=dead)
    QueueSettingFactory(profile=orphaned)
    QueueSettingFactory(profile=healthy)
    BoostRuleFactory(
        organization=org,
        profile_ids=[str(healthy.id), str(deselected.id), str(to_restore.id), "junk"],
    )
    return {"healthy": healthy, "to_restore": to_restore, "relinked": relinked}


def finding_keys(run):
    return sorted((f.type, str(f.object_id), f.platform, f.external_id) for f in run.findings.all())


@pytest.fixture
def audit():
    return ProfileConnectionAuditService()


@pytest.mark.django_db
def test_rule_1_one_pass_converges(audit, committed):
    org = OrganizationFactory()
    every_finding_type(org)

    first = committed(audit.run_full_audit, org_id=org.id, fix=True).run
    assert first.found == first.fixed == 8
    assert set(first.by_type) == {t for t, c in first.by_type.items() if c["found"]}

    after_first = domain_state()
    assert audit.run_full_audit(org_id=org.id).run.found == 0, "a dry run after --fix finds nothing"
    second = committed(audit.run_full_audit, org_id=org.id, fix=True).run
    assert (second.found, second.fixed) == (0, 0)
    assert domain_state() == after_first, "fixing twice changes nothing the second time"


@pytest.mark.django_db
def test_rule_2_dry_run_is_the_plan(audit, committed):
    org = OrganizationFactory()
    made = every_finding_type(org)

    dry = audit.run_full_audit(org_id=org.id).run
    fixed = committed(audit.run_full_audit, org_id=org.id, fix=True).run

    assert finding_keys(dry) == finding_keys(fixed)
    assert set(fixed.findings.values_list("outcome", flat=True)) == {FindingOutcome.FIXED}
    # Cleanup counts what the plan deletes as dead and what it restores as alive.
    boost = dry.findings.get(type="invalid_boost_ref")
    kept = boost.after["profile_ids"]
    assert str(made["to_restore"].id) in kept
    assert kept == [str(made["healthy"].id), str(made["to_restore"].id)]
    assert dry.by_type["stale_queue_setting"]["found"] == 2


@pytest.mark.django_db
def test_rule_2_dry_run_shows_the_queue_settings_a_restore_brings_back(audit, committed):
    org = OrganizationFactory()
    asset = AssetFactory(connection=ConnectionFactory(organization=org))
    profile = profile_for(asset)
    queue = QueueSettingFactory(profile=profile)
    ConnectionAsset.objects.filter(id=asset.id).update(is_selected=False)
    committed(audit.run_full_audit, org_id=org.id, fix=True)  # profile and its queue retired
    ConnectionAsset.objects.filter(id=asset.id).update(is_selected=True)

    planned = audit.run_full_audit(org_id=org.id).run.findings.get()
    done = committed(audit.run_full_audit, org_id=org.id, fix=True).run.findings.get()

    assert planned.type == done.type == "restore"
    assert list(planned.before["queue_settings"]) == [str(queue.id)]
    assert (planned.before, planned.after) == (done.before, done.after)
    queue.refresh_from_db()
    assert queue.deleted_at is None


@pytest.mark.django_db
def test_rule_3_dry_run_writes_nothing(audit):
    org = OrganizationFactory()
    every_finding_type(org)
    before = domain_state()

    with CaptureQueriesContext(connection) as queries:
        report = audit.run_audit_for_all_orgs()

    assert report.run.found == 8
    assert domain_state() == before
    writes = [q["sql"] for q in queries if re.match(r"\s*(INSERT|UPDATE|DELETE)", q["sql"], re.I)]
    written_tables = {
        re.search(r'(?:INTO|UPDATE|FROM)\s+"?(\w+)"?', sql).group(1) for sql in writes
    }
    # Findings are written with COPY on PostgreSQL (not an INSERT the capture sees): they are
    # counted below instead. Drift records are the audit's own too: a dry run observed the drift
    # (DESIGN "Drift history and fights").
    assert written_tables - {"profiles_auditfinding"} == {
        "profiles_auditrun",
        "profiles_auditshard",
        "profiles_driftrecord",
    }
    assert not written_tables & DOMAIN_TABLES
    assert AuditFinding.objects.filter(run=report.run).count() == 8


@pytest.mark.django_db
def test_rule_4_fixes_recheck_before_they_write(audit):
    """A finding that no longer holds when its fix runs is recorded stale, never forced."""
    org = OrganizationFactory()
    connection = ConnectionFactory(organization=org)
    asset = AssetFactory(connection=connection, is_selected=False)
    profile = profile_for(asset)
    other = profile_for(AssetFactory(connection=connection, is_selected=False))

    def user_reselects_between_detection_and_fix():
        ConnectionAsset.objects.filter(id=asset.id).update(is_selected=True)

    report = audit.run_full_audit(
        org_id=org.id, fix=True, should_stop=user_reselects_between_detection_and_fix
    )

    outcomes = {f.object_id: (f.outcome, f.detail) for f in report.run.findings.all()}
    assert outcomes[profile.id][0] == FindingOutcome.STALE
    assert "re-checked" in outcomes[profile.id][1]
    assert outcomes[other.id][0] == FindingOutcome.FIXED
    profile.refresh_from_db()
    assert profile.deleted_at is None
    assert report.run.fixed == 1


@pytest.mark.django_db(transaction=True)
def test_rule_4_fix_waits_for_the_real_time_sync_of_the_organization(audit):
    """Fixes are serialized with the real-time sync through the organization's lock: a fix
    planned before a concurrent selection change waits for it, then sees it."""
    org = OrganizationFactory()
    asset = AssetFactory(connection=ConnectionFactory(organization=org), is_selected=False)
    profile = profile_for(asset)
    planned, locked, release = threading.Event(), threading.Event(), threading.Event()
    results = {}

    def real_time_sync():
        try:
            assert planned.wait(timeout=30)
            with transaction.atomic():
                lock_organization(org.id)
                locked.set()
                assert release.wait(timeout=30)
                ConnectionAsset.objects.filter(id=asset.id).update(is_selected=True)
        finally:
            connection.close()

    def between_detection_and_fix():
        planned.set()
        assert locked.wait(timeout=30)

    def fix():
        try:
            results["report"] = audit.run_full_audit(
                org_id=org.id, fix=True, should_stop=between_detection_and_fix
            )
        finally:
            connection.close()

    sync_thread = threading.Thread(target=real_time_sync)
    fix_thread = threading.Thread(target=fix)
    sync_thread.start()
    fix_thread.start()
    assert locked.wait(timeout=30)
    fix_thread.join(timeout=1.0)
    assert fix_thread.is_alive(), "the fix must wait while the organization is locked"
    release.set()
    sync_thread.join(timeout=30)
    fix_thread.join(timeout=30)

    finding = results["report"].run.findings.get()
    assert finding.outcome == FindingOutcome.STALE
    profile.refresh_from_db()
    assert profile.deleted_at is None


@pytest.mark.django_db
def test_rule_5_organizations_are_isolated(audit, committed):
    mine, theirs = OrganizationFactory(), OrganizationFactory()
    every_finding_type(mine)
    every_finding_type(theirs)
    # The same external ids selected in the other organization must not matter here.
    for asset in ConnectionAsset.objects.filter(connection__organization=mine):
        AssetFactory(
            connection=theirs.connections.first(),
            asset_type=asset.asset_type,
            external_id=asset.external_id,
            is_selected=not asset.is_selected,
        )
    plan_alone = audit.plan_organization(org_id=mine.id)
    theirs_before = domain_state([theirs.id])

    report = committed(audit.run_full_audit, org_id=mine.id, fix=True)

    assert {f.organization_id for f in report.run.findings.all()} == {mine.id}
    assert domain_state([theirs.id]) == theirs_before, "nothing of O' is written to fix O"
    assert report.run.found == len(plan_alone.findings)


@pytest.mark.django_db
def test_rule_6_one_organizations_failure_is_contained(audit, committed, monkeypatch):
    broken, healthy = OrganizationFactory(name="broken"), OrganizationFactory(name="healthy")
    for org in (broken, healthy):
        every_finding_type(org)
    broken_before = domain_state([broken.id])
    real_apply = chunks_module.apply_cleanup_findings

    def apply_then_fail(findings, *, now):
        changes = real_apply(findings, now=now)
        if (
            any(f.type == "stale_queue_setting" for f in findings)
            and QueueSetting.objects.filter(organization=broken, deleted_at=now).exists()
        ):
            raise RuntimeError("disk full while fixing")
        return changes

    monkeypatch.setattr(chunks_module, "apply_cleanup_findings", apply_then_fail)

    report = committed(audit.run_audit_for_all_orgs, fix=True)

    run = report.run
    assert run.status == AuditStatus.PARTIAL
    assert run.failed_organizations == {str(broken.id): "RuntimeError: disk full while fixing"}
    assert "disk full" in run.error
    assert domain_state([broken.id]) == broken_before, "the failed organization rolled back"
    assert set(
        AuditFinding.objects.filter(run=run, organization=broken).values_list("outcome", flat=True)
    ) == {FindingOutcome.FAILED}
    assert audit.run_full_audit(org_id=healthy.id).run.found == 0, "the others were fixed"
    [failed] = [o for o in report.organizations if o.error]
    assert failed.organization_id == broken.id


@pytest.mark.django_db
def test_rule_7_bad_data_never_crashes_a_run(audit, committed):
    org = OrganizationFactory()
    connection = ConnectionFactory(organization=org)
    AssetFactory(connection=connection, asset_type="myspace_page", external_id="x")
    AssetFactory(connection=connection, asset_type="", external_id="")
    weird = BoostRuleFactory(organization=org, profile_ids={"not": "a list"})
    junk = BoostRuleFactory(organization=org, profile_ids=[1, None, {"id": 2}, ["x"], "", True])
    ProfileFactory(organization=org, platform="myspace", connection=connection)
    # Dangling foreign keys (the constraints are deferred, and this test never commits).
    dangling_profile = ProfileFactory(organization=org, connection=None)
    SocialProfile.objects.filter(id=dangling_profile.id).update(
        connection_id="00000000-0000-4000-8000-000000000001"
    )
    dangling_setting = QueueSettingFactory(profile=ProfileFactory(organization=org))
    QueueSetting.objects.filter(id=dangling_setting.id).update(
        profile_id="00000000-0000-4000-8000-000000000002"
    )

    report = committed(audit.run_full_audit, org_id=org.id, fix=True)

    assert report.run.status == AuditStatus.SUCCEEDED
    weird.refresh_from_db()
    junk.refresh_from_db()
    assert weird.profile_ids == [] and junk.profile_ids == []
    dangling_profile.refresh_from_db()
    assert dangling_profile.deleted_at is not None, "a profile on a vanished connection is orphaned"
    assert audit.run_full_audit(org_id=org.id).run.found == 0
    # Leave no dangling rows for the end-of-test constraint check.
    QueueSetting.objects.filter(id=dangling_setting.id).delete()
    SocialProfile.objects.filter(id=dangling_profile.id).delete()


def _org_with_profiles(count):
    org = OrganizationFactory()
    connection = ConnectionFactory(organization=org)
    expired = ConnectionFactory(organization=org, status=ConnectionStatus.EXPIRED)
    for n in range(count):
        target = connection if n % 3 else expired
        profile = profile_for(AssetFactory(connection=target, is_selected=n % 4 != 0))
        QueueSettingFactory(profile=profile)
    BoostRuleFactory(organization=org, profile_ids=["junk"])
    return org


@pytest.mark.django_db
def test_rule_8_detection_query_count_does_not_grow_with_profiles(audit, django_assert_num_queries):
    small, large = _org_with_profiles(10), _org_with_profiles(200)

    with CaptureQueriesContext(connection) as small_queries:
        small_plan = audit.plan_organization(org_id=small.id)
    with django_assert_num_queries(len(small_queries)):
        large_plan = audit.plan_organization(org_id=large.id)

    assert len(small_queries) == 5
    assert len(large_plan.findings) > len(small_plan.findings) > 0


@pytest.mark.django_db
def test_rule_8_all_org_runs_walk_chunks_of_100_by_id(audit):
    orgs = sorted((OrganizationFactory() for _ in range(230)), key=lambda o: o.id)
    for org in orgs[::20]:
        profile_for(AssetFactory(connection=ConnectionFactory(organization=org), is_selected=False))
    progress = []

    with CaptureQueriesContext(connection) as queries:
        report = audit.run_audit_for_all_orgs(progress=lambda done, total: progress.append(done))
    with CaptureQueriesContext(connection) as one_chunk:
        audit.run_full_audit(org_id=orgs[0].id)

    assert progress == [100, 200, 230]
    assert report.run.organizations_audited == 230
    assert report.run.found == len(orgs[::20])
    # Per chunk: organization ids, its unsettled organizations (a sweep counts what the marks
    # missed), five snapshot reads and its change marks (versions and writers), then one
    # transaction that counts the chunk on the run, reads its drift records and its
    # organizations' audits (OrganizationAudits), writes them and its findings and moves the
    # shard's cursor. Three chunks cost two chunks more than one
    # organization's run does: nothing per organization or per profile (SQLite some three
    # statements more per chunk than PostgreSQL: its drift records are upserted by Django, then
    # checked for one another run made meanwhile).
    per_chunk = 16 if connection.vendor == "postgresql" else 19
    assert len(queries) - len(one_chunk) <= 2 * per_chunk


@pytest.mark.django_db
def test_rule_8_all_org_dry_run_query_count_does_not_grow_with_profiles(audit):
    def reads_for_run():
        # Reads only: inserting the findings takes more batches when there are more of them.
        with CaptureQueriesContext(connection) as queries:
            audit.run_audit_for_all_orgs()
        return sum(1 for q in queries if q["sql"].lstrip().upper().startswith("SELECT"))

    for _ in range(5):
        _org_with_profiles(3)
    few = reads_for_run()
    for org in SocialProfile.objects.values_list("organization_id", flat=True).distinct():
        connection_ = ConnectionFactory(organization_id=org)
        for _ in range(30):
            profile_for(AssetFactory(connection=connection_, is_selected=False))
    assert reads_for_run() == few


def test_every_design_rule_has_a_test_named_after_it():
    """Keeps this file honest: one test per rule of DESIGN.md, named after it."""
    names = {name for name in globals() if name.startswith("test_rule_")}
    for number in range(1, 9):
        assert any(name.startswith(f"test_rule_{number}_") for name in names), number


@pytest.mark.django_db
def test_backing_connection_is_the_earliest_live_selecting_one(audit, committed):
    org = OrganizationFactory()
    now = timezone.now()
    oldest_dead = ConnectionFactory(
        organization=org, created_at=now - timedelta(days=9), deleted_at=now
    )
    old_inactive = ConnectionFactory(
        organization=org, created_at=now - timedelta(days=8), status="inactive"
    )
    old_live = ConnectionFactory(organization=org, created_at=now - timedelta(days=7))
    new_live = ConnectionFactory(organization=org, created_at=now - timedelta(days=1))
    for c in (oldest_dead, old_inactive, old_live, new_live):
        AssetFactory(connection=c, external_id="k")

    committed(audit.create_missing_profiles, org_id=org.id)

    assert SocialProfile.objects.get(organization=org).connection_id == old_live.id
