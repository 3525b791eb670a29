"""Reads for the audit: snapshots of whole organizations with a fixed number of queries
(DESIGN rule 8), whatever their number of profiles."""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast
from uuid import UUID

from django.db import connection, transaction
from django.db.models import Exists, Func, Max, OuterRef, Q, QuerySet, TextField
from django.db.models.functions import Cast, Length, Substr

from boosts.models import BoostRule
from connections.models import ConnectionAsset, PlatformConnection
from connections.platforms import ASSET_TYPE_PLATFORM, PLATFORM_ASSET_TYPE
from orgs.models import Organization
from profiles.models import (
    AuditFinding,
    AuditRun,
    ChangeMark,
    FindingAction,
    FindingOutcome,
    FindingType,
    SocialProfile,
    UnsettledOrganization,
)
from profiles.plan import (
    AssetRow,
    BoostRuleRow,
    ConnectionRow,
    Key,
    OrgSnapshot,
    ProfileRow,
    QueueSettingRow,
    Unreadable,
)
from queues.models import QueueSetting

Key3 = tuple[UUID, str, str]
"""(organization, platform, external_id): one key of one organization, what a sync job syncs."""

# The snapshot reads' rows, as both readers return them.
_ConnectionRead = tuple[UUID, UUID, str, datetime | None, datetime]
"""(id, organization, status, deleted_at, created_at)"""
_AssetRead = tuple[UUID, UUID, str, str, str, datetime]
"""AssetRow's fields."""
_ProfileRead = tuple[UUID, UUID, UUID | None, str, str, datetime | None]
"""(id, organization, connection, platform, external id, deleted_at)"""
_SettingRead = tuple[UUID, UUID, UUID]
"""(id, organization, profile)"""
_RuleRead = tuple[UUID, UUID, object]
"""(id, organization, profile_ids decoded)"""
_KeyedAssetRead = tuple[UUID, UUID, UUID, str, str, str, datetime]
"""(organization, *AssetRow)"""
_KeyedProfileRead = tuple[UUID, UUID, UUID | None, str, str, datetime | None]
"""(organization, *ProfileRow)"""

_ASSET_TYPES_OF: dict[str, tuple[str, ...]] = {
    platform: tuple(t for t, p in ASSET_TYPE_PLATFORM.items() if p == platform)
    for platform in set(ASSET_TYPE_PLATFORM.values())
}


def organization_id_chunks(
    *,
    chunk_size: int,
    first: UUID | None = None,
    end: UUID | None = None,
    after: UUID | None = None,
    among: Sequence[UUID] | None = None,
) -> Iterator[list[UUID]]:
    """Organization ids in [first, end) (None: unbounded), after ``after``, in chunks ordered
    by id (keyset pagination: one query a chunk, and organizations created meanwhile are still
    reached if their id sorts later). ``among``: only these (a change-driven run's shard); an
    organization deleted since it was marked is left out."""
    if among is not None:
        wanted = sorted(o for o in among if after is None or o > after)
        for start in range(0, len(wanted), chunk_size):
            part = wanted[start : start + chunk_size]
            existing = set(Organization.objects.filter(id__in=part).values_list("id", flat=True))
            if chunk := [o for o in part if o in existing]:
                yield chunk
        return
    last = after
    while True:
        ids = Organization.objects.order_by("id")
        if first is not None:
            ids = ids.filter(id__gte=first)
        if end is not None:
            ids = ids.filter(id__lt=end)
        if last is not None:
            ids = ids.filter(id__gt=last)
        chunk = list(ids.values_list("id", flat=True)[:chunk_size])
        if not chunk:
            return
        yield chunk
        last = chunk[-1]


def shard_starts(*, shard_size: int) -> tuple[list[UUID], int]:
    """The first organization id of every ``shard_size`` organizations by id, and how many
    organizations there are: one query (a window over the id index), whatever their number."""
    table = Organization._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT id, total FROM (SELECT id, row_number() OVER (ORDER BY id) AS position, "
            f"count(*) OVER () AS total FROM {table}) numbered "
            "WHERE (position - 1) %% %s = 0 ORDER BY id",
            [shard_size],
        )
        rows = cursor.fetchall()
    starts = [value if isinstance(value, UUID) else UUID(value) for value, _ in rows]
    return starts, rows[0][1] if rows else 0


