# Change marks (DESIGN "Change-driven runs"): every write to the audited tables marks the
# organizations it touches, in the writing transaction, by triggers declared here, so the ORM,
# QuerySet.update, bulk writes, Django's cascades and SET NULLs, raw SQL and other programs are
# all seen, and a write that rolls back marks nothing.
#
# Hand-written SQL, one operation for both databases, rather than django-pgtrigger: it installs
# PostgreSQL triggers only (on SQLite nothing), so SQLite would need a second library or a second
# path of our own; it declares triggers in Meta of models that four other apps own, and adds an
# app of its own; and the bodies here (an upsert over transition tables) would be the same
# hand-written SQL inside its Trigger objects. Here one RunPython picks each vendor's SQL:
# PostgreSQL statement-level triggers with transition tables (one upsert per statement over the
# organizations it touched), SQLite row-level triggers, behind the same tests.
#
# Writers. PostgreSQL: current_setting('application_name') and the transaction-local
# profile_sync.writer that profiles.change_marks.writer() sets. SQLite has neither, so the
# helper writes the tag (and an application name) into a one-row table,
# profiles_changemark_writer, and removes it before its transaction ends: SQLite has one writer
# at a time and readers see only committed rows, so an uncommitted row there is as local to the
# writing transaction as SET LOCAL, and a program that never calls the helper finds the table
# empty (no tag, no application name) instead of failing on a missing table or function.
#
# Versions. PostgreSQL: a sequence. SQLite: a one-row counter, profiles_changemark_clock
# (writers are serialized, so the counter is never contended).
#
# On SQLite, a later migration that rebuilds one of the audited tables (Django copies the table
# to alter most columns) drops its triggers with the old table: such a migration must create
# them again. tests/test_change_marks.py checks that every trigger is in place.

from django.db import migrations, models

# At most this many distinct (application_name, writer) pairs are kept per mark.
MAX_WRITERS = 10

# The audited tables whose rows name their organization; assets name it through their connection.
DIRECT = [
    "connections_platformconnection",
    "profiles_socialprofile",
    "queues_queuesetting",
    "boosts_boostrule",
]
ASSETS = "connections_connectionasset"

# --- PostgreSQL ---------------------------------------------------------------------------------

PG_SEQUENCE = "CREATE SEQUENCE profiles_changemark_version_seq AS bigint"

# One upsert over the distinct organizations a statement touched, {marks} being (org, n) rows,
# in id order (so two statements marking overlapping sets take the marks' row locks in the same
# order). The writer: who connected (application_name) and what the application says it is
# doing (the transaction-local tag; '' once a tag set earlier in the session has ended). The
# writers stay oldest first, one entry per (application_name, writer), the newest last; bounded.
# Inlined in each trigger function, not a function of its own: PL/pgSQL keeps the plan of every
# statement for the session, where an SQL function with an INSERT is planned at every call.
PG_UPSERT = f"""
      INSERT INTO profiles_changemark AS m
        (organization_id, first_marked_at, last_marked_at, writes, writers, version)
      SELECT s.org, statement_timestamp(), statement_timestamp(), s.n,
             jsonb_build_array(jsonb_build_object(
               'application_name', current_setting('application_name'),
               'writer', nullif(current_setting('profile_sync.writer', true), ''),
               'at', statement_timestamp())),
             nextval('profiles_changemark_version_seq')
      FROM ({{marks}}) s
      WHERE s.org IS NOT NULL
      ORDER BY s.org
      ON CONFLICT (organization_id) DO UPDATE SET
        last_marked_at = excluded.last_marked_at,
        writes = m.writes + excluded.writes,
        version = excluded.version,
        writers = CASE
          WHEN m.writers -> -1 -> 'application_name' = excluded.writers -> 0 -> 'application_name'
               AND m.writers -> -1 -> 'writer' = excluded.writers -> 0 -> 'writer'
            THEN jsonb_set(m.writers, '{{{{-1}}}}', excluded.writers -> 0)
          ELSE (
            SELECT coalesce(jsonb_agg(kept.e ORDER BY kept.o), '[]'::jsonb) || excluded.writers
            FROM (
              SELECT t.e, t.o FROM jsonb_array_elements(m.writers) WITH ORDINALITY AS t(e, o)
              WHERE t.e -> 'application_name' IS DISTINCT FROM excluded.writers -> 0 -> 'application_name'
                 OR t.e -> 'writer' IS DISTINCT FROM excluded.writers -> 0 -> 'writer'
              ORDER BY t.o DESC
              LIMIT {MAX_WRITERS - 1}
            ) kept)
        END;"""


