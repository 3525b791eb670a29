"""Honest records of missing profiles (DESIGN "Nothing is lost", last bullet): a fix records a
missing profile as "sync sent", and it counts as fixed only once the profile exists — confirmed
by the sync job in the transaction that creates it, or by a later fixing audit — even after its
run has closed; a key no longer selected when the job runs is stale, never fixed."""

import json
from io import StringIO

import pytest
from django.core.management import call_command

from connections.models import ConnectionAsset
from profiles.models import AuditStatus, FindingOutcome, SocialProfile
from profiles.services.audit import ProfileConnectionAuditService
from profiles.services.sync import NO_LONGER_SELECTED
from tests.factories import AssetFactory, profile_for

pytestmark = pytest.mark.django_db


@pytest.fixture
def audit():
    return ProfileConnectionAuditService()


def fix_with_jobs_held(audit, org, capture):
    """A fixing run whose sync jobs are sent but not run yet (they wait in ``hooks``)."""
    with capture(execute=False) as hooks:
        report = audit.run_full_audit(org_id=org.id, fix=True)
    return report.run, hooks


def test_a_missing_profile_counts_as_fixed_only_once_it_exists(
    audit, django_capture_on_commit_callbacks
):
    asset = AssetFactory()
    org = asset.connection.organization
    profile_for(AssetFactory(connection=asset.connection, is_selected=False))  # deselected

    run, send_jobs = fix_with_jobs_held(audit, org, django_capture_on_commit_callbacks)

    assert run.status == AuditStatus.SUCCEEDED
    assert (run.found, run.fixed) == (2, 1)
    assert run.by_type["missing"] == {"found": 1, "fixed": 0, "sync_sent": 1}
    finding = run.findings.get(type="missing")
    assert finding.outcome == FindingOutcome.SENT
    assert not SocialProfile.objects.filter(external_id=asset.external_id).exists()

    for send in send_jobs:  # the job runs (eagerly): it creates the profile and confirms
        send()

    run.refresh_from_db()
    finding.refresh_from_db()
    assert SocialProfile.objects.alive().filter(external_id=asset.external_id).count() == 1
    assert finding.outcome == FindingOutcome.FIXED
    assert (run.found, run.fixed) == (2, 2)
    assert run.by_type["missing"] == {"found": 1, "fixed": 1, "sync_sent": 0}

    for send in send_jobs:  # delivered again: counted once
        send()
    run.refresh_from_db()
    assert run.fixed == 2 and run.by_type["missing"]["fixed"] == 1


def test_the_report_says_sync_sent_until_the_job_confirms(
    audit, django_capture_on_commit_callbacks
):
    org = AssetFactory().connection.organization
    out = StringIO()

    with django_capture_on_commit_callbacks(execute=False) as send_jobs:
        call_command("profiles_audit_sync", "--fix", "--format", "json", stdout=out)
    report = json.loads(out.getvalue())
    for send in send_jobs:
        send()
    again = StringIO()
    call_command("profiles_audit_sync", "--fix", "--check", stdout=again)

    assert report["totals"] == {"found": 1, "fixed": 0, "sync_sent": 1}
    assert report["by_type"]["missing"] == {"found": 1, "fixed": 0, "sync_sent": 1}
    [org_report] = report["organizations"]
    assert org_report["org_id"] == str(org.id)
    assert org_report["by_type"]["missing"] == {"found": 1, "fixed": 0, "sync_sent": 1}
    total = next(line for line in again.getvalue().splitlines() if "total" in line)
    assert total.split() == ["total", "0", "0", "0"]


def test_a_later_fixing_audit_confirms_a_profile_that_exists_by_then(
    audit, django_capture_on_commit_callbacks, committed
):
    asset = AssetFactory()
    org = asset.connection.organization
    first, _lost = fix_with_jobs_held(audit, org, django_capture_on_commit_callbacks)
    profile_for(asset)  # created meanwhile by someone else (the real-time sync's other path)

    audit.run_full_audit(org_id=org.id)  # a dry run writes no other run's records (rule 3)
    first.refresh_from_db()
    assert first.by_type["missing"]["sync_sent"] == 1
    second = committed(audit.run_full_audit, org_id=org.id, fix=True).run

    first.refresh_from_db()
    assert second.found == 0
    assert first.findings.get().outcome == FindingOutcome.FIXED
    assert (first.found, first.fixed) == (1, 1)
    assert first.by_type["missing"] == {"found": 1, "fixed": 1, "sync_sent": 0}


def test_a_key_deselected_before_its_job_runs_is_stale_not_fixed(
    audit, django_capture_on_commit_callbacks
):
    asset = AssetFactory()
    org = asset.connection.organization
    run, send_jobs = fix_with_jobs_held(audit, org, django_capture_on_commit_callbacks)
    ConnectionAsset.objects.filter(id=asset.id).update(is_selected=False)

    for send in send_jobs:
        send()

    run.refresh_from_db()
    finding = run.findings.get()
    assert not SocialProfile.objects.exists()
    assert (finding.outcome, finding.detail) == (FindingOutcome.STALE, NO_LONGER_SELECTED)
    assert run.fixed == 0
    assert run.by_type["missing"] == {"found": 1, "fixed": 0, "sync_sent": 0}


def test_a_sync_job_that_runs_while_its_run_is_open_counts_when_the_run_closes(audit, committed):
    """In one process (eager tasks) the job runs as each chunk commits, before the run closes:
    the run ends with the profile counted fixed, as before there was a sync job at all."""
    asset = AssetFactory()

    run = committed(audit.run_full_audit, org_id=asset.connection.organization_id, fix=True).run

    assert (run.found, run.fixed) == (1, 1)
    assert run.by_type["missing"] == {"found": 1, "fixed": 1, "sync_sent": 0}
    assert run.findings.get().outcome == FindingOutcome.FIXED