def load_snapshots(
    organization_ids: Sequence[UUID], *, queue_settings: bool = True
) -> dict[UUID, OrgSnapshot]:
    """Snapshots of these organizations: five queries in all, each on an index, read as tuples
    (no model instances, no ``Meta.ordering`` sort), whatever their number of profiles.

    With ``queue_settings=False`` their queue settings are left to ``add_queue_settings``, in
    the same ``consistent_reads()``: a chunk reads only those the plan can find stale.
    """
    with consistent_reads():
        return _load_snapshots(organization_ids, queue_settings=queue_settings)


@contextmanager
def consistent_reads() -> Iterator[None]:
    """The reads inside see one consistent state: outside a transaction they run in one of
    their own (PostgreSQL: REPEATABLE READ, read only; SQLite: its transactions hold writers
    off), so a sync or revert committing between two of them is seen whole or not at all.
    Inside a transaction (a fix's re-read, under the organizations' locks) they run in that
    one."""
    if connection.in_atomic_block:
        yield
        return
    with transaction.atomic():
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        yield


def add_queue_settings(
    snapshots: Mapping[UUID, OrgSnapshot], *, profile_ids: Sequence[UUID]
) -> None:
    """Fill in the alive queue settings of these snapshots' organizations that belong to
    ``profile_ids`` (snapshots read with ``queue_settings=False``; one query)."""
    read = _snapshot_read()
    # Snapshots read with ``queue_settings=False`` each hold a list of their own to fill.
    settings = {
        org.int: cast("list[QueueSettingRow]", snapshot.queue_settings)
        for org, snapshot in snapshots.items()
    }
    for id_, org, profile_id in read.alive_queue_settings(list(snapshots), profile_ids):
        settings[org.int].append(QueueSettingRow(id_, profile_id))


def _load_snapshots(
    organization_ids: Sequence[UUID], *, queue_settings: bool
) -> dict[UUID, OrgSnapshot]:
    # Rows are grouped by their organization's ``id.int``: an int is hashed and compared in C,
    # a UUID in Python, and each row read is one lookup.
    orgs = [org.int for org in organization_ids]
    connections: dict[int, dict[UUID, ConnectionRow]] = {org: {} for org in orgs}
    assets: dict[int, list[AssetRow]] = {org: [] for org in orgs}
    profiles: dict[int, list[ProfileRow]] = {org: [] for org in orgs}
    settings: dict[int, list[QueueSettingRow]] = {org: [] for org in orgs}
    rules: dict[int, list[BoostRuleRow]] = {org: [] for org in orgs}
    read = _snapshot_read()

    organization_of: dict[int, int] = {}
    connection_ids = []
    connection_id: UUID | None  # an asset's connection, then a profile's (which may have none)
    for id_, org, status, deleted_at, created_at in read.connections(organization_ids):
        connections[org.int][id_] = ConnectionRow(id_, status, deleted_at, created_at)
        organization_of[id_.int] = org.int
        connection_ids.append(id_)
    # By connection id (the foreign key's index), not through a join on the organization.
    for id_, connection_id, asset_type, external_id, name, created_at in read.selected_assets(
        connection_ids
    ):
        assets[organization_of[connection_id.int]].append(
            AssetRow(id_, connection_id, asset_type, external_id, name, created_at)
        )
    for id_, org, connection_id, platform, external_id, deleted_at in read.profiles(
        organization_ids
    ):
        profiles[org.int].append(ProfileRow(id_, connection_id, platform, external_id, deleted_at))
    if queue_settings:
        for id_, org, profile_id in read.alive_queue_settings(organization_ids):
            settings[org.int].append(QueueSettingRow(id_, profile_id))
    for id_, org, profile_ids in read.alive_boost_rules(organization_ids):
        rules[org.int].append(BoostRuleRow(id_, profile_ids))

    return {
        org: OrgSnapshot(
            organization_id=org,
            connections=connections[org.int],
            selected_assets=assets[org.int],
            profiles=profiles[org.int],
            queue_settings=settings[org.int],
            boost_rules=rules[org.int],
        )
        for org in organization_ids
    }


