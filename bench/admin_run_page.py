"""How long the admin's audit-run pages take for a run of many findings (default 100,000).

Builds one finished fixing run with that many findings (bulk_create, spread over organizations
like an all-organization run) in the configured database, then requests the admin pages through
Django's test client as a logged-in staff user: the whole request (middleware, views, queries,
template rendering), without a network. Prints, per page, the median and best of the timed
requests and the number of queries. Figures, not pass/fail.

    createdb -h 127.0.0.1 -U postgres psa_wt4_bench
    DATABASE_URL=postgres://postgres@127.0.0.1:5432/psa_wt4_bench \\
        .venv/bin/python bench/admin_run_page.py --findings 100000

The run is deleted afterwards unless --keep is given.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "audit_project.settings")
os.environ.setdefault("PROFILE_AUDIT_CONSOLE_LEVEL", "WARNING")
# A benchmark serves nothing: a key of its own, so it runs with DEBUG off (as measured) and no
# secret to set (the settings refuse the development placeholder with DEBUG off).
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
from django.utils import timezone  # noqa: E402

from orgs.models import Organization  # noqa: E402
from profiles.models import (  # noqa: E402
    AuditFinding,
    AuditRun,
    AuditStatus,
    AuditTrigger,
    FindingAction,
    FindingOutcome,
    FindingType,
)

KINDS = [
    (FindingType.ORPHANED, FindingAction.SOFT_DELETE, "profiles.SocialProfile"),
    (FindingType.DESELECTED, FindingAction.SOFT_DELETE, "profiles.SocialProfile"),
    (FindingType.RELINK, FindingAction.RELINK, "profiles.SocialProfile"),
    (FindingType.MISSING, FindingAction.DISPATCH_SYNC, "profiles.SocialProfile"),
    (FindingType.STALE_QUEUE_SETTING, FindingAction.SOFT_DELETE, "queues.QueueSetting"),
    (FindingType.INVALID_BOOST_REF, FindingAction.REMOVE_REFS, "boosts.BoostRule"),
]


def build_run(*, findings: int, organizations: int) -> AuditRun:
    orgs = Organization.objects.bulk_create(
        Organization(name=f"Bench org {n:05d}") for n in range(organizations)
    )
    by_type = {t.value: {"found": 0, "fixed": 0} for t in FindingType}
    run = AuditRun.objects.create(
        trigger=AuditTrigger.SCHEDULE,
        fix=True,
        status=AuditStatus.SUCCEEDED,
        finished_at=timezone.now(),
        duration_seconds=42.0,
        organizations_audited=organizations,
        error="",
    )
    now = timezone.now().isoformat()
    per_org = -(-findings // organizations)
    batch: list[AuditFinding] = []
    for n in range(findings):
        type_, action, model = KINDS[n % len(KINDS)]
        missing = type_ == FindingType.MISSING
        connection_id = str(uuid.uuid4())
        after = (
            {"connection_id": connection_id}
            if type_ == FindingType.RELINK
            else {"platform": "facebook", "external_id": f"ext-{n}", "name": f"Page {n}"}
            if missing
            else {"profile_ids": [str(uuid.uuid4())]}
            if type_ == FindingType.INVALID_BOOST_REF
            else {"deleted_at": now}
        )
        before = (
            None
            if missing
            else {"connection_id": None}
            if type_ == FindingType.RELINK
            else {"profile_ids": [str(uuid.uuid4()), "not-a-uuid"]}
            if type_ == FindingType.INVALID_BOOST_REF
            else {"deleted_at": None}
        )
        batch.append(
            AuditFinding(
                run=run,
                seq=n + 1,
                organization=orgs[n // per_org],
                type=type_,
                action=action,
                model=model,
                object_id=None if missing else uuid.uuid4(),
                platform="facebook",
                external_id=f"ext-{n}",
                before=before,
                after=after,
                outcome=FindingOutcome.FIXED,
            )
        )
        by_type[type_]["found"] += 1
        by_type[type_]["fixed"] += 1
        if len(batch) == 5000:
            AuditFinding.objects.bulk_create(batch)
            batch = []
    AuditFinding.objects.bulk_create(batch)
    run.by_type = by_type
    run.found = run.fixed = findings
    run.save()
    return run


def time_page(client: Client, url: str, *, repeat: int) -> tuple[float, float, int, int]:
    client.get(url)  # warm: the content type cache, connection, template loading
    timings, query_counts = [], []
    for _ in range(repeat):
        with CaptureQueriesContext(connection) as captured:
            started = time.perf_counter()
            response = client.get(url)
            timings.append(time.perf_counter() - started)
        assert response.status_code == 200, (url, response.status_code)
        query_counts.append(len(captured))
    return statistics.median(timings), min(timings), max(query_counts), len(response.content)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--findings", type=int, default=100_000, help="findings in the run")
    parser.add_argument("--organizations", type=int, default=100, help="organizations they span")
    parser.add_argument("--repeat", type=int, default=7, help="timed requests per page")
    parser.add_argument("--keep", action="store_true", help="keep the run and organizations")
    args = parser.parse_args()

    setup_test_environment()
    call_command("migrate", verbosity=0)
    started = time.perf_counter()
    run = build_run(findings=args.findings, organizations=args.organizations)
    built = time.perf_counter() - started
    # An on-call engineer: staff with the view and revert permissions, not a superuser (whose
    # permission checks cost no queries).
    user, _ = User.objects.get_or_create(username="bench-oncall", defaults={"is_staff": True})
    user.user_permissions.set(
        Permission.objects.filter(
            codename__in=["view_auditrun", "view_auditfinding", "revert_auditrun"]
        )
    )
    client = Client()
    client.force_login(user)

    run_page = reverse("admin:profiles_auditrun_change", args=[run.id])
    pages = args.findings // 100
    middle = max(1, pages // 2)
    findings_list = reverse("admin:profiles_auditfinding_changelist")
    urls = [
        ("run detail, findings page 1", run_page),
        (f"run detail, findings page {middle}", f"{run_page}?findings_page={middle}"),
        (f"run detail, findings page {pages} (last)", f"{run_page}?findings_page={pages}"),
        ("findings list, filtered to the run", f"{findings_list}?run={run.id}"),
        (
            "findings list, run + type + fixed",
            f"{findings_list}?run={run.id}&type=relink&fixed=yes",
        ),
        ("findings list, last page of the run", f"{findings_list}?run={run.id}&p={pages - 1}"),
        ("run list", reverse("admin:profiles_auditrun_changelist")),
        ("revert confirmation", reverse("admin:profiles_auditrun_revert", args=[run.id])),
    ]
    vendor = connection.vendor
    print(
        f"{args.findings:,} findings over {args.organizations} organizations on {vendor} "
        f"(built in {built:.1f} s); {args.repeat} timed requests per page after one warm-up"
    )
    print(f"{'page':<42}{'median ms':>10}{'best ms':>9}{'queries':>9}{'KiB':>7}")
    try:
        for label, url in urls:
            median, best, queries, size = time_page(client, url, repeat=args.repeat)
            print(
                f"{label:<42}{median * 1000:>10.1f}{best * 1000:>9.1f}{queries:>9}{size // 1024:>7}"
            )
    finally:
        if not args.keep:
            AuditFinding.objects.filter(run=run).delete()
            run.delete()
            Organization.objects.filter(name__startswith="Bench org ").delete()


if __name__ == "__main__":
    main()
