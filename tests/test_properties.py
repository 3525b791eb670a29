"""DESIGN's properties over random organization states (hypothesis, 200 examples each).

Each example builds its organizations inside a savepoint that is rolled back afterwards, so
examples never see each other's rows.
"""

from contextlib import contextmanager

import pytest
from django.db import transaction
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from profiles.models import FindingOutcome
from profiles.plan import ALL_TYPES, Guard, plan_organization
from profiles.selectors import load_snapshots
from profiles.services.audit import ProfileConnectionAuditService
from profiles.services.chunks import plan_chunk
from tests.domain import domain_state
from tests.strategies import build_org, org_states

pytestmark = pytest.mark.django_db

PROPERTY_SETTINGS = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@contextmanager
def rolled_back():
    with transaction.atomic():
        yield
        transaction.set_rollback(True)


def finding_keys(run):
    return sorted(
        (f.type, str(f.object_id), f.platform, f.external_id, repr(f.after))
        for f in run.findings.all()
    )


def fix(audit, committed, org, **kwargs):
    # force: the mass-deletion guard is a separate rule (tests/test_guard); here every plan
    # must be applied for the properties to speak about it.
    return committed(audit.run_full_audit, org_id=org.id, fix=True, force=True, **kwargs).run


@PROPERTY_SETTINGS
@given(state=org_states())
def test_property_one_pass_converges_and_fixing_twice_changes_nothing(state, committed):
    audit = ProfileConnectionAuditService()
    with rolled_back():
        org = build_org(state)
        first = fix(audit, committed, org)
        assert first.fixed == first.found
        assert audit.run_full_audit(org_id=org.id).run.found == 0
        settled = domain_state()
        second = fix(audit, committed, org)
        assert second.found == 0
        assert domain_state() == settled


@PROPERTY_SETTINGS
@given(state=org_states())
def test_property_dry_run_is_the_plan(state, committed):
    audit = ProfileConnectionAuditService()
    with rolled_back():
        org = build_org(state)
        dry = audit.run_full_audit(org_id=org.id, force=True).run
        fixed = fix(audit, committed, org)
        assert [k[:4] for k in finding_keys(dry)] == [k[:4] for k in finding_keys(fixed)]
        # Same changes too, but for the deletion time, which a dry run can only plan.
        assert [k for k in finding_keys(dry) if "deleted_at': '" not in k[4]] == [
            k for k in finding_keys(fixed) if "deleted_at': '" not in k[4]
        ]
        assert set(fixed.findings.values_list("outcome", flat=True)) <= {FindingOutcome.FIXED}


@PROPERTY_SETTINGS
@given(state=org_states())
def test_property_dry_run_writes_nothing(state):
    audit = ProfileConnectionAuditService()
    with rolled_back():
        build_org(state)
        before = domain_state()
        audit.run_audit_for_all_orgs()
        assert domain_state() == before


@PROPERTY_SETTINGS
@given(mine=org_states(), theirs=org_states())
def test_property_organizations_are_isolated(mine, theirs, committed):
    audit = ProfileConnectionAuditService()
    guard = Guard(minimum=5, ratio=0.5)
    with rolled_back():
        org = build_org(mine, name="mine")
        alone = plan_organization(load_snapshots([org.id])[org.id], guard=guard)
        other = build_org(theirs, name="theirs")
        together = load_snapshots([org.id, other.id])
        assert plan_organization(together[org.id], guard=guard) == alone
        others_before = domain_state([other.id])
        report = fix(audit, committed, org)
        assert domain_state([other.id]) == others_before
        assert set(report.findings.values_list("organization_id", flat=True)) <= {org.id}
        assert report.found == len(alone.findings)
        assert set(report.by_type) == {t.value for t in ALL_TYPES}


@PROPERTY_SETTINGS
@given(
    mine=org_states(),
    theirs=org_states(),
    types=st.frozensets(st.sampled_from(ALL_TYPES), min_size=1),
)
def test_property_a_chunk_reads_only_settings_that_can_be_stale_and_plans_the_same(
    mine, theirs, types
):
    guard = Guard(minimum=5, ratio=0.5)
    with rolled_back():
        ids = [build_org(mine, name="mine").id, build_org(theirs, name="theirs").id]
        whole = load_snapshots(ids)
        expected = [plan_organization(whole[org], types=types, guard=guard) for org in ids]
        assert plan_chunk(ids, types=types, guard=guard) == expected
