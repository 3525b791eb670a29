"""What a revert does, in one place (DESIGN "Nothing is lost"): a pure function from a run's
recorded changes and a snapshot of the rows they touched to the decisions (put back, or a
conflict and why) and the rows as the revert leaves them.

Nothing here reads or writes the database: ``profiles.services.revert`` loads the snapshot,
applies the rows and records the decisions. Recorded before/after are parsed once, here, into
typed values (datetimes, UUIDs, JSON values), and compared as such.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import Enum
from typing import Any, NamedTuple
from uuid import UUID

from profiles.models import FindingAction
from profiles.plan import Key, Unreadable, canonical_json

PROFILE = "profiles.SocialProfile"
QUEUE_SETTING = "queues.QueueSetting"
BOOST_RULE = "boosts.BoostRule"
# The fields a fix changes, per model: the only ones a revert compares and writes back.
REVERTIBLE_FIELDS: dict[str, tuple[str, ...]] = {
    PROFILE: ("deleted_at", "connection_id"),
    QUEUE_SETTING: ("deleted_at",),
    BOOST_RULE: ("deleted_at", "profile_ids"),
}
LABELS = {PROFILE: "profile", QUEUE_SETTING: "queue setting", BOOST_RULE: "boost rule"}


# --- Recorded changes, parsed ---------------------------------------------------------------


class Side(NamedTuple):
    """One side (before or after) of a recorded change, typed: ``values`` holds the fields it
    names (``deleted_at`` a datetime or None, ``connection_id`` a UUID or None, ``profile_ids``
    the JSON value); ``queue_settings`` the settings a restore carried along."""

    values: Mapping[str, Any]
    queue_settings: Mapping[UUID, datetime | None]


class CreatedProfile(NamedTuple):
    """What a missing-profile fix asked the sync job to create."""

    key: Key
    connection_id: UUID | None


@dataclass(frozen=True, slots=True)
class RecordedChange:
    """A fixed finding of the reverted run, as the revert needs it."""

    seq: int
    type: str
    action: str
    model: str
    object_id: UUID | None
    platform: str
    external_id: str
    before: Side
    after: Side
    created: CreatedProfile | None = None
    """A missing-profile fix (``dispatch_sync``): the profile the job was to create."""
    unreadable: str = ""
    """Why the recorded before/after could not be parsed (then it is a conflict)."""


EMPTY_SIDE = Side({}, {})


def parse_change(
    *,
    seq: int,
    type: str,
    action: str,
    model: str,
    object_id: UUID | None,
    platform: str,
    external_id: str,
    before: Any,
    after: Any,
) -> RecordedChange:
    """A recorded finding with its before/after parsed into typed values."""
    change = RecordedChange(
        seq, type, action, model, object_id, platform, external_id, EMPTY_SIDE, EMPTY_SIDE
    )
    try:
        if action == FindingAction.DISPATCH_SYNC:
            recorded = after if isinstance(after, dict) else {}
            key = (recorded.get("platform", platform), recorded.get("external_id", external_id))
            created = CreatedProfile(key, _as_uuid(recorded.get("connection_id")))
            return replace(change, created=created)
        return replace(change, before=_parse_side(before), after=_parse_side(after))
    except (TypeError, ValueError, AttributeError) as exc:
        return replace(change, unreadable=f"{type_name(exc)}: {exc}")


def type_name(exc: BaseException) -> str:
    return type(exc).__name__


def _parse_side(side: Any) -> Side:
    if not isinstance(side, dict):
        return EMPTY_SIDE
    values: dict[str, Any] = {}
    for name, value in side.items():
        if name == "queue_settings":
            continue
        values[name] = _PARSERS.get(name, _as_is)(value)
    settings = {
        UUID(setting_id): _as_datetime(deleted_at)
        for setting_id, deleted_at in (side.get("queue_settings") or {}).items()
    }
    return Side(values, settings)


def _as_datetime(value: Any) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value
    return datetime.fromisoformat(value)


def _as_uuid(value: Any) -> UUID | None:
    if value is None or isinstance(value, UUID):
        return value
    return UUID(str(value))


def _as_is(value: Any) -> Any:
    return value


_PARSERS: dict[str, Callable[[Any], Any]] = {"deleted_at": _as_datetime, "connection_id": _as_uuid}


def as_json(value: Any) -> Any:
    """A typed value as before/after hold it."""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, UUID):
        return str(value)
    return value


# --- The snapshot ---------------------------------------------------------------------------


class ProfileNow(NamedTuple):
    id: UUID
    key: Key
    connection_id: UUID | None
    deleted_at: datetime | None
    created_at: datetime


class SettingNow(NamedTuple):
    id: UUID
    profile_id: UUID
    deleted_at: datetime | None


class RuleNow(NamedTuple):
    id: UUID
    deleted_at: datetime | None
    profile_ids: Any
    """The JSON value as stored, or ``Unreadable`` when it cannot be decoded (rule 7)."""


Row = ProfileNow | SettingNow | RuleNow


@dataclass(frozen=True)
class RevertSnapshot:
    """The rows of one organization that a chunk of recorded changes touched, as they are now.

    ``profiles``: those the changes name, and the organization's alive profiles with their keys;
    ``queue_settings``: those the changes name, and every setting of a profile a change could
    restore; ``audit_deletions``: (setting, deleted_at) of those settings an audit deleted as
    stale (a restore brings exactly those back); ``connection_owners``: the organization of
    each connection the changes name that still exists.
    """

    organization_id: UUID
    profiles: Mapping[UUID, ProfileNow] = field(default_factory=dict)
    queue_settings: Mapping[UUID, SettingNow] = field(default_factory=dict)
    boost_rules: Mapping[UUID, RuleNow] = field(default_factory=dict)
    connection_owners: Mapping[UUID, UUID] = field(default_factory=dict)
    audit_deletions: frozenset[tuple[UUID, datetime]] = frozenset()

    def with_rows(self, rows: RevertRows, *, keys: Iterable[Key] = ()) -> RevertSnapshot:
        """This snapshot as ``rows`` (what an earlier part of the same dry revert would have
        written) left it: its rows replaced, and the profiles of its keys and of ``keys``
        added (a profile brought back alive holds its key)."""
        if not rows:
            return self
        profiles = dict(self.profiles)
        wanted = {p.key for p in profiles.values()} | set(keys)
        for id_, profile in rows.profiles.items():
            if id_ in profiles or profile.key in wanted:
                profiles[id_] = profile

        def replaced(mine: Mapping[UUID, Row], theirs: Mapping[UUID, Row]) -> dict[UUID, Any]:
            return {id_: theirs.get(id_, row) for id_, row in mine.items()}

        return replace(
            self,
            profiles=profiles,
            queue_settings=replaced(self.queue_settings, rows.queue_settings),
            boost_rules=replaced(self.boost_rules, rows.boost_rules),
        )


def rows_to_load(changes: Iterable[RecordedChange]) -> RowsToLoad:
    """What a snapshot for these changes must hold (the loader reads it set-based)."""
    wanted = RowsToLoad()
    for change in changes:
        if change.created is not None:
            wanted.keys.add(change.created.key)
        elif change.object_id is not None and change.model in REVERTIBLE_FIELDS:
            wanted.ids[change.model].add(change.object_id)
            if change.model == PROFILE and _could_restore(change):
                wanted.restorable_profiles.add(change.object_id)
        for side in (change.before, change.after):
            wanted.ids[QUEUE_SETTING].update(side.queue_settings)
            if side.values.get("connection_id"):
                wanted.connections.add(side.values["connection_id"])
        if change.created is not None and change.created.connection_id:
            wanted.connections.add(change.created.connection_id)
    return wanted


@dataclass
class RowsToLoad:
    ids: dict[str, set[UUID]] = field(
        default_factory=lambda: {PROFILE: set(), QUEUE_SETTING: set(), BOOST_RULE: set()}
    )
    keys: set[Key] = field(default_factory=set)
    """Keys whose alive profiles are needed (besides those of the profiles in ``ids``)."""
    restorable_profiles: set[UUID] = field(default_factory=set)
    """Profiles a change could restore: their queue settings are needed."""
    connections: set[UUID] = field(default_factory=set)


def _could_restore(change: RecordedChange) -> bool:
    return "deleted_at" in change.before.values and change.before.values["deleted_at"] is None


# --- Decisions ------------------------------------------------------------------------------


class Result(Enum):
    PUT_BACK = "put_back"
    CONFLICT = "conflict"


@dataclass(frozen=True, slots=True)
class Decision:
    """What reverting one recorded change does, or why it does not: one finding of the revert.
    ``before``/``after`` are in the audit's JSON shapes, so a revert can be reverted in turn."""

    change: RecordedChange
    result: Result
    detail: str
    object_id: UUID | None = None
    """The object it acted on, when not the change's (a created profile)."""
    before: dict[str, Any] | None = None
    after: dict[str, Any] | None = None