def _snapshot_read() -> _SnapshotReadPostgreSQL | _SnapshotReadORM:
    return _SnapshotReadPostgreSQL() if connection.vendor == "postgresql" else _SnapshotReadORM()


class _SnapshotReadORM:
    """The snapshot's five reads through the ORM (SQLite: Django converts its stored values)."""

    def connections(self, orgs: Sequence[UUID]) -> Iterable[_ConnectionRead]:
        return (
            PlatformConnection.objects.filter(organization_id__in=orgs)
            .order_by()
            .values_list("id", "organization_id", "status", "deleted_at", "created_at")
        )

    def selected_assets(self, connection_ids: Sequence[UUID]) -> Iterable[_AssetRead]:
        if not connection_ids:
            return []
        return (
            ConnectionAsset.objects.filter(connection_id__in=connection_ids, is_selected=True)
            .order_by()
            .values_list("id", "connection_id", "asset_type", "external_id", "name", "created_at")
        )

    def profiles(self, orgs: Sequence[UUID]) -> Iterable[_ProfileRead]:
        return (
            SocialProfile.objects.filter(organization_id__in=orgs)
            .order_by()
            .values_list(
                "id", "organization_id", "connection_id", "platform", "external_id", "deleted_at"
            )
        )

    def alive_queue_settings(
        self, orgs: Sequence[UUID], profile_ids: Sequence[UUID] | None = None
    ) -> Iterable[_SettingRead]:
        settings = QueueSetting.objects.alive().filter(organization_id__in=orgs)
        if profile_ids is not None:
            settings = settings.filter(profile_id__in=profile_ids)
        return settings.order_by().values_list("id", "organization_id", "profile_id")

    def selected_assets_with_keys(self, keys: Collection[Key3]) -> Iterable[_KeyedAssetRead]:
        """(organization, *AssetRow) of the selected assets with these keys."""
        rows = ConnectionAsset.objects.filter(
            connection__organization_id__in={org for org, _, _ in keys},
            external_id__in={external_id for _, _, external_id in keys},
            is_selected=True,
        ).values_list(
            "connection__organization_id",
            "id",
            "connection_id",
            "asset_type",
            "external_id",
            "name",
            "created_at",
        )
        return [
            row
            for row in rows.order_by()
            if (row[0], ASSET_TYPE_PLATFORM.get(row[3]), row[4]) in keys
        ]

    def profiles_with_keys(self, keys: Collection[Key3]) -> Iterable[_KeyedProfileRead]:
        """(organization, *ProfileRow) of the profiles, alive or dead, with these keys."""
        rows = SocialProfile.objects.filter(
            organization_id__in={org for org, _, _ in keys},
            external_id__in={external_id for _, _, external_id in keys},
        ).values_list(
            "organization_id", "id", "connection_id", "platform", "external_id", "deleted_at"
        )
        return [row for row in rows.order_by() if (row[0], row[3], row[4]) in keys]

    def alive_boost_rules(self, orgs: Sequence[UUID]) -> list[_RuleRead]:
        # As text, decoded row by row (``decode_json``): one rule's unreadable JSON must not
        # stop the read of its chunk (rule 7).
        return [
            (id_, org, decode_json(text))
            for id_, org, text in BoostRule.objects.alive()
            .filter(organization_id__in=orgs)
            .order_by()
            .values_list("id", "organization_id", Cast("profile_ids", TextField()))
        ]


