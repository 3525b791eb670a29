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
