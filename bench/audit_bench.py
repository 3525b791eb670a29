#!/usr/bin/env python
"""Audit benchmark: builds N organizations x M profiles with a given rate of each kind of
inconsistency, then measures a dry run and a fix over all organizations: in this process, and
fanned out over Celery workers with 1 and 2 processes; and, on PostgreSQL, the set-based SQL
floor doing the same work (``bench/setbased.py``), with the ratio of each to it.

Prints, per phase, the median wall time over --repeat runs, the number of queries (in-process
only; COPY is not counted), and the peak RSS of the process that did the work (the largest worker
process when fanned out). Each measured run is its own process on a fresh copy of the data set.

    python bench/audit_bench.py --orgs 1000 --profiles 20            # DATABASE_URL or SQLite
    DATABASE_URL=postgres://postgres@127.0.0.1:5432/psa python bench/audit_bench.py \
        --orgs 5000 --workers 0,1,2

On PostgreSQL it creates databases ``<name>_bench_template`` and ``<name>_bench`` on the
server of DATABASE_URL (and drops them at the end unless --keep). Fanned-out runs need Redis
(BENCH_REDIS_URL, default redis://127.0.0.1:6379/14, flushed before each run). A fix is timed
with all the work it causes: the sync jobs it sends for missing profiles run inline in this
process (eager tasks, as in the embedded default), and when fanned out the workers also take
the `celery` queue and the timing ends when every sync job has confirmed its profiles.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH_REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")


# --- Orchestration (no Django here) ------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--orgs", type=int, default=1000, help="organizations (default 1000)")
    parser.add_argument("--profiles", type=int, default=20, help="profiles per organization")
    parser.add_argument(
        "--rate",
        type=float,
        default=0.05,
        help="share of profiles in each inconsistent state (default 0.05 per kind)",
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs per phase (median shown)")
    parser.add_argument("--keep", action="store_true", help="keep the benchmark databases")
    parser.add_argument(
        "--workers",
        default="0",
        help="comma-separated: 0 = in this process, N = fanned out over a worker with N "
        "processes (needs Redis; default 0)",
    )
    parser.add_argument(
        "--shard-size",
        type=int,
        default=0,
        help="organizations per shard when fanned out (default: enough shards to keep two "
        "processes busy, at least 100)",
    )
    parser.add_argument("command", nargs="?", default="run", choices=["run", "_build", "_measure"])
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.command == "_build":
        build(args.orgs, args.profiles, args.rate)
    elif args.command == "_measure":
        measure(args.mode, workers=int(args.workers), shard_size=args.shard_size)
    else:
        orchestrate(args)


class Databases:
    """A template database holding the built data set, copied afresh for every measured run."""

    def __init__(self, url: str | None) -> None:
        self.url = url
        if url:
            base, name = url.rsplit("/", 1)
            self.admin_url = f"{base}/postgres"
            self.template = f"{name}_bench_template"
            self.run_db = f"{name}_bench"
            self.template_url, self.run_url = f"{base}/{self.template}", f"{base}/{self.run_db}"
        else:
            self.template_path = ROOT / "var" / "bench_template.sqlite3"
            self.run_path = ROOT / "var" / "bench.sqlite3"

    def env(self, *, template: bool) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
        env["PROFILE_AUDIT_CONSOLE_LEVEL"] = "ERROR"
        # The data set needs more deletions than a run's default budget (10,000 at 5,000
        # organizations and up); the floor applies none, so neither does the measured run.
        env["PROFILE_AUDIT_RUN_MAX_DELETIONS"] = str(10**9)
        env["PROFILE_AUDIT_LOG_DIR"] = str(ROOT / "var" / "bench-logs")
        if self.url:
            env["DATABASE_URL"] = self.template_url if template else self.run_url
        else:
            env["SQLITE_PATH"] = str(self.template_path if template else self.run_path)
        return env

    def _admin(self, *statements: str) -> None:
        import psycopg

        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            for statement in statements:
                conn.execute(statement)

    def fresh_template(self) -> None:
        if self.url:
            self._admin(
                f'DROP DATABASE IF EXISTS "{self.run_db}"',
                f'DROP DATABASE IF EXISTS "{self.template}"',
                f'CREATE DATABASE "{self.template}"',
            )
        else:
            self.template_path.parent.mkdir(parents=True, exist_ok=True)
            self.template_path.unlink(missing_ok=True)

    def copy_for_run(self) -> None:
        if self.url:
            self._admin(
                f'DROP DATABASE IF EXISTS "{self.run_db}"',
                f'CREATE DATABASE "{self.run_db}" TEMPLATE "{self.template}"',
            )
        else:
            shutil.copyfile(self.template_path, self.run_path)

    def drop(self) -> None:
        if self.url:
            self._admin(
                f'DROP DATABASE IF EXISTS "{self.run_db}"',
                f'DROP DATABASE IF EXISTS "{self.template}"',
            )
        else:
            self.template_path.unlink(missing_ok=True)
            self.run_path.unlink(missing_ok=True)


def orchestrate(args: argparse.Namespace) -> None:
    dbs = Databases(os.environ.get("DATABASE_URL"))
    backend = "PostgreSQL" if dbs.url else "SQLite"
    workers = [int(w) for w in args.workers.split(",")]
    shard_size = args.shard_size or max(100, args.orgs // 8)
    print(
        f"audit benchmark: {args.orgs} organizations x {args.profiles} profiles, "
        f"rate {args.rate:g} per kind, {backend}, median of {args.repeat}"
        + (f", shards of {shard_size} when fanned out" if any(workers) else "")
    )
    dbs.fresh_template()
    started = time.perf_counter()
    built = _child(dbs.env(template=True), "_build", args)
    print(
        f"built in {time.perf_counter() - started:.1f} s: "
        + ", ".join(f"{count} {table}" for table, count in built["rows"].items())
    )
    print()
    print(
        f"{'phase':<6}{'where':<14}{'wall s (median)':>16}{'min':>7}{'max':>7}{'queries':>9}"
        f"{'peak RSS MB':>12}{'found':>8}{'fixed':>8}{'x floor':>9}"
    )
    floor: dict[str, float] = {}
    try:
        if dbs.url:
            for mode in ("dry", "fix"):
                walls = []
                for _ in range(args.repeat):
                    dbs.copy_for_run()
                    result = _child(dbs.env(template=False), "_measure", args, mode=f"floor-{mode}")
                    walls.append(result["wall_seconds"])
                floor[mode] = statistics.median(walls)
                print(
                    f"{mode:<6}{'set-based SQL':<14}{floor[mode]:>16.2f}{min(walls):>7.2f}"
                    f"{max(walls):>7.2f}{'':>9}{'':>12}{result['found']:>8}{result['fixed']:>8}"
                    f"{1:>9.1f}"
                )
        for mode in ("dry", "fix"):
            for n in workers:
                results = []
                for _ in range(args.repeat):
                    dbs.copy_for_run()
                    env = dbs.env(template=False)
                    extra = ["--workers", str(n), "--shard-size", str(shard_size)]
                    results.append(_child(env, "_measure", args, mode=mode, extra=extra))
                walls = [r["wall_seconds"] for r in results]
                last = results[-1]
                where = "in-process" if n == 0 else f"{n} worker proc"
                ratio = f"{statistics.median(walls) / floor[mode]:>9.1f}" if mode in floor else ""
                queries = str(last["queries"]) if n == 0 else "-"
                print(
                    f"{mode:<6}{where:<14}{statistics.median(walls):>16.2f}{min(walls):>7.2f}"
                    f"{max(walls):>7.2f}{queries:>9}"
                    f"{statistics.median(r['peak_rss_mb'] for r in results):>12.0f}"
                    f"{last['found']:>8}{last['fixed']:>8}{ratio}"
                )
                if mode == "fix":
                    print(
                        f"  after that fix (sync jobs included), {last['sync_sent_left']} sync "
                        f"sent left unconfirmed; a dry run finds {last['found_after_fix']}"
                    )
    finally:
        if not args.keep:
            dbs.drop()


def _child(
    env: dict[str, str],
    command: str,
    args: argparse.Namespace,
    mode: str = "",
    extra: list[str] | None = None,
    root: Path = ROOT,
) -> dict:
    """Run ``command`` of this script in a child process; ``root``: the tree whose
    bench/audit_bench.py (and so whose code) runs it."""
    cmd = [
        sys.executable,
        str(root / "bench" / "audit_bench.py"),
        command,
        f"--orgs={args.orgs}",
        f"--profiles={args.profiles}",
        f"--rate={args.rate}",
        *(extra or []),
    ]
    if mode:
        cmd.append(f"--mode={mode}")
    result = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True)
    if result.returncode != 0:
        sys.stderr.write(result.stdout + result.stderr)
        raise SystemExit(f"benchmark step {command} {mode} failed")
    return json.loads(result.stdout.strip().splitlines()[-1])


# --- In a child process (Django set up) ---------------------------------------------------------


def _setup_django() -> None:
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "audit_project.settings")
    # A benchmark is not a deployment: settings refuse the placeholder secret otherwise.
    os.environ.setdefault(
        "DJANGO_SECRET_KEY", "local-benchmark-only-key-not-for-serving-anything-at-all"
    )
    import django

    django.setup()


def build(orgs: int, profiles: int, rate: float) -> None:
    """Create the data set. Per organization: a live connection holding most assets, a second
    live one created later, an expired one and a deleted one; each profile slot is healthy or,
    at ``rate`` each, orphaned, deselected, relink, restore or missing; plus stale queue
    settings and invalid boost entries at the same rate."""
    _setup_django()
    import random
    import uuid
    from datetime import timedelta

    from django.core.management import call_command
    from django.utils import timezone

    from boosts.models import BoostRule
    from connections.models import ConnectionAsset, PlatformConnection
    from orgs.models import Organization
    from profiles.models import SocialProfile
    from queues.models import QueueSetting

    call_command("migrate", verbosity=0)
    rng = random.Random(20261128)
    now = timezone.now()
    kinds = ["orphaned", "deselected", "relink", "restore", "missing"]
    rows: dict[str, list] = {k: [] for k in ("org", "conn", "asset", "profile", "queue", "boost")}
    counts = dict.fromkeys(rows, 0)

    def flush(final: bool = False) -> None:
        for key, model in (
            ("org", Organization),
            ("conn", PlatformConnection),
            ("asset", ConnectionAsset),
            ("profile", SocialProfile),
            ("queue", QueueSetting),
            ("boost", BoostRule),
        ):
            if rows[key] and (final or len(rows["profile"]) >= 20000):
                model.objects.bulk_create(rows[key], batch_size=2000)
                counts[key] += len(rows[key])
                rows[key] = []

    for n in range(orgs):
        org = Organization(id=uuid.uuid4(), name=f"Bench {n:06d}", created_at=now)
        main_c = PlatformConnection(
            organization=org, provider="meta", created_at=now - timedelta(days=9)
        )
        second = PlatformConnection(
            organization=org, provider="meta", created_at=now - timedelta(days=2)
        )
        expired = PlatformConnection(organization=org, provider="google", status="expired")
        deleted = PlatformConnection(organization=org, provider="meta", deleted_at=now)
        rows["org"].append(org)
        rows["conn"] += [main_c, second, expired, deleted]
        healthy_ids = []
        for slot in range(profiles):
            external_id = f"{n}-{slot}"
            roll = rng.random()
            kind = kinds[int(roll / rate)] if roll < rate * len(kinds) else "healthy"

            def asset(connection, selected=True, external_id=external_id):
                rows["asset"].append(
                    ConnectionAsset(
                        connection=connection,
                        asset_type="page",
                        external_id=external_id,
                        name=f"Page {external_id}",
                        is_selected=selected,
                    )
                )

            def profile(connection, dead=False, external_id=external_id, org=org):
                p = SocialProfile(
                    id=uuid.uuid4(),
                    organization=org,
                    connection=connection,
                    platform="facebook",
                    external_id=external_id,
                    name=f"Page {external_id}",
                    deleted_at=now - timedelta(days=1) if dead else None,
                )
                rows["profile"].append(p)
                return p

            if kind == "healthy":
                asset(main_c)
                p = profile(main_c)
                healthy_ids.append(str(p.id))
                rows["queue"].append(QueueSetting(organization=org, profile=p, slots=["09:00"]))
            elif kind == "orphaned":
                asset(expired)
                profile(expired)
            elif kind == "deselected":
                asset(main_c, selected=False)
                profile(main_c)
            elif kind == "relink":
                asset(deleted)
                asset(second)
                profile(deleted)
            elif kind == "restore":
                asset(main_c)
                profile(main_c, dead=True)
            else:  # missing
                asset(main_c)
            if rng.random() < rate:  # a stale queue setting on a long-dead profile
                dead = profile(None, dead=True, external_id=f"{external_id}-gone")
                rows["queue"].append(QueueSetting(organization=org, profile=dead))
        refs = healthy_ids[:5]
        if rng.random() < rate * profiles / 5:
            refs = [*refs, str(uuid.uuid4()), "junk"]
        rows["boost"].append(BoostRule(organization=org, name="Boost", profile_ids=refs))
        flush()
    flush(final=True)
    from django.db import connection

    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("VACUUM ANALYZE")
    print(
        json.dumps(
            {
                "rows": {
                    "organizations": counts["org"],
                    "connections": counts["conn"],
                    "assets": counts["asset"],
                    "profiles": counts["profile"],
                    "queue settings": counts["queue"],
                    "boost rules": counts["boost"],
                }
            }
        )
    )


def _without_drift_history() -> None:
    """The audit as it was before drift history (bench/drift_cost.py): chunks read no drift
    records and write none (in this process only: not in fanned-out workers)."""
    from profiles.services import drift

    def read(cls, organization_ids, *, now=None, mark_writers=None):
        return cls(records={}, mark_writers={}, now=now, released=set())

    drift.DriftBook.read = classmethod(read)
    drift.DriftBook.record = lambda self, rows, **kwargs: None
    drift.DriftBook.write_from_findings = lambda self, **kwargs: None


def measure(mode: str, *, workers: int, shard_size: int) -> None:
    """One measured run, in a process of its own: ``dry``/``fix`` in-process (workers 0) or
    fanned out over a worker with ``workers`` processes, or the set-based floor."""
    if workers:
        os.environ["REDIS_URL"] = BENCH_REDIS_URL
        os.environ["PROFILE_AUDIT_SHARD_SIZE"] = str(shard_size)
    _setup_django()
    import resource

    from django.db import connection

    from audit_project.celery import app

    if mode.startswith("floor-"):
        _measure_floor(mode.removeprefix("floor-"))
        return
    if os.environ.get("BENCH_DRIFT") == "off":
        _without_drift_history()
    # The sync jobs for missing profiles are part of a fix's cost: in this process they run
    # inline as each chunk commits (eager); fanned out, the workers run them too.
    app.conf.task_always_eager = not workers
    from profiles.models import AuditFinding
    from profiles.services.audit import AuditRequest, run_audit, send_shards, start_run

    queries = 0

    def count(execute, sql, params, many, context):
        nonlocal queries
        queries += 1
        return execute(sql, params, many, context)

    request = AuditRequest(fix=mode == "fix")
    server_before = server_after = None
    cpu = 0.0
    if workers:
        _flush_bench_redis()
        worker = _start_worker(workers)
        try:
            started = time.perf_counter()
            run = start_run(request)
            send_shards(run)
            unconfirmed = AuditFinding.objects.filter(run_id=run.id, outcome="sent")
            while run.status == "running" or unconfirmed.exists():
                # The run is finished by whichever worker closes its last shard, and its
                # missing profiles exist once every sync job has confirmed them: the only way
                # to see both from here is the records. 50 ms is within the figures' noise.
                if worker.poll() is not None:
                    raise SystemExit("the benchmark's worker exited before the run finished")
                time.sleep(0.05)
                run.refresh_from_db()
            wall = time.perf_counter() - started
            run.refresh_from_db()
        finally:
            _stop_worker(worker)
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    else:
        server_before = _server_cpu()
        with connection.execute_wrapper(count):
            started, cpu_started = time.perf_counter(), time.process_time()
            run = run_audit(request).run
            wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        server_after = _server_cpu()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {
        "wall_seconds": wall,
        "queries": queries,
        "peak_rss_mb": peak,
        "found": run.found,
        "fixed": run.fixed,
        "status": run.status,
    }
    if not workers:
        result["cpu_seconds"] = cpu  # the run's alone (a fix's check afterwards not counted)
    if server_before is not None and server_after is not None:
        result["server_cpu_seconds"] = server_after - server_before
    if mode == "fix":
        result["sync_sent_left"] = AuditFinding.objects.filter(
            run_id=run.id, outcome="sent"
        ).count()
        os.environ.pop("REDIS_URL", None)
        result["found_after_fix"] = run_audit(AuditRequest()).run.found
    print(json.dumps(result))


def _server_cpu() -> float | None:
    """The CPU seconds of this process's PostgreSQL backend so far, read from /proc (the
    server is on this machine): an in-process run's work on the server, which on a shared,
    noisy machine says more than wall time. None on SQLite or where /proc does not show it."""
    from django.db import connection

    if connection.vendor != "postgresql":
        return None
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        (pid,) = cursor.fetchone()
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _measure_floor(mode: str) -> None:
    from django.db import connection

    sys.path.insert(0, str(ROOT / "bench"))
    from setbased import count_findings, fix_setbased

    from profiles.models import AuditRun

    started = time.perf_counter()
    if mode == "dry":
        counts = count_findings(connection)
        found, fixed = sum(counts.values()), 0
    else:
        run = AuditRun.objects.create(trigger="command", fix=True)
        started = time.perf_counter()
        counts = fix_setbased(connection, run_id=run.id)
        found = fixed = sum(counts.values())
    wall = time.perf_counter() - started
    print(json.dumps({"wall_seconds": wall, "found": found, "fixed": fixed}))


def _flush_bench_redis() -> None:
    import redis

    client = redis.Redis.from_url(BENCH_REDIS_URL)
    client.flushdb()
    client.close()


def _start_worker(processes: int) -> subprocess.Popen:
    """A prefork worker on `maintenance` (the shards) and `celery` (their sync jobs)."""
    from audit_project.celery import app

    node = f"bench-{os.getpid()}@localhost"
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "audit_project",
            "worker",
            "-Q",
            "maintenance,celery",
            "--pool",
            "prefork",
            "--concurrency",
            str(processes),
            "-n",
            node,
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "-l",
            "warning",
        ],
        cwd=ROOT,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "audit_project.settings"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while not app.control.ping(destination=[node], timeout=0.5):
        if worker.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("the benchmark's worker did not start")
    return worker


def _stop_worker(worker: subprocess.Popen) -> None:
    worker.send_signal(signal.SIGTERM)
    worker.wait(timeout=60)


if __name__ == "__main__":
    main()
