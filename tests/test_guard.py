"""The mass-deletion guard (DESIGN "Nothing is lost"): an organization whose plan would
soft-delete more than max(GUARD_MIN, GUARD_RATIO x alive profiles) is not fixed at all."""

import json
import logging
from io import StringIO

import pytest
from django.core.management import call_command

from profiles.models import AuditRun, AuditStatus, FindingOutcome, SocialProfile
from profiles.services.audit import ProfileConnectionAuditService
from queues.models import QueueSetting
from tests.factories import AssetFactory, ConnectionFactory, QueueSettingFactory, profile_for

pytestmark = pytest.mark.django_db


def organization(*, alive: int, deselected: int):
    """An organization with ``alive`` profiles on a live connection, ``deselected`` of which
    the user has unticked (the plan soft-deletes those), each with a queue setting."""
    connection = ConnectionFactory()
    for n in range(alive):
        asset = AssetFactory(connection=connection, is_selected=n >= deselected)
        QueueSettingFactory(profile=profile_for(asset))
    return connection.organization


def fix(org, **options):
    return ProfileConnectionAuditService().run_full_audit(org_id=org.id, fix=True, **options)


@pytest.mark.parametrize(
    ("alive", "deletions", "guarded"),
    [
        (20, 10, False),  # 50 % of 20 is the limit: allowed
        (20, 11, True),  # one more trips it
        (10, 5, False),  # at 10 or fewer the minimum of 5 applies
        (10, 6, True),
        (4, 4, False),  # a small organization may lose all of its (≤ 5) profiles
        (6, 6, True),
    ],
)
def test_the_guard_trips_above_the_boundary_and_not_at_it(alive, deletions, guarded):
    org = organization(alive=alive, deselected=deletions)

    run = fix(org).run

    still_alive = SocialProfile.objects.filter(organization=org).alive().count()
    if guarded:
        assert run.status == AuditStatus.PARTIAL
        assert still_alive == alive
        assert set(run.findings.values_list("outcome", flat=True)) == {FindingOutcome.GUARDED}
        assert run.fixed == 0
    else:
        assert run.status == AuditStatus.SUCCEEDED
        assert still_alive == alive - deletions
        assert run.by_type["deselected"]["fixed"] == deletions


def test_a_guarded_organization_keeps_its_queues_and_the_others_are_fixed():
    guarded = organization(alive=6, deselected=6)
    fine = organization(alive=6, deselected=1)
    settings_before = QueueSetting.objects.filter(organization=guarded).alive().count()

    report = ProfileConnectionAuditService().run_audit_for_all_orgs(fix=True)

    assert report.run.status == AuditStatus.PARTIAL
    assert QueueSetting.objects.filter(organization=guarded).alive().count() == settings_before
    assert SocialProfile.objects.filter(organization=fine).alive().count() == 5
    by_org = {o.organization_id: o for o in report.organizations}
    assert by_org[guarded.id].guarded and not by_org[fine.id].guarded


def test_force_passes_the_guard_and_is_recorded():
    org = organization(alive=6, deselected=6)

    out = StringIO()
    call_command("profiles_audit_sync", "--fix", "--force", "--org", str(org.id), stdout=out)

    run = AuditRun.objects.get()
    assert run.forced and run.status == AuditStatus.SUCCEEDED
    assert SocialProfile.objects.filter(organization=org).alive().count() == 0
    assert "Guarded" not in out.getvalue()


def test_a_guarded_organization_logs_a_warning():
    org = organization(alive=6, deselected=6)
    records = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("profile-audit")
    logger.addHandler(handler)
    try:
        fix(org)
    finally:
        logger.removeHandler(handler)

    (warning,) = [r for r in records if r.msg.get("event") == "profile_audit.org_guarded"]
    assert warning.levelno == logging.WARNING
    assert warning.msg["org_id"] == str(org.id)
    assert warning.msg["deletions"] == 6 and warning.msg["alive_profiles"] == 6


def test_the_dry_run_shows_which_organizations_the_guard_would_stop():
    guarded = organization(alive=20, deselected=11)
    fine = organization(alive=20, deselected=10)

    out = StringIO()
    call_command("profiles_audit_sync", stdout=out)
    text = out.getvalue()
    out = StringIO()
    call_command("profiles_audit_sync", "--format", "json", stdout=out)
    result = json.loads(out.getvalue())

    assert f"Guarded: organization {guarded.id}" in text
    assert f"Guarded: organization {fine.id}" not in text
    assert {o["org_id"]: o["guarded"] for o in result["organizations"]} == {
        str(guarded.id): True,
        str(fine.id): False,
    }
    assert result["status"] == AuditStatus.PARTIAL
    dry = AuditRun.objects.filter(fix=False).first()
    outcomes = dict(dry.findings.values_list("organization_id", "outcome").distinct())
    assert outcomes == {guarded.id: FindingOutcome.GUARDED, fine.id: FindingOutcome.PLANNED}


def test_the_guard_is_tuned_by_settings(settings):
    settings.PROFILE_AUDIT_GUARD_MIN = 2
    settings.PROFILE_AUDIT_GUARD_RATIO = 0.1
    org = organization(alive=20, deselected=3)  # 3 > max(2, 0.1 x 20)

    assert fix(org).run.status == AuditStatus.PARTIAL
    assert SocialProfile.objects.filter(organization=org).alive().count() == 20


# --- The guard weighs the whole plan, and again under the lock (issue 8) ---------------------