def binary_cursor() -> Any:
    """PostgreSQL: a cursor that binds its parameters on the server and reads in binary with
    psycopg's own (C) loaders. Django's own cursors bind on the client and read text, through a
    time stamp loader of its own in Python (5 us a value). This one is wrapped as Django wraps
    its own, so query logging and execute wrappers still see it."""
    import psycopg
    from psycopg.types.datetime import TimestamptzBinaryLoader

    connection.ensure_connection()
    raw = psycopg.Cursor(connection.connection)
    raw.format = psycopg.pq.Format.BINARY
    # Django's loader only re-attaches the time zone; the session is in UTC already.
    raw.adapters.register_loader("timestamptz", TimestamptzBinaryLoader)
    # A private method of Django's PostgreSQL backend, absent from the stubs' base class.
    return connection._prepare_cursor(raw)  # type: ignore[attr-defined]


class _SnapshotReadPostgreSQL:
    """The same reads as plain SQL with one array parameter each (``= ANY(%b)``), bound on the
    server (the arrays dumped in binary: seven times faster than text for a list of UUIDs) and
    fetched at once in binary, with psycopg's own loaders: three times faster than
    the ORM's ``IN (...)`` and its row-by-row iteration, which cost more than the queries
    themselves, and a fifth faster again than text results (bench/README.md)."""

    def __init__(self) -> None:
        self._cursor = binary_cursor()

    def _fetch(
        self, sql: str, ids: Collection[UUID], *more_ids: Collection[UUID]
    ) -> list[tuple[Any, ...]]:
        if not ids:
            return []
        self._cursor.execute(sql, [list(ids), *(list(more) for more in more_ids)])
        rows: list[tuple[Any, ...]] = self._cursor.fetchall()
        return rows

    def connections(self, orgs: Sequence[UUID]) -> Iterable[_ConnectionRead]:
        return self._fetch(
            f"SELECT id, organization_id, status, deleted_at, created_at "
            f"FROM {PlatformConnection._meta.db_table} WHERE organization_id = ANY(%b)",
            orgs,
        )

    def selected_assets(self, connection_ids: Sequence[UUID]) -> Iterable[_AssetRead]:
        return self._fetch(
            f"SELECT id, connection_id, asset_type, external_id, name, created_at "
            f"FROM {ConnectionAsset._meta.db_table} WHERE connection_id = ANY(%b) AND is_selected",
            connection_ids,
        )

    def profiles(self, orgs: Sequence[UUID]) -> Iterable[_ProfileRead]:
        return self._fetch(
            f"SELECT id, organization_id, connection_id, platform, external_id, deleted_at "
            f"FROM {SocialProfile._meta.db_table} WHERE organization_id = ANY(%b)",
            orgs,
        )

    def alive_queue_settings(
        self, orgs: Sequence[UUID], profile_ids: Sequence[UUID] | None = None
    ) -> Iterable[_SettingRead]:
        table = QueueSetting._meta.db_table
        if profile_ids is None:
            return self._fetch(
                f"SELECT id, organization_id, profile_id FROM {table} "
                "WHERE organization_id = ANY(%b) AND deleted_at IS NULL",
                orgs,
            )
        # By profile (the foreign key's index); the organization is the plan's to judge.
        return self._fetch(
            f"SELECT id, organization_id, profile_id FROM {table} "
            "WHERE profile_id = ANY(%b) AND deleted_at IS NULL AND organization_id = ANY(%b)",
            profile_ids,
            orgs,
        )

    def selected_assets_with_keys(self, keys: Collection[Key3]) -> Iterable[_KeyedAssetRead]:
        # Joined on the keys (the asset key index), never reading an organization's other assets.
        keys = [(org, t, e) for org, p, e in keys for t in _ASSET_TYPES_OF.get(p, ())]
        if not keys:
            return []
        orgs, asset_types, external_ids = (list(column) for column in zip(*keys, strict=True))
        self._cursor.execute(
            f"SELECT c.organization_id, a.id, a.connection_id, a.asset_type, a.external_id, "
            f"a.name, a.created_at FROM {ConnectionAsset._meta.db_table} a "
            f"JOIN {PlatformConnection._meta.db_table} c ON c.id = a.connection_id "
            "JOIN unnest(%b::uuid[], %b::text[], %b::text[]) AS k(org, asset_type, external_id) "
            "ON a.asset_type = k.asset_type AND a.external_id = k.external_id "
            "AND c.organization_id = k.org WHERE a.is_selected",
            [orgs, asset_types, external_ids],
        )
        assets: list[_KeyedAssetRead] = self._cursor.fetchall()
        return assets

    def profiles_with_keys(self, keys: Collection[Key3]) -> Iterable[_KeyedProfileRead]:
        if not keys:
            return []
        orgs, platforms, external_ids = (list(column) for column in zip(*keys, strict=True))
        self._cursor.execute(
            f"SELECT p.organization_id, p.id, p.connection_id, p.platform, p.external_id, "
            f"p.deleted_at FROM {SocialProfile._meta.db_table} p "
            "JOIN unnest(%b::uuid[], %b::text[], %b::text[]) AS k(org, platform, external_id) "
            "ON p.organization_id = k.org AND p.platform = k.platform "
            "AND p.external_id = k.external_id",
            [orgs, platforms, external_ids],
        )
        profiles: list[_KeyedProfileRead] = self._cursor.fetchall()
        return profiles

    def alive_boost_rules(self, orgs: Sequence[UUID]) -> list[_RuleRead]:
        return [
            (id_, org, decode_json(text))
            for id_, org, text in self._fetch(
                f"SELECT id, organization_id, profile_ids::text FROM {BoostRule._meta.db_table} "
                "WHERE organization_id = ANY(%b) AND deleted_at IS NULL",
                orgs,
            )
        ]


