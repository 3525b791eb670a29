"""Soft delete and restore of profiles, and the question every sync asks: is this key selected?"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import overload
from uuid import UUID

from profiles.models import (
    AuditFinding,
    FindingAction,
    FindingOutcome,
    FindingType,
    SocialProfile,
    StaleQueueSettingDeletion,
)
from profiles.plan import selected_keys
from profiles.selectors import load_key_snapshot
from profiles.services.bulk import update_rows
from queues.models import QueueSetting


@overload
def to_json(value: datetime | UUID) -> str: ...
@overload
def to_json(value: object) -> object: ...
def to_json(value: object) -> object:
    """Datetimes and UUIDs as the strings AuditFinding.before/after hold."""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, UUID):
        return str(value)
    return value


class ProfileSoftDeleteService:
    def is_asset_selected_in_any_connection(
        self, *, organization_id: UUID, platform: str, external_id: str
    ) -> bool:
        """Whether some asset with this key is selected on a live connection of the organization."""
        snapshot = load_key_snapshot(
            organization_id=organization_id, platform=platform, external_id=external_id
        )
        return (platform, external_id) in selected_keys(snapshot)

    def soft_delete_profiles(self, *, profile_ids: Iterable[UUID], now: datetime) -> int:
        return SocialProfile.objects.alive().filter(id__in=list(profile_ids)).update(deleted_at=now)

    def restore_profiles(
        self, *, connection_by_profile: Mapping[UUID, UUID | None]
    ) -> dict[UUID, dict[str, str]]:
        """Restore these dead profiles onto the given connections, with the queue settings an
        audit soft-deleted because the profile was dead (and no others).

        Returns, per profile, the queue settings brought back: {setting id: its deleted_at}.
        """
        if not connection_by_profile:
            return {}
        # One statement for any number of profiles (a chunk of organizations restores many).
        update_rows(
            SocialProfile,
            ["deleted_at", "connection_id"],
            [
                (profile_id, None, connection)
                for profile_id, connection in connection_by_profile.items()
            ],
        )
        return self.restore_queue_settings(profile_ids=list(connection_by_profile))

    def restore_queue_settings(self, *, profile_ids: list[UUID]) -> dict[UUID, dict[str, str]]:
        """Bring back the queue settings of these profiles that an audit soft-deleted as stale
        and that nobody has touched since (their ``deleted_at`` is still the audit's)."""
        restored = self.queue_settings_to_restore(profile_ids=profile_ids)
        setting_ids = [UUID(s) for settings in restored.values() for s in settings]
        if setting_ids:
            QueueSetting.objects.filter(id__in=setting_ids).update(deleted_at=None)
        return restored

    def queue_settings_to_restore(self, *, profile_ids: list[UUID]) -> dict[UUID, dict[str, str]]:
        """Read only: the dead queue settings ``restore_queue_settings`` would bring back with
        these profiles, per profile {setting id: its deleted_at} (a revert's dry run asks)."""
        dead_settings = list(
            QueueSetting.objects.dead()
            .filter(profile_id__in=profile_ids)
            .values_list("id", "profile_id", "deleted_at")
        )
        if not dead_settings:
            return {}
        setting_ids = [s[0] for s in dead_settings]
        deleted_by_audit = set(
            (object_id, (after or {}).get("deleted_at"))
            for object_id, after in AuditFinding.objects.filter(
                type=FindingType.STALE_QUEUE_SETTING,
                action=FindingAction.SOFT_DELETE,
                outcome=FindingOutcome.FIXED,
                object_id__in=setting_ids,
            ).values_list("object_id", "after")
        )
        # Retention prunes old findings but keeps these deletions apart: however old, they
        # still come back with their profile.
        deleted_by_audit.update(
            (setting_id, to_json(deleted_at))
            for setting_id, deleted_at in StaleQueueSettingDeletion.objects.filter(
                queue_setting_id__in=setting_ids
            ).values_list("queue_setting_id", "deleted_at")
        )
        restored: dict[UUID, dict[str, str]] = {}
        for setting_id, profile_id, deleted_at in dead_settings:
            assert deleted_at is not None  # a dead setting's deletion time
            if (setting_id, to_json(deleted_at)) in deleted_by_audit:
                restored.setdefault(profile_id, {})[str(setting_id)] = to_json(deleted_at)
        return restored