def _pg_trigger_function(name: str, org_rows: str) -> str:
    """A statement-level trigger function; ``org_rows`` selects (org, n) from ``{rows}``.

    An update counts, per organization, the larger of its rows before and after: a row that
    stays counts once, a row moved counts once on each side.
    """
    inserted = org_rows.format(rows="new_rows")
    deleted = org_rows.format(rows="old_rows")
    updated = (
        f"SELECT u.org, max(u.n) AS n FROM ({inserted} UNION ALL {deleted}) u GROUP BY u.org"
    )
    return f"""
    CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      IF TG_OP = 'INSERT' THEN {PG_UPSERT.format(marks=inserted)}
      ELSIF TG_OP = 'DELETE' THEN {PG_UPSERT.format(marks=deleted)}
      ELSE {PG_UPSERT.format(marks=updated)}
      END IF;
      RETURN NULL;
    END
    $$
    """


PG_DIRECT_ROWS = "SELECT r.organization_id AS org, count(*) AS n FROM {rows} r GROUP BY 1"
# An asset's organization is its connection's. Django deletes assets before their connection
# (and a connection deleted first marks its organization itself).
PG_ASSET_ROWS = (
    "SELECT c.organization_id AS org, count(*) AS n FROM {rows} r "
    "JOIN connections_platformconnection c ON c.id = r.connection_id GROUP BY 1"
)


def _pg_triggers(table: str, function: str) -> list[str]:
    return [
        f"CREATE TRIGGER profile_sync_mark_insert AFTER INSERT ON {table} "
        f"REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION {function}()",
        f"CREATE TRIGGER profile_sync_mark_update AFTER UPDATE ON {table} "
        f"REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows "
        f"FOR EACH STATEMENT EXECUTE FUNCTION {function}()",
        f"CREATE TRIGGER profile_sync_mark_delete AFTER DELETE ON {table} "
        f"REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION {function}()",
    ]


PG_INSTALL = [
    PG_SEQUENCE,
    _pg_trigger_function("profile_sync_mark_rows", PG_DIRECT_ROWS),
    _pg_trigger_function("profile_sync_mark_asset_rows", PG_ASSET_ROWS),
    *(sql for table in DIRECT for sql in _pg_triggers(table, "profile_sync_mark_rows")),
    *_pg_triggers(ASSETS, "profile_sync_mark_asset_rows"),
]

PG_UNINSTALL = [
    *(
        f"DROP TRIGGER IF EXISTS profile_sync_mark_{op} ON {table}"
        for table in [*DIRECT, ASSETS]
        for op in ("insert", "update", "delete")
    ),
    "DROP FUNCTION IF EXISTS profile_sync_mark_rows()",
    "DROP FUNCTION IF EXISTS profile_sync_mark_asset_rows()",
    "DROP SEQUENCE IF EXISTS profiles_changemark_version_seq",
]

# --- SQLite -------------------------------------------------------------------------------------

SQLITE_TABLES = [
    "CREATE TABLE profiles_changemark_clock "
    "(id integer NOT NULL PRIMARY KEY CHECK (id = 1), version integer NOT NULL)",
    "INSERT INTO profiles_changemark_clock (id, version) VALUES (1, 0)",
    "CREATE TABLE profiles_changemark_writer "
    "(id integer NOT NULL PRIMARY KEY CHECK (id = 1), application_name text NOT NULL, "
    "writer text NOT NULL)",
]

# Django stores datetimes on SQLite as UTC text; the writers' "at" is ISO 8601 with its zone.
SQLITE_NOW = "strftime('%Y-%m-%d %H:%M:%f', 'now')"
SQLITE_ENTRY = (
    "json_object("
    "'application_name', coalesce((SELECT application_name FROM profiles_changemark_writer), ''), "
    "'writer', (SELECT writer FROM profiles_changemark_writer), "
    "'at', strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now'))"
)
# In the upsert's DO UPDATE: the mark's writers with this write's entry (excluded's only one).
_SAME = (
    "json_extract({e}, '$.application_name') IS json_extract(excluded.writers, '$[0].application_name') "
    "AND json_extract({e}, '$.writer') IS json_extract(excluded.writers, '$[0].writer')"
)
SQLITE_PUSH = f"""CASE
      WHEN {_SAME.format(e="json_extract(writers, '$[#-1]')")}
        THEN json_set(writers, '$[#-1]', json(json_extract(excluded.writers, '$[0]')))
      ELSE json_insert(
        (SELECT json_group_array(json(kept.value)) FROM (
          SELECT recent.key, recent.value FROM (
            SELECT j.key, j.value FROM json_each(writers) j
            WHERE NOT ({_SAME.format(e="j.value")})
            ORDER BY j.key DESC LIMIT {MAX_WRITERS - 1}
          ) recent ORDER BY recent.key
        ) kept),
        '$[#]', json(json_extract(excluded.writers, '$[0]')))
    END"""


