"""How long the admin's run and finding lists take with millions of findings stored (default
5,000,000), on PostgreSQL. Figures, not pass/fail.

Fills the configured database with SQL (generate_series: minutes, not hours) unless it already
holds that many findings: 10,000 organizations, runs every six hours over 90 days (fixing,
scheduled) plus dry runs by command, each run's findings spread over organizations. Then
requests the pages through Django's test client as a staff user who is not a superuser (the
whole request: middleware, views, queries, templates), one warm-up and --repeat timed requests
each, and prints the median and best server time and the number of queries.

    createdb -h 127.0.0.1 -U postgres psa_scale
    DATABASE_URL=postgres://postgres@127.0.0.1:5432/psa_scale DJANGO_DEBUG=false \\
        DJANGO_SECRET_KEY=bench-only .venv/bin/python bench/admin_at_scale.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "audit_project.settings")
os.environ.setdefault("PROFILE_AUDIT_CONSOLE_LEVEL", "WARNING")
os.environ.setdefault(
    "DJANGO_SECRET_KEY", "local-benchmark-only-key-not-for-serving-anything-at-all"
)

import django

django.setup()

from django.contrib.auth.models import Permission, User  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.db import connection  # noqa: E402
from django.test import Client  # noqa: E402
from django.test.utils import CaptureQueriesContext, setup_test_environment  # noqa: E402
from django.urls import reverse  # noqa: E402

from profiles.models import AuditFinding, AuditRun  # noqa: E402

ORGANIZATIONS = 10_000

FILL = """
INSERT INTO orgs_organization (id, name, created_at)
SELECT gen_random_uuid(), 'Scale org ' || lpad(g::text, 5, '0'), now() - interval '200 days'
FROM generate_series(1, %(orgs)s) g;

CREATE TEMP TABLE scale_orgs AS
SELECT row_number() OVER (ORDER BY id) - 1 AS n, id FROM orgs_organization
WHERE name LIKE 'Scale org %%';
CREATE INDEX ON scale_orgs (n);

CREATE TEMP TABLE scale_runs AS
SELECT g AS n, gen_random_uuid() AS id,
       CASE WHEN g %% 3 = 0 THEN 'command' ELSE 'schedule' END AS trigger,
       g %% 3 <> 0 AS fix,
       now() - (interval '90 days') + (g * interval '90 days' / %(runs)s) AS started_at
FROM generate_series(1, %(runs)s) g;

INSERT INTO profiles_auditrun (
    id, trigger, organization_id, types, fix, forced, status, started_at, finished_at,
    duration_seconds, organizations_audited, found, fixed, by_type, failed_organizations,
    guarded_organizations, error, organizations_total, findings_recorded, last_progress_at,
    deadline, requested_by, requested_host, task_id, lock_token, reverted_run_id)
SELECT id, trigger, NULL, '[]', fix, false,
       CASE WHEN n %% 17 = 0 THEN 'partial' ELSE 'succeeded' END,
       started_at, started_at + interval '95 seconds', 95.0, %(orgs)s,
       %(per_run)s, CASE WHEN fix THEN %(per_run)s ELSE 0 END,
       '{}', '{}', '[]', '', %(orgs)s, %(per_run)s, started_at + interval '95 seconds',
       NULL, '', 'bench-host', '', '', NULL
FROM scale_runs;

INSERT INTO profiles_auditfinding (
    id, run_id, seq, organization_id, type, action, model, object_id, platform, external_id,
    before, after, outcome, detail)
SELECT gen_random_uuid(), r.id, g, o.id,
       (ARRAY['orphaned','deselected','relink','missing','restore','stale_queue_setting'])[1 + g %% 6],
       (ARRAY['soft_delete','soft_delete','relink','dispatch_sync','restore','soft_delete'])[1 + g %% 6],
       CASE WHEN g %% 6 = 5 THEN 'queues.QueueSetting' ELSE 'profiles.SocialProfile' END,
       CASE WHEN g %% 6 = 3 THEN NULL ELSE gen_random_uuid() END,
       'facebook', 'ext-' || r.n || '-' || g,
       CASE WHEN g %% 6 = 3 THEN NULL ELSE '{"deleted_at": null}'::jsonb END,
       '{"deleted_at": "2026-01-01T00:00:00+00:00"}'::jsonb,
       CASE WHEN NOT r.fix THEN 'planned' WHEN g %% 50 = 0 THEN 'stale' ELSE 'fixed' END,
       ''
