#!/usr/bin/env python
"""One large organization: peak RSS and wall time of a dry run, a forced fix and the revert of
that fix, each as ``manage.py profiles_audit_sync`` in a process of its own, on PostgreSQL.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/psa python bench/one_org.py --profiles 100000

The data set is ``audit_bench.py``'s (one organization, --rate of each inconsistency), built in
``<name>_bench_template`` and copied to ``<name>_bench`` (both dropped at the end unless
--keep). Tasks run eagerly (no REDIS_URL), so the fix includes the sync of missing profiles.
``--code DIR`` measures another checkout of the project (e.g. the base commit, exported with
``git archive``) on the same data set.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from audit_bench import Databases  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profiles", type=int, default=100_000, help="profiles (default 100000)")
    parser.add_argument("--rate", type=float, default=0.05, help="share per inconsistency kind")
    parser.add_argument(
        "--code",
        action="append",
        default=[],
        help="a checkout of the project to measure (repeatable; default: this one)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the benchmark databases")
    args = parser.parse_args()
    url = os.environ.get("DATABASE_URL")
    if not url or not url.startswith("postgres"):
        raise SystemExit(
            "set DATABASE_URL to a PostgreSQL database (its name prefixes the bench's)"
        )
    dbs = Databases(url)
    dbs.fresh_template()
    started = time.perf_counter()
    build = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "audit_bench.py"),
            "_build",
            "--orgs=1",
            f"--profiles={args.profiles}",
            f"--rate={args.rate}",
        ],
        env=dbs.env(template=True),
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    print(
        f"built in {time.perf_counter() - started:.1f} s: {build.stdout.strip().splitlines()[-1]}"
    )
    try:
        for code in args.code or [str(ROOT)]:
            print(f"\ncode: {code}")
            print(f"{'phase':<14}{'wall s':>9}{'peak RSS MB':>13}{'found':>9}{'fixed':>9}")
            dbs.copy_for_run()
            env = dbs.env(template=False)
            _phase("dry run", code, env, [])
            fix = _phase("forced fix", code, env, ["--fix", "--force"])
            _phase("revert", code, env, ["--revert", fix["run_id"], "--fix"])
    finally:
        if not args.keep:
            dbs.drop()


def _phase(name: str, code: str, env: dict[str, str], options: list[str]) -> dict:
    """Run one command under GNU time: its own peak RSS (a process's ru_maxrss, not the
    largest of all children so far) and its wall time."""
    command = [sys.executable, "manage.py", "profiles_audit_sync", *options, "--format", "json"]
    result = subprocess.run(
        ["/usr/bin/time", "-f", "BENCH %M %e", *command],
        env={
            **env,
            "DJANGO_SECRET_KEY": "local-benchmark-only-key-not-for-serving-anything-at-all",
        },
        cwd=code,
        capture_output=True,
        text=True,
    )
    [measured] = [line for line in result.stderr.splitlines() if line.startswith("BENCH ")]
    _, rss_kib, wall = measured.split()
    try:
        report = json.loads(result.stdout)
    except ValueError:
        sys.stderr.write(result.stdout + result.stderr)
        raise SystemExit(f"{name} failed (exit {result.returncode})") from None
    totals = report.get("totals", {})
    print(
        f"{name:<14}{float(wall):>9.1f}{int(rss_kib) / 1024:>13.0f}"
        f"{totals.get('found', ''):>9}{totals.get('fixed', ''):>9}",
        flush=True,
    )
    return report


if __name__ == "__main__":
    main()
