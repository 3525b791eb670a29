#!/usr/bin/env python
"""Change-driven runs against the sweep: cost when 1 % of organizations were written since the
last audit, and the time from a bad write to its fix with the minute beat entry and a worker.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/psa_changes_bench \\
        .venv/bin/python bench/changes_bench.py --orgs 20000 --marked 0.01 --latency 20

Builds the benchmark's data set (bench/audit_bench.py's ``build``) into a fresh database,
converges it (a forced fix, then change-driven fixes until nothing is marked), then:

1. writes a bad change (a selected asset is deselected behind the real-time sync's back) into ``--marked`` of the organizations, and times a
   change-driven dry run and a sweep's dry run on that state (median of ``--repeat``);
2. times a change-driven fix of it; writes the same amount of drift into other organizations and
   times the sweep's fix of that (each fixes the same number of organizations' drift; the sync
   jobs, if any, run in-process);
3. with ``--latency N``: starts beat (DatabaseScheduler, the migrate-created minute entry) and a
   worker on ``maintenance``, then N times makes a bad write at a random moment and waits until
   its finding is recorded fixed; prints the median and the worst.

Figures, not pass/fail; the machine is shared: quote medians and ratios.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--orgs", type=int, default=20000)
    parser.add_argument("--profiles", type=int, default=20)
    parser.add_argument("--marked", type=float, default=0.01, help="share of organizations written")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--latency", type=int, default=0, help="bad writes timed to their fix")
    parser.add_argument("--skip-build", action="store_true", help="reuse the database as it is")
    parser.add_argument("--latency-only", action="store_true", help="only the write-to-fix time")
    args = parser.parse_args()
    if not os.environ.get("DATABASE_URL", "").startswith("postgres"):
        raise SystemExit("set DATABASE_URL to a scratch PostgreSQL database (it is rebuilt)")
    os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:6379/13")
    os.environ.setdefault("PROFILE_AUDIT_RUN_MAX_DELETIONS", "100000000")
    os.environ.setdefault("PROFILE_AUDIT_CONSOLE_LEVEL", "ERROR")
    os.environ.setdefault(
        "DJANGO_SECRET_KEY", "bench-" + "changes-bench-local-only-not-a-secret-" * 2
    )

    from audit_bench import _setup_django, build

    if not args.skip_build:
        _recreate_database()
        started = time.monotonic()
        build(args.orgs, args.profiles, 0.05)
        print(
            f"built {args.orgs:,} organizations x {args.profiles} in {time.monotonic() - started:.0f} s"
        )
    _setup_django()
    from celery import current_app

    current_app.conf.task_always_eager = True  # the sync jobs of a fix run in-process, timed
    _converge()

    rng = random.Random(20261201)
    from orgs.models import Organization

    ids = list(Organization.objects.order_by("id").values_list("id", flat=True))
    if args.latency_only:
        _latency(args.latency, ids, rng)
        return
    n = max(1, int(len(ids) * args.marked))
    first, second = rng.sample(ids, 2 * n)[:n], rng.sample(ids, 2 * n)[n:]

    _bad_writes(first)
    dry_changed = _median(lambda: _timed(changed=True, fix=False), args.repeat)
    dry_sweep = _median(lambda: _timed(changed=False, fix=False), args.repeat)
    fix_changed = _timed(changed=True, fix=True)
    _converge()
    _bad_writes(second)
    fix_sweep = _timed(changed=False, fix=True)

    print(f"\n{args.orgs:,} organizations x {args.profiles}, {n:,} written ({args.marked:.0%})")
    print("| run | change-driven | sweep | ratio |")
    print("| --- | --- | --- | --- |")
    for name, (c, s) in (("dry run", (dry_changed, dry_sweep)), ("fix", (fix_changed, fix_sweep))):
        print(
            f"| {name} | {c[0]:.2f} s ({c[1]} orgs) | {s[0]:.2f} s ({s[1]:,} orgs) | {c[0] / s[0]:.1%} |"
        )

    if args.latency:
        _latency(args.latency, ids, rng)


def _recreate_database() -> None:
    import psycopg

    url = os.environ["DATABASE_URL"]
    name = url.rsplit("/", 1)[1]
    with psycopg.connect(url.rsplit("/", 1)[0] + "/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')


def _converge() -> None:
    """Fix everything, then audit what the fixes marked until nothing is marked."""
    from profiles.models import ChangeMark, UnsettledOrganization
    from profiles.services.audit import AuditRequest, NoRun, run_audit

    run_audit(AuditRequest(fix=True, force=True))
    for _ in range(5):
        if isinstance(run_audit(AuditRequest(fix=True, force=True, changed=True)), NoRun):
            break
    # What the guard holds stays unsettled; the benchmark measures fresh drift only.
    UnsettledOrganization.objects.all().delete()
    ChangeMark.objects.all().delete()


def _bad_writes(org_ids) -> list:
    """In each organization, deselect one selected asset that backs an alive profile, one
    statement each, as another program would (the real-time sync is not told). The profiles
    that become ``deselected``."""
    from connections.models import ConnectionAsset
    from connections.platforms import ASSET_TYPE_PLATFORM
    from profiles.models import SocialProfile

    chosen = {}
    for org, asset, platform_of, ext in (
        ConnectionAsset.objects.filter(
            connection__organization_id__in=list(org_ids), is_selected=True
        )
        .order_by("connection__organization_id", "id")
        .values_list("connection__organization_id", "id", "asset_type", "external_id")
    ):
        chosen.setdefault(org, (asset, ASSET_TYPE_PLATFORM.get(platform_of), ext))
    profiles = []
    for org, (asset, platform, ext) in chosen.items():
        others = ConnectionAsset.objects.filter(
            connection__organization_id=org, external_id=ext, is_selected=True
        ).exclude(id=asset)
        if platform is None or others.exists():
            continue
        ConnectionAsset.objects.filter(id=asset).update(is_selected=False)
        profiles += SocialProfile.objects.filter(
            organization_id=org, platform=platform, external_id=ext, deleted_at__isnull=True
        ).values_list("id", flat=True)
    return profiles


def _timed(*, changed: bool, fix: bool) -> tuple[float, int]:
    from profiles.services.audit import AuditRequest, NoRun, run_audit

    started = time.monotonic()
    report = run_audit(AuditRequest(fix=fix, force=True, changed=changed))
    seconds = time.monotonic() - started
    audited = 0 if isinstance(report, NoRun) else report.run.organizations_audited
    return seconds, audited


def _median(measure, repeat: int) -> tuple[float, int]:
    results = [measure() for _ in range(repeat)]
    return statistics.median(r[0] for r in results), results[0][1]


def _latency(samples: int, ids, rng: random.Random) -> None:
    """Bad write → its finding recorded fixed, with beat's minute entry and one worker."""
    from django.utils import timezone

    from profiles.models import AuditFinding, FindingOutcome

    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "audit_project.settings"}
    env.pop("PROFILE_AUDIT_RUN_MAX_DELETIONS", None)
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "audit_project", "worker", "-Q",
         "maintenance,celery", "--concurrency", "1", "-l", "warning"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    beat = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "audit_project", "beat", "-l", "warning",
         "--scheduler", "django_celery_beat.schedulers:DatabaseScheduler"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    delays = []
    try:
        for i in range(samples):
            time.sleep(rng.uniform(0, 60))  # a write at a random moment of the minute
            # An organization with nothing left to break is passed over for another at once,
            # so every sample is timed.
            for _ in range(1000):
                if profiles := _bad_writes([rng.choice(ids)]):
                    break
            else:
                raise SystemExit("no organization left with an asset to deselect")
            written, written_at = time.monotonic(), timezone.now()
            deadline = written + 300
            # Its finding, recorded fixed by a run that started after the write.
            while not AuditFinding.objects.filter(
                object_id__in=profiles,
                outcome=FindingOutcome.FIXED,
                run__started_at__gte=written_at,
            ).exists():
                if time.monotonic() > deadline:
                    raise SystemExit("no fix within 5 minutes: is the worker taking tasks?")
                time.sleep(0.2)  # polling the records: the fix is recorded by another process
            delays.append(time.monotonic() - written)
            print(f"  write {i + 1}: found and fixed after {delays[-1]:.1f} s", flush=True)
    finally:
        for process in (beat, worker):
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)
    print(
        f"\nbad write -> fixed, {len(delays)} writes: median {statistics.median(delays):.1f} s, "
        f"worst {max(delays):.1f} s"
    )


if __name__ == "__main__":
    main()
