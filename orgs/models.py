"""The tenant: every other domain row belongs to one organization."""

import uuid

from django.db import models
from django.db.models.functions import Upper
from django.utils import timezone


class Organization(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.CharField(max_length=255)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["name"]
        indexes = [
            # The admin filters by "name contains" (UPPER(name) LIKE on PostgreSQL). Besides
            # serving it, the index gives the planner statistics on UPPER(name); without them it
            # guesses one matching organization and joins millions of audit findings to sort
            # them (12 s at 5 million findings for a name that matches them all).
            models.Index(Upper("name"), name="organization_name_upper_idx"),
        ]

    def __str__(self) -> str:
        return self.name
