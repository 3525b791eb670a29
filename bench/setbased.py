#!/usr/bin/env python
"""The set-based SQL floor of the audit benchmark (PostgreSQL only).

What the audit's detection and fix cost when written as a few set-based statements over all
organizations at once, with no per-organization loop and no Python-side row processing: the
floor ``audit_bench.py`` compares the application against. Semantics are ``profiles.plan``'s
(DESIGN "Audit semantics, per organization O", rules 1 and 2), checked against it by ``--check``.

API (``connection``: a psycopg 3 ``Connection``, autocommit or not, or Django's
``django.db.connection``, used through its own cursor and ``transaction.atomic``)::

    count_findings(connection) -> dict[str, int]
    fix_setbased(connection, *, run_id, guard_min=5, guard_ratio=0.5, force=False)
        -> dict[str, int]

``count_findings`` is one read-only statement. ``fix_setbased`` does what ``--fix`` does in one
transaction (its own, or a savepoint in the caller's) and returns the findings fixed per type.
Command line::

    python bench/setbased.py --check --orgs 300   # agreement with the app, builder + nasty data
    python bench/setbased.py --time --orgs 5000 --profiles 20   # median of 3, fresh copy each

Scratch databases: ``psa_floor_*`` on the server of ``--url`` (default
postgres://postgres@127.0.0.1:5432/psa_floor), dropped at the end unless ``--keep``.

Known gaps against the application (``--check`` finds no other difference):

* No per-organization advisory lock and no re-check under one (DESIGN rule 4): one
  transaction over a quiet data set. The mass-deletion guard is applied (``guard_min``,
  ``guard_ratio``, ``force``; pass the settings' values if they are not the defaults), the run
  budget (``PROFILE_AUDIT_RUN_MAX_DELETIONS``) is not: on the benchmark's 5,000 organizations a
  fix soft-deletes about 15,000 rows, over the default budget of 10,000.
* A missing profile is inserted directly on its backing connection (named after the backing
  asset) instead of through the sync job; its finding is recorded as the app records it
  (``object_id`` null). One ``now()`` serves the whole transaction (the app takes one per
  organization or chunk).
* ``fix_setbased`` closes the run itself (status ``succeeded``/``partial``, counts, ``by_type``,
  ``findings_recorded``, ``organizations_audited``, ``guarded_organizations``, finish time);
  it writes no AuditShard rows.
* ``before.profile_ids`` of an invalid boost rule is the stored JSON as is; the app's goes
  through Python's json, so a number's spelling may differ (``1.50`` against ``1.5``).
* Boost entries are read exactly as ``uuid.UUID(str)`` reads them, Unicode whitespace and
  digits included, with tables taken from the running interpreter's Unicode database.
* Restoring a profile brings back the queue settings an audit soft-deleted with it, as
  ``ProfileSoftDeleteService.restore_queue_settings`` does (matched on the finding's
  ``after.deleted_at`` text).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
import unicodedata
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from connections.platforms import ASSET_TYPE_PLATFORM  # noqa: E402 (no Django needed)

TYPES = (
    "orphaned",
    "deselected",
    "relink",
    "restore",
    "missing",
    "stale_queue_setting",
    "invalid_boost_ref",
)
"""Finding types in the order ``profiles.plan`` lists them (the order a run records them)."""

ACTIONS = {
    "orphaned": "soft_delete",
    "deselected": "soft_delete",
    "relink": "relink",
    "restore": "restore",
    "missing": "dispatch_sync",
    "stale_queue_setting": "soft_delete",
    "invalid_boost_ref": "remove_refs",
}
MODELS = {
    **{t: "profiles.SocialProfile" for t in TYPES[:5]},
    "stale_queue_setting": "queues.QueueSetting",
    "invalid_boost_ref": "boosts.BoostRule",
}
GUARD_DETAIL = "mass-deletion guard"

# --- How a boost entry is read: Python's ``uuid.UUID(str)``, in SQL -----------------------------
#
# ``uuid.UUID(s)`` drops every "urn:" then every "uuid:", strips "{" and "}" from both ends,
# drops every "-", requires 32 characters, and reads them with ``int(s, 16)``: surrounding
# whitespace (ASCII \t\n\v\f\r and space, and any non-ASCII ``str.isspace()`` character), one
# "+", a "0x" prefix with one optional "_" after it, single "_" between digits, and any Unicode
# decimal digit (``str.isdecimal()``) as its ASCII digit. The SQL below does exactly that: the
# non-ASCII characters are first translated to their ASCII meaning (a table computed from this
# interpreter's Unicode database), then a regular expression checks the grammar and the digits
# are left-padded to 32 and cast to uuid.

_ASCII_SPACE = " \t\n\x0b\x0c\r"
_INT_RE = f"^[{_ASCII_SPACE}]*\\+?(0[xX]_?)?[0-9a-fA-F](_?[0-9a-fA-F])*[{_ASCII_SPACE}]*$"
_PREFIX_RE = f"^[{_ASCII_SPACE}]*\\+?(0[xX])?"


@cache
def _non_ascii_translation() -> tuple[str, str]:
    """(characters, their ASCII meaning to ``int``): non-ASCII whitespace and decimal digits."""
    source, target = [], []
    for code in range(128, sys.maxunicode + 1):
        char = chr(code)
        if char.isspace():
            source.append(char)
            target.append(" ")
        elif char.isdecimal():
            source.append(char)
            target.append(str(unicodedata.decimal(char)))
    return "".join(source), "".join(target)


def _params(**extra: Any) -> dict[str, Any]:
    source, target = _non_ascii_translation()
    return {
        "asset_types": list(ASSET_TYPE_PLATFORM),
        "platforms": list(ASSET_TYPE_PLATFORM.values()),
        "nd_from": source,
        "nd_to": target,
        "int_re": _INT_RE,
        "prefix_re": _PREFIX_RE,
        "int_strip": "_" + _ASCII_SPACE,
        **extra,
    }


def _hex_sql(text: str) -> str:
    """SQL: what ``uuid.UUID`` hands to ``int(_, 16)``: "urn:", "uuid:", outer braces and every
    dash taken out of ``text``."""
    return f"replace(btrim(replace(replace({text}, 'urn:', ''), 'uuid:', ''), '{{}}'), '-', '')"


def _uuid_ref_sql(hexed: str) -> str:
    """SQL: the uuid ``uuid.UUID`` returns for the string whose ``_hex_sql`` is ``hexed``, or
    NULL where it raises ValueError. 32 ASCII hex digits (nearly every entry) take the fast
    path; the rest are translated to ASCII (only if they hold a non-ASCII character) and read
    with ``int``'s grammar."""
    ascii_ = (
        f"CASE WHEN octet_length({hexed}) = char_length({hexed}) THEN {hexed} "
        f"ELSE translate({hexed}, %(nd_from)s, %(nd_to)s) END"
    )
    digits = f"translate(regexp_replace({ascii_}, %(prefix_re)s, ''), %(int_strip)s, '')"
    return (
        f"CASE WHEN {hexed} ~ '^[0-9a-fA-F]{{32}}$' THEN {hexed}::uuid "
        f"WHEN char_length({hexed}) = 32 AND {ascii_} ~ %(int_re)s "
        f"THEN lpad({digits}, 32, '0')::uuid END"
    )


