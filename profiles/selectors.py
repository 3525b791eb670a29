"""Reads for the audit: snapshots of whole organizations with a fixed number of queries
(DESIGN rule 8), whatever their number of profiles."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from uuid import UUID

from boosts.models import BoostRule
from connections.models import ConnectionAsset, PlatformConnection
from connections.platforms import PLATFORM_ASSET_TYPE
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


def organization_id_chunks(*, chunk_size: int) -> Iterator[list[UUID]]:
    """Every organization id, in chunks ordered by id (keyset pagination: one query a chunk,
    and organizations created meanwhile are still reached if their id sorts later)."""
    last: UUID | None = None
    while True:
        ids = Organization.objects.order_by("id")
        if last is not None:
            ids = ids.filter(id__gt=last)
        chunk = list(ids.values_list("id", flat=True)[:chunk_size])
        if not chunk:
            return
        yield chunk
        last = chunk[-1]


def load_snapshots(organization_ids: Sequence[UUID]) -> dict[UUID, OrgSnapshot]:
    """Snapshots of these organizations: five queries in all."""
    connections: dict[UUID, dict[UUID, ConnectionRow]] = {org: {} for org in organization_ids}
    assets: dict[UUID, list[AssetRow]] = {org: [] for org in organization_ids}
    profiles: dict[UUID, list[ProfileRow]] = {org: [] for org in organization_ids}
    settings: dict[UUID, list[QueueSettingRow]] = {org: [] for org in organization_ids}
    rules: dict[UUID, list[BoostRuleRow]] = {org: [] for org in organization_ids}

    for id_, org, status, deleted_at, created_at in PlatformConnection.objects.filter(
        organization_id__in=organization_ids
    ).values_list("id", "organization_id", "status", "deleted_at", "created_at"):
        connections[org][id_] = ConnectionRow(id_, status, deleted_at, created_at)

    for (
        id_,
        org,
        connection_id,
        asset_type,
        external_id,
        name,
        created_at,
    ) in ConnectionAsset.objects.filter(
        connection__organization_id__in=organization_ids, is_selected=True
    ).values_list(
        "id",
        "connection__organization_id",
        "connection_id",
        "asset_type",
        "external_id",
        "name",
        "created_at",
    ):
        assets[org].append(AssetRow(id_, connection_id, asset_type, external_id, name, created_at))

    for id_, org, connection_id, platform, external_id, deleted_at in SocialProfile.objects.filter(
        organization_id__in=organization_ids
    ).values_list(
        "id", "organization_id", "connection_id", "platform", "external_id", "deleted_at"
    ):
        profiles[org].append(ProfileRow(id_, connection_id, platform, external_id, deleted_at))

    for id_, org, profile_id in (
        QueueSetting.objects.alive()
        .filter(organization_id__in=organization_ids)
        .values_list("id", "organization_id", "profile_id")
    ):
        settings[org].append(QueueSettingRow(id_, profile_id))

    for id_, org, profile_ids in (
        BoostRule.objects.alive()
        .filter(organization_id__in=organization_ids)
        .values_list("id", "organization_id", "profile_ids")
    ):
        rules[org].append(BoostRuleRow(id_, profile_ids))

    return {
        org: OrgSnapshot(
            organization_id=org,
            connections=connections[org],
            selected_assets=assets[org],
            profiles=profiles[org],
            queue_settings=settings[org],
            boost_rules=rules[org],
        )
        for org in organization_ids
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
