"""Reverting a run (DESIGN "Nothing is lost"): what a fixing run changed is put back exactly,
what changed since is a conflict left alone, and a revert is a run that can itself be reverted."""

import json
import uuid
from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection as db_connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from boosts.models import BoostRule
from connections.models import ConnectionStatus
from profiles.models import (
    AuditFinding,
    AuditRun,
    AuditStatus,
    AuditTrigger,
    FindingAction,
    FindingOutcome,
    FindingType,
    SocialProfile,
)
from profiles.services import revert as revert_service
from profiles.services.audit import (
    AuditRequest,
    ProfileConnectionAuditService,
    start_run,
    work_shard,
)
from profiles.services.revert import RevertRejected, revert_run
from queues.models import QueueSetting
from tests.factories import (
    AssetFactory,
    BoostRuleFactory,
    ConnectionFactory,
    ProfileFactory,
    QueueSettingFactory,
    profile_for,
)

pytestmark = pytest.mark.django_db


def domain_state() -> dict:
    """Every row the audit may change, as comparable values."""
    return {
        "profiles": {
            p.id: (p.organization_id, p.connection_id, p.platform, p.external_id, p.deleted_at)
            for p in SocialProfile.objects.all()
        },
        "queue_settings": {s.id: (s.profile_id, s.deleted_at) for s in QueueSetting.objects.all()},
        "boost_rules": {
            r.id: (json.dumps(r.profile_ids), r.deleted_at) for r in BoostRule.objects.all()
        },
    }


@pytest.fixture
def fix(committed):
    """A fixing audit of one organization, with the missing-profile jobs it sends run."""

    def run(org, **options):
        return committed(
            ProfileConnectionAuditService().run_full_audit, org_id=org.id, fix=True, **options
        )

    return run


def revert(run, *, fix=True):
    return revert_run(run_id=run.id, fix=fix)


# --- One scenario per finding type -----------------------------------------------------------


def orphaned():
    asset = AssetFactory(connection__status=ConnectionStatus.EXPIRED)
    profile = profile_for(asset)
    QueueSettingFactory(profile=profile)
    return asset.connection.organization


def deselected():
    asset = AssetFactory(is_selected=False)
    profile_for(asset)
    return asset.connection.organization


def relink():
    old = AssetFactory(connection__created_at=timezone.now() - timedelta(days=3))
    org = old.connection.organization
    new = AssetFactory(connection__organization=org, external_id=old.external_id)
    profile_for(old)
    old.connection.soft_delete()
    assert new.connection.is_live
    return org


def restore():
    asset = AssetFactory()
    profile_for(asset, connection=None, deleted_at=timezone.now() - timedelta(days=1))
    return asset.connection.organization


def missing():
    asset = AssetFactory()
    return asset.connection.organization


def stale_queue_setting():
    profile = ProfileFactory(deleted_at=timezone.now() - timedelta(days=2))
    QueueSettingFactory(profile=profile)
    return profile.organization


def invalid_boost_ref():
    asset = AssetFactory()
    alive = profile_for(asset)
    return BoostRuleFactory(
        organization=alive.organization,
        profile_ids=[str(alive.id), "not-a-uuid", str(uuid.uuid4()), 42],
    ).organization


SCENARIOS = {
    FindingType.ORPHANED: orphaned,
    FindingType.DESELECTED: deselected,
    FindingType.RELINK: relink,
    FindingType.RESTORE: restore,
    FindingType.MISSING: missing,
    FindingType.STALE_QUEUE_SETTING: stale_queue_setting,
    FindingType.INVALID_BOOST_REF: invalid_boost_ref,
}


@pytest.mark.parametrize("finding_type", list(SCENARIOS))
def test_revert_puts_back_exactly_what_the_fix_changed(finding_type, fix):
    org = SCENARIOS[finding_type]()
    before = domain_state()

    run = fix(org).run
    assert run.by_type[finding_type]["fixed"] >= 1
    after_fix = domain_state()
    assert after_fix != before

    report = revert(run)

    assert report.run.status == AuditStatus.SUCCEEDED
    assert report.conflicts == 0 and report.put_back == run.fixed
    restored = domain_state()
    if finding_type == FindingType.MISSING:
        # The profile the sync job created stays as a soft-deleted row (nothing is deleted).
        (created,) = set(restored["profiles"]) - set(before["profiles"])
        assert restored["profiles"].pop(created)[-1] is not None
    assert restored == before


