"""hypothesis strategies for random organization states, and the builder that stores one.

States are small but dense in collisions: few external ids, a platform no asset type maps to,
an unknown asset type, ties on connection ``created_at`` and on profile ``deleted_at``, profiles
on another organization's connection, and boost rules full of junk.
"""

import json
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from random import Random
from uuid import UUID

from hypothesis import strategies as st

from boosts.models import BoostRule
from connections.models import ConnectionAsset, PlatformConnection
from connections.platforms import ASSET_TYPE_PLATFORM
from orgs.models import Organization
from profiles.models import SocialProfile
from profiles.plan import (
    AssetRow,
    BoostRuleRow,
    ConnectionRow,
    OrgSnapshot,
    ProfileRow,
    QueueSettingRow,
)
from queues.models import QueueSetting

BASE_TIME = datetime(2026, 1, 1, tzinfo=UTC)
EXTERNAL_IDS = ["1", "2", "3"]
ASSET_TYPES = ["page", "page", "instagram_account", "youtube_channel", "myspace_page"]
PLATFORMS = ["facebook", "facebook", "instagram", "youtube", "myspace"]
STATUSES = ["active"] * 5 + ["inactive", "expired", "revoked"]


@dataclass(frozen=True)
class ConnectionSpec:
    status: str
    deleted: bool
    created_hour: int


@dataclass(frozen=True)
class AssetSpec:
    connection: int
    asset_type: str
    external_id: str
    selected: bool


@dataclass(frozen=True)
class ProfileSpec:
    platform: str
    external_id: str
    connection: int | None  # index into the connections; -1: another organization's
    deleted_hour: int | None


@dataclass(frozen=True)
class OrgState:
    connections: tuple[ConnectionSpec, ...]
    assets: tuple[AssetSpec, ...]
    profiles: tuple[ProfileSpec, ...]
    queue_settings: tuple[tuple[int, bool], ...]  # (profile index, alive)
    boost_rules: tuple[object, ...]  # a list of refs, or a value that is not a list


# Strategies that do not depend on what was drawn before are built once: hypothesis validates
# each new strategy object, which would cost more than the plans the examples test.
_CONNECTION_SPECS = st.lists(
    st.builds(
        ConnectionSpec,
        status=st.sampled_from(STATUSES),
        deleted=st.sampled_from([False, False, False, True]),
        created_hour=st.integers(0, 2),
    ),
    max_size=3,
)
_ASSET_SPECS = {
    n: st.lists(
        st.builds(
            AssetSpec,
            connection=st.integers(0, n - 1),
            asset_type=st.sampled_from(ASSET_TYPES),
            external_id=st.sampled_from(EXTERNAL_IDS),
            selected=st.sampled_from([True, True, False]),
        ),
        max_size=7,
    )
    for n in range(1, 4)
}
# Mostly one of the organization's connections; sometimes none, or another organization's.
_CONNECTION_REFS = {
    n: st.sampled_from([None, -1, *range(n)] + [*range(n)] * 2) for n in range(0, 4)
}
_OFF_CONNECTION_REFS = {n: st.sampled_from([None, -1, *range(n)]) for n in range(0, 4)}
_ANY_KEY = st.tuples(st.sampled_from(PLATFORMS), st.sampled_from(EXTERNAL_IDS))
_DELETED_HOUR = st.one_of(st.none(), st.integers(0, 2))
_JUNK_REFS = st.sampled_from(["junk", "foreign", "unknown", 7, None])
_NOT_A_LIST = st.sampled_from([{"a": 1}, "text", 3])


def _one_of_list(draw, values: list) -> object:
    return values[draw(st.integers(0, len(values) - 1))]