def _sqlite_mark(org: str, *, unless_same_as: str | None = None) -> str:
    """The statements that mark organization ``org`` (an SQL expression), in a trigger body;
    the counter is raised only when there is an organization to mark."""
    when = f"({org}) IS NOT NULL"
    if unless_same_as:
        when += f" AND ({org}) IS NOT ({unless_same_as})"
    return f"""
      UPDATE profiles_changemark_clock SET version = version + 1 WHERE {when};
      INSERT INTO profiles_changemark
        (organization_id, first_marked_at, last_marked_at, writes, writers, version)
      SELECT ({org}), {SQLITE_NOW}, {SQLITE_NOW}, 1, json_array(json({SQLITE_ENTRY})),
             (SELECT version FROM profiles_changemark_clock)
      WHERE {when}
      ON CONFLICT (organization_id) DO UPDATE SET
        last_marked_at = excluded.last_marked_at,
        writes = writes + 1,
        writers = {SQLITE_PUSH},
        version = excluded.version;"""


def _sqlite_triggers(table: str, org_of: str) -> list[str]:
    """Row-level triggers on ``table``; ``org_of`` is an SQL template of ``{row}``'s organization.

    An update marks the row's organization after it and, when that differs, the one before.
    """
    new, old = org_of.format(row="NEW"), org_of.format(row="OLD")
    return [
        f"CREATE TRIGGER profile_sync_mark_insert_{table} AFTER INSERT ON {table} "
        f"FOR EACH ROW BEGIN {_sqlite_mark(new)} END",
        f"CREATE TRIGGER profile_sync_mark_update_{table} AFTER UPDATE ON {table} "
        f"FOR EACH ROW BEGIN {_sqlite_mark(new)} {_sqlite_mark(old, unless_same_as=new)} END",
        f"CREATE TRIGGER profile_sync_mark_delete_{table} AFTER DELETE ON {table} "
        f"FOR EACH ROW BEGIN {_sqlite_mark(old)} END",
    ]


SQLITE_DIRECT_ORG = "{row}.organization_id"
SQLITE_ASSET_ORG = (
    "SELECT c.organization_id FROM connections_platformconnection c WHERE c.id = {row}.connection_id"
)

SQLITE_INSTALL = [
    *SQLITE_TABLES,
    *(sql for table in DIRECT for sql in _sqlite_triggers(table, SQLITE_DIRECT_ORG)),
    *_sqlite_triggers(ASSETS, SQLITE_ASSET_ORG),
]

SQLITE_UNINSTALL = [
    *(
        f"DROP TRIGGER IF EXISTS profile_sync_mark_{op}_{table}"
        for table in [*DIRECT, ASSETS]
        for op in ("insert", "update", "delete")
    ),
    "DROP TABLE IF EXISTS profiles_changemark_writer",
    "DROP TABLE IF EXISTS profiles_changemark_clock",
]


def _run(statements: dict[str, list[str]]):
    def run(apps, schema_editor):
        vendor = schema_editor.connection.vendor
        if vendor not in statements:
            raise NotImplementedError(f"change marks have no triggers for {vendor}")
        for sql in statements[vendor]:
            # No parameters: the SQL's % signs are its own (strftime), not placeholders.
            schema_editor.execute(sql, None)

    return run


class Migration(migrations.Migration):

    dependencies = [
        ('boosts', '0001_initial'),
        ('connections', '0001_initial'),
        ('orgs', '0002_organization_name_upper_idx'),
        ('profiles', '0011_sync_sent_outcome'),
        ('queues', '0001_initial'),
    ]

    operations = [
        migrations.CreateModel(
            name='ChangeMark',
            fields=[
                ('organization', models.OneToOneField(db_constraint=False, on_delete=models.deletion.DO_NOTHING, primary_key=True, related_name='change_mark', serialize=False, to='orgs.organization')),
                ('first_marked_at', models.DateTimeField(help_text='The first write since the last audit.')),
                ('last_marked_at', models.DateTimeField(help_text='The latest write.')),
                ('writes', models.BigIntegerField(default=0, help_text='Rows written since the first mark (a row moved counts in both).')),
                ('writers', models.JSONField(blank=True, default=list)),
                ('version', models.BigIntegerField()),
            ],
            options={
                'ordering': ['first_marked_at'],
            },
        ),
        migrations.RunPython(
            _run({"postgresql": PG_INSTALL, "sqlite": SQLITE_INSTALL}),
            _run({"postgresql": PG_UNINSTALL, "sqlite": SQLITE_UNINSTALL}),
        ),
    ]
