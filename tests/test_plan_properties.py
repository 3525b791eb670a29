"""DESIGN's properties of the two plans, on in-memory states (no database: thousands of
examples in seconds). ``profiles.plan`` and ``profiles.revert_plan`` are pure; the in-memory
fix (``tests.strategies.apply_in_memory``) applies findings as ``profiles.services.changes``
does, and tests/test_properties.py shows on the database that this is what ``--fix`` applies.
"""

import json
from dataclasses import replace
from datetime import timedelta
from random import Random
from uuid import UUID

from hypothesis import given, settings
from hypothesis import strategies as st

from profiles.models import FindingAction, FindingType
from profiles.plan import ALL_TYPES, AssetRow, Guard, OrgSnapshot, plan_organization
from profiles.revert_plan import PROFILE, Result, parse_change, plan_revert
from tests.strategies import (
    BASE_TIME,
    EXTERNAL_IDS,
    World,
    apply_in_memory,
    apply_revert_in_memory,
    org_states,
    revert_snapshot_of,
    world_of,
)

FAST = settings(max_examples=1000, deadline=None)
FIX_TIME = BASE_TIME + timedelta(days=1)
REVERT_TIME = BASE_TIME + timedelta(days=2)
FORCED = Guard(minimum=5, ratio=0.5, force=True)


@st.composite
def worlds(draw) -> World:
    return world_of(draw(org_states()), Random(draw(st.integers(0, 2**32))))


def ids_from(seed: int):
    rng = Random(seed)
    return lambda: UUID(int=rng.getrandbits(128), version=4)


def fixed(world: World) -> tuple[World, list[dict], tuple]:
    plan = plan_organization(world.snapshot(), guard=FORCED)
    after, records = apply_in_memory(world, plan.findings, now=FIX_TIME, new_id=ids_from(1))
    return after, records, plan.findings


# --- plan.py ------------------------------------------------------------------------------------


@FAST
@given(world=worlds())
def test_one_pass_converges_and_fixing_twice_changes_nothing(world):
    after, _, findings = fixed(world)
    again = plan_organization(after.snapshot(), guard=FORCED)
    assert again.findings == (), f"left after one pass of {findings}"
    twice, _ = apply_in_memory(after, again.findings, now=REVERT_TIME, new_id=ids_from(2))
    assert twice == after


@FAST
@given(world=worlds())
def test_the_plan_is_what_applying_it_changes(world):
    """Each finding's recorded before is the object as it was, and the objects that change
    are exactly those the findings name (with the settings a restore carries, and the profiles
    the sync creates)."""
    after, records, findings = fixed(world)
    named = {f.object_id for f in findings if f.object_id}
    for record in records:
        named.update(UUID(s) for s in ((record["after"] or {}).get("queue_settings") or {}))
        if record["model"] == PROFILE and record["object_id"]:
            was = world.profiles[UUID(record["object_id"])]
            before = record["before"]
            if "connection_id" in before:
                assert before["connection_id"] == (
                    str(was.connection_id) if was.connection_id else None
                )
            if "deleted_at" in before:
                assert before["deleted_at"] == (
                    was.deleted_at.isoformat() if was.deleted_at else None
                )
    for table in ("profiles", "settings", "rules"):
        old, new = getattr(world, table), getattr(after, table)
        changed = {id_ for id_ in old if old[id_] != new[id_]}
        assert changed <= named
        created = set(new) - set(old)
        assert len(created) == sum(1 for f in findings if f.type == FindingType.MISSING) * (
            table == "profiles"
        )


