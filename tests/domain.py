"""Helpers for tests that compare whole domain states."""

from django.db.models import Model

from boosts.models import BoostRule
from connections.models import ConnectionAsset, PlatformConnection
from orgs.models import Organization
from profiles.models import SocialProfile
from queues.models import QueueSetting

DOMAIN_MODELS: tuple[type[Model], ...] = (
    Organization,
    PlatformConnection,
    ConnectionAsset,
    SocialProfile,
    QueueSetting,
    BoostRule,
)
DOMAIN_TABLES = frozenset(model._meta.db_table for model in DOMAIN_MODELS)


def domain_state(organization_ids=None) -> dict[str, list[tuple]]:
    """Every row of every domain table (of these organizations, if given), field by field."""
    state = {}
    for model in DOMAIN_MODELS:
        rows = model.objects.all()
        if organization_ids is not None:
            rows = rows.filter(**{_org_path(model) + "__in": list(organization_ids)})
        fields = [f.attname for f in model._meta.concrete_fields]
        state[model._meta.label] = sorted(
            (tuple(repr(v) for v in row) for row in rows.values_list(*fields)), key=str
        )
    return state


def _org_path(model: type[Model]) -> str:
    if model is Organization:
        return "id"
    if model is ConnectionAsset:
        return "connection__organization_id"
    return "organization_id"