# Deeper than this, a stored JSON value is unreadable whatever the Python: 3.11 stops decoding
# at its recursion limit, 3.13 decodes thousands of levels and then cannot write them back.
MAX_JSON_DEPTH = 100


def decode_json(text: str | None) -> object:
    """A stored JSON value, or ``Unreadable`` when it cannot be worked with: nested deeper than
    ``MAX_JSON_DEPTH``, or not JSON at all."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except (RecursionError, ValueError) as exc:
        return Unreadable(type(exc).__name__)
    if _deeper_than(value, MAX_JSON_DEPTH):
        return Unreadable(f"nested deeper than {MAX_JSON_DEPTH} levels")
    return value


def _deeper_than(value: object, limit: int) -> bool:
    """Whether lists and objects nest more than ``limit`` levels (iteratively: no recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, list | dict):
            if depth > limit:
                return True
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children if isinstance(child, list | dict))
    return False


def load_keys_snapshots(keys: Collection[tuple[UUID, str, str]]) -> dict[UUID, OrgSnapshot]:
    """What the sync of a batch of keys (organization, platform, external id) reads, per
    organization: its connections, and its selected assets and profiles with those keys. Three
    queries whatever the number of keys (DESIGN "Speed on one core"); the organizations' other
    assets and profiles are not read."""
    wanted = set(keys)
    organization_ids = sorted({org for org, _, _ in wanted}, key=lambda org: org.int)
    read = _snapshot_read()
    connections: dict[UUID, dict[UUID, ConnectionRow]] = {org: {} for org in organization_ids}
    for id_, org, status, deleted_at, created_at in read.connections(organization_ids):
        connections[org][id_] = ConnectionRow(id_, status, deleted_at, created_at)
    assets: dict[UUID, list[AssetRow]] = {org: [] for org in organization_ids}
    for asset in read.selected_assets_with_keys(wanted):
        assets[asset[0]].append(AssetRow(*asset[1:]))
    profiles: dict[UUID, list[ProfileRow]] = {org: [] for org in organization_ids}
    for profile in read.profiles_with_keys(wanted):
        profiles[profile[0]].append(ProfileRow(*profile[1:]))
    return {
        org: OrgSnapshot(
            organization_id=org,
            connections=connections[org],
            selected_assets=assets[org],
            profiles=profiles[org],
        )
        for org in organization_ids
    }