@FAST
@given(world=worlds(), types=st.frozensets(st.sampled_from(ALL_TYPES), min_size=1))
def test_a_plan_names_only_its_organizations_rows_and_points_only_at_its_live_connections(
    world, types
):
    snapshot = world.snapshot()
    plan = plan_organization(snapshot, types=types, guard=FORCED)
    own = set(world.profiles) | set(world.settings) | set(world.rules)
    live = snapshot.live_connection_ids
    after_plan_alive = {str(p.id) for p in world.profiles.values() if p.deleted_at is None} - {
        str(f.object_id) for f in plan.findings if f.soft_deletes_profile
    }
    after_plan_alive |= {str(f.object_id) for f in plan.findings if f.type == FindingType.RESTORE}
    for f in plan.findings:
        assert f.type in types
        assert f.object_id is None or f.object_id in own
        if f.target_connection_id is not None:
            assert f.target_connection_id in live
        for entry in f.kept_profile_ids:
            assert str(UUID(entry)) in after_plan_alive
    # Another organization's selected assets (on its connection) change nothing in O's plan.
    foreign_assets = tuple(
        AssetRow(UUID(int=n + 1), world.foreign_connection_id, "page", external_id, "x", BASE_TIME)
        for n, external_id in enumerate(EXTERNAL_IDS)
    )
    crowded = OrgSnapshot(
        organization_id=snapshot.organization_id,
        connections=snapshot.connections,
        selected_assets=(*snapshot.selected_assets, *foreign_assets),
        profiles=snapshot.profiles,
        queue_settings=snapshot.queue_settings,
        boost_rules=snapshot.boost_rules,
    )
    assert plan_organization(crowded, types=types, guard=FORCED) == plan


@FAST
@given(
    world=worlds(),
    types=st.frozensets(st.sampled_from(ALL_TYPES), min_size=1),
    minimum=st.integers(0, 6),
    ratio=st.sampled_from([0.0, 0.25, 0.5, 1.0]),
    force=st.booleans(),
)
def test_the_guard_weighs_the_whole_plan_whatever_the_types(world, types, minimum, ratio, force):
    snapshot = world.snapshot()
    guard = Guard(minimum=minimum, ratio=ratio, force=force)
    whole = plan_organization(snapshot, guard=guard)
    part = plan_organization(snapshot, types=types, guard=guard)
    deletions = sum(1 for f in whole.findings if f.soft_deletes_profile)
    alive = sum(1 for p in world.profiles.values() if p.deleted_at is None)
    expected = not force and deletions > max(minimum, ratio * alive)
    assert whole.guarded == part.guarded == expected
    assert whole.deletions == part.deletions == deletions


# --- revert_plan.py -----------------------------------------------------------------------------


def recorded_newest_first(records: list[dict]):
    return [
        parse_change(
            seq=seq,
            type=r["type"],
            action=r["action"],
            model=r["model"],
            object_id=UUID(r["object_id"]) if r["object_id"] else None,
            platform=r["platform"],
            external_id=r["external_id"],
            before=r["before"],
            after=r["after"],
        )
        for seq, r in reversed(list(enumerate(records, start=1)))
    ]


def revert(world: World, records: list[dict]):
    return plan_revert(
        recorded_newest_first(records),
        revert_snapshot_of(world),
        run_started_at=FIX_TIME - timedelta(seconds=1),
        now=REVERT_TIME,
    )


def never_another_organizations_connection(world: World, plan) -> None:
    owners = world.connection_owners()
    for row in plan.rows.profiles.values():
        stays = world.profiles[row.id].connection_id
        assert (
            row.connection_id in (None, stays) or owners[row.connection_id] == world.organization_id
        )


