"""Celery tasks of the profiles app: thin wrappers over the services."""

from __future__ import annotations

from uuid import UUID

from celery import shared_task

from audit_project.log_config import audit_logger
from profiles.services.sync import sync_profile


@shared_task(name="profiles.sync_profile", acks_late=True)
def sync_profile_task(organization_id: str, platform: str, external_id: str) -> dict[str, str]:
    """The profile sync job the audit dispatches for a missing profile (idempotent)."""
    result = sync_profile(
        organization_id=UUID(organization_id), platform=platform, external_id=external_id
    )
    audit_logger().info(
        "profile_sync.completed",
        org_id=organization_id,
        platform=platform,
        external_id=external_id,
        action=result.action,
        profile_id=str(result.profile_id) if result.profile_id else None,
    )
    return {"action": result.action, "profile_id": str(result.profile_id or "")}