def test_a_full_fix_of_every_finding_type_is_reverted_exactly(fix):
    orgs = [scenario() for scenario in SCENARIOS.values()]
    org = orgs[0]
    # Everything in one organization's run: move the other scenarios' rows into the first one.
    for model in (SocialProfile, QueueSetting, BoostRule):
        model.objects.update(organization=org)
    from connections.models import PlatformConnection

    PlatformConnection.objects.update(organization=org)
    before = domain_state()

    run = fix(org).run
    assert {t for t, c in run.by_type.items() if c["fixed"]} == {t.value for t in SCENARIOS}

    report = revert(run)

    assert report.conflicts == 0
    restored = domain_state()
    (created,) = set(restored["profiles"]) - set(before["profiles"])
    assert restored["profiles"].pop(created)[-1] is not None
    assert restored == before


def test_revert_findings_are_recorded_in_reverse_order_with_the_audit_shapes(fix):
    org = restore()
    stale_queue_setting_profile = ProfileFactory(
        organization=org, deleted_at=timezone.now() - timedelta(days=1)
    )
    QueueSettingFactory(profile=stale_queue_setting_profile)
    run = fix(org).run
    fixed = list(run.findings.order_by("seq"))

    report = revert(run)

    rows = list(report.run.findings.order_by("seq"))
    assert [r.type for r in rows] == [f.type for f in reversed(fixed)]
    assert {r.action for r in rows} == {FindingAction.REVERT}
    assert {r.outcome for r in rows} == {FindingOutcome.FIXED}
    for row, original in zip(rows, reversed(fixed), strict=True):
        assert row.object_id == original.object_id
        assert row.before == {k: v for k, v in original.after.items()}
        assert row.after == original.before
        assert f"finding {original.seq} of run {run.id}" in row.detail
    assert report.run.trigger == AuditTrigger.REVERT
    assert report.run.reverted_run_id == run.id


# --- Revert of a revert -----------------------------------------------------------------------


def test_a_revert_can_be_reverted_back_to_the_fixed_state(fix):
    orgs = [scenario() for scenario in SCENARIOS.values()]
    for org in orgs:
        fix(org)
    runs = list(AuditRun.objects.filter(fix=True, trigger=AuditTrigger.COMMAND))
    after_fix = domain_state()

    first = [revert(run) for run in runs]
    assert all(r.conflicts == 0 for r in first)
    second = [revert(r.run) for r in first]

    assert all(r.conflicts == 0 and r.put_back for r in second)
    assert domain_state() == after_fix
    third = [revert(r.run) for r in second]
    assert all(r.conflicts == 0 for r in third)
    assert domain_state() != after_fix


def test_the_revert_of_a_missing_profile_can_be_reverted(fix):
    org = missing()
    run = fix(org).run
    (profile,) = SocialProfile.objects.filter(organization=org)

    undo = revert(run)
    profile.refresh_from_db()
    assert profile.deleted_at is not None
    (row,) = undo.run.findings.all()
    assert row.object_id == profile.id and row.type == FindingType.MISSING

    redo = revert(undo.run)
    profile.refresh_from_db()
    assert redo.put_back == 1 and profile.deleted_at is None


# --- Conflicts ------------------------------------------------------------------------------


def test_objects_changed_since_the_run_are_conflicts_and_left_alone(fix):
    deleted_org = orphaned()
    relinked_org = relink()
    boost_org = invalid_boost_ref()
    runs = {o.id: fix(o).run for o in (deleted_org, relinked_org, boost_org)}
    # Someone restored the orphaned profile and renamed its queue setting's profile by hand...
    orphan = SocialProfile.objects.get(organization=deleted_org, queue_settings__isnull=False)
    orphan.restore()
    # ...moved the relinked profile to yet another connection...
    elsewhere = ConnectionFactory(organization=relinked_org)
    SocialProfile.objects.filter(organization=relinked_org).update(connection=elsewhere)
    # ...and edited the boost rule.
    BoostRule.objects.filter(organization=boost_org).update(profile_ids=["edited"])
    changed = domain_state()

    reports = [revert(run) for run in runs.values()]

    # The queue setting the orphaned fix soft-deleted is still as the run left it: it comes back.
    setting_rows = [r for r in reports[0].run.findings.all() if r.type == "stale_queue_setting"]
    assert [r.outcome for r in setting_rows] == [FindingOutcome.FIXED]
    changed["queue_settings"] = {
        id_: (profile, None) for id_, (profile, _) in changed["queue_settings"].items()
    }
    assert domain_state() == changed
    conflicts = AuditFinding.objects.filter(outcome=FindingOutcome.CONFLICT)
    assert sorted(c.type for c in conflicts) == ["invalid_boost_ref", "orphaned", "relink"]
    assert all(r.run.status == AuditStatus.PARTIAL for r in reports)
    assert "already as it was before the run" in conflicts.get(type="orphaned").detail
    assert "connection_id is" in conflicts.get(type="relink").detail
    assert "profile_ids is ['edited']" in conflicts.get(type="invalid_boost_ref").detail