@dataclass
class RevertRows:
    """The rows a revert changes, as it leaves them (whole rows, keyed by id)."""

    profiles: dict[UUID, ProfileNow] = field(default_factory=dict)
    queue_settings: dict[UUID, SettingNow] = field(default_factory=dict)
    boost_rules: dict[UUID, RuleNow] = field(default_factory=dict)

    def update(self, other: RevertRows) -> None:
        self.profiles.update(other.profiles)
        self.queue_settings.update(other.queue_settings)
        self.boost_rules.update(other.boost_rules)

    def __bool__(self) -> bool:
        return bool(self.profiles or self.queue_settings or self.boost_rules)


@dataclass(frozen=True)
class RevertPlan:
    decisions: tuple[Decision, ...]
    rows: RevertRows


def plan_revert(
    changes: Sequence[RecordedChange],
    snapshot: RevertSnapshot,
    *,
    run_started_at: datetime,
    now: datetime,
) -> RevertPlan:
    """Decide each change, newest first (``changes`` in that order), each against the rows as
    the later changes' reverts left them. ``run_started_at``: when the reverted run started (a
    profile older than that was not created by its sync job); ``now``: when the revert deletes.
    """
    state = _State(snapshot)
    decisions = tuple(_decide(change, state, run_started_at, now) for change in changes)
    return RevertPlan(decisions, state.changed)