def _iso_sql(value: str) -> str:
    """SQL: a timestamptz as ``datetime.isoformat()`` writes Django's UTC datetimes (the text
    AuditFinding.before/after hold): no fraction when microseconds are 0, "+00:00"."""
    utc = f"({value} AT TIME ZONE 'UTC')"
    return (
        f"(to_char({utc}, 'YYYY-MM-DD\"T\"HH24:MI:SS') || "
        f"CASE WHEN to_char({utc}, 'US') = '000000' THEN '' ELSE to_char({utc}, '.US') END "
        "|| '+00:00')"
    )


# --- The plan, as common table expressions ------------------------------------------------------
#
# live      connections that are alive and active (their organization is carried along: a
#           profile on another organization's connection never finds its connection live)
# sel       selected assets of a known type on a live connection, with their key
# keys      selected keys, their backing connection (earliest created_at, then smallest id)
#           and every live connection selecting them. A missing profile is named after the backing asset (the selected asset of the key
#           on that connection created first, then smallest id), looked up for those keys only
# pdec      every profile with its decision (orphaned, deselected, relink, restore or none) and
#           whether it is alive once the decisions are applied (rule 2)
# missing   selected keys with no profile at all
# stale     alive queue settings whose profile (of the same organization) is dead afterwards
# invalid   alive boost rules that are not a list or hold an entry that is not the id of a
#           profile of the organization alive afterwards; ``kept``: the valid entries in order

PLAN_CTES = f"""
amap (asset_type, platform) AS (
    SELECT * FROM unnest(%(asset_types)s::text[], %(platforms)s::text[])
),
live AS (
    SELECT id, organization_id, created_at
    FROM connections_platformconnection
    WHERE deleted_at IS NULL AND status = 'active'
),
sel AS (
    SELECT l.organization_id AS org, m.platform, a.external_id, a.connection_id,
           l.created_at AS connection_created_at
    FROM connections_connectionasset a
    JOIN live l ON l.id = a.connection_id
    JOIN amap m ON m.asset_type = a.asset_type
    WHERE a.is_selected
),
keys AS (
    SELECT org, platform, external_id,
           (array_agg(connection_id ORDER BY connection_created_at, connection_id))[1]
               AS backing_id,
           array_agg(connection_id) AS selecting
    FROM sel
    GROUP BY org, platform, external_id
),
prof AS (
    SELECT p.id, p.organization_id AS org, p.platform, p.external_id, p.connection_id,
           p.deleted_at, k.backing_id, k.org IS NOT NULL AS selected,
           l.id IS NOT NULL AS connection_live,
           coalesce(p.connection_id = ANY (k.selecting), false) AS own_connection_selects,
           bool_or(p.deleted_at IS NULL) OVER key_w AS key_alive,
           row_number() OVER (key_w ORDER BY p.deleted_at DESC NULLS FIRST, p.id) AS recency
    FROM profiles_socialprofile p
    LEFT JOIN live l ON l.id = p.connection_id AND l.organization_id = p.organization_id
    LEFT JOIN keys k
           ON k.org = p.organization_id AND k.platform = p.platform
          AND k.external_id = p.external_id
    WINDOW key_w AS (PARTITION BY p.organization_id, p.platform, p.external_id)
),
pdec AS (
    SELECT prof.*,
           CASE
               WHEN deleted_at IS NULL AND NOT selected AND NOT connection_live THEN 'orphaned'
               WHEN deleted_at IS NULL AND NOT selected THEN 'deselected'
               WHEN deleted_at IS NULL AND NOT own_connection_selects THEN 'relink'
               WHEN deleted_at IS NOT NULL AND selected AND NOT key_alive AND recency = 1
                   THEN 'restore'
           END AS decision,
           selected AND (deleted_at IS NULL OR (NOT key_alive AND recency = 1)) AS alive_after
    FROM prof
),
missing AS (
    SELECT k.* FROM keys k
    WHERE NOT EXISTS (
        SELECT 1 FROM profiles_socialprofile p
        WHERE p.organization_id = k.org AND p.platform = k.platform
          AND p.external_id = k.external_id
    )
),
stale AS (
    SELECT q.id, q.organization_id AS org, q.profile_id
    FROM queues_queuesetting q
    JOIN pdec d ON d.id = q.profile_id AND d.org = q.organization_id
    WHERE q.deleted_at IS NULL AND NOT d.alive_after
),
rules AS (
    SELECT id, organization_id AS org, profile_ids
    FROM boosts_boostrule
    WHERE deleted_at IS NULL
),
entries AS MATERIALIZED (
    SELECT r.id AS rule_id, r.org, e.ord, e.value,
           CASE WHEN jsonb_typeof(e.value) = 'string'
                THEN {_hex_sql("(e.value #>> '{}')")} END AS hexed
    FROM rules r
    CROSS JOIN LATERAL jsonb_array_elements(
        CASE WHEN jsonb_typeof(r.profile_ids) = 'array' THEN r.profile_ids ELSE '[]' END
    ) WITH ORDINALITY AS e (value, ord)
),
rule_entries AS (
    SELECT en.rule_id, bool_and(coalesce(d.alive_after, false)) AS all_valid,
           jsonb_agg(en.value ORDER BY en.ord) FILTER (WHERE d.alive_after) AS kept
    FROM entries en
    LEFT JOIN pdec d ON d.id = {_uuid_ref_sql("en.hexed")} AND d.org = en.org
    GROUP BY en.rule_id
),
invalid AS (
    SELECT r.id, r.org, r.profile_ids, coalesce(re.kept, '[]') AS kept
    FROM rules r
    LEFT JOIN rule_entries re ON re.rule_id = r.id
    WHERE jsonb_typeof(r.profile_ids) <> 'array' OR NOT coalesce(re.all_valid, true)
)
"""

COUNT_SQL = f"""
WITH {PLAN_CTES}
SELECT
    (SELECT count(*) FROM pdec WHERE decision = 'orphaned'),
    (SELECT count(*) FROM pdec WHERE decision = 'deselected'),
    (SELECT count(*) FROM pdec WHERE decision = 'relink'),
    (SELECT count(*) FROM pdec WHERE decision = 'restore'),
    (SELECT count(*) FROM missing),
    (SELECT count(*) FROM stale),
    (SELECT count(*) FROM invalid)
"""

# One row per finding. ``rank`` orders the types; within a type a run records profile, setting
# and rule findings by object id, restore and missing ones by key (``plan.py`` sorts them so).
PLAN_TABLE_SQL = f"""
CREATE TEMP TABLE floor_plan ON COMMIT DROP AS
WITH {PLAN_CTES}
SELECT org,
       CASE decision WHEN 'orphaned' THEN 1 WHEN 'deselected' THEN 2 WHEN 'relink' THEN 3
                     ELSE 4 END AS rank,
       decision::text AS type, id AS object_id, platform::text, external_id::text,
       connection_id, backing_id AS target_id, deleted_at, NULL::text AS name,
       NULL::jsonb AS profile_ids, NULL::jsonb AS kept, false AS guarded
FROM pdec WHERE decision IS NOT NULL
UNION ALL
SELECT org, 5, 'missing', NULL, platform, external_id, NULL, backing_id, NULL,
       (SELECT a.name FROM connections_connectionasset a
        JOIN amap m ON m.asset_type = a.asset_type
        WHERE a.connection_id = missing.backing_id AND m.platform = missing.platform
          AND a.external_id = missing.external_id AND a.is_selected
        ORDER BY a.created_at, a.id LIMIT 1),
       NULL, NULL, false
FROM missing
UNION ALL
SELECT org, 6, 'stale_queue_setting', id, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
       false
FROM stale
UNION ALL
SELECT org, 7, 'invalid_boost_ref', id, NULL, NULL, NULL, NULL, NULL, NULL, profile_ids, kept,
       false
FROM invalid
"""

