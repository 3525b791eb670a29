"""Drift history and fights (DESIGN "Drift history and fights"), on the database the suite runs
on (PostgreSQL, and the same on SQLite): fingerprints and their states, fights held and resumed,
the writers a finding names, and the audit never fighting itself."""

import uuid
from contextlib import contextmanager
from datetime import timedelta

import pytest
from django.core.management import CommandError, call_command
from django.db import transaction
from django.utils import timezone
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connections.models import ConnectionAsset
from profiles.change_marks import writer
from profiles.models import (
    AuditFinding,
    AuditRun,
    AuditStatus,
    DriftRecord,
    DriftState,
    FindingOutcome,
    OrganizationAudits,
    SocialProfile,
)
from profiles.plan import ALL_TYPES, SCOPES, Guard
from profiles.services import retention
from profiles.services.audit import ProfileConnectionAuditService
from profiles.services.chunks import plan_chunk
from profiles.services.drift import DriftBook, prune_quiet_records, resume_fixing
from profiles.services.recording import FindingRow, record_findings
from profiles.services.revert import revert_run
from tests.factories import AssetFactory, ConnectionFactory, OrganizationFactory
from tests.strategies import build_org, org_states
from tests.test_design_rules import profile_for

pytestmark = pytest.mark.django_db


@pytest.fixture
def audit():
    return ProfileConnectionAuditService()


def deselected_profile(**organization):
    """An organization with one profile whose asset is no longer selected (a deselected
    finding), beside a selected one (so the guard never trips)."""
    org = OrganizationFactory(**organization)
    connection = ConnectionFactory(organization=org)
    for _ in range(3):
        profile_for(AssetFactory(connection=connection))
    asset = AssetFactory(connection=connection)
    profile = profile_for(asset)
    ConnectionAsset.objects.filter(id=asset.id).update(is_selected=False)
    return org, profile


def revive(profile, *, by="partner-sync"):
    """Another program undoes the audit's soft delete, tagged as itself."""
    with writer(by):
        SocialProfile.objects.filter(id=profile.id).update(deleted_at=None)


def finding_of(run, profile):
    return AuditFinding.objects.get(run=run, object_id=profile.id)


def record_of(profile):
    """Its record, times found and last seen as shown (``found``, ``seen_at``)."""
    return DriftRecord.objects.with_sightings().get(object_id=profile.id)


def test_a_finding_found_in_two_runs_is_one_drift_record_found_twice(audit):
    org, profile = deselected_profile()

    first = audit.run_full_audit(org_id=org.id).run
    second = audit.run_full_audit(org_id=org.id).run

    record = record_of(profile)
    assert record.found == 2
    assert record.state == DriftState.OPEN
    assert record.times_fixed == 0
    assert finding_of(first, profile).drift_id == finding_of(second, profile).drift_id == record.id
    assert not finding_of(second, profile).recurring  # never fixed or resolved: still the same


def test_drift_that_stays_is_counted_by_its_organizations_audits_not_rewritten(audit):
    """Found again with nothing new to say, a record is not written: one more audit of its
    organization counts it (times found, last seen) while it stays unresolved; a run of some
    types only counts it on the record itself (a run of every type may then have found it); resolved,
    the audits since no longer count."""
    org, profile = deselected_profile()
    for _ in range(3):
        last = audit.run_full_audit(org_id=org.id).run

    stored = DriftRecord.objects.get(object_id=profile.id)
    assert stored.times_found == 1  # as written by the first run
    record = record_of(profile)
    assert record.found == 3
    assert record.seen_at == OrganizationAudits.objects.get(organization_id=org.id).last_audit_at
    assert record.seen_at >= last.started_at

    audit.run_full_audit(org_id=org.id, scopes=["deselected"])
    assert record_of(profile).found == 4

    ConnectionAsset.objects.filter(
        connection__organization=org, external_id=profile.external_id
    ).update(is_selected=True)
    audit.run_full_audit(org_id=org.id)  # resolves it
    audit.run_full_audit(org_id=org.id)
    record = record_of(profile)
    assert (record.state, record.found) == (DriftState.RESOLVED, 4)