@st.composite
def org_states(draw) -> OrgState:
    connections = tuple(draw(_CONNECTION_SPECS))
    assets = tuple(draw(_ASSET_SPECS[len(connections)])) if connections else ()
    # Half the profiles share the key of a drawn asset, so that relinks, restores and
    # deselections are common rather than rare.
    asset_keys = [
        (ASSET_TYPE_PLATFORM.get(a.asset_type, "myspace"), a.external_id, a.selected)
        for a in assets
    ]
    selected_keys = [k[:2] for k in asset_keys if k[2]]
    key_pools = [pool for pool in (selected_keys, [k[:2] for k in asset_keys]) if pool]

    def key() -> tuple[str, str]:
        choice = draw(st.integers(0, len(key_pools)))
        return draw(_ANY_KEY) if choice == 0 else _one_of_list(draw, key_pools[choice - 1])

    profiles = tuple(
        ProfileSpec(*key(), draw(_CONNECTION_REFS[len(connections)]), draw(_DELETED_HOUR))
        for _ in range(draw(st.integers(0, 6)))
    )
    if selected_keys:
        # Profiles of selected keys off their connections: relinks when alive, restores when
        # dead; without them both would be rare.
        profiles += tuple(
            ProfileSpec(
                *_one_of_list(draw, selected_keys),
                draw(_OFF_CONNECTION_REFS[len(connections)]),
                draw(_DELETED_HOUR),
            )
            for _ in range(draw(st.integers(0, 2)))
        )
    queue_settings = ()
    if profiles:
        queue_settings = tuple(
            (draw(st.integers(0, len(profiles) - 1)), draw(st.booleans()))
            for _ in range(draw(st.integers(0, 4)))
        )

    def ref() -> object:
        if profiles and draw(st.booleans()):
            return ("profile", draw(st.integers(0, len(profiles) - 1)))
        return draw(_JUNK_REFS)

    boost_rules = tuple(
        [ref() for _ in range(draw(st.integers(0, 5)))]
        if draw(st.integers(0, 3))
        else draw(_NOT_A_LIST)
        for _ in range(draw(st.integers(0, 2)))
    )
    return OrgState(connections, assets, profiles, queue_settings, boost_rules)


def build_org(state: OrgState, *, name: str = "random") -> Organization:
    """Store ``state`` as a new organization (plus a neighbour for its foreign references)."""
    org = Organization.objects.create(name=name)
    neighbour = Organization.objects.create(name=f"{name} neighbour")
    foreign_connection = PlatformConnection.objects.create(organization=neighbour, provider="meta")
    foreign_profile = SocialProfile.objects.create(
        organization=neighbour, platform="facebook", external_id="1", connection=foreign_connection
    )
    connections = [
        PlatformConnection.objects.create(
            organization=org,
            provider="meta",
            status=spec.status,
            created_at=BASE_TIME + timedelta(hours=spec.created_hour),
            deleted_at=BASE_TIME if spec.deleted else None,
        )
        for spec in state.connections
    ]
    ConnectionAsset.objects.bulk_create(
        ConnectionAsset(
            connection=connections[spec.connection],
            asset_type=spec.asset_type,
            external_id=spec.external_id,
            name=f"{spec.asset_type} {spec.external_id}",
            is_selected=spec.selected,
        )
        for spec in state.assets
    )
    alive_keys = set()
    profiles = []
    for spec in state.profiles:
        deleted_at = (
            BASE_TIME + timedelta(hours=spec.deleted_hour)
            if spec.deleted_hour is not None
            else None
        )
        key = (spec.platform, spec.external_id)
        if deleted_at is None and key in alive_keys:
            deleted_at = BASE_TIME  # at most one alive profile per key: the database says so
        if deleted_at is None:
            alive_keys.add(key)
        connection = (
            foreign_connection
            if spec.connection == -1
            else connections[spec.connection]
            if spec.connection is not None
            else None
        )
        profiles.append(
            SocialProfile(
                organization=org,
                connection=connection,
                platform=spec.platform,
                external_id=spec.external_id,
                deleted_at=deleted_at,
            )
        )
    SocialProfile.objects.bulk_create(profiles)
    QueueSetting.objects.bulk_create(
        QueueSetting(
            organization=org,
            profile=profiles[index],
            deleted_at=None if alive else BASE_TIME,
        )
        for index, alive in state.queue_settings
    )
    special = {"foreign": str(foreign_profile.id), "unknown": str(UUID(int=12345))}

    def stored(ref):
        if isinstance(ref, tuple):
            return str(profiles[ref[1]].id)
        return special.get(ref, ref) if isinstance(ref, str) else ref

    BoostRule.objects.bulk_create(
        BoostRule(
            organization=org,
            profile_ids=[stored(ref) for ref in value] if isinstance(value, list) else value,
        )
        for value in state.boost_rules
    )
    return org


# --- In memory: the same states without a database (the plans' fast property tests) -----------


@dataclass(frozen=True)
class MemProfile:
    id: UUID
    connection_id: UUID | None
    platform: str
    external_id: str
    deleted_at: datetime | None
    created_at: datetime


