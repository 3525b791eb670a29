"""An organization's OAuth connections to providers and the assets each can publish to."""

import uuid

from django.db import models
from django.utils import timezone

from audit_project.soft_delete import SoftDeleteModel
from connections.platforms import ASSET_TYPE_PLATFORM


class Provider(models.TextChoices):
    META = "meta", "Meta"
    GOOGLE = "google", "Google"
    LINKEDIN = "linkedin", "LinkedIn"
    TWITTER = "twitter", "X (Twitter)"
    TIKTOK = "tiktok", "TikTok"
    SNAPCHAT = "snapchat", "Snapchat"


class ConnectionStatus(models.TextChoices):
    ACTIVE = "active", "Active"
    INACTIVE = "inactive", "Inactive"
    EXPIRED = "expired", "Expired"
    REVOKED = "revoked", "Revoked"


class PlatformConnection(SoftDeleteModel):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    organization = models.ForeignKey(
        "orgs.Organization", on_delete=models.CASCADE, related_name="connections"
    )
    provider = models.CharField(max_length=20, choices=Provider.choices)
    status = models.CharField(
        max_length=20, choices=ConnectionStatus.choices, default=ConnectionStatus.ACTIVE
    )
    name = models.CharField(max_length=255, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["created_at", "id"]

    def __str__(self) -> str:
        return f"{self.get_provider_display()}: {self.name or self.id}"

    @property
    def is_live(self) -> bool:
        return self.deleted_at is None and self.status == ConnectionStatus.ACTIVE


# Enum's functional API takes (name, value) pairs; the stubs know only a names string.
AssetType = models.TextChoices("AssetType", [(t, t) for t in ASSET_TYPE_PLATFORM])  # type: ignore[call-overload]


class ConnectionAsset(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    connection = models.ForeignKey(
        PlatformConnection, on_delete=models.CASCADE, related_name="assets"
    )
    # Not restricted to AssetType: providers add types before we map them, and the audit must
    # survive (and log) an unknown one.
    asset_type = models.CharField(max_length=50)
    external_id = models.CharField(max_length=255)
    name = models.CharField(max_length=255, blank=True)
    is_selected = models.BooleanField(default=False)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["created_at", "id"]
        indexes = [models.Index(fields=["asset_type", "external_id"], name="asset_key_idx")]

    def __str__(self) -> str:
        return f"{self.asset_type} {self.external_id} ({self.name})"