class _State:
    """The snapshot's rows, changed decision by decision (the plan's working copy)."""

    def __init__(self, snapshot: RevertSnapshot) -> None:
        self.organization_id = snapshot.organization_id
        self.profiles = dict(snapshot.profiles)
        self.settings = dict(snapshot.queue_settings)
        self.rules = dict(snapshot.boost_rules)
        self.connection_owners = snapshot.connection_owners
        self.audit_deletions = snapshot.audit_deletions
        self.by_key: dict[Key, set[UUID]] = {}
        for profile in self.profiles.values():
            self.by_key.setdefault(profile.key, set()).add(profile.id)
        self.settings_of: dict[UUID, list[UUID]] = {}
        for setting in sorted(self.settings.values(), key=lambda s: s.id.int):
            self.settings_of.setdefault(setting.profile_id, []).append(setting.id)
        self.changed = RevertRows()

    def get(self, model: str, id_: UUID) -> Row | None:
        tables: dict[str, Mapping[UUID, Row]] = {
            PROFILE: self.profiles,
            QUEUE_SETTING: self.settings,
            BOOST_RULE: self.rules,
        }
        return tables[model].get(id_)

    def put(self, row: Row) -> None:
        if isinstance(row, ProfileNow):
            self.profiles[row.id] = self.changed.profiles[row.id] = row
        elif isinstance(row, SettingNow):
            self.settings[row.id] = self.changed.queue_settings[row.id] = row
        else:
            self.rules[row.id] = self.changed.boost_rules[row.id] = row

    def alive_profile(self, key: Key, *, other_than: UUID | None = None) -> UUID | None:
        for id_ in sorted(self.by_key.get(key, ()), key=lambda i: i.int):
            if id_ != other_than and self.profiles[id_].deleted_at is None:
                return id_
        return None

    def settings_to_restore(self, profile_id: UUID) -> dict[UUID, datetime]:
        """The profile's settings an audit deleted as stale, still as it left them."""
        restored = {}
        for setting_id in self.settings_of.get(profile_id, ()):
            deleted_at = self.settings[setting_id].deleted_at
            if deleted_at is not None and (setting_id, deleted_at) in self.audit_deletions:
                restored[setting_id] = deleted_at
        return restored


