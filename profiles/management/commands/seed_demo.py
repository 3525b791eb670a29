"""``seed_demo``: a small data set with every kind of finding next to healthy data.

Re-running replaces the organizations it made before (their names start with "Demo ").
"""

from datetime import timedelta

from django.core.management.base import BaseCommand
from django.db import transaction
from django.utils import timezone

from boosts.models import BoostRule
from connections.models import ConnectionAsset, ConnectionStatus, PlatformConnection, Provider
from orgs.models import Organization
from profiles.models import SocialProfile
from queues.models import QueueSetting

DEMO_PREFIX = "Demo "


class Command(BaseCommand):
    help = (
        'Create demo organizations (names start with "Demo ") holding every kind of '
        "inconsistency the audit finds, plus healthy data; replaces earlier demo organizations."
    )

    @transaction.atomic
    def handle(self, *args, **options):
        Organization.objects.filter(name__startswith=DEMO_PREFIX).delete()
        now = timezone.now()
        self._bakery(now)
        self._agency(now)
        self._healthy(now)
        count = Organization.objects.filter(name__startswith=DEMO_PREFIX).count()
        self.stdout.write(self.style.SUCCESS(f"Seeded {count} demo organizations."))

    def _bakery(self, now):
        """Orphaned, deselected, restore, missing, stale queue setting, invalid boost refs."""
        org = Organization.objects.create(name=f"{DEMO_PREFIX}Bakery")
        meta = _connection(org, Provider.META, "Bakery Meta", now - timedelta(days=30))
        google = _connection(
            org,
            Provider.GOOGLE,
            "Bakery Google",
            now - timedelta(days=20),
            ConnectionStatus.EXPIRED,
        )
        main_page = _asset(meta, "page", "fb-bakery", "Bakery", selected=True)
        healthy = _profile(org, meta, "facebook", main_page.external_id, "Bakery")
        # Missing: selected Instagram account, no profile yet.
        _asset(meta, "instagram_account", "ig-bakery", "@bakery", selected=True)
        # Deselected: the user unticked the page, the profile stayed.
        _asset(meta, "page", "fb-bakery-old", "Old Bakery page", selected=False)
        deselected = _profile(org, meta, "facebook", "fb-bakery-old", "Old Bakery page")
        # Restore: re-selected page whose profile is still soft-deleted.
        _asset(meta, "page", "fb-bakery-events", "Bakery Events", selected=True)
        _profile(
            org,
            meta,
            "facebook",
            "fb-bakery-events",
            "Bakery Events",
            deleted=now - timedelta(days=3),
        )
        # Orphaned: its Google token expired.
        _asset(google, "youtube_channel", "yt-bakery", "Bakery TV", selected=True)
        orphaned = _profile(org, google, "youtube", "yt-bakery", "Bakery TV")
        # Stale queue setting: its profile was deleted long ago.
        gone = _profile(
            org, None, "twitter", "tw-bakery", "Bakery on X", deleted=now - timedelta(days=9)
        )
        QueueSetting.objects.create(
            organization=org, profile=gone, name="X mornings", slots=["09:00"]
        )
        QueueSetting.objects.create(
            organization=org, profile=healthy, name="FB lunch", slots=["12:00"]
        )
        # An asset type the audit does not know: logged, never fatal.
        _asset(meta, "whatsapp_channel", "wa-bakery", "Bakery WhatsApp", selected=True)
        other = Organization.objects.create(name=f"{DEMO_PREFIX}Competitor")
        foreign = _profile(other, None, "facebook", "fb-competitor", "Competitor", deleted=now)
        BoostRule.objects.create(
            organization=org,
            name="Weekend boost",
            profile_ids=[str(healthy.id), str(gone.id), "not-a-uuid", str(foreign.id), 42],
        )
        BoostRule.objects.create(
            organization=org, name="All pages", profile_ids=[str(healthy.id), str(deselected.id)]
        )
        BoostRule.objects.create(
            organization=org, name="Video push", profile_ids=[str(orphaned.id)]
        )

    def _agency(self, now):
        """Relink (one asset on two connections, the older one deleted) and missing profiles
        of several asset types."""
        org = Organization.objects.create(name=f"{DEMO_PREFIX}Agency")
        first = _connection(org, Provider.META, "Agency Meta (old)", now - timedelta(days=60))
        second = _connection(org, Provider.META, "Agency Meta (new)", now - timedelta(days=5))
        for connection in (first, second):
            _asset(connection, "page", "fb-agency", "Agency", selected=True)
        profile = _profile(org, first, "facebook", "fb-agency", "Agency")
        QueueSetting.objects.create(
            organization=org, profile=profile, name="Daily", slots=["10:00"]
        )
        first.deleted_at = now - timedelta(hours=2)
        first.save(update_fields=["deleted_at"])
        linkedin = _connection(org, Provider.LINKEDIN, "Agency LinkedIn", now - timedelta(days=4))
        _asset(linkedin, "linkedin_page", "li-agency", "Agency Inc.", selected=True)
        tiktok = _connection(org, Provider.TIKTOK, "Agency TikTok", now - timedelta(days=4))
        _asset(tiktok, "tiktok_account", "tt-agency", "@agency", selected=True)

    def _healthy(self, now):
        org = Organization.objects.create(name=f"{DEMO_PREFIX}Healthy Co")
        meta = _connection(org, Provider.META, "Healthy Meta", now - timedelta(days=10))
        for n in range(3):
            asset = _asset(meta, "page", f"fb-healthy-{n}", f"Healthy page {n}", selected=True)
            profile = _profile(org, meta, "facebook", asset.external_id, asset.name)
            QueueSetting.objects.create(organization=org, profile=profile, name=f"Queue {n}")
        _asset(meta, "page", "fb-healthy-unused", "Unused page", selected=False)


def _connection(org, provider, name, created_at, status=ConnectionStatus.ACTIVE):
    return PlatformConnection.objects.create(
        organization=org, provider=provider, name=name, status=status, created_at=created_at
    )


def _asset(connection, asset_type, external_id, name, *, selected):
    return ConnectionAsset.objects.create(
        connection=connection,
        asset_type=asset_type,
        external_id=external_id,
        name=name,
        is_selected=selected,
    )


def _profile(org, connection, platform, external_id, name, deleted=None):
    return SocialProfile.objects.create(
        organization=org,
        connection=connection,
        platform=platform,
        external_id=external_id,
        name=name,
        deleted_at=deleted,
    )