# The mass-deletion guard, judged on each organization's whole plan.
GUARD_SQL = """
UPDATE floor_plan f SET guarded = true
FROM (
    SELECT d.org FROM (
        SELECT org, count(*) AS deletions FROM floor_plan
        WHERE type IN ('orphaned', 'deselected')
        GROUP BY org HAVING count(*) > %(guard_min)s
    ) d
    WHERE NOT %(force)s AND d.deletions > (
        SELECT %(guard_ratio)s::float8 * count(*) FROM profiles_socialprofile p
        WHERE p.organization_id = d.org AND p.deleted_at IS NULL
    )
) g
WHERE f.org = g.org
"""

# The queue settings a restore brings back: dead settings of the restored profile whose
# deletion an audit recorded (a fixed stale_queue_setting finding whose after.deleted_at is still
# the setting's deleted_at) - ``ProfileSoftDeleteService.queue_settings_to_restore``.
QUEUE_RESTORE_SQL = f"""
CREATE TEMP TABLE floor_queue_restore ON COMMIT DROP AS
SELECT q.id, q.profile_id, {_iso_sql("q.deleted_at")} AS deleted_at
FROM floor_plan f
JOIN queues_queuesetting q ON q.profile_id = f.object_id
WHERE f.type = 'restore' AND NOT f.guarded AND q.deleted_at IS NOT NULL
  AND EXISTS (
      SELECT 1 FROM profiles_auditfinding a
      WHERE a.model = 'queues.QueueSetting' AND a.object_id = q.id
        AND a.type = 'stale_queue_setting' AND a.action = 'soft_delete' AND a.outcome = 'fixed'
        AND a.after ->> 'deleted_at' = {_iso_sql("q.deleted_at")}
  )
"""

WRITE_SQL = (
    # Profile decisions first, all from the one snapshot...
    """UPDATE profiles_socialprofile p SET deleted_at = now() FROM floor_plan f
       WHERE f.type IN ('orphaned', 'deselected') AND NOT f.guarded
         AND p.id = f.object_id AND p.deleted_at IS NULL""",
    """UPDATE profiles_socialprofile p SET connection_id = f.target_id FROM floor_plan f
       WHERE f.type = 'relink' AND NOT f.guarded
         AND p.id = f.object_id AND p.organization_id = f.org AND p.deleted_at IS NULL""",
    """UPDATE profiles_socialprofile p SET deleted_at = NULL, connection_id = f.target_id
       FROM floor_plan f
       WHERE f.type = 'restore' AND NOT f.guarded
         AND p.id = f.object_id AND p.deleted_at IS NOT NULL""",
    """UPDATE queues_queuesetting q SET deleted_at = NULL FROM floor_queue_restore r
       WHERE q.id = r.id""",
    """INSERT INTO profiles_socialprofile
           (id, organization_id, connection_id, platform, external_id, name, created_at,
            deleted_at)
       SELECT gen_random_uuid(), org, target_id, platform, external_id, name, now(), NULL
       FROM floor_plan WHERE type = 'missing' AND NOT guarded""",
    # ...then cleanup, as the plan computed it against the state after them (rules 1, 2).
    """UPDATE queues_queuesetting q SET deleted_at = now() FROM floor_plan f
       WHERE f.type = 'stale_queue_setting' AND NOT f.guarded
         AND q.id = f.object_id AND q.deleted_at IS NULL""",
    """UPDATE boosts_boostrule r SET profile_ids = f.kept FROM floor_plan f
       WHERE f.type = 'invalid_boost_ref' AND NOT f.guarded AND r.id = f.object_id""",
)

# before/after in the shapes ``profiles.services.changes.planned_change`` records.
FINDINGS_SQL = f"""
INSERT INTO profiles_auditfinding
    (id, run_id, seq, organization_id, type, action, model, object_id, platform, external_id,
     before, after, outcome, detail)
SELECT gen_random_uuid(), %(run_id)s,
       (SELECT coalesce(max(seq), 0) FROM profiles_auditfinding WHERE run_id = %(run_id)s)
         + row_number() OVER (
             ORDER BY f.org, f.rank,
                      CASE WHEN f.type IN ('restore', 'missing') THEN NULL ELSE f.object_id END,
                      f.platform COLLATE "C", f.external_id COLLATE "C"),
       f.org, f.type, a.action, a.model,
       f.object_id, coalesce(f.platform, ''), coalesce(f.external_id, ''),
       CASE f.type
           WHEN 'relink' THEN jsonb_build_object('connection_id', f.connection_id::text)
           WHEN 'restore' THEN jsonb_build_object(
               'deleted_at', {_iso_sql("f.deleted_at")},
               'connection_id', f.connection_id::text)
               || CASE WHEN qr.before IS NULL THEN '{{}}'
                       ELSE jsonb_build_object('queue_settings', qr.before) END
           WHEN 'missing' THEN NULL
           WHEN 'invalid_boost_ref' THEN jsonb_build_object('profile_ids', f.profile_ids)
           ELSE jsonb_build_object('deleted_at', NULL)
       END,
       CASE f.type
           WHEN 'relink' THEN jsonb_build_object('connection_id', f.target_id::text)
           WHEN 'restore' THEN jsonb_build_object(
               'deleted_at', NULL, 'connection_id', f.target_id::text)
               || CASE WHEN qr.after IS NULL THEN '{{}}'
                       ELSE jsonb_build_object('queue_settings', qr.after) END
           WHEN 'missing' THEN jsonb_build_object(
               'platform', f.platform, 'external_id', f.external_id,
               'connection_id', f.target_id::text, 'name', f.name)
           WHEN 'invalid_boost_ref' THEN jsonb_build_object('profile_ids', f.kept)
           ELSE jsonb_build_object('deleted_at', {_iso_sql("now()")})
       END,
       CASE WHEN f.guarded THEN 'guarded' ELSE 'fixed' END,
       CASE WHEN f.guarded THEN %(guard_detail)s ELSE '' END
FROM floor_plan f
JOIN unnest(%(types)s::text[], %(actions)s::text[], %(models)s::text[]) AS a (type, action, model)
  ON a.type = f.type
LEFT JOIN (
    SELECT profile_id, jsonb_object_agg(id::text, deleted_at) AS before,
           jsonb_object_agg(id::text, NULL::text) AS after
    FROM floor_queue_restore GROUP BY profile_id
) qr ON f.type = 'restore' AND qr.profile_id = f.object_id
"""

SUMMARY_SQL = """
SELECT type, count(*), count(*) FILTER (WHERE NOT guarded),
       (SELECT array_agg(DISTINCT org::text) FROM floor_plan WHERE guarded)
FROM floor_plan GROUP BY type
"""