def _decide(
    change: RecordedChange, state: _State, run_started_at: datetime, now: datetime
) -> Decision:
    if change.unreadable:
        return Decision(
            change, Result.CONFLICT, f"cannot read what the run recorded: {change.unreadable}"
        )
    if change.created is not None:
        return _decide_created_profile(change, change.created, state, run_started_at, now)
    return _decide_change(change, state)


def _decide_change(change: RecordedChange, state: _State) -> Decision:
    """Put back ``before`` if the object is exactly as ``after`` says the run left it."""
    fields = REVERTIBLE_FIELDS.get(change.model)
    before, after = change.before.values, change.after.values
    if fields is None or change.object_id is None or not set(before) | set(after) <= set(fields):
        return Decision(
            change, Result.CONFLICT, f"cannot put back a change to {change.model} {sorted(after)}"
        )
    current = state.get(change.model, change.object_id)
    if current is None:
        return Decision(change, Result.CONFLICT, f"the {LABELS[change.model]} no longer exists")
    now_values = current._asdict()
    # Every fix acts on an alive object and leaves it alive unless its after says otherwise.
    left = {"deleted_at": None, **after}
    changed = [k for k, v in left.items() if not _same(now_values[k], v)]
    if changed:
        if before and all(_same(now_values[k], v) for k, v in before.items()):
            return Decision(change, Result.CONFLICT, "already as it was before the run")
        what = "; ".join(
            f"{k} is {_shown(now_values[k])}, the run left {_shown(left[k])}" for k in changed
        )
        return Decision(change, Result.CONFLICT, f"changed since the run: {what}")
    restores_profile = (
        isinstance(current, ProfileNow)
        and current.deleted_at is not None
        and _could_restore(change)
    )
    if isinstance(current, ProfileNow) and restores_profile:
        holder = state.alive_profile(current.key, other_than=current.id)
        if holder is not None:
            platform, external_id = current.key
            return Decision(
                change,
                Result.CONFLICT,
                f"another alive profile ({holder}) holds {platform}:{external_id}",
            )
    stays_on = now_values.get("connection_id")
    put_back, connection_stays = _without_foreign_connection(before, state, stays_on=stays_on)
    if connection_stays and not put_back:
        # A relink changed nothing but the connection: nothing of it can be put back.
        return Decision(change, Result.CONFLICT, f"not put back: {connection_stays}")

    # Only what is written back is recorded, so reverting this revert is exact too.
    recorded_before: dict[str, Any] = {k: as_json(now_values[k]) for k in put_back}
    recorded_after: dict[str, Any] = {k: as_json(v) for k, v in put_back.items()}
    state.put(current._replace(**put_back))
    detail = (
        f"put back {', '.join(put_back)}; {connection_stays}" if connection_stays else "put back"
    )
    detail += _put_back_settings(change, state, recorded_before, recorded_after)
    if restores_profile:
        _restore_settings(current.id, state, recorded_before, recorded_after)
    return Decision(change, Result.PUT_BACK, detail, before=recorded_before, after=recorded_after)