FROM scale_runs r
CROSS JOIN generate_series(1, %(per_run)s) g
JOIN scale_orgs o ON o.n = (r.n * 7919 + g) %% %(orgs)s;
ANALYZE;
"""


def fill(findings: int, runs: int) -> None:
    per_run = findings // runs
    with connection.cursor() as cursor:
        cursor.execute(FILL, {"orgs": ORGANIZATIONS, "runs": runs, "per_run": per_run})


def time_page(client: Client, url: str, *, repeat: int) -> tuple[float, float, int]:
    response = client.get(url)  # warm-up
    assert response.status_code == 200, (url, response.status_code)
    timings, queries = [], 0
    for _ in range(repeat):
        with CaptureQueriesContext(connection) as captured:
            started = time.perf_counter()
            response = client.get(url)
            timings.append(time.perf_counter() - started)
        assert response.status_code == 200, (url, response.status_code)
        queries = max(queries, len(captured))
    return statistics.median(timings), min(timings), queries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--findings", type=int, default=5_000_000)
    parser.add_argument("--runs", type=int, default=2_000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--fill-only", action="store_true")
    args = parser.parse_args()
    if connection.vendor != "postgresql":
        sys.exit("bench/admin_at_scale.py needs PostgreSQL: set DATABASE_URL")

    setup_test_environment()
    call_command("migrate", verbosity=0)
    stored = AuditFinding.objects.count()
    if stored < args.findings:
        started = time.perf_counter()
        fill(args.findings - stored, args.runs)
        print(f"filled in {time.perf_counter() - started:.0f} s")
    stored = AuditFinding.objects.count()
    if args.fill_only:
        print(f"{stored:,} findings stored")
        return

    user, _ = User.objects.get_or_create(username="bench-oncall", defaults={"is_staff": True})
    user.user_permissions.set(
        Permission.objects.filter(
            codename__in=[
                "view_auditrun",
                "view_auditfinding",
                "revert_auditrun",
                "run_auditrun",
                "release_lock_auditrun",
            ]
        )
    )
    client = Client()
    client.force_login(user)
    runs = reverse("admin:profiles_auditrun_changelist")
    findings = reverse("admin:profiles_auditfinding_changelist")
    some = AuditFinding.objects.filter(object_id__isnull=False).order_by("run_id", "seq").first()
    run = AuditRun.objects.order_by("-started_at").first()
    urls = [
        ("run list (dashboard)", runs),
        ("run list, search an organization", f"{runs}?q=Scale+org+01234"),
        ("run list, status filter", f"{runs}?status__exact=partial"),
        ("run list, sorted by found", f"{runs}?o=6"),
        ("findings list", findings),
        ("findings list, search external id", f"{findings}?q={some.external_id}"),
        ("findings list, search object id", f"{findings}?q={some.object_id}"),
        ("findings list, organization by name", f"{findings}?organization=Scale+org+01234"),
        ("findings list, organization by id", f"{findings}?organization={some.organization_id}"),
        ("findings list, name matching every org", f"{findings}?organization=Scale+org"),
        ("findings list, type filter", f"{findings}?type__exact=relink"),
        ("findings list, sorted by type", f"{findings}?o=4"),
        ("findings list, one run", f"{findings}?run={run.id}"),
        ("run page", reverse("admin:profiles_auditrun_change", args=[run.id])),
    ]
    print(f"{stored:,} findings, {AuditRun.objects.count():,} runs; {args.repeat} requests each")
    print(f"{'page':<42}{'median ms':>10}{'best ms':>9}{'queries':>9}")
    for label, url in urls:
        median, best, queries = time_page(client, url, repeat=args.repeat)
        print(f"{label:<42}{median * 1000:>10.1f}{best * 1000:>9.1f}{queries:>9}")


if __name__ == "__main__":
    main()
