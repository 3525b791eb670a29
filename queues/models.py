"""Publishing queue settings; each belongs to one social profile."""

import uuid

from django.db import models
from django.utils import timezone

from audit_project.soft_delete import SoftDeleteModel


class QueueSetting(SoftDeleteModel):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    organization = models.ForeignKey(
        "orgs.Organization", on_delete=models.CASCADE, related_name="queue_settings"
    )
    profile = models.ForeignKey(
        "profiles.SocialProfile", on_delete=models.CASCADE, related_name="queue_settings"
    )
    name = models.CharField(max_length=255, blank=True)
    slots = models.JSONField(default=list, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["created_at", "id"]

    def __str__(self) -> str:
        return self.name or str(self.id)
