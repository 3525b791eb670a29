"""Boost rules: paid promotion rules that name the profiles they apply to."""

import uuid

from django.db import models
from django.utils import timezone

from audit_project.soft_delete import SoftDeleteModel


class BoostRule(SoftDeleteModel):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    organization = models.ForeignKey(
        "orgs.Organization", on_delete=models.CASCADE, related_name="boost_rules"
    )
    name = models.CharField(max_length=255, blank=True)
    # A JSON list of profile id strings. Written by other code, so the audit treats anything
    # else (not a list, non-strings, malformed ids) as data to report, never as a crash.
    profile_ids = models.JSONField(default=list, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["created_at", "id"]

    def __str__(self) -> str:
        return self.name or str(self.id)