def sent_findings(*, organization_ids: Collection[UUID]) -> list[tuple[UUID, UUID, str, Key3]]:
    """The findings of these organizations whose sync job has not confirmed yet (outcome
    ``sent``), as (finding id, run id, type, (organization, platform, external id)): one
    lookup on a partial index that holds only such findings."""
    if not organization_ids:
        return []
    return [
        (id_, run_id, type_, (org, platform, external_id))
        for id_, run_id, type_, org, platform, external_id in AuditFinding.objects.filter(
            outcome=FindingOutcome.SENT, organization_id__in=list(organization_ids)
        )
        .order_by()
        .values_list("id", "run_id", "type", "organization_id", "platform", "external_id")
    ]


def unconfirmed_sync_keys(*, quiet_since: datetime) -> list[tuple[UUID, Key3]]:
    """(run id, key) of the findings still ``sent`` whose run has made no progress since
    ``quiet_since`` (finished, or stopped writing): their sync job should have run by then."""
    quiet_runs = AuditRun.objects.filter(
        Q(finished_at__lt=quiet_since)
        | Q(finished_at__isnull=True, last_progress_at__lt=quiet_since)
        | Q(finished_at__isnull=True, last_progress_at__isnull=True, started_at__lt=quiet_since)
    )
    return [
        (run_id, (org, platform, external_id))
        for run_id, org, platform, external_id in AuditFinding.objects.filter(
            outcome=FindingOutcome.SENT, run_id__in=quiet_runs.values("id")
        )
        .exclude(organization_id__isnull=True)
        .order_by("run_id", "organization_id")
        .values_list("run_id", "organization_id", "platform", "external_id")
    ]


def alive_profile_keys(keys: Collection[Key3]) -> set[Key3]:
    """Those of these keys (organization, platform, external id) that have an alive profile."""
    if not keys:
        return set()
    wanted = set(keys)
    return {
        key
        for key in SocialProfile.objects.alive()
        .filter(
            organization_id__in={org for org, _, _ in wanted},
            external_id__in={external_id for _, _, external_id in wanted},
        )
        .order_by()
        .values_list("organization_id", "platform", "external_id")
        if key in wanted
    }


def load_key_snapshot(*, organization_id: UUID, platform: str, external_id: str) -> OrgSnapshot:
    """What the sync of one key reads: O's connections, and O's selected assets and profiles
    with that key (three queries)."""
    connections = {
        id_: ConnectionRow(id_, status, deleted_at, created_at)
        for id_, status, deleted_at, created_at in PlatformConnection.objects.filter(
            organization_id=organization_id
        ).values_list("id", "status", "deleted_at", "created_at")
    }
    asset_type = PLATFORM_ASSET_TYPE.get(platform)
    assets = (
        [
            AssetRow(*row)
            for row in ConnectionAsset.objects.filter(
                connection__organization_id=organization_id,
                is_selected=True,
                asset_type=asset_type,
                external_id=external_id,
            ).values_list("id", "connection_id", "asset_type", "external_id", "name", "created_at")
        ]
        if asset_type
        else []
    )
    profiles = [
        ProfileRow(*row)
        for row in SocialProfile.objects.filter(
            organization_id=organization_id, platform=platform, external_id=external_id
        ).values_list("id", "connection_id", "platform", "external_id", "deleted_at")
    ]
    return OrgSnapshot(
        organization_id=organization_id,
        connections=connections,
        selected_assets=assets,
        profiles=profiles,
    )


# --- Reverts and the admin: reads of recorded runs ------------------------------------------


def fixed_findings_newest_first(*, run_id: UUID, page_size: int) -> Iterator[AuditFinding]:
    """A run's fixed findings in reverse ``seq`` order (the order a revert undoes them), one
    page of ``page_size`` at a time (keyset on ``seq``: no page costs more than the first).
    Missing profiles whose sync job has not confirmed yet (``sent``) come too: a revert says
    what became of them."""
    last: int | None = None
    while True:
        page = AuditFinding.objects.filter(
            run_id=run_id, outcome__in=(FindingOutcome.FIXED, FindingOutcome.SENT)
        )
        if last is not None:
            page = page.filter(seq__lt=last)
        rows = list(page.order_by("-seq").only(*REVERT_FINDING_FIELDS)[:page_size])
        yield from rows
        if len(rows) < page_size:
            return
        last = rows[-1].seq


