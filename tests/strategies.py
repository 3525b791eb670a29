"""hypothesis strategies for random organization states, and the builder that stores one.

States are small but dense in collisions: few external ids, a platform no asset type maps to,
an unknown asset type, ties on connection ``created_at`` and on profile ``deleted_at``, profiles
on another organization's connection, and boost rules full of junk.
"""

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from uuid import UUID

from hypothesis import strategies as st

from boosts.models import BoostRule
from connections.models import ConnectionAsset, PlatformConnection
from connections.platforms import ASSET_TYPE_PLATFORM
from orgs.models import Organization
from profiles.models import SocialProfile
from queues.models import QueueSetting

BASE_TIME = datetime(2026, 1, 1, tzinfo=UTC)
EXTERNAL_IDS = ["1", "2", "3"]
ASSET_TYPES = ["page", "page", "instagram_account", "youtube_channel", "myspace_page"]
PLATFORMS = ["facebook", "facebook", "instagram", "youtube", "myspace"]
STATUSES = ["active"] * 5 + ["inactive", "expired", "revoked"]


@dataclass(frozen=True)
class ConnectionSpec:
    status: str
    deleted: bool
    created_hour: int


@dataclass(frozen=True)
class AssetSpec:
    connection: int
    asset_type: str
    external_id: str
    selected: bool


@dataclass(frozen=True)
class ProfileSpec:
    platform: str
    external_id: str
    connection: int | None  # index into the connections; -1: another organization's
    deleted_hour: int | None


@dataclass(frozen=True)
class OrgState:
    connections: tuple[ConnectionSpec, ...]
    assets: tuple[AssetSpec, ...]
    profiles: tuple[ProfileSpec, ...]
    queue_settings: tuple[tuple[int, bool], ...]  # (profile index, alive)
    boost_rules: tuple[object, ...]  # a list of refs, or a value that is not a list


@st.composite
def org_states(draw) -> OrgState:
    connections = tuple(
        draw(
            st.lists(
                st.builds(
                    ConnectionSpec,
                    status=st.sampled_from(STATUSES),
                    deleted=st.sampled_from([False, False, False, True]),
                    created_hour=st.integers(0, 2),
                ),
                max_size=3,
            )
        )
    )
    assets = ()
    if connections:
        assets = tuple(
            draw(
                st.lists(
                    st.builds(
                        AssetSpec,
                        connection=st.integers(0, len(connections) - 1),
                        asset_type=st.sampled_from(ASSET_TYPES),
                        external_id=st.sampled_from(EXTERNAL_IDS),
                        selected=st.sampled_from([True, True, False]),
                    ),
                    max_size=7,
                )
            )
        )
    # Mostly one of the organization's connections; sometimes none, or another organization's.
    connection_refs = st.sampled_from(
        [None, -1, *range(len(connections))] * 1 + [*range(len(connections))] * 2
    )
    # Half the profiles share the key of a drawn asset, so that relinks, restores and
    # deselections are common rather than rare.
    asset_keys = [
        (ASSET_TYPE_PLATFORM.get(a.asset_type, "myspace"), a.external_id, a.selected)
        for a in assets
    ]
    key_choices = [st.tuples(st.sampled_from(PLATFORMS), st.sampled_from(EXTERNAL_IDS))]
    for wanted in ([k[:2] for k in asset_keys if k[2]], [k[:2] for k in asset_keys]):
        if wanted:
            key_choices.append(st.sampled_from(wanted))
    keys = st.one_of(*key_choices)
    profiles = tuple(
        ProfileSpec(platform, external_id, connection, deleted_hour)
        for (platform, external_id), connection, deleted_hour in draw(
            st.lists(
                st.tuples(keys, connection_refs, st.one_of(st.none(), st.integers(0, 2))),
                max_size=6,
            )
        )
    )
    selected_keys = [k[:2] for k in asset_keys if k[2]]
    if selected_keys:
        # Profiles of selected keys off their connections: relinks when alive, restores when
        # dead; without them both would be rare.
        profiles += tuple(
            ProfileSpec(platform, external_id, connection, deleted_hour)
            for (platform, external_id), connection, deleted_hour in draw(
                st.lists(
                    st.tuples(
                        st.sampled_from(selected_keys),
                        st.sampled_from([None, -1, *range(len(connections))]),
                        st.one_of(st.none(), st.integers(0, 2)),
                    ),
                    max_size=2,
                )
            )
        )
    queue_settings = ()
    refs = st.sampled_from(["junk", "foreign", "unknown", 7, None])
    if profiles:
        queue_settings = tuple(
            draw(st.lists(st.tuples(st.integers(0, len(profiles) - 1), st.booleans()), max_size=4))
        )
        refs = st.one_of(st.tuples(st.just("profile"), st.integers(0, len(profiles) - 1)), refs)
    boost_rules = tuple(
        draw(
            st.lists(
                st.one_of(st.lists(refs, max_size=5), st.sampled_from([{"a": 1}, "text", 3])),
                max_size=2,
            )
        )
    )
    return OrgState(connections, assets, profiles, queue_settings, boost_rules)


