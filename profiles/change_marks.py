"""Writer tags: name the code behind a write, so the change marks its triggers leave (and the
findings that follow) say who changed an organization (DESIGN "Change-driven runs")."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from django.db import DEFAULT_DB_ALIAS, connections, transaction
from django.db.backends.utils import CursorWrapper

SETTING = "profile_sync.writer"
# The project's own writers: the real-time selection change, the audit's fixes, its reverts.
REALTIME_SYNC = "realtime-sync"
AUDIT_FIX = "audit-fix"
AUDIT_REVERT = "audit-revert"
# What a write made through writer() on SQLite records as its application (PostgreSQL records
# the connection's own application_name; SQLite has no such thing).
SQLITE_APPLICATION_NAME = "profile-sync-audit"


@contextmanager
def writer(tag: str, *, using: str = DEFAULT_DB_ALIAS) -> Iterator[None]:
    """Tag every write made inside the block with ``tag`` (e.g. ``"partner-sync"``).

    Use it around or inside ``transaction.atomic()``::

        with writer("partner-sync"):
            PlatformConnection.objects.filter(...).update(status="revoked")

        with transaction.atomic():
            with writer("billing"):
                ...

    The block runs in a transaction of its own (a savepoint when one is open already: so a
    block that is the whole transaction needs no ``atomic()`` inside), and the tag lives exactly
    as long as the block: on PostgreSQL it is the transaction-local setting
    ``profile_sync.writer`` (``set_config(..., true)``), on SQLite an uncommitted row of
    ``profiles_changemark_writer`` that no other connection can see (SQLite has one writer at a
    time). Blocks nest: the inner tag applies inside, the outer one again after it; an exception
    leaves the block with its writes and its tag rolled back. Code outside the host application
    (another program, a shell) can tag its writes on PostgreSQL with
    ``SET LOCAL profile_sync.writer = '...'`` in its own transaction.
    """
    if not tag:
        raise ValueError("a writer tag names the code that writes; it cannot be empty")
    connection = connections[using]
    # A transaction this block opens ends the tag with it on PostgreSQL (set_config's is_local);
    # SQLite's row must go before the commit would make it everyone's.
    ends_with_transaction = not connection.in_atomic_block and connection.vendor == "postgresql"
    with transaction.atomic(using=using):
        with connection.cursor() as cursor:
            previous = _swap(cursor, connection.vendor, tag)
        yield
        if not ends_with_transaction:
            with connection.cursor() as cursor:
                _swap(cursor, connection.vendor, previous)


def current_writer(*, using: str = DEFAULT_DB_ALIAS) -> str | None:
    """The writer tag in effect on this connection, if any."""
    connection = connections[using]
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute("SELECT nullif(current_setting(%s, true), '')", [SETTING])
        else:
            cursor.execute("SELECT writer FROM profiles_changemark_writer")
        row = cursor.fetchone()
    return row[0] if row else None


def _swap(cursor: CursorWrapper, vendor: str, tag: str | None) -> str | None:
    """Set the tag (None: no tag) and return the one it replaces."""
    if vendor == "postgresql":
        # One round trip: the CTE reads the tag before set_config replaces it. '' is what the
        # setting reads once a tag set earlier in the session has ended.
        cursor.execute(
            "WITH previous AS MATERIALIZED (SELECT nullif(current_setting(%s, true), '') AS tag) "
            "SELECT previous.tag, set_config(%s, %s, true) FROM previous",
            [SETTING, SETTING, tag or ""],
        )
        previous: str | None = cursor.fetchone()[0]
        return previous
    cursor.execute("SELECT writer FROM profiles_changemark_writer")
    row = cursor.fetchone()
    if tag is None:
        cursor.execute("DELETE FROM profiles_changemark_writer")
    else:
        cursor.execute(
            "INSERT INTO profiles_changemark_writer (id, application_name, writer) "
            "VALUES (1, %s, %s) ON CONFLICT (id) DO UPDATE SET writer = excluded.writer",
            [SQLITE_APPLICATION_NAME, tag],
        )
    return row[0] if row else None