def test_restoring_a_profile_whose_key_has_another_alive_profile_is_a_conflict(fix):
    org = deselected()
    run = fix(org).run
    (gone,) = SocialProfile.objects.filter(organization=org)
    ProfileFactory(organization=org, platform=gone.platform, external_id=gone.external_id)
    changed = domain_state()

    report = revert(run)

    assert report.conflicts == 1 and report.put_back == 0
    assert "holds facebook:" in report.run.findings.get().detail
    assert domain_state() == changed


def test_a_created_profile_moved_since_is_a_conflict(fix):
    org = missing()
    run = fix(org).run
    elsewhere = ConnectionFactory(organization=org)
    SocialProfile.objects.filter(organization=org).update(connection=elsewhere)
    changed = domain_state()

    report = revert(run)

    assert report.conflicts == 1
    assert "the job created it on" in report.run.findings.get().detail
    assert domain_state() == changed


def test_a_missing_profile_never_created_is_a_conflict(django_capture_on_commit_callbacks):
    org = missing()
    # The sync job is never run: the broker still holds it.
    run = ProfileConnectionAuditService().run_full_audit(org_id=org.id, fix=True).run

    report = revert(run)

    assert report.conflicts == 1
    assert "has not created it yet" in report.run.findings.get().detail


def test_a_revert_only_touches_the_reverted_runs_organization(fix):
    org = deselected()
    other = deselected()
    run = fix(org).run
    fix(other)
    other_state = {
        k: {i: v for i, v in rows.items() if v[0] == other.id}
        for k, rows in domain_state().items()
        if k == "profiles"
    }

    revert(run)

    assert {i: v for i, v in domain_state()["profiles"].items() if v[0] == other.id} == other_state[
        "profiles"
    ]


# --- Connections a revert may not point at ------------------------------------------------


def test_reverting_a_restore_from_another_organizations_connection_puts_back_the_rest(fix):
    """The profile dies again as the run found it, its queue setting with it; its connection
    stays inside the organization, and the revert says why; reverting the revert is exact."""
    asset = AssetFactory(is_selected=False)
    org = asset.connection.organization
    foreign = ConnectionFactory()  # another organization's
    profile = profile_for(asset, connection=foreign, deleted_at=timezone.now())
    setting = QueueSettingFactory(profile=profile)
    fix(org)  # the setting of the dead profile goes as stale
    before_restore = domain_state()
    asset.is_selected = True
    asset.save()
    run = fix(org).run
    assert run.by_type[FindingType.RESTORE]["fixed"] == 1
    after_fix = domain_state()
    assert setting.id in QueueSetting.objects.alive().values_list("id", flat=True)

    report = revert(run)

    assert report.put_back == 1 and report.conflicts == 0
    row = report.run.findings.get()
    assert row.outcome == FindingOutcome.FIXED
    assert "belongs to another organization" in row.detail
    assert f"stays on connection {asset.connection_id}" in row.detail
    assert "connection_id" not in row.before and "connection_id" not in row.after
    was = before_restore["profiles"][profile.id][-1]  # its deleted_at
    expected = dict(before_restore)
    expected["profiles"] = {
        **before_restore["profiles"],
        profile.id: (org.id, asset.connection_id, "facebook", asset.external_id, was),
    }
    assert domain_state() == expected

    redo = revert(report.run)

    assert redo.put_back == 1 and redo.conflicts == 0
    assert domain_state() == after_fix