def build_org(state: OrgState, *, name: str = "random") -> Organization:
    """Store ``state`` as a new organization (plus a neighbour for its foreign references)."""
    org = Organization.objects.create(name=name)
    neighbour = Organization.objects.create(name=f"{name} neighbour")
    foreign_connection = PlatformConnection.objects.create(organization=neighbour, provider="meta")
    foreign_profile = SocialProfile.objects.create(
        organization=neighbour, platform="facebook", external_id="1", connection=foreign_connection
    )
    connections = [
        PlatformConnection.objects.create(
            organization=org,
            provider="meta",
            status=spec.status,
            created_at=BASE_TIME + timedelta(hours=spec.created_hour),
            deleted_at=BASE_TIME if spec.deleted else None,
        )
        for spec in state.connections
    ]
    ConnectionAsset.objects.bulk_create(
        ConnectionAsset(
            connection=connections[spec.connection],
            asset_type=spec.asset_type,
            external_id=spec.external_id,
            name=f"{spec.asset_type} {spec.external_id}",
            is_selected=spec.selected,
        )
        for spec in state.assets
    )
    alive_keys = set()
    profiles = []
    for spec in state.profiles:
        deleted_at = (
            BASE_TIME + timedelta(hours=spec.deleted_hour)
            if spec.deleted_hour is not None
            else None
        )
        key = (spec.platform, spec.external_id)
        if deleted_at is None and key in alive_keys:
            deleted_at = BASE_TIME  # at most one alive profile per key: the database says so
        if deleted_at is None:
            alive_keys.add(key)
        connection = (
            foreign_connection
            if spec.connection == -1
            else connections[spec.connection]
            if spec.connection is not None
            else None
        )
        profiles.append(
            SocialProfile(
                organization=org,
                connection=connection,
                platform=spec.platform,
                external_id=spec.external_id,
                deleted_at=deleted_at,
            )
        )
    SocialProfile.objects.bulk_create(profiles)
    QueueSetting.objects.bulk_create(
        QueueSetting(
            organization=org,
            profile=profiles[index],
            deleted_at=None if alive else BASE_TIME,
        )
        for index, alive in state.queue_settings
    )
    special = {"foreign": str(foreign_profile.id), "unknown": str(UUID(int=12345))}

    def stored(ref):
        if isinstance(ref, tuple):
            return str(profiles[ref[1]].id)
        return special.get(ref, ref) if isinstance(ref, str) else ref

    BoostRule.objects.bulk_create(
        BoostRule(
            organization=org,
            profile_ids=[stored(ref) for ref in value] if isinstance(value, list) else value,
        )
        for value in state.boost_rules
    )
    return org
