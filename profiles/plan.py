"""The audit's semantics, in one place (DESIGN "Audit semantics, per organization O").

Pure functions from a snapshot of one organization to the findings a dry run reports and
``--fix`` applies. Nothing here reads or writes the database: ``profiles.selectors`` builds the
snapshot, ``profiles.services.audit`` records and applies the plan.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from typing import Any, NamedTuple
from uuid import UUID

from connections.models import ConnectionStatus
from connections.platforms import ASSET_TYPE_PLATFORM
from profiles.models import FindingAction, FindingType

Key = tuple[str, str]
"""(platform, external_id): what a selected asset and a profile have in common."""

PROFILE_TYPES: tuple[FindingType, ...] = (
    FindingType.ORPHANED,
    FindingType.DESELECTED,
    FindingType.RELINK,
    FindingType.RESTORE,
    FindingType.MISSING,
)
CLEANUP_TYPES: tuple[FindingType, ...] = (
    FindingType.STALE_QUEUE_SETTING,
    FindingType.INVALID_BOOST_REF,
)
ALL_TYPES: tuple[FindingType, ...] = PROFILE_TYPES + CLEANUP_TYPES

# What ``--type`` accepts, and the finding types each value covers.
SCOPES: dict[str, tuple[FindingType, ...]] = {
    "orphaned": (FindingType.ORPHANED,),
    "relink": (FindingType.RELINK,),
    "missing": (FindingType.MISSING,),
    "deselected": (FindingType.DESELECTED,),
    "restore": (FindingType.RESTORE,),
    "cleanup": CLEANUP_TYPES,
}


def types_for_scopes(scopes: Iterable[str] | None) -> frozenset[FindingType]:
    """The finding types that ``--type`` values select; none given means all of them."""
    scopes = list(scopes or [])
    if not scopes:
        return frozenset(ALL_TYPES)
    return frozenset(t for scope in scopes for t in SCOPES[scope])


# --- The snapshot -------------------------------------------------------------------------------


class ConnectionRow(NamedTuple):
    id: UUID
    status: str
    deleted_at: datetime | None
    created_at: datetime

    @property
    def live(self) -> bool:
        """Live: alive and active (belonging to O is given: the snapshot holds only O's)."""
        return self.deleted_at is None and self.status == ConnectionStatus.ACTIVE


class AssetRow(NamedTuple):
    """A *selected* asset on one of O's connections (unselected ones never matter)."""

    id: UUID
    connection_id: UUID
    asset_type: str
    external_id: str
    name: str
    created_at: datetime

    @property
    def platform(self) -> str | None:
        return ASSET_TYPE_PLATFORM.get(self.asset_type)


class ProfileRow(NamedTuple):
    id: UUID
    connection_id: UUID | None
    platform: str
    external_id: str
    deleted_at: datetime | None

    @property
    def key(self) -> Key:
        return (self.platform, self.external_id)

    @property
    def alive(self) -> bool:
        return self.deleted_at is None


class QueueSettingRow(NamedTuple):
    """An *alive* queue setting of O."""

    id: UUID
    profile_id: UUID


class BoostRuleRow(NamedTuple):
    """An *alive* boost rule of O; ``profile_ids`` is whatever JSON the row holds (or
    ``Unreadable`` when it cannot be decoded)."""

    id: UUID
    profile_ids: Any


class Unreadable(NamedTuple):
    """A stored value that cannot be decoded here (JSON nested deeper than Python reads)."""

    reason: str


class BadData(ValueError):
    """An organization's data cannot be audited as it is: its organization is recorded as
    failed with this message; the others go on (rule 6). A single unreadable row is not this:
    it is left as it is and the rest of its organization is audited (rule 7)."""


@dataclass(frozen=True)
class OrgSnapshot:
    """Everything the audit of one organization reads, and nothing of any other."""

    organization_id: UUID
    connections: Mapping[UUID, ConnectionRow]
    selected_assets: Sequence[AssetRow]
    profiles: Sequence[ProfileRow]
    queue_settings: Sequence[QueueSettingRow] = ()
    """O's alive queue settings: all of them, or at least those of the profiles
    ``profiles_whose_settings_can_be_stale`` names (no other can be a finding)."""
    boost_rules: Sequence[BoostRuleRow] = ()

    @cached_property
    def live_connection_ids(self) -> frozenset[UUID]:
        """O's live connections (asked about for every asset and profile: computed once)."""
        return frozenset(id_ for id_, c in self.connections.items() if c.live)

    @cached_property
    def alive_profiles(self) -> list[ProfileRow]:
        """O's alive profiles by id (read by several finders: sorted once)."""
        return sorted((p for p in self.profiles if p.deleted_at is None), key=lambda p: p.id.int)


# --- Selection ----------------------------------------------------------------------------------


class SelectedKey(NamedTuple):
    key: Key
    backing_connection_id: UUID
    selecting_connection_ids: frozenset[UUID]
    name: str
    """Name of the asset on the backing connection: what a missing profile is created with."""


def selected_keys(snapshot: OrgSnapshot) -> dict[Key, SelectedKey]:
    """Keys selected in O: some selected asset with that key sits on a live connection.

    The backing connection is the live selecting connection created first (ties: smallest id).
    """
    by_key: dict[Key, list[tuple[datetime, UUID, AssetRow]]] = {}
    live = {id_.int: c for id_, c in snapshot.connections.items() if c.live}
    for asset in snapshot.selected_assets:
        platform = ASSET_TYPE_PLATFORM.get(asset.asset_type)
        connection = live.get(asset.connection_id.int)
        if platform is None or connection is None:
            continue
        by_key.setdefault((platform, asset.external_id), []).append(
            (connection.created_at, asset.connection_id, asset)
        )
    selection = {}
    for key, candidates in by_key.items():
        if len(candidates) == 1:  # the common case: one selecting asset
            _, backing_id, backing_asset = candidates[0]
            selecting = frozenset((backing_id,))
        else:
            _, backing_id, _ = min(candidates, key=lambda c: (c[0], c[1]))
            # Two rows of the same asset on one connection: the older one names the profile.
            backing_asset = min(
                (c[2] for c in candidates if c[1] == backing_id),
                key=lambda a: (a.created_at, a.id),
            )
            selecting = frozenset(c[1] for c in candidates)
        selection[key] = SelectedKey(key, backing_id, selecting, backing_asset.name)
    return selection


def unknown_asset_types(snapshot: OrgSnapshot) -> Counter[str]:
    """Selected assets whose type maps to no platform: logged, never backing a profile."""
    return Counter(a.asset_type for a in snapshot.selected_assets if a.platform is None)


# --- Findings -----------------------------------------------------------------------------------


# Not frozen: a frozen dataclass sets every field through object.__setattr__, and a large
# run builds hundreds of thousands of findings. Nothing changes one after it is made; the hash
# is over the compared fields, as a frozen one's would be.
@dataclass(slots=True, unsafe_hash=True)
class Finding:
    """One inconsistency and the fix the plan holds for it.

    Two findings are equal when they would make the same change to the same object: a fix
    re-detects under the organization's lock and applies only findings still equal to one
    detected then (DESIGN rule 4).
    """

    type: FindingType
    object_id: UUID | None
    """The profile, queue setting or boost rule; ``None`` for a missing profile."""
    key: Key | None = None
    connection_id: UUID | None = None
    """Profile findings: the profile's connection now."""
    target_connection_id: UUID | None = None
    """relink, restore, missing: the backing connection the profile ends up on."""
    deleted_at: datetime | None = None
    """restore: when the profile to restore was deleted."""
    profile_id: UUID | None = None
    """stale_queue_setting: the setting's dead profile."""
    profile_ids: str | None = None
    """invalid_boost_ref: the rule's ``profile_ids`` now, as canonical JSON text."""
    kept_profile_ids: tuple[str, ...] = ()
    """invalid_boost_ref: the entries the fix keeps, in order."""
    name: str = field(default="", compare=False)
    """missing: the new profile's name (a rename of the asset does not make the finding stale)."""

    @property
    def action(self) -> FindingAction:
        return ACTIONS[self.type]

    @property
    def model(self) -> str:
        return MODELS[self.type]

    @property
    def soft_deletes_profile(self) -> bool:
        return self.type in (FindingType.ORPHANED, FindingType.DESELECTED)


ACTIONS: dict[FindingType, FindingAction] = {
    FindingType.ORPHANED: FindingAction.SOFT_DELETE,
    FindingType.DESELECTED: FindingAction.SOFT_DELETE,
    FindingType.RELINK: FindingAction.RELINK,
    FindingType.MISSING: FindingAction.DISPATCH_SYNC,
    FindingType.RESTORE: FindingAction.RESTORE,
    FindingType.STALE_QUEUE_SETTING: FindingAction.SOFT_DELETE,
    FindingType.INVALID_BOOST_REF: FindingAction.REMOVE_REFS,
}
MODELS: dict[FindingType, str] = {
    **{t: "profiles.SocialProfile" for t in PROFILE_TYPES},
    FindingType.STALE_QUEUE_SETTING: "queues.QueueSetting",
    FindingType.INVALID_BOOST_REF: "boosts.BoostRule",
}


def find_orphaned_profiles(
    snapshot: OrgSnapshot, selection: Mapping[Key, SelectedKey]
) -> list[Finding]:
    """Alive profiles whose connection is null, dead or not active, and whose key is not
    selected in O. A connection of another organization counts as not live: nothing of O'
    can vouch for a profile of O (rule 5)."""
    live = snapshot.live_connection_ids
    return [
        Finding(FindingType.ORPHANED, p.id, key=p.key, connection_id=p.connection_id)
        for p in snapshot.alive_profiles
        if p.connection_id not in live and p.key not in selection
    ]


def find_deselected_profiles(
    snapshot: OrgSnapshot, selection: Mapping[Key, SelectedKey]
) -> list[Finding]:
    """Alive profiles on a live connection whose key is not selected in O."""
    live = snapshot.live_connection_ids
    return [
        Finding(FindingType.DESELECTED, p.id, key=p.key, connection_id=p.connection_id)
        for p in snapshot.alive_profiles
        if p.connection_id in live and p.key not in selection
    ]


def find_profiles_to_relink(
    snapshot: OrgSnapshot, selection: Mapping[Key, SelectedKey]
) -> list[Finding]:
    """Alive profiles whose key is selected in O, but not through their own connection."""
    findings = []
    for p in snapshot.alive_profiles:
        selected = selection.get(p.key)
        if selected is None or p.connection_id in selected.selecting_connection_ids:
            continue
        findings.append(
            Finding(
                FindingType.RELINK,
                p.id,
                key=p.key,
                connection_id=p.connection_id,
                target_connection_id=selected.backing_connection_id,
            )
        )
    return findings


def find_profiles_to_restore(
    snapshot: OrgSnapshot, selection: Mapping[Key, SelectedKey]
) -> list[Finding]:
    """Selected keys with no alive profile but dead ones: the most recently deleted comes back
    (ties: smallest id), on the backing connection."""
    alive_keys = {p.key for p in snapshot.profiles if p.alive}
    latest_dead: dict[Key, ProfileRow] = {}
    for p in snapshot.profiles:
        if p.alive or p.key not in selection or p.key in alive_keys:
            continue
        current = latest_dead.get(p.key)
        if current is None or (p.deleted_at, -p.id.int) > (current.deleted_at, -current.id.int):
            latest_dead[p.key] = p
    return [
        Finding(
            FindingType.RESTORE,
            p.id,
            key=key,
            connection_id=p.connection_id,
            target_connection_id=selection[key].backing_connection_id,
            deleted_at=p.deleted_at,
        )
        for key, p in sorted(latest_dead.items())
    ]


def find_missing_profiles(
    snapshot: OrgSnapshot, selection: Mapping[Key, SelectedKey]
) -> list[Finding]:
    """Selected keys with no profile at all, alive or dead."""
    known_keys = {p.key for p in snapshot.profiles}
    return [
        Finding(
            FindingType.MISSING,
            None,
            key=key,
            target_connection_id=selected.backing_connection_id,
            name=selected.name,
        )
        for key, selected in sorted(selection.items())
        if key not in known_keys
    ]


# Profile ids as their 128-bit numbers (``UUID.int``) in the sets below: ints are hashed and
# compared in C, UUIDs in Python, and a run looks up millions of them.


def alive_profiles_after(snapshot: OrgSnapshot, decisions: Iterable[Finding]) -> frozenset[int]:
    """O's alive profiles (``id.int``) once ``decisions`` are applied: deleted ones dead,
    restored ones alive (DESIGN rule 2). A missing profile gets a new id nothing can refer to
    yet."""
    alive = {p.id.int for p in snapshot.profiles if p.deleted_at is None}
    for finding in decisions:
        # Profile findings other than "missing" always name their profile.
        if finding.object_id is None:
            continue
        if finding.soft_deletes_profile:
            alive.discard(finding.object_id.int)
        elif finding.type == FindingType.RESTORE:
            alive.add(finding.object_id.int)
    return frozenset(alive)


def find_stale_queue_settings(
    snapshot: OrgSnapshot, alive_profiles: frozenset[int]
) -> list[Finding]:
    """Alive queue settings whose profile (of O) is dead."""
    dead = {p.id.int for p in snapshot.profiles}.difference(alive_profiles)
    stale = [s for s in snapshot.queue_settings if s.profile_id.int in dead]
    return [
        Finding(FindingType.STALE_QUEUE_SETTING, s.id, profile_id=s.profile_id)
        for s in sorted(stale, key=lambda s: s.id.int)
    ]


def find_invalid_boost_refs(snapshot: OrgSnapshot, alive_profiles: frozenset[int]) -> list[Finding]:
    """Alive boost rules with entries that are not the id of an alive profile of O: unknown,
    dead, another organization's, or malformed. A value that is not a list has no valid entry.
    A rule whose value cannot be read or written back (``unreadable_boost_rules``) is left."""
    findings = []
    for rule in sorted(snapshot.boost_rules, key=lambda r: r.id.int):
        text = _rule_json(rule)
        if isinstance(text, Unreadable):
            continue
        entries = rule.profile_ids if isinstance(rule.profile_ids, list) else None
        kept = [e for e in entries or [] if _profile_ref(e) in alive_profiles]
        if entries is not None and len(kept) == len(entries):
            continue
        findings.append(
            Finding(
                FindingType.INVALID_BOOST_REF,
                rule.id,
                profile_ids=text,
                kept_profile_ids=tuple(kept),
            )
        )
    return findings


def unreadable_boost_rules(snapshot: OrgSnapshot) -> dict[UUID, str]:
    """O's alive boost rules whose ``profile_ids`` cannot be read or written back here (JSON
    nested deeper than Python's recursion limit), and why. Rule 7: such a rule is reported and
    left as it is, since its fix could not record what it changed (before), and nothing else of
    O depends on it; the rest of O is audited and fixed."""
    unreadable = {}
    for rule in sorted(snapshot.boost_rules, key=lambda r: r.id.int):
        value = rule.profile_ids
        if isinstance(value, list) and all(isinstance(e, str) for e in value):
            continue  # the common case: nothing nested, nothing to encode
        text = _rule_json(rule)
        if isinstance(text, Unreadable):
            unreadable[rule.id] = text.reason
    return unreadable


def _profile_ref(entry: Any) -> int | None:
    """The profile an entry names (``id.int``). Entries are read the way the rest of the
    product reads them (Django's UUID lookup), so a valid id in upper case or without dashes
    still counts."""
    if not isinstance(entry, str):
        return None
    try:
        return uuid.UUID(entry).int
    except ValueError:
        return None


def _rule_json(rule: BoostRuleRow) -> str | Unreadable:
    """The rule's value as canonical JSON text, or why it has none."""
    if isinstance(rule.profile_ids, Unreadable):
        return rule.profile_ids
    try:
        return canonical_json(rule.profile_ids)
    except (RecursionError, ValueError) as exc:
        return Unreadable(type(exc).__name__)


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


# --- The plan -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Guard:
    """Mass-deletion guard: a plan deleting more than max(minimum, ratio x alive profiles)."""

    minimum: int
    ratio: float
    force: bool = False

    def trips(self, *, deletions: int, alive_profiles: int) -> bool:
        return not self.force and deletions > max(self.minimum, self.ratio * alive_profiles)


@dataclass(frozen=True)
class OrgPlan:
    organization_id: UUID
    profile_findings: tuple[Finding, ...]
    cleanup_findings: tuple[Finding, ...]
    alive_profiles: int
    guarded: bool = False
    error: str = ""
    """Why the organization could not be planned (``BadData``); then there are no findings."""
    deletions: int = 0
    """Profiles the organization's whole plan soft-deletes, whatever types were asked for."""
    unknown_asset_types: Mapping[str, int] = field(default_factory=dict)
    unreadable_boost_rules: Mapping[UUID, str] = field(default_factory=dict)
    """Boost rules left as they are because their value cannot be read: {rule id: why}."""
    planning_seconds: float = field(default=0.0, compare=False)
    mark_version: int | None = field(default=None, compare=False)
    """The version of the organization's change mark in the snapshot it was planned from (None:
    it had none). The same version under the fix's lock means nothing of it was written since."""
    mark_writers: Sequence[dict[str, Any]] = field(default=(), compare=False)
    """That mark's writers (what a dry run's drift records name)."""

    @property
    def findings(self) -> tuple[Finding, ...]:
        return self.profile_findings + self.cleanup_findings


def find_profile_findings(
    snapshot: OrgSnapshot, types: frozenset[FindingType] = frozenset(ALL_TYPES)
) -> tuple[Finding, ...]:
    """The profile decisions (orphaned, deselected, relink, restore, missing), from one snapshot."""
    selection = selected_keys(snapshot)
    finders = {
        FindingType.ORPHANED: find_orphaned_profiles,
        FindingType.DESELECTED: find_deselected_profiles,
        FindingType.RELINK: find_profiles_to_relink,
        FindingType.RESTORE: find_profiles_to_restore,
        FindingType.MISSING: find_missing_profiles,
    }
    return tuple(
        finding
        for finding_type in PROFILE_TYPES
        if finding_type in types
        for finding in finders[finding_type](snapshot, selection)
    )


def find_cleanup_findings(
    snapshot: OrgSnapshot,
    decisions: Iterable[Finding],
    types: frozenset[FindingType] = frozenset(ALL_TYPES),
) -> tuple[Finding, ...]:
    """Cleanup as it stands once ``decisions`` are applied (DESIGN rules 1 and 2)."""
    alive = alive_profiles_after(snapshot, decisions)
    findings: list[Finding] = []
    if FindingType.STALE_QUEUE_SETTING in types:
        findings += find_stale_queue_settings(snapshot, alive)
    if FindingType.INVALID_BOOST_REF in types:
        findings += find_invalid_boost_refs(snapshot, alive)
    return tuple(findings)


def profiles_whose_settings_can_be_stale(
    snapshot: OrgSnapshot, whole: Iterable[Finding]
) -> list[UUID]:
    """O's profiles whose queue settings ``find_stale_queue_settings`` can find stale once
    (part of) ``whole``, O's profile decisions, is applied: those dead now and those it soft
    deletes. The others' settings never are, and need not be read (most of them)."""
    deleted = {f.object_id.int for f in whole if f.soft_deletes_profile and f.object_id is not None}
    return [p.id for p in snapshot.profiles if p.deleted_at is not None or p.id.int in deleted]


def plan_organization(
    snapshot: OrgSnapshot,
    *,
    types: frozenset[FindingType] = frozenset(ALL_TYPES),
    guard: Guard,
    whole: tuple[Finding, ...] | None = None,
) -> OrgPlan:
    """O's plan. ``whole``: ``find_profile_findings(snapshot)``, if it was found already."""
    # The guard weighs the organization's whole plan: fixing one type at a time (``--type``)
    # must not get round it (DESIGN "Mass-deletion guard").
    if whole is None:
        whole = find_profile_findings(snapshot)
    profile_findings = tuple(f for f in whole if f.type in types)
    cleanup_findings = find_cleanup_findings(snapshot, profile_findings, types)
    alive_count = sum(1 for p in snapshot.profiles if p.alive)
    deletions = sum(1 for f in whole if f.soft_deletes_profile)
    return OrgPlan(
        organization_id=snapshot.organization_id,
        profile_findings=profile_findings,
        cleanup_findings=cleanup_findings,
        alive_profiles=alive_count,
        guarded=guard.trips(deletions=deletions, alive_profiles=alive_count),
        deletions=deletions,
        unknown_asset_types=dict(unknown_asset_types(snapshot)),
        unreadable_boost_rules=unreadable_boost_rules(snapshot)
        if FindingType.INVALID_BOOST_REF in types
        else {},
    )