def test_reverting_a_relink_from_another_organizations_connection_says_why_it_stays(fix):
    asset = AssetFactory()
    org = asset.connection.organization
    foreign = ConnectionFactory()
    profile = profile_for(asset, connection=foreign)
    run = fix(org).run
    assert run.by_type[FindingType.RELINK]["fixed"] == 1
    after_fix = domain_state()

    report = revert(run)

    row = report.run.findings.get()
    assert row.outcome == FindingOutcome.CONFLICT
    assert f"connection {foreign.id} belongs to another organization" in row.detail
    assert "no longer exists" not in row.detail
    profile.refresh_from_db()
    assert profile.connection_id == asset.connection_id
    assert domain_state() == after_fix


def test_reverting_a_restore_whose_old_connection_is_gone_puts_back_the_rest(fix):
    asset = AssetFactory()
    org = asset.connection.organization
    old = ConnectionFactory(organization=org, status=ConnectionStatus.REVOKED)
    deleted_at = timezone.now() - timedelta(days=2)
    profile = profile_for(asset, connection=old, deleted_at=deleted_at)
    run = fix(org).run
    assert run.by_type[FindingType.RESTORE]["fixed"] == 1
    old_id = old.id
    old.delete()  # a hard delete, after the run

    report = revert(run)

    profile.refresh_from_db()
    assert (profile.deleted_at, profile.connection_id) == (deleted_at, asset.connection_id)
    row = report.run.findings.get()
    assert row.outcome == FindingOutcome.FIXED
    assert f"connection {old_id} no longer exists" in row.detail


# --- Dry run and rejections ------------------------------------------------------------------


def test_a_dry_run_of_a_revert_shows_what_would_be_put_back_and_writes_nothing(fix):
    org = orphaned()
    run = fix(org).run
    after_fix = domain_state()

    out = StringIO()
    call_command("profiles_audit_sync", revert=str(run.id), stdout=out)

    assert domain_state() == after_fix
    dry = AuditRun.objects.get(reverted_run=run)
    assert dry.fix is False and dry.trigger == AuditTrigger.REVERT
    assert {f.outcome for f in dry.findings.all()} == {FindingOutcome.PLANNED}
    assert "2 would put back, 0 conflicts" in out.getvalue()
    assert "run with --fix" in out.getvalue()
    # A dry run of a revert does not count as a revert.
    call_command("profiles_audit_sync", revert=str(run.id), fix=True, stdout=StringIO())
    assert domain_state() != after_fix


def test_the_command_reverts_with_fix_and_reports_json(fix):
    org = deselected()
    run = fix(org).run

    out = StringIO()
    call_command(
        "profiles_audit_sync", "--revert", str(run.id), "--fix", "--format", "json", stdout=out
    )

    result = json.loads(out.getvalue())
    assert result["reverted_run_id"] == str(run.id)
    assert result["fix"] is True and result["status"] == "succeeded"
    assert result["put_back"] == 1 and result["conflicts"] == 0
    assert result["by_type"]["deselected"] == {"found": 1, "fixed": 1}


def _rejected(run_id: str, match: str) -> None:
    state, runs = domain_state(), AuditRun.objects.count()
    findings = AuditFinding.objects.count()
    with pytest.raises(CommandError, match=match) as error:
        call_command("profiles_audit_sync", "--revert", run_id, "--fix", stdout=StringIO())
    assert "\n" not in str(error.value)
    assert (domain_state(), AuditRun.objects.count(), AuditFinding.objects.count()) == (
        state,
        runs,
        findings,
    )


def test_reverting_a_dry_run_is_rejected():
    org = deselected()
    run = ProfileConnectionAuditService().run_full_audit(org_id=org.id).run
    _rejected(str(run.id), "is a dry run and changed nothing")


def test_reverting_an_unknown_or_malformed_run_is_rejected():
    _rejected(str(uuid.uuid4()), "no audit run with id .*; find run ids in the admin")
    _rejected("last-tuesday", "'last-tuesday' is not an audit run id")


def test_reverting_a_run_twice_is_rejected(fix):
    org = deselected()
    run = fix(org).run
    first = revert(run)
    _rejected(str(run.id), f"already reverted by run {first.run.id}; to undo that revert")