def test_one_audit_counts_drift_that_stays_beside_a_fix_in_the_same_organization(audit, committed):
    """One fixing run meets, in one organization, a held record (only seen again: counted by
    the organization's audit) and a record it fixes (written): each is found once more."""
    org, held = deselected_profile()
    fight(audit, committed, org, held)
    committed(audit.run_full_audit, org_id=org.id, fix=True)  # held from now on
    asset = AssetFactory(connection=held.connection)
    other = profile_for(asset)
    ConnectionAsset.objects.filter(id=asset.id).update(is_selected=False)
    audit.run_full_audit(org_id=org.id)  # a dry run: the other's record is made
    held_found = record_of(held).found

    run = committed(audit.run_full_audit, org_id=org.id, fix=True).run

    assert finding_of(run, held).outcome == FindingOutcome.HELD
    assert finding_of(run, other).outcome == FindingOutcome.FIXED
    assert record_of(held).found == held_found + 1
    record = record_of(other)
    assert (record.found, record.times_fixed, record.state) == (2, 1, DriftState.OPEN)
    audit.run_full_audit(org_id=org.id)  # the other is fixed: resolved, found as often
    assert (record_of(other).found, record_of(other).state) == (2, DriftState.RESOLVED)
    assert record_of(held).found == held_found + 2


def test_fixed_then_undone_by_partner_sync_it_recurs_and_names_the_writer(audit, committed):
    org, profile = deselected_profile()
    committed(audit.run_full_audit, org_id=org.id, fix=True)
    revive(profile)

    again = audit.run_full_audit(org_id=org.id).run

    record = record_of(profile)
    finding = finding_of(again, profile)
    assert record.state == DriftState.RECURRING
    assert record.times_fixed == 1 and record.found == 2
    assert record.undone_by == "partner-sync"
    assert finding.recurring
    assert "partner-sync" in [w["writer"] for w in finding.writers]
    # The audit's own fix is not a writer that led to the finding.
    assert "audit-fix" not in [w["writer"] for w in finding.writers]


def fight(audit, committed, org, profile, *, fixes=3):
    """The audit fixes the profile ``fixes`` times, and partner-sync undoes each fix."""
    for _ in range(fixes):
        run = committed(audit.run_full_audit, org_id=org.id, fix=True).run
        assert finding_of(run, profile).outcome == FindingOutcome.FIXED
        revive(profile)


def test_fixed_three_times_in_the_window_the_fourth_finding_is_held(audit, committed):
    org, profile = deselected_profile()
    fight(audit, committed, org, profile)

    run = committed(audit.run_full_audit, org_id=org.id, fix=True).run

    finding = finding_of(run, profile)
    assert finding.outcome == FindingOutcome.HELD
    assert finding.detail.startswith("fighting: fixed 3 times in 24 h; undone by partner-sync at ")
    profile.refresh_from_db()
    assert profile.deleted_at is None  # left alone
    assert run.status == AuditStatus.PARTIAL  # not failed
    assert record_of(profile).state == DriftState.FIGHTING
    # And it stays held on every later run, however the window moves.
    later = committed(audit.run_full_audit, org_id=org.id, fix=True).run
    assert finding_of(later, profile).outcome == FindingOutcome.HELD


def test_a_held_run_exits_like_a_guarded_one(audit, committed, capsys):
    org, profile = deselected_profile()
    fight(audit, committed, org, profile)

    committed(call_command, "profiles_audit_sync", "--fix", "--org", str(org.id))  # exit 0

    out = capsys.readouterr().out
    assert "Held: organization" in out and "1 findings fight another writer" in out
    with pytest.raises(CommandError) as check:
        committed(call_command, "profiles_audit_sync", "--org", str(org.id), "--check")
    assert check.value.returncode == 1


def test_fixes_outside_the_window_are_no_fight(audit, committed, settings):
    org, profile = deselected_profile()
    fight(audit, committed, org, profile, fixes=2)
    record = record_of(profile)
    long_ago = (timezone.now() - timedelta(days=2)).isoformat()
    record.recent_fixes = [{**f, "at": long_ago} for f in record.recent_fixes]
    record.save()

    run = committed(audit.run_full_audit, org_id=org.id, fix=True).run

    assert finding_of(run, profile).outcome == FindingOutcome.FIXED


def test_resume_fixing_fixes_it_on_the_next_run(audit, committed):
    org, profile = deselected_profile()
    fight(audit, committed, org, profile)
    committed(audit.run_full_audit, org_id=org.id, fix=True)  # held

    assert resume_fixing(DriftRecord.objects.filter(object_id=profile.id), by="alice") == 1
    run = committed(audit.run_full_audit, org_id=org.id, fix=True).run

    assert finding_of(run, profile).outcome == FindingOutcome.FIXED
    profile.refresh_from_db()
    assert profile.deleted_at is not None
    record = record_of(profile)
    assert record.resumed_by == "alice" and record.held_since is None