def organization_with_orphans_and_deselected(*, alive: int, orphaned: int, deselected: int):
    """``alive`` profiles: ``orphaned`` on an expired connection, ``deselected`` unticked on the
    live one, each with a queue setting; the rest healthy."""
    org = organization(alive=alive - orphaned, deselected=deselected)
    expired = ConnectionFactory(organization=org, status="expired")
    for _ in range(orphaned):
        QueueSettingFactory(profile=profile_for(AssetFactory(connection=expired)))
    return org


def test_the_guard_weighs_the_whole_plan_whatever_type_is_asked_for():
    # 10 alive; 4 orphaned + 4 deselected = 8 deletions > max(5, 5): the whole plan is guarded,
    # though each type alone (4) would fit.
    org = organization_with_orphans_and_deselected(alive=10, orphaned=4, deselected=4)
    settings_before = QueueSetting.objects.filter(organization=org).alive().count()

    for scopes in (["orphaned"], ["deselected"], None):
        run = fix(org, scopes=scopes).run
        assert run.status == AuditStatus.PARTIAL
        assert run.fixed == 0
        assert set(run.findings.values_list("outcome", flat=True)) == {FindingOutcome.GUARDED}

    assert SocialProfile.objects.filter(organization=org).alive().count() == 10
    assert QueueSetting.objects.filter(organization=org).alive().count() == settings_before


def test_the_guard_is_judged_again_on_the_fresh_state_under_the_lock():
    # Planned: 3 of 10 orphaned (fits). Before the fix takes the lock, the token of the live
    # connection expires too: now all 10 would go. The 3 still hold, but the organization is
    # guarded on what is there now, and nothing is written.
    org = organization_with_orphans_and_deselected(alive=10, orphaned=3, deselected=0)
    live = org.connections.get(status="active")

    def token_expires_between_detection_and_fix():
        type(live).objects.filter(id=live.id).update(status="expired")

    run = fix(org, should_stop=token_expires_between_detection_and_fix).run

    assert run.status == AuditStatus.PARTIAL
    assert run.fixed == 0
    assert set(run.findings.values_list("outcome", flat=True)) == {FindingOutcome.GUARDED}
    assert SocialProfile.objects.filter(organization=org).alive().count() == 10


# --- The run budget (PROFILE_AUDIT_RUN_MAX_DELETIONS) -----------------------------------------


@pytest.mark.parametrize("shard_size", [1000, 1], ids=["one shard", "a shard per organization"])
def test_the_run_budget_caps_a_runs_deletions_over_all_its_shards(settings, shard_size):
    settings.PROFILE_AUDIT_RUN_MAX_DELETIONS = 3
    settings.PROFILE_AUDIT_SHARD_SIZE = shard_size
    # Each organization would delete one profile (of 10) and its queue setting: 2 rows.
    orgs = sorted((organization(alive=10, deselected=1) for _ in range(3)), key=lambda org: org.id)

    run = ProfileConnectionAuditService().run_audit_for_all_orgs(fix=True).run

    assert run.status == AuditStatus.PARTIAL
    assert run.deletions_reserved == 2  # the first fits (2 of 3), the second would not
    by_org = {org.id: fix_outcomes(run, org) for org in orgs}
    assert by_org[orgs[0].id] == {FindingOutcome.FIXED}
    assert by_org[orgs[1].id] == by_org[orgs[2].id] == {FindingOutcome.GUARDED}
    assert "run budget" in run.findings.filter(organization=orgs[1]).first().detail
    assert sorted(run.guarded_organizations) == sorted(str(o.id) for o in orgs[1:])


def test_force_lifts_the_run_budget(settings):
    settings.PROFILE_AUDIT_RUN_MAX_DELETIONS = 1
    orgs = [organization(alive=10, deselected=1) for _ in range(2)]

    run = ProfileConnectionAuditService().run_audit_for_all_orgs(fix=True, force=True).run

    assert (run.status, run.fixed) == (AuditStatus.SUCCEEDED, 4)
    assert all(fix_outcomes(run, org) == {FindingOutcome.FIXED} for org in orgs)


def fix_outcomes(run, org) -> set[str]:
    return set(run.findings.filter(organization=org).values_list("outcome", flat=True))


def test_the_budget_keeps_what_was_committed_when_a_shard_is_interrupted_mid_chunk(
    settings, monkeypatch
):
    """The chunk's one transaction fails, the fall-back commits the first organization, then
    the shard is interrupted (its soft time limit): the budget keeps exactly what committed."""
    from celery.exceptions import SoftTimeLimitExceeded

    from profiles.services import chunks
    from profiles.services.audit import AuditRequest, start_run, work_shard

    first, second = sorted(
        (organization(alive=10, deselected=1) for _ in range(2)), key=lambda org: org.id
    )
    real_apply = chunks.apply_cleanup_findings
    calls = []

    def flaky_apply(findings, *, now):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("the chunk's one transaction fails")
        if len(calls) == 3:
            raise SoftTimeLimitExceeded()  # during the second organization's own transaction
        return real_apply(findings, now=now)

    monkeypatch.setattr(chunks, "apply_cleanup_findings", flaky_apply)
    run = start_run(AuditRequest(fix=True))

    with pytest.raises(SoftTimeLimitExceeded):
        work_shard(shard_id=run.shards.get().id)

    run.refresh_from_db()
    assert fix_outcomes(run, first) == {FindingOutcome.FIXED}
    assert fix_outcomes(run, second) == set()  # rolled back; its shard resumes there
    assert run.deletions_reserved == 2  # the first organization's profile and queue setting