def test_a_revert_in_progress_blocks_another_until_it_is_abandoned(fix):
    org = deselected()
    run = fix(org).run
    in_progress = AuditRun.objects.create(
        trigger=AuditTrigger.REVERT, fix=True, reverted_run=run, organization=org
    )
    _rejected(str(run.id), f"is being reverted right now \\(run {in_progress.id}\\)")

    AuditRun.objects.filter(id=in_progress.id).update(
        started_at=timezone.now() - timedelta(minutes=61)
    )
    assert revert(run).put_back == 1


def test_reverting_a_running_run_or_one_that_changed_nothing_is_rejected(fix):
    running = start_run(AuditRequest(fix=True))  # alive: it holds the fixing-run lease
    # A revert is a fixing run: it waits for the running one like any other (exit 75)...
    _rejected(str(running.id), "^skipped: another fixing run holds the lock")
    # ...and its dry run says why it cannot be reverted yet.
    with pytest.raises(CommandError, match="still running; wait for it to finish"):
        call_command("profiles_audit_sync", "--revert", str(running.id), stdout=StringIO())
    work_shard(shard_id=running.shards.get().id)  # it finishes, and gives the lease back
    org = deselected()
    SocialProfile.objects.update(deleted_at=timezone.now())
    quiet = fix(org).run
    _rejected(str(quiet.id), "changed nothing")


def test_revert_takes_no_audit_options():
    with pytest.raises(CommandError, match="takes no --org, --force"):
        call_command(
            "profiles_audit_sync",
            "--revert",
            str(uuid.uuid4()),
            "--org",
            str(uuid.uuid4()),
            "--force",
            stdout=StringIO(),
        )


def test_service_rejection_is_a_value_error_with_the_reason():
    with pytest.raises(RevertRejected, match="no audit run"):
        revert_run(run_id=uuid.uuid4(), fix=True)


# --- Size and failure ---------------------------------------------------------------------------


def test_a_large_revert_reads_and_writes_in_chunks_with_a_bounded_number_of_queries(fix):
    connection = ConnectionFactory()
    org = connection.organization
    SocialProfile.objects.bulk_create(
        SocialProfile(
            organization=org, connection=connection, platform="facebook", external_id=f"x-{n}"
        )
        for n in range(1200)
    )
    run = fix(org, force=True).run
    assert run.fixed == 1200

    with CaptureQueriesContext(db_connection) as captured:
        report = revert(run)

    assert report.put_back == 1200 and report.conflicts == 0
    assert SocialProfile.objects.filter(organization=org).alive().count() == 1200
    # Two chunks: a fixed number of reads and writes each, never one per finding; and, once per
    # run or per organization, the lease (take, renew, prove), the writer tag and the record.
    assert len(captured) < 80


def test_an_organization_that_fails_is_contained_and_its_revert_can_be_retried(fix, monkeypatch):
    broken, fine = deselected(), deselected()
    run = ProfileConnectionAuditService().run_audit_for_all_orgs(fix=True).run
    after_fix = domain_state()
    real_write = revert_service.apply_revert

    def write(rows):
        if SocialProfile.objects.filter(id__in=list(rows.profiles), organization=broken).exists():
            raise RuntimeError("the disk is full")
        real_write(rows)

    monkeypatch.setattr(revert_service, "apply_revert", write)
    first = revert(run)

    assert first.run.status == AuditStatus.PARTIAL and first.failed == 1
    assert str(broken.id) in first.run.failed_organizations
    failed = first.run.findings.get(organization=broken)
    assert failed.outcome == FindingOutcome.FAILED and "the disk is full" in failed.detail
    assert SocialProfile.objects.filter(organization=fine).alive().count() == 1
    assert SocialProfile.objects.filter(organization=broken).alive().count() == 0
    assert domain_state() != after_fix

    monkeypatch.setattr(revert_service, "apply_revert", real_write)
    second = revert(run)

    assert second.put_back == 1 and second.conflicts == 1  # the fine one was put back already
    assert SocialProfile.objects.alive().count() == 2


def test_a_revert_tags_its_writes_as_the_audits_revert(fix):
    from profiles.models import ChangeMark

    org = deselected()
    run = fix(org).run
    ChangeMark.objects.all().delete()

    revert(run)

    mark = ChangeMark.objects.get(organization_id=org.id)
    assert {w["writer"] for w in mark.writers} == {"audit-revert"}