def test_a_fight_resumes_by_itself_once_resolved_for_one_window(audit, committed):
    org, profile = deselected_profile()
    fight(audit, committed, org, profile)
    committed(audit.run_full_audit, org_id=org.id, fix=True)  # held
    SocialProfile.objects.filter(id=profile.id).update(deleted_at=timezone.now())  # by hand
    audit.run_full_audit(org_id=org.id)  # clean: resolved
    assert record_of(profile).state == DriftState.RESOLVED

    revive(profile)
    soon = committed(audit.run_full_audit, org_id=org.id, fix=True).run
    assert finding_of(soon, profile).outcome == FindingOutcome.HELD  # within the window

    SocialProfile.objects.filter(id=profile.id).update(deleted_at=timezone.now())
    audit.run_full_audit(org_id=org.id)
    DriftRecord.objects.filter(object_id=profile.id).update(
        resolved_at=timezone.now() - timedelta(days=1, minutes=1)
    )
    revive(profile)
    later = committed(audit.run_full_audit, org_id=org.id, fix=True).run
    assert finding_of(later, profile).outcome == FindingOutcome.FIXED


def test_a_record_resolves_when_its_organization_audits_clean(audit, committed):
    org, profile = deselected_profile()
    committed(audit.run_full_audit, org_id=org.id, fix=True)

    clean = audit.run_full_audit(org_id=org.id).run

    assert clean.found == 0
    record = record_of(profile)
    assert record.state == DriftState.RESOLVED and record.resolved_at is not None


def test_a_run_of_other_types_resolves_nothing_of_this_type(audit, committed):
    org, profile = deselected_profile()
    audit.run_full_audit(org_id=org.id)

    audit.run_full_audit(org_id=org.id, scopes=["missing"])

    assert record_of(profile).state == DriftState.OPEN


def test_a_run_of_some_types_counts_nothing_of_the_others(audit):
    """A --type run says nothing of the records of other types: they were not looked for, so
    it neither resolves them nor counts them found (its organization's audits count only
    runs of every type)."""
    org, profile = deselected_profile()
    AssetFactory(connection=profile.connection)  # selected, and no profile: a missing one
    audit.run_full_audit(org_id=org.id)
    audit.run_full_audit(org_id=org.id)

    audit.run_full_audit(org_id=org.id, scopes=["missing"])

    assert (record_of(profile).found, record_of(profile).state) == (2, DriftState.OPEN)
    missing = DriftRecord.objects.with_sightings().get(organization=org, type="missing")
    assert missing.found == 3


def test_a_dry_run_updates_history_but_never_holds_or_resumes(audit, committed):
    org, profile = deselected_profile()
    fight(audit, committed, org, profile)
    committed(audit.run_full_audit, org_id=org.id, fix=True)  # held
    found_before = record_of(profile).found

    dry = audit.run_full_audit(org_id=org.id).run

    finding = finding_of(dry, profile)
    assert finding.outcome == FindingOutcome.PLANNED
    assert finding.detail.startswith("fighting")
    record = record_of(profile)
    assert record.found == found_before + 1
    assert record.state == DriftState.FIGHTING and record.held_since is not None

    # Nor does a dry run start a fight: three fixes, then a dry run plans it as ever.
    org2, profile2 = deselected_profile()
    fight(audit, committed, org2, profile2)
    assert finding_of(audit.run_full_audit(org_id=org2.id).run, profile2).outcome == "planned"
    assert record_of(profile2).held_since is None


def test_a_revert_does_not_count_as_the_other_writer(audit, committed):
    org, profile = deselected_profile()
    for _ in range(3):
        run = committed(audit.run_full_audit, org_id=org.id, fix=True).run
        assert finding_of(run, profile).outcome == FindingOutcome.FIXED
        committed(revert_run, run_id=run.id, fix=True)  # puts the profile back

    run = committed(audit.run_full_audit, org_id=org.id, fix=True).run

    assert finding_of(run, profile).outcome == FindingOutcome.FIXED
    assert record_of(profile).undone_by == ""


