"""Writes of the connections app: the real-time change of a connection's asset selection."""

from __future__ import annotations

from collections.abc import Iterable
from uuid import UUID

from connections.models import ConnectionAsset, PlatformConnection
from connections.platforms import ASSET_TYPE_PLATFORM
from profiles.change_marks import REALTIME_SYNC, writer
from profiles.services.organization_lock import lock_organization
from profiles.services.sync import SyncResult, sync_profiles


def set_asset_selection(
    *, connection: PlatformConnection, asset_ids: Iterable[UUID], selected: bool
) -> dict[tuple[str, str], SyncResult]:
    """Select (or deselect) assets of a connection, then sync the affected keys' profiles at
    once, in the same transaction, as the product's real-time sync does."""
    asset_ids = list(asset_ids)
    with writer(REALTIME_SYNC):  # the transaction, its writes tagged
        lock_organization(connection.organization_id)
        assets = list(
            ConnectionAsset.objects.filter(connection=connection, id__in=asset_ids).values_list(
                "asset_type", "external_id"
            )
        )
        ConnectionAsset.objects.filter(connection=connection, id__in=asset_ids).update(
            is_selected=selected
        )
        keys = sorted(
            {(ASSET_TYPE_PLATFORM[t], ext) for t, ext in assets if t in ASSET_TYPE_PLATFORM}
        )
        # One batch for all the keys: the same set-based sync as the audit's sync job.
        results = sync_profiles(
            keys=[(connection.organization_id, platform, ext) for platform, ext in keys]
        )
        return {(key.platform, key.external_id): result for key, result in results.items()}