RUN_SQL = """
UPDATE profiles_auditrun SET
    status = %(status)s, finished_at = clock_timestamp(), last_progress_at = clock_timestamp(),
    duration_seconds = extract(epoch FROM clock_timestamp() - now()),
    found = %(found)s, fixed = %(fixed)s, by_type = %(by_type)s::jsonb,
    findings_recorded = (SELECT coalesce(max(seq), 0) FROM profiles_auditfinding
                         WHERE run_id = %(run_id)s),
    organizations_audited = (SELECT count(*) FROM orgs_organization),
    guarded_organizations = %(guarded)s::jsonb
WHERE id = %(run_id)s
"""


# --- The API ------------------------------------------------------------------------------------


@contextmanager
def _transaction_cursor(connection: Any) -> Iterator[Any]:
    """A cursor in a transaction: ``transaction.atomic`` and Django's cursor for Django's
    connection (its execute wrappers see every statement), ``connection.transaction()`` for a
    psycopg 3 connection. Either is a savepoint when the caller already has a transaction."""
    if hasattr(connection, "ensure_connection"):  # django.db.connection
        from django.db import transaction

        with transaction.atomic(using=connection.alias), connection.cursor() as cursor:
            yield cursor
    else:
        with connection.transaction(), connection.cursor() as cursor:
            yield cursor


def count_findings(connection: Any) -> dict[str, int]:
    """Findings of each type over all organizations, as ``plan_organization`` counts them with
    all types (what a dry run's ``by_type[t]["found"]`` holds): one statement, read only."""
    with _transaction_cursor(connection) as cursor:
        cursor.execute(COUNT_SQL, _params())
        row = cursor.fetchone()
    return dict(zip(TYPES, (int(n) for n in row), strict=True))


def fix_setbased(
    connection: Any,
    *,
    run_id: uuid.UUID | str,
    guard_min: int = 5,
    guard_ratio: float = 0.5,
    force: bool = False,
) -> dict[str, int]:
    """Apply every finding of every organization set-based, in one transaction, record one
    AuditFinding per finding (seq after the run's last) and close the run (status, counts).

    Organizations the mass-deletion guard holds (more than ``max(guard_min, guard_ratio x alive
    profiles)`` deletions, unless ``force``) are recorded ``guarded`` and left alone, as the app
    does. Returns the findings fixed per type."""
    params = _params(
        run_id=str(run_id),
        guard_min=guard_min,
        guard_ratio=float(guard_ratio),
        force=force,
        guard_detail=GUARD_DETAIL,
        types=list(TYPES),
        actions=[ACTIONS[t] for t in TYPES],
        models=[MODELS[t] for t in TYPES],
    )
    with _transaction_cursor(connection) as cursor:
        cursor.execute(PLAN_TABLE_SQL, params)
        # Temporary tables have no statistics until analyzed (autovacuum never sees them):
        # without them the writes' joins were planned as nested loops over the whole plan, and
        # at 20,000 organizations one UPDATE ran for minutes.
        cursor.execute("ANALYZE floor_plan")
        cursor.execute(GUARD_SQL, params)
        cursor.execute(QUEUE_RESTORE_SQL, params)
        cursor.execute("ANALYZE floor_queue_restore")
        for statement in WRITE_SQL:
            cursor.execute(statement)
        cursor.execute(FINDINGS_SQL, params)
        cursor.execute(SUMMARY_SQL)
        rows = cursor.fetchall()
        by_type = {t: {"found": 0, "fixed": 0} for t in TYPES}
        guarded: list[str] = []
        for type_, found, fixed, guarded_orgs in rows:
            by_type[type_] = {"found": int(found), "fixed": int(fixed)}
            guarded = guarded_orgs or []
        found = sum(c["found"] for c in by_type.values())
        fixed = sum(c["fixed"] for c in by_type.values())
        cursor.execute(
            RUN_SQL,
            {
                "run_id": str(run_id),
                "status": "partial" if guarded else "succeeded",
                "found": found,
                "fixed": fixed,
                "by_type": json.dumps(by_type),
                "guarded": json.dumps(guarded),
            },
        )
        cursor.execute("DROP TABLE floor_plan, floor_queue_restore")
    return {t: by_type[t]["fixed"] for t in TYPES}


# === Checking and timing (command line) ==========================================================

DEFAULT_URL = "postgres://postgres@127.0.0.1:5432/psa_floor"
NOW_MARK = "NOW"
"""What a fix's own timestamp is normalized to when findings are compared."""


class Scratch:
    """Scratch databases ``<name>_<suffix>`` (all ``psa_floor*``) on the server of ``url``."""

    def __init__(self, url: str) -> None:
        self.base, self.name = url.rsplit("/", 1)
        if not self.name.startswith("psa_floor"):
            raise SystemExit("scratch databases must be named psa_floor*")
        self.made: set[str] = set()

    def url(self, suffix: str) -> str:
        return f"{self.base}/{self.name}_{suffix}"

    def _admin(self, *statements: str) -> None:
        import psycopg

        with psycopg.connect(f"{self.base}/postgres", autocommit=True) as conn:
            for statement in statements:
                conn.execute(statement)

    def create(self, suffix: str, template: str | None = None) -> str:
        name = f"{self.name}_{suffix}"
        from_ = f' TEMPLATE "{self.name}_{template}"' if template else ""
        self._admin(f'DROP DATABASE IF EXISTS "{name}"', f'CREATE DATABASE "{name}"{from_}')
        self.made.add(name)
        return self.url(suffix)

    def drop_all(self) -> None:
        self._admin(*(f'DROP DATABASE IF EXISTS "{name}"' for name in sorted(self.made)))
        self.made.clear()