def test_retention_keeps_drift_records_and_prunes_them_after_a_long_quiet(audit, settings):
    org, profile = deselected_profile()
    run = audit.run_full_audit(org_id=org.id).run
    audit.run_full_audit(org_id=org.id)
    AuditRun.objects.filter(id=run.id).update(started_at=timezone.now() - timedelta(days=400))

    retention.prune_audit_runs(older_than_days=90)

    assert not AuditRun.objects.filter(id=run.id).exists()
    assert record_of(profile).found == 2
    long_ago = timezone.now() - timedelta(days=400)
    DriftRecord.objects.update(last_seen_at=long_ago)
    OrganizationAudits.objects.update(last_audit_at=long_ago)
    assert retention.prune_audit_runs(older_than_days=90).drift_records_deleted == 1
    assert not DriftRecord.objects.exists()
    assert prune_quiet_records(before=timezone.now()) == 0


def test_the_prune_forgets_the_audits_of_a_deleted_organization(audit):
    """An organization's audit count (drift that stays) goes once the organization is gone;
    another's stays, and so do its records' times found."""
    gone, _ = deselected_profile()
    kept, profile = deselected_profile()
    for org in (gone, kept, gone, kept):
        audit.run_full_audit(org_id=org.id)
    assert OrganizationAudits.objects.count() == 2

    gone.delete()
    prune_quiet_records(before=timezone.now() - timedelta(days=1))

    assert list(OrganizationAudits.objects.values_list("organization_id", flat=True)) == [kept.id]
    assert record_of(profile).found == 2


@contextmanager
def rolled_back():
    with transaction.atomic():
        yield
        transaction.set_rollback(True)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(state=org_states(), runs=st.integers(min_value=2, max_value=5))
def test_the_audit_never_fights_itself(audit, committed, state, runs):
    """No self-oscillation: with no other writer, fixing again and again never finds anything
    the first fix did not leave settled — no fingerprint is fixed twice, none recurs or fights."""
    with rolled_back():
        org = build_org(state)
        for _ in range(runs):
            committed(audit.run_full_audit, org_id=org.id, fix=True, force=True)
        records = DriftRecord.objects.filter(organization=org)
        assert all(r.times_fixed <= 1 for r in records), [(r.key, r.times_fixed) for r in records]
        assert not records.filter(state__in=[DriftState.RECURRING, DriftState.FIGHTING]).exists()
        assert not AuditFinding.objects.filter(run__organization=org, recurring=True).exists()


# A run: fixing or not, and the --type values it looks for (none: every type).
_RUNS = st.tuples(
    st.booleans(),
    st.lists(st.sampled_from(sorted(SCOPES)), max_size=2, unique=True),
)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(state=org_states(), runs=st.lists(_RUNS, min_size=1, max_size=5))
def test_times_found_is_the_number_of_findings_of_the_fingerprint(audit, committed, state, runs):
    """Whichever runs, in whichever order — dry or fixing, of every type or some — a record's
    times found is how many findings it has: counted on the record or by its organization's
    audits, never twice and never missed."""
    with rolled_back():
        org = build_org(state)
        for fix, scopes in runs:
            committed(audit.run_full_audit, org_id=org.id, fix=fix, force=True, scopes=scopes)
        records = DriftRecord.objects.with_sightings().filter(organization=org)
        found = {r.id: r.found for r in records}
        findings = {
            drift_id: AuditFinding.objects.filter(drift_id=drift_id).count() for drift_id in found
        }
        assert found == findings


def test_the_command_lists_findings_as_new_or_recurring(audit, committed, capsys):
    org, profile = deselected_profile()
    committed(call_command, "profiles_audit_sync", "--org", str(org.id), "-v", "2")
    first = [line for line in capsys.readouterr().out.splitlines() if str(profile.id) in line]
    committed(audit.run_full_audit, org_id=org.id, fix=True)
    revive(profile)

    committed(call_command, "profiles_audit_sync", "--org", str(org.id), "-v", "2")

    again = [line for line in capsys.readouterr().out.splitlines() if str(profile.id) in line]
    assert " new " in first[0]
    assert " recurring " in again[0]


def _finding_rows(org, plans, outcome=FindingOutcome.PLANNED):
    return [
        FindingRow(
            organization_id=org.id,
            type=f.type,
            action=f.action,
            model=f.model,
            object_id=f.object_id,
            platform=f.key[0] if f.key else "",
            external_id=f.key[1] if f.key else "",
            before=None,
            after=None,
            outcome=outcome,
        )
        for p in plans
        for f in p.findings
    ]