@dataclass(frozen=True)
class MemSetting:
    id: UUID
    profile_id: UUID
    deleted_at: datetime | None


@dataclass(frozen=True)
class MemRule:
    id: UUID
    deleted_at: datetime | None
    profile_ids: object


@dataclass(frozen=True)
class World:
    """One organization's rows (and the neighbour's connection and profile it can point at),
    as plain values: what ``OrgSnapshot`` and ``RevertSnapshot`` are made of."""

    organization_id: UUID
    neighbour_id: UUID
    connections: dict[UUID, ConnectionRow]
    foreign_connection_id: UUID
    selected_assets: tuple[AssetRow, ...]
    profiles: dict[UUID, MemProfile]
    settings: dict[UUID, MemSetting]
    rules: dict[UUID, MemRule]
    audit_deletions: frozenset[tuple[UUID, datetime]]
    """(setting, deleted_at) of the settings an audit deleted as stale."""

    def snapshot(self) -> OrgSnapshot:
        return OrgSnapshot(
            organization_id=self.organization_id,
            connections=dict(self.connections),
            selected_assets=self.selected_assets,
            profiles=[
                ProfileRow(p.id, p.connection_id, p.platform, p.external_id, p.deleted_at)
                for p in self.profiles.values()
            ],
            queue_settings=[
                QueueSettingRow(s.id, s.profile_id)
                for s in self.settings.values()
                if s.deleted_at is None
            ],
            boost_rules=[
                BoostRuleRow(r.id, r.profile_ids)
                for r in self.rules.values()
                if r.deleted_at is None
            ],
        )

    def connection_owners(self) -> dict[UUID, UUID]:
        owners = dict.fromkeys(self.connections, self.organization_id)
        owners[self.foreign_connection_id] = self.neighbour_id
        return owners


def world_of(state: OrgState, rng: Random) -> World:
    """``state`` as a ``World``, with ids drawn from ``rng`` (so ties on id go either way)."""

    def new_id() -> UUID:
        return UUID(int=rng.getrandbits(128), version=4)

    org, neighbour, foreign_connection, foreign_profile = (new_id() for _ in range(4))
    connections = [
        ConnectionRow(
            new_id(),
            spec.status,
            BASE_TIME if spec.deleted else None,
            BASE_TIME + timedelta(hours=spec.created_hour),
        )
        for spec in state.connections
    ]
    assets = tuple(
        AssetRow(
            new_id(),
            connections[spec.connection].id,
            spec.asset_type,
            spec.external_id,
            f"{spec.asset_type} {spec.external_id}",
            BASE_TIME,
        )
        for spec in state.assets
        if spec.selected
    )
    alive_keys = set()
    profiles = []
    for spec in state.profiles:
        deleted_at = (
            BASE_TIME + timedelta(hours=spec.deleted_hour)
            if spec.deleted_hour is not None
            else None
        )
        key = (spec.platform, spec.external_id)
        if deleted_at is None and key in alive_keys:
            deleted_at = BASE_TIME  # at most one alive profile per key, as in the database
        if deleted_at is None:
            alive_keys.add(key)
        connection_id = (
            foreign_connection
            if spec.connection == -1
            else connections[spec.connection].id
            if spec.connection is not None
            else None
        )
        profiles.append(
            MemProfile(
                new_id(), connection_id, spec.platform, spec.external_id, deleted_at, BASE_TIME
            )
        )
    settings = [
        MemSetting(new_id(), profiles[index].id, None if alive else BASE_TIME)
        for index, alive in state.queue_settings
    ]
    # Every other dead setting was deleted by an audit (as stale, while its profile was dead):
    # a restore of its profile brings it back.
    audit_deletions = frozenset(
        (s.id, s.deleted_at) for n, s in enumerate(settings) if s.deleted_at and n % 2 == 0
    )
    special = {"foreign": str(foreign_profile), "unknown": str(UUID(int=12345))}

    def stored(ref):
        if isinstance(ref, tuple):
            return str(profiles[ref[1]].id)
        return special.get(ref, ref) if isinstance(ref, str) else ref

    rules = [
        MemRule(
            new_id(),
            None,
            [stored(ref) for ref in value] if isinstance(value, list) else value,
        )
        for value in state.boost_rules
    ]
    return World(
        organization_id=org,
        neighbour_id=neighbour,
        connections={c.id: c for c in connections},
        foreign_connection_id=foreign_connection,
        selected_assets=assets,
        profiles={p.id: p for p in profiles},
        settings={s.id: s for s in settings},
        rules={r.id: r for r in rules},
        audit_deletions=audit_deletions,
    )