# What a finding says it changed, where: recorded (recording.FINDING_COLUMNS), read back by a
# revert, and printed by the command.
FINDING_CHANGE_FIELDS = (
    "organization_id",
    "type",
    "action",
    "model",
    "object_id",
    "platform",
    "external_id",
    "before",
    "after",
)
REVERT_FINDING_FIELDS = ("id", "seq", *FINDING_CHANGE_FIELDS, "drift_id")


@dataclass(frozen=True, slots=True)
class ProfileState:
    id: UUID
    platform: str
    external_id: str
    connection_id: UUID | None
    deleted_at: datetime | None
    created_at: datetime


def profile_states(
    *, organization_id: UUID, profile_ids: Collection[UUID] = (), keys: Collection[Key] = ()
) -> list[ProfileState]:
    """The organization's profiles with these ids, and its *alive* profiles with these keys."""
    fields = ("id", "platform", "external_id", "connection_id", "deleted_at", "created_at")
    profiles = SocialProfile.objects.filter(organization_id=organization_id)
    rows: list[tuple[UUID, str, str, UUID | None, datetime | None, datetime]] = []
    if profile_ids:
        rows += profiles.filter(id__in=list(profile_ids)).values_list(*fields)
    if keys:
        wanted = set(keys)
        rows += (
            row
            for row in profiles.alive()
            .filter(external_id__in={external_id for _, external_id in wanted})
            .values_list(*fields)
            if (row[1], row[2]) in wanted
        )
    return [ProfileState(*row) for row in rows]


def queue_setting_states(
    *, organization_id: UUID, setting_ids: Collection[UUID]
) -> dict[UUID, datetime | None]:
    """{setting id: deleted_at} for the organization's queue settings with these ids."""
    if not setting_ids:
        return {}
    return dict(
        QueueSetting.objects.filter(
            organization_id=organization_id, id__in=list(setting_ids)
        ).values_list("id", "deleted_at")
    )


def boost_rule_states(
    *, organization_id: UUID, rule_ids: Collection[UUID]
) -> dict[UUID, tuple[datetime | None, object]]:
    """{rule id: (deleted_at, profile_ids as stored)} for the organization's boost rules."""
    if not rule_ids:
        return {}
    return {
        id_: (deleted_at, profile_ids)
        for id_, deleted_at, profile_ids in BoostRule.objects.filter(
            organization_id=organization_id, id__in=list(rule_ids)
        ).values_list("id", "deleted_at", "profile_ids")
    }


def connection_organizations(*, connection_ids: Collection[UUID]) -> dict[UUID, UUID]:
    """{connection id: its organization} for those of these connections that still exist.

    A revert asks about the connections its findings name; another organization's is never
    written back (rule 5), and its owner is read only to say so instead of calling it gone.
    """
    if not connection_ids:
        return {}
    return dict(
        PlatformConnection.objects.filter(id__in=list(connection_ids)).values_list(
            "id", "organization_id"
        )
    )