def test_two_runs_meeting_a_fingerprint_at_once_make_one_record(audit, committed):
    """A run that read no record for a fingerprint while another run made one links its finding
    to that record: one record per fingerprint, and no finding points at a record not there."""
    org, profile = deselected_profile()
    plans = plan_chunk([org.id], types=ALL_TYPES, guard=Guard(minimum=5, ratio=0.5))
    book = DriftBook.read([org.id])  # before the other run made the record
    committed(audit.run_full_audit, org_id=org.id)
    made = record_of(profile)
    run = AuditRun.objects.create(trigger="command", fix=False)
    rows = _finding_rows(org, plans)

    with transaction.atomic():
        book.record(rows, audited=[org.id], types=ALL_TYPES, run_id=run.id, fix=False)
        first = record_findings(run_id=run.id, rows=rows, organizations=1)
        book.write_from_findings(run_id=run.id, first_seq=first, last_seq=first + len(rows) - 1)

    assert DriftRecord.objects.filter(object_id=profile.id).count() == 1
    assert finding_of(run, profile).drift_id == made.id
    linked = set(AuditFinding.objects.filter(run=run).values_list("drift_id", flat=True))
    assert linked <= set(DriftRecord.objects.values_list("id", flat=True))


def test_a_new_record_of_a_fix_counts_its_fix(audit):
    """A fingerprint first met by a fixing run: found once, fixed once, its fix in the window
    that judges a fight."""
    org, profile = deselected_profile()

    run = audit.run_full_audit(org_id=org.id, fix=True).run

    record = record_of(profile)
    assert (record.state, record.found, record.times_fixed) == (DriftState.OPEN, 1, 1)
    assert record.last_fixed_at is not None
    assert [f["run"] for f in record.recent_fixes] == [str(run.id)]
    assert record.first_seen_at == record.seen_at == record.last_fixed_at
    assert finding_of(run, profile).drift_id == record.id


def test_a_fix_of_a_record_seen_before_counts_its_fix(audit):
    """A dry run met it first; the fix that follows counts on the same record (on PostgreSQL
    the server counts it from the finding, as a new record's fix is counted above)."""
    org, profile = deselected_profile()
    audit.run_full_audit(org_id=org.id)

    run = audit.run_full_audit(org_id=org.id, fix=True).run

    record = record_of(profile)
    assert (record.state, record.found, record.times_fixed) == (DriftState.OPEN, 2, 1)
    assert record.last_fixed_at == record.seen_at
    assert [f["run"] for f in record.recent_fixes] == [str(run.id)]


def test_a_fix_keeps_the_last_fixes_of_the_window_only(audit, settings):
    """Fixes older than the window drop out of the record's recent fixes; the new one comes
    last."""
    settings.PROFILE_AUDIT_FIGHT_FIXES = 4
    org, profile = deselected_profile()
    audit.run_full_audit(org_id=org.id)
    now = timezone.now()
    at = [(now - timedelta(days=2)).isoformat()] + [
        (now - timedelta(hours=h)).isoformat() for h in (3, 2, 1)
    ]
    DriftRecord.objects.filter(object_id=profile.id).update(
        state=DriftState.RECURRING,
        last_fixed_at=now - timedelta(hours=1),
        times_fixed=4,
        recent_fixes=[{"at": a, "run": f"earlier-{i}"} for i, a in enumerate(at)],
    )

    run = audit.run_full_audit(org_id=org.id, fix=True).run

    assert finding_of(run, profile).outcome == FindingOutcome.FIXED  # 3 in the window: no fight
    record = record_of(profile)
    assert record.times_fixed == 5
    assert [f["run"] for f in record.recent_fixes] == [
        "earlier-1",
        "earlier-2",
        "earlier-3",
        str(run.id),
    ]
    assert record.state == DriftState.RECURRING


def test_a_dry_run_beside_a_fix_never_undoes_its_hold(audit, committed):
    """Records are read without row locks: a dry run that read a record before a fixing run
    held it writes only what it observed, and the hold stays."""
    org, profile = deselected_profile()
    fight(audit, committed, org, profile)
    dry_plans = plan_chunk([org.id], types=ALL_TYPES, guard=Guard(minimum=5, ratio=0.5))
    dry_book = DriftBook.read([org.id])  # read before the hold

    committed(audit.run_full_audit, org_id=org.id, fix=True)  # holds it
    held_since = record_of(profile).held_since
    assert held_since is not None
    rows = _finding_rows(org, dry_plans)
    dry_book.record(rows, audited=[org.id], types=ALL_TYPES, run_id=uuid.uuid4(), fix=False)

    record = record_of(profile)
    assert record.held_since == held_since
    assert record.state == DriftState.FIGHTING