def apply_in_memory(world: World, findings, *, now: datetime, new_id) -> tuple[World, list[dict]]:
    """``findings`` applied to ``world`` as ``--fix`` applies them (profiles/services/changes.py,
    with the missing profiles' sync job run), and each finding's record as the fix stores it
    (before/after through JSON, as the database holds them)."""
    from profiles.models import FindingType
    from profiles.services.changes import planned_change

    profiles, settings, rules = dict(world.profiles), dict(world.settings), dict(world.rules)
    deletions = set(world.audit_deletions)
    records = []
    for f in findings:
        restored: dict[str, str] = {}
        match f.type:
            case FindingType.ORPHANED | FindingType.DESELECTED:
                profiles[f.object_id] = replace(profiles[f.object_id], deleted_at=now)
            case FindingType.RELINK:
                profiles[f.object_id] = replace(
                    profiles[f.object_id], connection_id=f.target_connection_id
                )
            case FindingType.RESTORE:
                profiles[f.object_id] = replace(
                    profiles[f.object_id], deleted_at=None, connection_id=f.target_connection_id
                )
                for s in sorted(settings.values(), key=lambda s: s.id.int):
                    if s.profile_id == f.object_id and (s.id, s.deleted_at) in deletions:
                        restored[str(s.id)] = s.deleted_at.isoformat()
                        settings[s.id] = replace(s, deleted_at=None)
            case FindingType.MISSING:
                platform, external_id = f.key
                created = MemProfile(
                    new_id(), f.target_connection_id, platform, external_id, None, now
                )
                profiles[created.id] = created
            case FindingType.STALE_QUEUE_SETTING:
                settings[f.object_id] = replace(settings[f.object_id], deleted_at=now)
                deletions.add((f.object_id, now))
            case FindingType.INVALID_BOOST_REF:
                rules[f.object_id] = replace(
                    rules[f.object_id], profile_ids=list(f.kept_profile_ids)
                )
        change = planned_change(f, now=now, queue_settings=restored or None)
        platform, external_id = f.key or ("", "")
        records.append(
            json.loads(
                json.dumps(
                    {
                        "type": str(f.type),
                        "action": str(f.action),
                        "model": f.model,
                        "object_id": str(f.object_id) if f.object_id else None,
                        "platform": platform,
                        "external_id": external_id,
                        "before": change.before,
                        "after": change.after,
                    }
                )
            )
        )
    return (
        replace(
            world,
            profiles=profiles,
            settings=settings,
            rules=rules,
            audit_deletions=frozenset(deletions),
        ),
        records,
    )


def revert_snapshot_of(world: World):
    """Every row of the organization as a revert's snapshot holds it."""
    from profiles.revert_plan import ProfileNow, RevertSnapshot, RuleNow, SettingNow

    return RevertSnapshot(
        organization_id=world.organization_id,
        profiles={
            p.id: ProfileNow(
                p.id, (p.platform, p.external_id), p.connection_id, p.deleted_at, p.created_at
            )
            for p in world.profiles.values()
        },
        queue_settings={
            s.id: SettingNow(s.id, s.profile_id, s.deleted_at) for s in world.settings.values()
        },
        boost_rules={
            r.id: RuleNow(r.id, r.deleted_at, r.profile_ids) for r in world.rules.values()
        },
        connection_owners=world.connection_owners(),
        audit_deletions=world.audit_deletions,
    )


def apply_revert_in_memory(world: World, rows) -> World:
    """A revert plan's rows written into ``world``."""
    profiles = dict(world.profiles)
    for p in rows.profiles.values():
        profiles[p.id] = replace(
            profiles[p.id], connection_id=p.connection_id, deleted_at=p.deleted_at
        )
    settings = dict(world.settings)
    for s in rows.queue_settings.values():
        settings[s.id] = replace(settings[s.id], deleted_at=s.deleted_at)
    rules = dict(world.rules)
    for r in rows.boost_rules.values():
        rules[r.id] = replace(rules[r.id], deleted_at=r.deleted_at, profile_ids=r.profile_ids)
    return replace(world, profiles=profiles, settings=settings, rules=rules)