def _without_foreign_connection(
    before: Mapping[str, Any], state: _State, *, stays_on: UUID | None
) -> tuple[dict[str, Any], str]:
    """``before`` without a connection a revert may not point the profile at, and why the
    profile stays on ``stays_on`` (empty when nothing is left out).

    A connection of another organization stays out (DESIGN rule 5: a revert never points a
    profile at another organization's connection); so does one deleted since the run, which
    cannot be pointed at, and pointing at none would leave an alive profile without a
    connection, the very thing the audit fixes. The rest of the change (``deleted_at``) is
    still put back: refusing it whole would leave alive a profile the run had restored.
    """
    connection_id = before.get("connection_id")
    if not connection_id:
        return dict(before), ""
    owner = state.connection_owners.get(connection_id)
    if owner == state.organization_id:
        return dict(before), ""
    if owner is None:
        why = f"connection {connection_id} no longer exists"
    else:
        why = (
            f"connection {connection_id} belongs to another organization, and a revert "
            "never points a profile at another organization's connection"
        )
    rest = {k: v for k, v in before.items() if k != "connection_id"}
    return rest, f"{why}, so the profile stays on connection {stays_on}"


def _put_back_settings(
    change: RecordedChange, state: _State, before: dict[str, Any], after: dict[str, Any]
) -> str:
    """The queue settings a restore brought back with its profile go back with it; returns
    what to add to the decision's detail."""
    was = change.before.queue_settings
    put_back: dict[str, Any] = {}
    skipped = []
    for setting_id, deleted_at in change.after.queue_settings.items():
        current = state.settings.get(setting_id)
        if current is None or setting_id not in was or current.deleted_at != deleted_at:
            skipped.append(str(setting_id))
            continue
        put_back[str(setting_id)] = as_json(current.deleted_at)
        state.put(current._replace(deleted_at=was[setting_id]))
        after.setdefault("queue_settings", {})[str(setting_id)] = as_json(was[setting_id])
    if put_back:
        before["queue_settings"] = put_back
    if skipped:
        return f"; queue settings changed since, left alone: {', '.join(skipped)}"
    return ""


def _restore_settings(
    profile_id: UUID, state: _State, before: dict[str, Any], after: dict[str, Any]
) -> None:
    """A profile put back alive brings back the settings an audit deleted because it was dead
    (and no others), as the audit's own restore does."""
    settings = state.settings_to_restore(profile_id)
    if not settings:
        return
    before.setdefault("queue_settings", {}).update(
        {str(s): as_json(deleted_at) for s, deleted_at in settings.items()}
    )
    after.setdefault("queue_settings", {}).update(dict.fromkeys(map(str, settings)))
    for setting_id in settings:
        state.put(state.settings[setting_id]._replace(deleted_at=None))


def _decide_created_profile(
    change: RecordedChange,
    created: CreatedProfile,
    state: _State,
    run_started_at: datetime,
    now: datetime,
) -> Decision:
    """A missing profile: the sync job created it after the run. Soft delete it if it is still
    as the job left it (alive, on the connection the run chose)."""
    holder = state.alive_profile(created.key)
    if holder is None:
        return Decision(
            change,
            Result.CONFLICT,
            "no alive profile with this key: the sync job has not created it yet, "
            "or it was deleted since",
        )
    current = state.profiles[holder]
    if current.created_at < run_started_at:
        return Decision(change, Result.CONFLICT, f"the alive profile {holder} predates the run")
    if current.connection_id != created.connection_id:
        return Decision(
            change,
            Result.CONFLICT,
            f"changed since the run: profile {holder} is on connection "
            f"{current.connection_id}, the job created it on {created.connection_id}",
        )
    state.put(current._replace(deleted_at=now))
    return Decision(
        change,
        Result.PUT_BACK,
        "put back: soft-deleted the profile the sync job created",
        object_id=holder,
        before={"deleted_at": None},
        after={"deleted_at": as_json(now)},
    )


def _same(current: Any, expected: Any) -> bool:
    """Equal as typed values; JSON values exactly (``1`` is not ``true`` nor ``1.0``)."""
    if isinstance(current, Unreadable) or isinstance(expected, Unreadable):
        return False
    if isinstance(current, datetime | UUID) or current is None or expected is None:
        return bool(current == expected)
    try:
        return canonical_json(current) == canonical_json(expected)
    except (RecursionError, ValueError):
        return False


def _shown(value: Any) -> str:
    if isinstance(value, Unreadable):
        return f"unreadable JSON ({value.reason})"
    return repr(as_json(value))