@FAST
@given(world=worlds())
def test_a_revert_after_a_fix_gives_back_the_state_before(world):
    after, records, _ = fixed(world)
    plan = revert(after, records)
    never_another_organizations_connection(after, plan)
    back = apply_revert_in_memory(after, plan.rows)

    assert all(
        d.result == Result.PUT_BACK for d in plan.decisions if _connection_may_go_back(d, world)
    )
    expected = dict(world.profiles)
    for id_, p in world.profiles.items():
        if (
            p.connection_id == world.foreign_connection_id
            and back.profiles[id_].connection_id != p.connection_id
        ):
            # Rule 5: a revert never points a profile back at another organization's connection.
            assert back.profiles[id_].connection_id == after.profiles[id_].connection_id
            expected[id_] = back.profiles[id_]
    created = set(back.profiles) - set(world.profiles)
    assert all(back.profiles[c].deleted_at == REVERT_TIME for c in created)
    assert {i: p for i, p in back.profiles.items() if i not in created} == expected
    # A profile the revert brings back alive brings back the settings an audit deleted while it
    # was dead, and no others (DESIGN "Nothing is lost").
    brought_back = {
        id_
        for id_, p in world.profiles.items()
        if p.deleted_at is None and after.profiles[id_].deleted_at
    }
    expected_settings = {
        id_: replace(s, deleted_at=None)
        if s.profile_id in brought_back and (s.id, s.deleted_at) in world.audit_deletions
        else s
        for id_, s in world.settings.items()
    }
    assert back.settings == expected_settings
    assert back.rules == world.rules


@FAST
@given(world=worlds())
def test_reverting_the_revert_gives_back_the_fixed_state(world):
    after, records, _ = fixed(world)
    first = revert(after, records)
    undone = apply_revert_in_memory(after, first.rows)
    second = revert(undone, revert_records(first))
    redone = apply_revert_in_memory(undone, second.rows)
    assert all(d.result == Result.PUT_BACK for d in second.decisions)
    # The settings the first revert brought back with a profile go again with it; the rest
    # is exactly as the fix left it.
    assert redone.profiles == after.profiles
    assert redone.rules == after.rules
    assert redone.settings == after.settings


def revert_records(plan) -> list[dict]:
    """A revert's put-back decisions as its findings record them (oldest first)."""
    put_back = [d for d in plan.decisions if d.result == Result.PUT_BACK]
    return [
        json.loads(
            json.dumps(
                {
                    "type": d.change.type,
                    "action": FindingAction.REVERT.value,
                    "model": d.change.model,
                    "object_id": str(d.object_id or d.change.object_id),
                    "platform": d.change.platform,
                    "external_id": d.change.external_id,
                    "before": d.before,
                    "after": d.after,
                }
            )
        )
        for d in put_back
    ]


def _connection_may_go_back(decision, world: World) -> bool:
    before = decision.change.before.values
    return before.get("connection_id") != world.foreign_connection_id


@FAST
@given(world=worlds(), data=st.data())
def test_an_object_changed_since_the_fix_is_a_conflict_and_left_alone(world, data):
    after, records, findings = fixed(world)
    touched = [f for f in findings if f.object_id is not None]
    if not touched:
        return
    target = data.draw(st.sampled_from(touched)).object_id
    if target in after.profiles:
        p = after.profiles[target]
        moved = data.draw(st.sampled_from([None, world.foreign_connection_id, *world.connections]))
        changed = p.__class__(
            p.id,
            moved if moved != p.connection_id else p.connection_id,
            p.platform,
            p.external_id,
            None if p.deleted_at else BASE_TIME + timedelta(hours=99),
            p.created_at,
        )
        mutated = World(**{**after.__dict__, "profiles": {**after.profiles, target: changed}})
    elif target in after.settings:
        s = after.settings[target]
        changed = s.__class__(s.id, s.profile_id, None if s.deleted_at else BASE_TIME)
        mutated = World(**{**after.__dict__, "settings": {**after.settings, target: changed}})
    else:
        r = after.rules[target]
        changed = r.__class__(r.id, r.deleted_at, ["edited"])
        mutated = World(**{**after.__dict__, "rules": {**after.rules, target: changed}})

    plan = revert(mutated, records)

    never_another_organizations_connection(mutated, plan)
    [decision] = [d for d in plan.decisions if d.change.object_id == target]
    assert decision.result == Result.CONFLICT
    back = apply_revert_in_memory(mutated, plan.rows)
    table = (
        "profiles"
        if target in after.profiles
        else "settings"
        if target in after.settings
        else "rules"
    )
    assert getattr(back, table)[target] == changed
