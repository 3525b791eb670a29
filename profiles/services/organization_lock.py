"""The per-organization lock that serializes the audit's fixes with the real-time sync."""

from collections.abc import Sequence
from uuid import UUID

from django.db import connection

# First half of PostgreSQL's two-key advisory lock: keeps ours apart from other users' locks.
_LOCK_NAMESPACE = 0x50534131  # "PSA1"


def lock_organization(organization_id: UUID) -> None:
    """Hold the organization's lock until the current transaction ends.

    PostgreSQL: a transaction-level advisory lock (re-entrant within one transaction). SQLite:
    nothing to do, its transactions start IMMEDIATE (settings) and so serialize every writer.
    """
    if not connection.in_atomic_block:
        raise RuntimeError("lock_organization() must be called inside transaction.atomic()")
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT pg_advisory_xact_lock(%s, %s)",
                [_LOCK_NAMESPACE, _signed_int32(organization_id)],
            )


def lock_organizations(organization_ids: Sequence[UUID]) -> None:
    """Hold the locks of all these organizations until the current transaction ends: one
    statement, taking them in one fixed order (so two holders of overlapping sets never wait
    for each other in a cycle)."""
    if not connection.in_atomic_block:
        raise RuntimeError("lock_organizations() must be called inside transaction.atomic()")
    if connection.vendor == "postgresql" and organization_ids:
        keys = sorted({_signed_int32(org) for org in organization_ids})
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT count(pg_advisory_xact_lock(%s, key)) "
                "FROM (SELECT key FROM unnest(%s::integer[]) AS k(key) ORDER BY key) ordered",
                [_LOCK_NAMESPACE, keys],
            )


def lock_timed_out(exc: Exception) -> bool:
    """Whether a database error is PostgreSQL's ``lock_timeout`` (SQLSTATE 55P03)."""
    return getattr(exc.__cause__, "sqlstate", None) == "55P03"


def _signed_int32(organization_id: UUID) -> int:
    # Two organizations sharing these 32 bits only wait for each other; never a wrong result.
    value = organization_id.int & 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value
