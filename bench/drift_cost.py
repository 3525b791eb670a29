#!/usr/bin/env python
"""What drift history costs (issue 16's budget: within 10 % of the run without it).

Builds audit_bench.py's data set once, then measures a dry run and a fix in this process, each
with drift bookkeeping and without it (``BENCH_DRIFT=off``: chunks read and write no drift
records), alternating the two in every round so that a noisy machine slows both alike. Every
measured run is its own process on a fresh copy of the data set (drift records start empty, so
every finding creates its record: the bookkeeping's dearest case); a fix's sync jobs run inline.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/psa python bench/drift_cost.py \\
        --orgs 5000 --profiles 20 --repeat 5

``--against TREE`` (PostgreSQL) also measures the run with drift history of another checkout
(``git worktree add TREE <commit>``) in the same rounds, on a data set built by that tree's own
code and migrations: the change since that commit, side by side, on one machine at one time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from audit_bench import Databases, _child

VARIANTS = ("with", "without")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--orgs", type=int, default=5000)
    parser.add_argument("--profiles", type=int, default=20)
    parser.add_argument("--rate", type=float, default=0.05)
    parser.add_argument("--repeat", type=int, default=5, help="rounds (median shown)")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument(
        "--warm",
        action="store_true",
        help="one dry run on the data set first, so every finding's record exists (the steady "
        "state of drift that stays: each run updates its records instead of creating them)",
    )
    parser.add_argument(
        "--against",
        type=Path,
        help="another checkout (a git worktree): its run with drift history is measured too",
    )
    args = parser.parse_args()
    args.workers = "0"
    dbs = Databases(os.environ.get("DATABASE_URL"))
    if args.against and not dbs.url:
        raise SystemExit("--against needs PostgreSQL: set DATABASE_URL")
    if args.against and not (args.against / "bench" / "audit_bench.py").is_file():
        raise SystemExit(f"--against {args.against}: no bench/audit_bench.py there")
    # The other tree's data set: built by its own code into databases of their own.
    other = Databases(f"{dbs.url}_against") if args.against else None
    variants = (*VARIANTS, "against") if args.against else VARIANTS
    print(
        f"drift history cost: {args.orgs} organizations x {args.profiles} profiles, rate "
        f"{args.rate:g}, {'PostgreSQL' if dbs.url else 'SQLite'}, in-process, {args.repeat} rounds"
        + (", records there already (--warm)" if args.warm else ", records created")
    )
    trees = [(dbs, Path(__file__).resolve().parent.parent)]
    if other is not None:
        trees.append((other, args.against.resolve()))
    for databases, root in trees:
        databases.fresh_template()
        _child(databases.env(template=True), "_build", args, root=root)
        if args.warm:
            _child(
                databases.env(template=True),
                "_measure",
                args,
                mode="dry",
                extra=["--workers", "0"],
                root=root,
            )
    walls: dict[tuple[str, str], list[float]] = {}
    cpus: dict[tuple[str, str], list[float]] = {}
    servers: dict[tuple[str, str], list[float]] = {}
    found: dict[str, int] = {}
    try:
        for round_ in range(args.repeat):
            for mode in ("dry", "fix"):
                for variant in variants if round_ % 2 == 0 else variants[::-1]:
                    databases, root = trees[1] if variant == "against" else trees[0]
                    databases.copy_for_run()
                    env = databases.env(template=False)
                    if variant == "without":
                        env["BENCH_DRIFT"] = "off"
                    result = _child(
                        env, "_measure", args, mode=mode, extra=["--workers", "0"], root=root
                    )
                    walls.setdefault((mode, variant), []).append(result["wall_seconds"])
                    # The run's CPU in the measured process (its sync jobs included, a fix's
                    # check afterwards not): less sensitive than wall time to what else the
                    # machine runs.
                    cpus.setdefault((mode, variant), []).append(result["cpu_seconds"])
                    # With its PostgreSQL backend's: most of the bookkeeping is the server's.
                    if (server := result.get("server_cpu_seconds")) is not None:
                        servers.setdefault((mode, variant), []).append(server)
                    found[mode] = result["found"]
    finally:
        if not args.keep:
            for databases, _ in trees:
                databases.drop()
    print(
        f"\n{'phase':<6}{'drift history':<15}{'wall s':>9}{'min':>7}{'max':>7}"
        f"{'CPU s':>8}{'found':>8}"
    )
    for mode in ("dry", "fix"):
        for variant in ("without", "with", "against")[: len(variants)]:
            w = walls[(mode, variant)]
            print(
                f"{mode:<6}{variant:<15}{statistics.median(w):>9.2f}{min(w):>7.2f}{max(w):>7.2f}"
                f"{statistics.median(cpus[(mode, variant)]):>8.2f}{found[mode]:>8}"
            )
        ratio = statistics.median(walls[(mode, "with")]) / statistics.median(
            walls[(mode, "without")]
        )
        pairs = [
            a / b for a, b in zip(walls[(mode, "with")], walls[(mode, "without")], strict=True)
        ]
        cpu = statistics.median(cpus[(mode, "with")]) - statistics.median(cpus[(mode, "without")])
        print(
            f"  {mode}: wall with / without = {ratio:.3f} (medians; per round "
            + ", ".join(f"{p:.2f}" for p in pairs)
            + f"); CPU with - without = {cpu:+.2f} s"
        )
        if servers.get((mode, "with")) and servers.get((mode, "without")):
            # Client and server CPU summed, round by round: the figure least moved by a
            # noisy machine.
            totals = {
                v: [c + s for c, s in zip(cpus[(mode, v)], servers[(mode, v)], strict=True)]
                for v in variants
                if len(servers.get((mode, v), ())) == len(cpus[(mode, v)])
            }
            print(
                f"  {mode}: CPU (process + PostgreSQL backend) with / without = "
                f"{statistics.median(totals['with']) / statistics.median(totals['without']):.3f}"
                f" ({statistics.median(totals['with']):.2f} s / "
                f"{statistics.median(totals['without']):.2f} s; server alone "
                f"{statistics.median(servers[(mode, 'with')]):.2f} s / "
                f"{statistics.median(servers[(mode, 'without')]):.2f} s)"
            )
            if "against" in totals:
                against = statistics.median(totals["against"])
                print(
                    f"  {mode}: CPU (process + backend) {args.against} / without = "
                    f"{against / statistics.median(totals['without']):.3f} ({against:.2f} s; "
                    f"server alone {statistics.median(servers[(mode, 'against')]):.2f} s)"
                )


if __name__ == "__main__":
    main()