def _child_env(url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    env.update(
        DATABASE_URL=url,
        PROFILE_AUDIT_CONSOLE_LEVEL="ERROR",
        PROFILE_AUDIT_LOG_DIR="/tmp/psa_floor_logs",
    )
    return env


def _run_child(url: str, *args: str, script: Path | None = None) -> dict:
    cmd = [sys.executable, str(script or Path(__file__).resolve()), *args]
    result = subprocess.run(cmd, env=_child_env(url), cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        sys.stderr.write(result.stdout[-5000:] + result.stderr[-5000:])
        raise SystemExit(f"step {' '.join(args)} failed")
    return json.loads(result.stdout.strip().splitlines()[-1])


def build_benchmark_data(url: str, *, orgs: int, profiles: int, rate: float) -> dict:
    """The benchmark's own data set (``audit_bench.py _build``) into the database at ``url``."""
    script = ROOT / "bench" / "audit_bench.py"
    args = ["_build", f"--orgs={orgs}", f"--profiles={profiles}", f"--rate={rate}"]
    return _run_child(url, *args, script=script)


# --- In a child process (Django set up) ---------------------------------------------------------


def _setup_django() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "audit_project.settings")
    # A benchmark is not a deployment: settings refuse the placeholder secret otherwise.
    os.environ.setdefault(
        "DJANGO_SECRET_KEY", "local-benchmark-only-key-not-for-serving-anything-at-all"
    )
    import django

    django.setup()


def build_nasty(orgs: int, seed: int) -> dict:
    """Organizations dense in the cases that break naive SQL: ties on connection created_at
    and on profile deleted_at, profiles on another organization's connection, dead and alive
    profiles of one key, unknown asset types and platforms, inactive/expired/revoked/deleted
    connections, queue settings on another organization's profile, restores that bring back
    queue settings an earlier audit deleted (and ones it did not), boost rules that are not
    lists or hold upper-case, dash-less, braced, urn, padded, "+"/"0x"/"_" and non-ASCII-digit
    forms of ids, other organizations' ids, numbers, nulls and junk."""
    _setup_django()
    from datetime import UTC, datetime, timedelta

    from django.core.management import call_command
    from django.db import connection

    from boosts.models import BoostRule
    from connections.models import ConnectionAsset, PlatformConnection
    from orgs.models import Organization
    from profiles.models import AuditFinding, AuditRun, SocialProfile
    from profiles.services.soft_delete import to_json
    from queues.models import QueueSetting

    call_command("migrate", verbosity=0)
    rng = random.Random(seed)
    base = datetime(2026, 1, 1, tzinfo=UTC)
    asset_types = ["page", "page", "instagram_account", "youtube_channel", "myspace_page"]
    platforms = ["facebook", "facebook", "instagram", "youtube", "myspace"]
    statuses = ["active"] * 5 + ["inactive", "expired", "revoked"]
    external_ids = ["1", "2", "3"]
    rows: dict[str, list] = {k: [] for k in ("org", "conn", "asset", "prof", "qs", "rule", "f")}
    prior = AuditRun(trigger="command", fix=True, status="succeeded", started_at=base)
    prior_seq = 0
    all_conns: list[PlatformConnection] = []
    all_profiles: list[SocialProfile] = []

    def hour(n: int) -> datetime:
        return base + timedelta(hours=n)

    def new_id() -> uuid.UUID:
        # One in four ids starts with "000": room for the "+", "0x", "0x_" and padded forms.
        value = uuid.UUID(int=rng.getrandbits(128), version=4)
        return uuid.UUID("000" + value.hex[3:]) if rng.random() < 0.25 else value

    def ref_forms(u: uuid.UUID) -> list[Any]:
        h, s = u.hex, str(u)
        forms = [s, s, s.upper(), h, h.upper(), "{" + s + "}", "urn:uuid:" + s, f"{{{{{h}}}"]
        forms += [s[:5] + "-" + s[5:], "uuid:" + h.upper(), h[:10] + "-" + "-" + h[10:]]
        forms.append(h.replace("3", "\u0663").replace("7", "\uff17"))  # Arabic-Indic, fullwidth
        forms.append(h.replace("a", "\uff41"))  # fullwidth a: not a digit, invalid
        if h.startswith("0"):
            forms += [" " + h[1:], "+" + h[1:], "\u00a0" + h[1:], h[1:] + "\t"]
            forms += [h[1:8] + "_" + h[8:], "_" + h[1:], h[1:] + "_", "\x1c" + h[1:]]
        if h.startswith("00"):
            forms += ["0x" + h[2:], "0X" + h[2:].upper(), " +" + h[2:], h[2:9] + "__" + h[9:]]
        if h.startswith("000"):
            forms += ["0x_" + h[3:], "+0x" + h[3:], "0x__" + h[4:], "0_x" + h[3:]]
        return forms

    for n in range(orgs):
        org = Organization(id=new_id(), name=f"Nasty {n:05d}", created_at=base)
        rows["org"].append(org)
        conns = []
        for _ in range(rng.randint(0, 4)):
            c = PlatformConnection(
                id=new_id(),
                organization=org,
                provider="meta",
                status=rng.choice(statuses),
                deleted_at=hour(50) if rng.random() < 0.2 else None,
                created_at=hour(rng.randint(0, 1)),
            )
            conns.append(c)
        rows["conn"] += conns
        for _ in range(rng.randint(0, 10) if conns else 0):
            rows["asset"].append(
                ConnectionAsset(
                    id=new_id(),
                    connection=rng.choice(conns),
                    asset_type=rng.choice(asset_types),
                    external_id=rng.choice(external_ids),
                    name=rng.choice(["A", "B", "C"]),
                    is_selected=rng.random() < 0.7,
                    created_at=hour(rng.randint(0, 1)),
                )
            )
        profiles = []
        for platform in set(rng.sample(platforms, 3)):
            for external_id in rng.sample(external_ids, rng.randint(0, 3)):
                alive_slot = rng.random() < 0.6
                for i in range(rng.randint(1, 3)):
                    roll = rng.random()
                    if roll < 0.15:
                        connection_ = None
                    elif roll < 0.3 and all_conns:
                        connection_ = rng.choice(all_conns)  # another organization's
                    else:
                        connection_ = rng.choice(conns) if conns else None
                    p = SocialProfile(
                        id=new_id(),
                        organization=org,
                        connection=connection_,
                        platform=platform,
                        external_id=external_id,
                        name="P",
                        deleted_at=None if (alive_slot and i == 0) else hour(rng.randint(10, 12)),
                        created_at=base,
                    )
                    profiles.append(p)
        live_conns = [c for c in conns if c.status == "active" and c.deleted_at is None]
        if len(live_conns) >= 2 and rng.random() < 0.6:
            # One key selected on two live connections (often a created_at tie): a profile on
            # either one stays where it is; only one that neither selects is relinked.
            for c in live_conns[:2]:
                rows["asset"].append(
                    ConnectionAsset(
                        id=new_id(),
                        connection=c,
                        asset_type="page",
                        external_id="8",
                        name=rng.choice(["A", "B"]),
                        is_selected=True,
                        created_at=base,
                    )
                )
            profiles.append(
                SocialProfile(
                    id=new_id(),
                    organization=org,
                    connection=rng.choice([*live_conns, None]),
                    platform="facebook",
                    external_id="8",
                    name="P",
                    created_at=base,
                )
            )
        if live_conns and rng.random() < 0.3:
            # A restore with ties: two dead profiles deleted at the same time (smallest id comes
            # back), each with queue settings, some deleted by an earlier audit.
            rows["asset"].append(
                ConnectionAsset(
                    id=new_id(),
                    connection=rng.choice(live_conns),
                    asset_type="page",
                    external_id="9",
                    name="Restored",
                    is_selected=True,
                    created_at=base,
                )
            )
            for _ in range(2):
                dead_profile = SocialProfile(
                    id=new_id(),
                    organization=org,
                    connection=rng.choice([*conns, None]),
                    platform="facebook",
                    external_id="9",
                    name="P",
                    deleted_at=hour(15),
                    created_at=base,
                )
                profiles.append(dead_profile)
                for by_audit in (True, False):
                    deleted_at = hour(16) + timedelta(microseconds=rng.choice([0, 120000]))
                    qs = QueueSetting(
                        id=new_id(),
                        organization=org,
                        profile=dead_profile,
                        deleted_at=deleted_at,
                        created_at=base,
                    )
                    rows["qs"].append(qs)
                    if by_audit:
                        prior_seq += 1
                        rows["f"].append(
                            AuditFinding(
                                run=prior,
                                seq=prior_seq,
                                organization=org,
                                type="stale_queue_setting",
                                action="soft_delete",
                                model="queues.QueueSetting",
                                object_id=qs.id,
                                before={"deleted_at": None},
                                # Mostly the audit's own deletion; sometimes a guarded finding
                                # or a deletion the setting no longer carries (not brought back).
                                after={
                                    "deleted_at": to_json(
                                        deleted_at if rng.random() < 0.85 else hour(99)
                                    )
                                },
                                outcome=rng.choice(["fixed"] * 4 + ["guarded"]),
                            )
                        )
        rows["prof"] += profiles
        for _ in range(rng.randint(0, 4)):
            pool = profiles if profiles and rng.random() < 0.9 else all_profiles
            if not pool:
                continue
            dead = rng.random() < 0.3
            dead_profiles = [p for p in profiles if p.deleted_at is not None]
            if dead and dead_profiles and rng.random() < 0.7:
                pool = dead_profiles  # what a restore may bring back
            deleted_at = hour(rng.randint(20, 22)) + timedelta(microseconds=rng.choice([0, 5, 500]))
            qs = QueueSetting(
                id=new_id(),
                organization=org,
                profile=rng.choice(pool),
                slots=["09:00"],
                deleted_at=deleted_at if dead else None,
                created_at=base,
            )
            rows["qs"].append(qs)
            if dead and rng.random() < 0.8:
                prior_seq += 1
                matching = rng.random() < 0.85
                rows["f"].append(
                    AuditFinding(
                        run=prior,
                        seq=prior_seq,
                        organization=org,
                        type="stale_queue_setting",
                        action="soft_delete",
                        model="queues.QueueSetting",
                        object_id=qs.id,
                        before={"deleted_at": None},
                        after={"deleted_at": to_json(deleted_at if matching else hour(99))},
                        outcome=rng.choice(["fixed"] * 5 + ["guarded"]),
                    )
                )
        for _ in range(rng.randint(0, 3)):
            roll = rng.random()
            if roll < 0.2:
                value: Any = rng.choice([{"a": 1}, "x", 3, "__json_null__", True, {}])
            else:
                value = []
                for _ in range(rng.randint(0, 5)):
                    pick = rng.random()
                    alive = [p for p in profiles if p.deleted_at is None] or profiles
                    if pick < 0.6 and profiles:
                        value.append(rng.choice(ref_forms(rng.choice(alive).id)))
                    elif pick < 0.7 and all_profiles:
                        value.append(str(rng.choice(all_profiles).id))
                    elif pick < 0.8:
                        value.append(str(new_id()))
                    else:
                        value.append(rng.choice(["junk", "", 123, None, ["x"], {"id": "y"}, 1.5]))
            rows["rule"].append(
                BoostRule(
                    id=new_id(),
                    organization=org,
                    name="R",
                    profile_ids=value,
                    deleted_at=hour(5) if rng.random() < 0.1 else None,
                    created_at=base,
                )
            )
        all_conns += conns
        all_profiles += profiles

    prior.save()
    for key, model in (
        ("org", Organization),
        ("conn", PlatformConnection),
        ("asset", ConnectionAsset),
        ("prof", SocialProfile),
        ("qs", QueueSetting),
        ("rule", BoostRule),
        ("f", AuditFinding),
    ):
        model.objects.bulk_create(rows[key], batch_size=2000)
    with connection.cursor() as cursor:
        # JSON null (Python None would be SQL NULL, which the column refuses).
        cursor.execute(
            "UPDATE boosts_boostrule SET profile_ids = 'null'::jsonb "
            "WHERE profile_ids = '\"__json_null__\"'::jsonb"
        )
        cursor.execute("VACUUM ANALYZE")
    return {"rows": {k: len(v) for k, v in rows.items()}}


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _normalize(value: Any, cutoff: str) -> Any:
    """Timestamps at or after ``cutoff`` (the fix's own "now") become NOW_MARK."""
    from datetime import datetime

    if isinstance(value, dict):
        return {k: _normalize(v, cutoff) for k, v in value.items()}
    if isinstance(value, list):
        return [_normalize(v, cutoff) for v in value]
    if isinstance(value, str) and len(value) >= 19 and value[4:5] == "-" and value[10:11] == "T":
        try:
            if datetime.fromisoformat(value) >= datetime.fromisoformat(cutoff):
                return NOW_MARK
        except ValueError:
            pass
    return value


def reference(mode: str) -> dict:
    """The application's view of the database at DATABASE_URL, by ``mode``:

    * ``plan``: per-type counts from ``load_snapshots`` + ``plan_organization`` (all types),
      the counts of the service's dry run (or its error), and the findings a fix records, as
      ``planned_change`` shapes them (outcome fixed or guarded, in run order);
    * ``newrun``: a new fixing AuditRun for the floor to fill;
    * ``appfix``: the service's own ``--fix`` over all organizations, then ``dump``;
    * ``dump``: the findings of the newest fixing run and the domain tables, for comparison.
    """
    _setup_django()
    from datetime import UTC, datetime

    from django.conf import settings
    from django.db import connection

    from orgs.models import Organization
    from profiles.models import AuditRun
    from profiles.plan import Guard, plan_organization
    from profiles.selectors import load_snapshots
    from profiles.services.changes import planned_change

    if mode == "newrun":
        run = AuditRun.objects.create(trigger="command", fix=True, types=sorted(TYPES))
        return {"run_id": str(run.id)}
    if mode == "djangofix":  # the floor, through Django's connection
        run = AuditRun.objects.create(trigger="command", fix=True, types=sorted(TYPES))
        fix_setbased(connection, run_id=run.id)
        return _dump(connection)
    if mode in ("appfix", "dump"):
        if mode == "appfix":
            from profiles.services.audit import ProfileConnectionAuditService

            ProfileConnectionAuditService().run_audit_for_all_orgs(fix=True)
        return _dump(connection)

    guard = Guard(
        minimum=settings.PROFILE_AUDIT_GUARD_MIN, ratio=settings.PROFILE_AUDIT_GUARD_RATIO
    )
    counts = dict.fromkeys(TYPES, 0)
    expected: list[list[Any]] = []
    marker = datetime(2999, 1, 1, tzinfo=UTC)  # normalized to NOW_MARK like the fix's now
    from profiles.services.soft_delete import ProfileSoftDeleteService

    org_ids = list(Organization.objects.order_by("id").values_list("id", flat=True))
    for start in range(0, len(org_ids), 100):
        snapshots = load_snapshots(org_ids[start : start + 100])
        plans = [plan_organization(snapshots[o], guard=guard) for o in org_ids[start : start + 100]]
        restored = ProfileSoftDeleteService().queue_settings_to_restore(
            profile_ids=[
                f.object_id
                for p in plans
                if not p.guarded
                for f in p.profile_findings
                if f.type == "restore"
            ]
        )
        for plan in plans:
            for f in plan.findings:
                counts[f.type] += 1
                qs = None if plan.guarded else restored.get(f.object_id)
                change = planned_change(f, now=marker, queue_settings=qs)
                platform, external_id = f.key or ("", "")
                expected.append(
                    [
                        str(plan.organization_id),
                        str(f.type),
                        str(f.action),
                        f.model,
                        str(f.object_id) if f.object_id else None,
                        platform,
                        external_id,
                        _normalize(change.before, marker.isoformat()),
                        _normalize(change.after, marker.isoformat()),
                        "guarded" if plan.guarded else "fixed",
                        GUARD_DETAIL if plan.guarded else "",
                    ]
                )
    service: dict[str, int] | str
    try:
        from profiles.services.audit import ProfileConnectionAuditService

        report = ProfileConnectionAuditService().run_audit_for_all_orgs()
        service = {t: report.run.by_type[t]["found"] for t in TYPES}
    except Exception as exc:  # the service is being rewritten: report, fall back to plans
        service = f"{type(exc).__name__}: {exc}"
    return {
        "plan_counts": counts,
        "service_counts": service,
        "django_connection_counts": count_findings(connection),
        "expected_findings": expected,
    }


def _dump(connection: Any) -> dict:
    """The newest fixing run's findings (seq order) and the domain tables, as plain JSON."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT id, started_at, status, found, fixed, error FROM profiles_auditrun "
            "WHERE fix ORDER BY started_at DESC LIMIT 1"
        )
        run_id, started_at, *run_state = cursor.fetchone()
        cursor.execute(
            "SELECT seq, organization_id::text, type, action, model, object_id::text, platform, "
            "external_id, before, after, outcome, detail FROM profiles_auditfinding "
            "WHERE run_id = %s ORDER BY seq",
            [run_id],
        )
        findings = [list(r) for r in cursor.fetchall()]
        cursor.execute(
            "SELECT id::text, organization_id::text, platform, external_id, name, "
            "connection_id::text, deleted_at IS NULL, created_at FROM profiles_socialprofile"
        )
        profiles = [[*r[:7], r[7].isoformat()] for r in cursor.fetchall()]
        cursor.execute("SELECT id::text, deleted_at FROM queues_queuesetting")
        settings_ = {i: d.isoformat() if d else None for i, d in cursor.fetchall()}
        cursor.execute("SELECT id::text, profile_ids FROM boosts_boostrule")
        rules = dict(cursor.fetchall())
    return {
        "run_id": str(run_id),
        "run": dict(zip(("status", "found", "fixed", "error"), run_state, strict=True)),
        "cutoff": started_at.isoformat(),
        "findings": [
            [
                f[0],
                *[
                    json.loads(x) if isinstance(x, str) and i in (8, 9) else x
                    for i, x in enumerate(f[1:], start=1)
                ],
            ]
            for f in findings
        ],
        "profiles": profiles,
        "queue_settings": settings_,
        "boost_rules": {
            k: _canonical(json.loads(v) if isinstance(v, str) else v) for k, v in rules.items()
        },
    }


# --- Orchestration ------------------------------------------------------------------------------


def _connect(url: str) -> Any:
    import psycopg

    return psycopg.connect(url)


def check_uuid_parsing(url: str, *, samples: int = 20000, seed: int = 7) -> list[str]:
    """The SQL reading of a boost entry against ``uuid.UUID(str)`` on many awkward strings."""
    rng = random.Random(seed)
    pieces = [
        *"0123456789abcdefABCDEF-{}_+xX ",
        "\t", "\n", "\x0b", "\x1c", "\u00a0", "\u3000", "\u0663", "\uff17", "\uff41", "g",
        "urn:", "uuid:", "0x", "URN:", "\u00b2",
    ]  # fmt: skip
    strings = ["", "junk", str(uuid.uuid4()), "{" * 3 + uuid.uuid4().hex + "}"]
    for _ in range(samples):
        h = uuid.uuid4().hex
        kind = rng.random()
        if kind < 0.5:  # a valid id, mutated
            chars = list(rng.choice([h, str(uuid.UUID(h)), "000" + h[3:], "00000" + h[5:]]))
            for _ in range(rng.randint(0, 3)):
                at = rng.randrange(len(chars) + 1)
                op = rng.random()
                if op < 0.4 and chars:
                    chars[min(at, len(chars) - 1)] = rng.choice(pieces)
                elif op < 0.7:
                    chars.insert(at, rng.choice(pieces))
                elif chars:
                    del chars[min(at, len(chars) - 1)]
            strings.append("".join(chars))
        else:  # built from pieces around 32 characters
            s = "".join(rng.choice(pieces) for _ in range(rng.randint(28, 34)))
            strings.append(s)

    def python(s: str) -> str | None:
        try:
            return str(uuid.UUID(s))
        except ValueError:
            return None

    sql = (
        f"SELECT t, {_uuid_ref_sql('hexed')}::text FROM "
        f"(SELECT t, {_hex_sql('t')} AS hexed FROM unnest(%(strings)s::text[]) AS t OFFSET 0) x"
    )
    with _connect(url) as conn, conn.cursor() as cursor:
        cursor.execute(sql, _params(strings=strings))
        got = dict(cursor.fetchall())
    valid = sum(python(s) is not None for s in strings)
    bad = [f"{s!r}: python {python(s)} sql {got[s]}" for s in strings if python(s) != got[s]]
    print(f"  uuid parsing: {len(set(strings))} strings ({valid} valid ids), {len(bad)} disagree")
    return bad


def check_dataset(scratch: Scratch, label: str, *, app_fix: bool) -> list[str]:
    """Counts, fix record, convergence and (with ``app_fix``) the app's own fix, on the data
    set in the ``tpl`` database."""
    problems: list[str] = []
    print(f"[{label}]")
    url = scratch.create("a", template="tpl")
    ref = _run_child(url, "_reference", "--mode=plan")
    with _connect(url) as conn:
        floor = count_findings(conn)
    service = ref["service_counts"]
    print(f"  {'type':<22}{'floor':>8}{'plan':>8}{'service':>9}")
    for t in TYPES:
        s = service[t] if isinstance(service, dict) else "-"
        print(f"  {t:<22}{floor[t]:>8}{ref['plan_counts'][t]:>8}{s:>9}")
        if floor[t] != ref["plan_counts"][t] or (isinstance(service, dict) and floor[t] != s):
            problems.append(f"{label}: count of {t} disagrees")
    if not isinstance(service, dict):
        print(f"  (service dry run unavailable, plan-based counts used: {service})")
    if ref["django_connection_counts"] != floor:
        problems.append(f"{label}: count_findings through Django's connection differs")

    url = scratch.create("b", template="tpl")
    run_id = _run_child(url, "_reference", "--mode=newrun")["run_id"]
    with _connect(url) as conn:
        fixed = fix_setbased(conn, run_id=run_id)
    dump_floor = _run_child(url, "_reference", "--mode=dump")
    cutoff = dump_floor["cutoff"]
    got = [_normalize(f[1:], cutoff) for f in dump_floor["findings"]]
    want = ref["expected_findings"]
    seqs = [f[0] for f in dump_floor["findings"]]
    if seqs != list(range(1, len(seqs) + 1)):
        problems.append(f"{label}: seq is not 1..n")
    mismatched = [
        (i, g, w)
        for i, (g, w) in enumerate(zip(got, want, strict=False))
        if _canonical(g) != _canonical(w)
    ]
    print(
        f"  fix_setbased: fixed {sum(fixed.values())} "
        f"({', '.join(f'{t} {n}' for t, n in fixed.items())}); "
        f"findings recorded {len(got)}, expected {len(want)}, differing {len(mismatched)}"
    )
    restores_with_settings = sum(
        1 for f in got if f[1] == "restore" and "queue_settings" in (f[8] or {})
    )
    odd_kept = sum(
        1
        for f in got
        if f[1] == "invalid_boost_ref"
        for e in f[8]["profile_ids"]
        if e != str(uuid.UUID(e))
    )
    print(
        f"  covered: {restores_with_settings} restores bringing back queue settings, "
        f"{odd_kept} kept boost entries in a non-canonical form, "
        f"{sum(1 for f in got if f[9] == 'guarded')} guarded findings"
    )
    if len(got) != len(want) or mismatched:
        problems.append(f"{label}: recorded findings differ from the plan's")
        for i, g, w in mismatched[:5]:
            print(f"    #{i + 1}\n      floor {g}\n      plan  {w}")
    after = _run_child(url, "_reference", "--mode=plan")
    left = {t: n for t, n in after["plan_counts"].items() if n}
    guarded = sum(1 for f in want if f[9] == "guarded")
    print(
        f"  dry run after the floor's fix finds {sum(after['plan_counts'].values())} "
        f"(service: {after['service_counts']}); guarded findings left as they were: {guarded}"
    )
    if sum(left.values()) != guarded:
        problems.append(f"{label}: a dry run after the fix finds {left}")
    with _connect(url) as conn:
        again = count_findings(conn)
    if again != after["plan_counts"]:
        problems.append(f"{label}: count_findings after the fix {again} != plan {left}")
    second_run = _run_child(url, "_reference", "--mode=newrun")["run_id"]
    with _connect(url) as conn:
        second = fix_setbased(conn, run_id=second_run)
    print(f"  a second fix_setbased fixes {sum(second.values())}")
    if any(second.values()):
        problems.append(f"{label}: fixing twice changed something the second time: {second}")

    url_d = scratch.create("d", template="tpl")
    dump_django = _run_child(url_d, "_reference", "--mode=djangofix")
    problems += _compare_fixes(label, dump_floor, dump_django, "fix_setbased through Django")
    if app_fix:
        url_c = scratch.create("c", template="tpl")
        dump_app = _run_child(url_c, "_reference", "--mode=appfix")
        problems += _compare_fixes(label, dump_floor, dump_app, "the service's own --fix")
    return problems


def _compare_fixes(label: str, floor: dict, app: dict, other: str) -> list[str]:
    """The floor's fix against another (on another copy): recorded findings and tables."""
    problems = []

    def findings(dump: dict) -> list[str]:
        return [_canonical(_normalize(f[1:], dump["cutoff"])) for f in dump["findings"]]

    def profiles(dump: dict) -> tuple[dict, list]:
        old, new = {}, []
        for id_, org, platform, external_id, name, conn, alive, created in dump["profiles"]:
            if created >= dump["cutoff"]:
                new.append((org, platform, external_id, name, conn, alive))
            else:
                old[id_] = (conn, alive)
        return old, sorted(new, key=str)

    def settings_(dump: dict) -> dict:
        return {k: v if v is None or v < dump["cutoff"] else NOW_MARK
                for k, v in dump["queue_settings"].items()}  # fmt: skip

    same = {
        "findings": findings(floor) == findings(app),
        "profiles": profiles(floor) == profiles(app),
        "queue settings": settings_(floor) == settings_(app),
        "boost rules": floor["boost_rules"] == app["boost_rules"],
    }
    print(
        f"  against {other} on another copy: "
        + ", ".join(f"{k} {'same' if v else 'DIFFER'}" for k, v in same.items())
    )
    for what, ok in same.items():
        if not ok:
            problems.append(f"{label}: {what} after the fix differ from {other}")
    if not same["findings"]:
        print(
            f"    floor: {len(floor['findings'])} findings, run {floor['run']}; "
            f"other: {len(app['findings'])} findings, run {app['run']}"
        )
        for i, (a, b) in enumerate(zip(findings(floor), findings(app), strict=False)):
            if a != b:
                print(f"    #{i + 1}\n      floor {a}\n      other {b}")
                break
    return problems


def check(args: argparse.Namespace) -> int:
    scratch = Scratch(args.url)
    problems: list[str] = []
    try:
        print(f"set-based floor check, {args.orgs} organizations per data set")
        problems += [f"uuid: {b}" for b in check_uuid_parsing(scratch.create("tpl"))][:20]
        for label, make in (
            (
                f"benchmark builder, {args.orgs} orgs x {args.profiles}",
                lambda url: build_benchmark_data(
                    url, orgs=args.orgs, profiles=args.profiles, rate=args.rate
                ),
            ),
            (
                f"nasty, {args.orgs} orgs",
                lambda url: _run_child(url, "_nasty", f"--orgs={args.orgs}", f"--seed={args.seed}"),
            ),
        ):
            built = make(scratch.create("tpl"))
            print(f"built: {built['rows']}")
            problems += check_dataset(scratch, label, app_fix=not args.no_app_fix)
    finally:
        if not args.keep:
            scratch.drop_all()
    print()
    print(
        "AGREEMENT: all checks pass"
        if not problems
        else "DISAGREEMENTS:\n  " + "\n  ".join(problems)
    )
    return 1 if problems else 0


def time_floor(args: argparse.Namespace) -> int:
    scratch = Scratch(args.url)
    try:
        started = time.perf_counter()
        built = build_benchmark_data(
            scratch.create("tpl"), orgs=args.orgs, profiles=args.profiles, rate=args.rate
        )
        print(
            f"set-based floor: {args.orgs} organizations x {args.profiles} profiles, "
            f"rate {args.rate:g}; built in {time.perf_counter() - started:.1f} s: {built['rows']}"
        )
        walls: dict[str, list[float]] = {"count_findings": [], "fix_setbased": []}
        result: dict[str, dict[str, int]] = {}
        for _ in range(args.repeat):
            url = scratch.create("a", template="tpl")
            with _connect(url) as conn:
                started = time.perf_counter()
                result["count_findings"] = count_findings(conn)
                walls["count_findings"].append(time.perf_counter() - started)
        for _ in range(args.repeat):
            url = scratch.create("a", template="tpl")
            run_id = _run_child(url, "_reference", "--mode=newrun")["run_id"]
            with _connect(url) as conn:
                started = time.perf_counter()
                result["fix_setbased"] = fix_setbased(conn, run_id=run_id)
                walls["fix_setbased"].append(time.perf_counter() - started)
            with _connect(url) as conn:
                left = sum(count_findings(conn).values())
        print(f"{'phase':<16}{'wall s (median)':>17}{'min':>8}{'max':>8}{'findings':>10}")
        for phase, w in walls.items():
            print(
                f"{phase:<16}{statistics.median(w):>17.3f}{min(w):>8.3f}{max(w):>8.3f}"
                f"{sum(result[phase].values()):>10}"
            )
        print(f"after fix_setbased, count_findings finds {left}")
    finally:
        if not args.keep:
            scratch.drop_all()
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", nargs="?", choices=["_nasty", "_reference"])
    parser.add_argument("--check", action="store_true", help="check agreement with the app")
    parser.add_argument("--time", action="store_true", help="time the floor on the builder's data")
    parser.add_argument("--orgs", type=int, default=300)
    parser.add_argument("--profiles", type=int, default=20)
    parser.add_argument("--rate", type=float, default=0.05)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--url", default=DEFAULT_URL, help=f"scratch server (default {DEFAULT_URL})"
    )
    parser.add_argument("--keep", action="store_true", help="keep the scratch databases")
    parser.add_argument("--no-app-fix", action="store_true", help="skip the service's own --fix")
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=11, help="seed of the nasty data set")
    args = parser.parse_args()
    if args.command == "_nasty":
        print(json.dumps(build_nasty(args.orgs, args.seed)))
    elif args.command == "_reference":
        print(json.dumps(reference(args.mode), default=str))
    elif args.check:
        raise SystemExit(check(args))
    elif args.time:
        raise SystemExit(time_floor(args))
    else:
        parser.print_help()


if __name__ == "__main__":
    main()