def run_findings_page(
    *, run_id: UUID, page: int, per_page: int, value_chars: int | None = None
) -> tuple[list[AuditFinding], int]:
    """One page of a run's findings, in ``seq`` order, and the number of pages.

    With ``value_chars``, before/after are not loaded: each row has ``before_head`` and
    ``after_head`` (the value's JSON text, its first ``value_chars`` characters, cut by the
    database) and ``before_chars``/``after_chars`` (its whole length): a value of 20 MB costs
    the page a few kilobytes.

    A run's ``seq`` runs 1..n without gaps (``RunRecorder``), so page p is the ``seq`` range
    ((p-1) x per_page, p x per_page]: two index lookups whatever the page and the run's size, where
    OFFSET would read every earlier row.
    """
    last_seq = AuditFinding.objects.filter(run_id=run_id).aggregate(last=Max("seq"))["last"] or 0
    pages = max(1, -(-last_seq // per_page))
    page = min(max(page, 1), pages)
    rows = (
        AuditFinding.objects.filter(
            run_id=run_id, seq__gt=(page - 1) * per_page, seq__lte=page * per_page
        )
        .select_related("organization")
        .only(
            *REVERT_FINDING_FIELDS,
            "organization__name",
            "outcome",
            "detail",
            "drift_id",
            "recurring",
            "writers",
        )
        .order_by("seq")
    )
    if value_chars is not None:
        cut: dict[str, Func] = {}
        for side in ("before", "after"):
            text = Cast(side, TextField())
            cut[f"{side}_head"] = Substr(text, 1, value_chars)
            cut[f"{side}_chars"] = Length(text)
        rows = rows.defer("before", "after").annotate(**cut)
    return list(rows), pages


def prunable_runs(*, cutoff: datetime) -> QuerySet[AuditRun]:
    """Runs started before ``cutoff`` that are not the latest of their scope (one organization,
    or all of them): a later run of the same scope exists."""
    later_same_org = AuditRun.objects.filter(
        organization=OuterRef("organization"), started_at__gt=OuterRef("started_at")
    )
    later_all_orgs = AuditRun.objects.filter(
        organization__isnull=True, started_at__gt=OuterRef("started_at")
    )
    return (
        AuditRun.objects.alias(later_org=Exists(later_same_org), later_all=Exists(later_all_orgs))
        .filter(started_at__lt=cutoff)
        .filter(
            Q(organization__isnull=False, later_org=True)
            | Q(organization__isnull=True, later_all=True)
        )
    )


def stale_queue_setting_deletions(
    *, run_ids: Collection[UUID], after_finding: UUID | None, limit: int
) -> list[tuple[UUID, UUID | None, object, UUID]]:
    """What these runs' fixed ``stale_queue_setting`` findings soft-deleted, one page of at
    most ``limit`` (keyset on the finding id): (finding id, queue setting id, the finding's
    ``after``, run id), for settings that still exist."""
    findings = AuditFinding.objects.filter(
        run_id__in=list(run_ids),
        type=FindingType.STALE_QUEUE_SETTING,
        action=FindingAction.SOFT_DELETE,
        outcome=FindingOutcome.FIXED,
    ).filter(Exists(QueueSetting.objects.filter(id=OuterRef("object_id"))))
    if after_finding is not None:
        findings = findings.filter(id__gt=after_finding)
    return list(findings.order_by("id").values_list("id", "object_id", "after", "run_id")[:limit])


# --- Change-driven runs: what is marked, what is unsettled ---------------------------------------


def change_marks(organization_ids: Sequence[UUID] | None = None) -> dict[UUID, int]:
    """{organization: version} of the change marks (of these organizations; None: all)."""
    marks = ChangeMark.objects.order_by()
    if organization_ids is not None:
        marks = marks.filter(organization_id__in=list(organization_ids))
    return dict(marks.values_list("organization_id", "version"))


def change_marks_with_writers(
    organization_ids: Sequence[UUID],
) -> dict[UUID, tuple[int, list[dict[str, Any]]]]:
    """{organization: (version, writers)} of these organizations' change marks (one query)."""
    return {
        org: (version, list(writers or []))
        for org, version, writers in ChangeMark.objects.order_by()
        .filter(organization_id__in=list(organization_ids))
        .values_list("organization_id", "version", "writers")
    }


def oldest_change_mark() -> datetime | None:
    return (
        ChangeMark.objects.order_by("first_marked_at")
        .values_list("first_marked_at", flat=True)
        .first()
    )


def unsettled_organizations(organization_ids: Sequence[UUID] | None = None) -> set[UUID]:
    rows = UnsettledOrganization.objects.order_by()
    if organization_ids is not None:
        rows = rows.filter(organization_id__in=list(organization_ids))
    return set(rows.values_list("organization_id", flat=True))
