"""One UPDATE for many rows that each get their own values (a chunk's relinks, restores, boost
rules): on PostgreSQL ``UPDATE ... FROM unnest(arrays)``, one array per column, bound
server-side whatever the number of rows; elsewhere Django's ``bulk_update``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

from django.db import connection
from django.db.models import Field, JSONField, Model


def update_rows(
    model: type[Model], fields: Sequence[str], rows: Sequence[tuple[object, ...]]
) -> int:
    """Set ``fields`` of each row ``(id, value, ...)``; returns the number of rows given."""
    if not rows:
        return 0
    if connection.vendor != "postgresql":
        model._default_manager.bulk_update(  # `objects`, the only manager
            [model(pk=row[0], **dict(zip(fields, row[1:], strict=True))) for row in rows],
            list(fields),
            batch_size=1000,
        )
        return len(rows)
    from psycopg.types.json import Jsonb

    meta = model._meta
    # The primary key and the named fields are concrete columns (get_field also returns
    # relations and generic keys, which have none).
    columns = cast("list[Field[Any, Any]]", [meta.pk, *(meta.get_field(name) for name in fields)])
    arrays: list[list[Any]] = [[] for _ in columns]
    for row in rows:
        for i, (column, value) in enumerate(zip(columns, row, strict=True)):
            arrays[i].append(
                Jsonb(value) if isinstance(column, JSONField) and value is not None else value
            )
    names = [c.column for c in columns]
    casts = ", ".join(f"%s::{c.db_type(connection)}[]" for c in columns)
    assignments = ", ".join(f"{name} = v.{name}" for name in names[1:])
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {meta.db_table} AS t SET {assignments} "
            f"FROM unnest({casts}) AS v({', '.join(names)}) WHERE t.{names[0]} = v.{names[0]}",
            arrays,
        )
    return len(rows)
