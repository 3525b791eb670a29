"""The profile sync unit: bring one key of one organization in step with its selection.

Called by the real-time selection change (``connections.services``) and, through the
``profiles.sync_profile`` task, by the audit for missing profiles. Idempotent, and safe to run
twice at once: it holds the organization's lock and decides from what it reads under it.
"""

from __future__ import annotations

from dataclasses import dataclass
from uuid import UUID

from django.db import transaction
from django.utils import timezone

from profiles.models import FindingType, SocialProfile
from profiles.plan import Finding, find_profile_findings
from profiles.selectors import load_key_snapshot
from profiles.services.changes import Change, apply_profile_findings, planned_change
from profiles.services.organization_lock import lock_organization

SYNC_ACTIONS = {
    FindingType.ORPHANED: "deleted",
    FindingType.DESELECTED: "deleted",
    FindingType.RELINK: "relinked",
    FindingType.RESTORE: "restored",
    FindingType.MISSING: "created",
}


@dataclass(frozen=True)
class SyncResult:
    action: str
    """created, restored, relinked, deleted or unchanged."""
    profile_id: UUID | None


def sync_profile(*, organization_id: UUID, platform: str, external_id: str) -> SyncResult:
    """Create or restore the key's profile on its backing connection, relink it there, or soft
    delete it when the key is selected nowhere in the organization."""
    with transaction.atomic():
        lock_organization(organization_id)
        snapshot = load_key_snapshot(
            organization_id=organization_id, platform=platform, external_id=external_id
        )
        findings = find_profile_findings(snapshot)
        if not findings:
            alive = next((p.id for p in snapshot.profiles if p.alive), None)
            return SyncResult("unchanged", alive)
        created: list[UUID] = []

        def create_profile(finding: Finding) -> Change:
            profile = SocialProfile.objects.create(
                organization_id=organization_id,
                connection_id=finding.target_connection_id,
                platform=platform,
                external_id=external_id,
                name=finding.name,
            )
            created.append(profile.id)
            return planned_change(finding, now=profile.created_at)

        apply_profile_findings(findings, now=timezone.now(), on_missing=create_profile)
    # One key has at most one alive profile, so one decision at most changes it.
    finding = findings[0]
    return SyncResult(SYNC_ACTIONS[finding.type], created[0] if created else finding.object_id)
