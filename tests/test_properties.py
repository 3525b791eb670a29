"""DESIGN's properties on the database, over random organization states (hypothesis, 200
examples each): that the plans are what ``--fix`` and ``--revert --fix`` apply, that a dry run
writes nothing, and that a chunk reads what its plans need. The plans' own properties run in
memory, in thousands of examples (tests/test_plan_properties.py).

Each example builds its organizations inside a savepoint that is rolled back afterwards, so
examples never see each other's rows.
"""

import json
from contextlib import contextmanager

import pytest
from django.db import transaction
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from boosts.models import BoostRule
from connections.models import PlatformConnection
from profiles.models import FindingOutcome, SocialProfile
from profiles.plan import ALL_TYPES, Guard, plan_organization
from profiles.selectors import load_snapshots
from profiles.services import revert as revert_service
from profiles.services.audit import ProfileConnectionAuditService
from profiles.services.chunks import plan_chunk
from profiles.services.revert import revert_run
from queues.models import QueueSetting
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
@given(mine=org_states(), theirs=org_states())
def test_property_the_plan_is_what_fix_applies(mine, theirs, committed):
    """The plan of O, read beside another organization, is what a dry run records and what
    ``--fix`` applies; one pass converges and nothing of the other organization changes. The
    plan's own properties are tested in memory (tests/test_plan_properties.py)."""
    audit = ProfileConnectionAuditService()
    guard = Guard(minimum=5, ratio=0.5)
    with rolled_back():
        org = build_org(mine, name="mine")
        alone = plan_organization(load_snapshots([org.id])[org.id], guard=guard)
        other = build_org(theirs, name="theirs")
        assert plan_organization(load_snapshots([org.id, other.id])[org.id], guard=guard) == alone
        dry = audit.run_full_audit(org_id=org.id, force=True).run
        others_before = domain_state([other.id])
        fixed = fix(audit, committed, org)
        assert [k[:4] for k in finding_keys(dry)] == [k[:4] for k in finding_keys(fixed)]
        # Same changes too, but for the deletion time, which a dry run can only plan.
        assert [k for k in finding_keys(dry) if "deleted_at': '" not in k[4]] == [
            k for k in finding_keys(fixed) if "deleted_at': '" not in k[4]
        ]
        assert set(fixed.findings.values_list("outcome", flat=True)) <= {FindingOutcome.FIXED}
        assert fixed.found == len(alone.findings)
        assert set(fixed.findings.values_list("organization_id", flat=True)) <= {org.id}
        assert set(fixed.by_type) == {t.value for t in ALL_TYPES}
        assert domain_state([other.id]) == others_before
        assert audit.run_full_audit(org_id=org.id).run.found == 0


@PROPERTY_SETTINGS
@given(state=org_states())
def test_property_the_revert_plan_is_what_revert_fix_applies(state, committed, monkeypatch):
    """A dry revert records what ``--revert --fix`` then does, and that gives back the state
    before the fix: but for the profiles the sync created (soft-deleted) and those the fix moved
    off another organization's connection (they stay: rule 5). Chunks of two findings: later
    chunks see what earlier ones wrote (or, dry, would have written)."""
    monkeypatch.setattr(revert_service, "CHUNK_SIZE", 2)
    audit = ProfileConnectionAuditService()
    with rolled_back():
        org = build_org(state)
        before = revertible_state(org)
        run = fix(audit, committed, org)
        if not run.fixed:
            return
        after_fix = domain_state()
        dry = revert_run(run_id=run.id, fix=False)
        assert domain_state() == after_fix
        done = revert_run(run_id=run.id, fix=True)

        def decided(report):
            return [
                (f.type, f.object_id, f.detail, repr(f.before)[:40], f.outcome == "conflict")
                for f in report.run.findings.order_by("seq")
            ]

        assert decided(dry) == decided(done)
        foreign = PlatformConnection.objects.get(organization__name="random neighbour").id
        now = revertible_state(org)
        expected = dict(before)
        for key, (connection_id, deleted_at) in before.items():
            if key[0] == "profile" and connection_id == foreign and now[key][0] != foreign:
                expected[key] = (now[key][0], deleted_at)  # it stays on the fix's connection
        created = set(now) - set(before)
        assert all(now[key][1] is not None for key in created)
        assert {k: v for k, v in now.items() if k not in created} == expected
        conflicts = done.run.findings.filter(outcome=FindingOutcome.CONFLICT)
        assert all("another organization" in c.detail for c in conflicts)


def revertible_state(org) -> dict:
    """What a fix changes and a revert puts back, of one organization."""
    state = {
        ("profile", p.id): (p.connection_id, p.deleted_at)
        for p in SocialProfile.objects.filter(organization=org)
    }
    state.update(
        {
            ("setting", s.id): (None, s.deleted_at)
            for s in QueueSetting.objects.filter(organization=org)
        }
    )
    state.update(
        {
            ("rule", r.id): (json.dumps(r.profile_ids), r.deleted_at)
            for r in BoostRule.objects.filter(organization=org)
        }
    )
    return state


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
