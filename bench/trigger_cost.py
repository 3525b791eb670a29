#!/usr/bin/env python
"""What the change-mark triggers cost the code that writes: the same writes timed with the
triggers enabled and disabled, side by side, in a scratch PostgreSQL database.

Two writers: the real-time ``set_asset_selection`` on a 20-profile organization (one asset
deselected or selected again, its profile soft-deleted or restored; median of many calls), and
a 10,000-row bulk update spanning --orgs organizations, as one ``QuerySet.update`` and as the
audit's own ``update_rows`` (``UPDATE ... FROM unnest``; median of several). The two modes are
interleaved round by round, so a machine busy with other work slows both alike. With triggers,
the real-time calls are timed both with the organization's mark already there (an update of the
mark, the usual case between two change-driven runs) and cleared before each call (an insert).

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/psa python bench/trigger_cost.py
    ... --orgs 500 --rounds 30 --calls 10 --bulk-repeat 9   # the defaults

It creates the database ``<name>_trigger_cost`` on the server of DATABASE_URL (dropped at the end
unless --keep); the triggers are switched with ``ALTER TABLE ... DISABLE TRIGGER`` there only.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent
Sample = tuple[float, float, float]  # ms: wall, CPU of this process, CPU of its backend
Figures = tuple[float, float, float]
Result = tuple[str, dict, str]
TRIGGERS = ("profile_sync_mark_insert", "profile_sync_mark_update", "profile_sync_mark_delete")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--orgs", type=int, default=500, help="organizations (x20 profiles)")
    parser.add_argument("--rounds", type=int, default=30, help="interleaved real-time rounds")
    parser.add_argument("--calls", type=int, default=10, help="real-time calls per round, mode")
    parser.add_argument("--bulk-repeat", type=int, default=9, help="bulk updates per mode")
    parser.add_argument("--keep", action="store_true", help="keep the scratch database")
    args = parser.parse_args()

    url = os.environ.get("DATABASE_URL", "")
    if not url.startswith("postgres"):
        sys.exit("DATABASE_URL must name a PostgreSQL server (the scratch database goes there)")
    parts = urlsplit(url)
    scratch = (parts.path.lstrip("/") or "postgres") + "_trigger_cost"
    admin_url = urlunsplit(parts._replace(path="/postgres"))
    _admin(admin_url, f'DROP DATABASE IF EXISTS "{scratch}"', f'CREATE DATABASE "{scratch}"')
    os.environ["DATABASE_URL"] = urlunsplit(parts._replace(path="/" + scratch))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "audit_project.settings")
    os.environ.setdefault("DJANGO_DEBUG", "false")
    os.environ.setdefault(
        "DJANGO_SECRET_KEY", "local-benchmark-only-key-not-for-serving-anything-at-all"
    )
    os.environ.setdefault("PROFILE_AUDIT_CONSOLE_LEVEL", "WARNING")
    sys.path.insert(0, str(ROOT))
    try:
        run(args)
    finally:
        from django.db import connections

        connections.close_all()
        if not args.keep:
            _admin(admin_url, f'DROP DATABASE IF EXISTS "{scratch}"')


def _admin(url: str, *statements: str) -> None:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        for sql in statements:
            conn.execute(sql)


def run(args: argparse.Namespace) -> None:
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    state = build(args.orgs)
    print(
        f"PostgreSQL, {args.orgs} organizations x 20 profiles; scratch database "
        f"{_database_name()}\n"
    )
    realtime = measure_realtime(state, rounds=args.rounds, calls=args.calls)
    bulk = measure_bulk(state, repeat=args.bulk_repeat)
    trigger_ms, share = measure_in_statement(state, repeat=args.bulk_repeat)
    tag = measure_writer_block(calls=args.rounds * args.calls)
    there, cleared, plain = measure_in_calls(state, calls=args.rounds * args.calls)

    print(f"{'':52} {'wall time, ms':^33}  {'CPU time (ours + backend), ms':^33}  backend CPU")
    print(f"{'writer':52} " + f"{'off':>7} {'on':>7} {'medians':>8} {'paired':>8}  " * 2, end="")
    print(f"{'off':>7} {'on':>7} {'cost':>7}")
    for name, samples, mode in [*realtime, *bulk]:
        line = f"{name:52} "
        for measure in (0, 3):
            off, on, ratio = _paired(samples, mode, measure)
            line += f"{off:7.2f} {on:7.2f} {_pct(on / off):>8} {_pct(ratio):>8}  "
        # The triggers run in the backend only; this process does the same work either way.
        backend_off, backend_on, _ = _paired(samples, mode, 2)
        cpu_off = _paired(samples, mode, 3)[0]
        cost = (backend_on - backend_off) / cpu_off
        print(f"{line}{backend_off:7.2f} {backend_on:7.2f} {_pct(1 + cost):>7}")
    print(
        f"\nInside the 10,000-row update (EXPLAIN ANALYZE): the trigger takes {trigger_ms:.1f} ms,"
        f" {_pct(1 + share)} of the update without it (median of {args.bulk_repeat})."
    )
    print(
        f"Inside set_asset_selection (track_functions): the trigger functions' own time is"
        f" {there:.3f} ms a call with the mark there, {cleared:.3f} ms with it cleared:"
        f" {_pct(1 + there / plain)} and {_pct(1 + cleared / plain)} of a call without them"
        f" ({plain:.2f} ms, median)."
    )
    print(f"An empty writer() block in a transaction: {tag:.3f} ms (median).")
    print(
        "\nmedians: median with triggers over median without; paired: median over rounds of"
        " each round's on/off ratio (its two blocks ran back to back); cost: the backend's extra"
        " CPU time over the whole CPU time without triggers (the triggers run in the backend"
        " only; this process runs the same code either way, so its own CPU time differs by"
        " noise alone)."
    )


def _pct(ratio: float) -> str:
    return f"{(ratio - 1) * 100:+.1f}%"


def _database_name() -> str:
    from django.db import connection

    return connection.settings_dict["NAME"]


class State:
    def __init__(self, org_ids, connection_id, asset_ids, profile_ids):
        self.org_ids = org_ids
        self.connection_id = connection_id
        self.asset_ids = asset_ids
        self.profile_ids = profile_ids


def build(orgs: int) -> State:
    """``orgs`` organizations, each with one live connection selecting 20 page assets and the 20
    profiles that go with them."""
    from connections.models import ConnectionAsset, PlatformConnection
    from orgs.models import Organization
    from profiles.models import ChangeMark, SocialProfile

    organizations = Organization.objects.bulk_create(
        Organization(name=f"Bench {n:05d}") for n in range(orgs)
    )
    connections = PlatformConnection.objects.bulk_create(
        PlatformConnection(organization=o, provider="meta", name=f"Meta {o.name}")
        for o in organizations
    )
    assets = ConnectionAsset.objects.bulk_create(
        (
            ConnectionAsset(
                connection=c, asset_type="page", external_id=f"{c.id}-{n}", is_selected=True
            )
            for c in connections
            for n in range(20)
        ),
        batch_size=5000,
    )
    profiles = SocialProfile.objects.bulk_create(
        (
            SocialProfile(
                organization_id=a.connection.organization_id,
                connection=a.connection,
                platform="facebook",
                external_id=a.external_id,
                name=a.external_id,
            )
            for a in assets
        ),
        batch_size=5000,
    )
    ChangeMark.objects.all().delete()
    _analyze()
    first = connections[0]
    return State(
        org_ids=[o.id for o in organizations],
        connection_id=first.id,
        asset_ids=[a.id for a in assets if a.connection_id == first.id],
        profile_ids=[p.id for p in profiles],
    )


def _vacuum(table: str) -> None:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(f"VACUUM {table}")


def _analyze() -> None:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("VACUUM ANALYZE")


def set_triggers(*, enabled: bool) -> None:
    from django.db import connection

    verb = "ENABLE" if enabled else "DISABLE"
    tables = [
        "connections_platformconnection",
        "connections_connectionasset",
        "profiles_socialprofile",
        "queues_queuesetting",
        "boosts_boostrule",
    ]
    with connection.cursor() as cursor:
        for table in tables:
            for trigger in TRIGGERS:
                cursor.execute(f"ALTER TABLE {table} {verb} TRIGGER {trigger}")


def clear_marks() -> None:
    from profiles.models import ChangeMark

    ChangeMark.objects.all().delete()


def _paired(samples: dict[str, list[list[Sample]]], mode: str, measure: int) -> Figures:
    """(median off, median on, median of the rounds' on/off ratios) of one measure (0: wall
    time, 1: this process's CPU time, 2: the backend's, 3: both): each round's two blocks ran
    back to back, so their ratio is what load on the machine disturbs least."""

    def value(x: Sample) -> float:
        return x[1] + x[2] if measure == 3 else x[measure]

    off = [value(x) for block in samples["off"] for x in block]
    on = [value(x) for block in samples[mode] for x in block]
    ratios = [
        statistics.median(map(value, b)) / statistics.median(map(value, a))
        for a, b in zip(samples["off"], samples[mode], strict=True)
    ]
    return statistics.median(off), statistics.median(on), statistics.median(ratios)


class Clock:
    """Wall time, and the CPU time of this process plus its database backend's (from
    /proc/<pid>/schedstat, in ns): CPU time is what a loaded machine disturbs least, and the
    triggers work in the backend."""

    def __init__(self) -> None:
        from django.db import connection

        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            self.schedstat = Path(f"/proc/{cursor.fetchone()[0]}/schedstat")

    def now(self) -> Sample:
        backend = int(self.schedstat.read_text().split()[0]) / 1e9
        return time.perf_counter(), time.process_time(), backend

    def since(self, start: Sample) -> Sample:
        end = self.now()
        return tuple((b - a) * 1000 for a, b in zip(start, end, strict=True))  # type: ignore[return-value]


def measure_realtime(state: State, *, rounds: int, calls: int) -> list[Result]:
    """Milliseconds of one set_asset_selection call (one asset off, or on again: a soft delete
    or a restore of its profile): triggers off, on with the mark there, on with it cleared."""
    from connections.models import PlatformConnection
    from connections.services import set_asset_selection

    connection_ = PlatformConnection.objects.get(pk=state.connection_id)
    modes = ["off", "on", "on_cleared"]
    samples: dict[str, list[list[Sample]]] = {mode: [] for mode in modes}
    clock = Clock()
    selected = False
    n = 0
    for round_ in range(rounds):
        for mode in modes if round_ % 2 == 0 else modes[::-1]:
            set_triggers(enabled=mode != "off")
            clear_marks()
            block: list[Sample] = []
            for call in range(calls + 1):  # the first warms this mode's plans
                if mode == "on_cleared":
                    clear_marks()
                asset = state.asset_ids[n % len(state.asset_ids)]
                started = clock.now()
                set_asset_selection(connection=connection_, asset_ids=[asset], selected=selected)
                elapsed = clock.since(started)
                if call:
                    block.append(elapsed)
                n += 1
                if n % len(state.asset_ids) == 0:
                    selected = not selected
            samples[mode].append(block)
    set_triggers(enabled=True)
    return [
        ("set_asset_selection, 20-profile org, mark there", samples, "on"),
        ("set_asset_selection, 20-profile org, mark cleared", samples, "on_cleared"),
    ]


def measure_bulk(state: State, *, repeat: int) -> list[Result]:
    """Milliseconds of a committed 10,000-row update (all profiles of the first 500
    organizations, no marks before it), as one QuerySet.update and through update_rows."""
    from django.db import transaction

    from profiles.models import SocialProfile
    from profiles.services.bulk import update_rows

    org_ids = state.org_ids[:500]
    profile_ids = state.profile_ids[: 20 * len(org_ids)]
    clock = Clock()
    samples: dict[str, dict[str, list[list[Sample]]]] = {
        kind: {"off": [], "on": []} for kind in ("queryset", "update_rows")
    }
    counter = 0
    for round_ in range(repeat):
        for kind in samples:
            for mode in ("off", "on") if round_ % 2 == 0 else ("on", "off"):
                set_triggers(enabled=mode == "on")
                clear_marks()
                # Every run starts from the same table: the last one's dead rows vacuumed.
                _vacuum("profiles_socialprofile")
                counter += 1
                name = f"bulk {counter}"
                started = clock.now()
                with transaction.atomic():
                    if kind == "queryset":
                        SocialProfile.objects.filter(organization_id__in=org_ids).update(name=name)
                    else:
                        update_rows(SocialProfile, ["name"], [(pk, name) for pk in profile_ids])
                samples[kind][mode].append([clock.since(started)])
    set_triggers(enabled=True)
    rows, orgs = len(profile_ids), len(org_ids)
    return [
        (f"{rows:,}-row QuerySet.update over {orgs} orgs", samples["queryset"], "on"),
        (f"{rows:,}-row update_rows over {orgs} orgs", samples["update_rows"], "on"),
    ]


def measure_in_statement(state: State, *, repeat: int) -> tuple[float, float]:
    """The trigger's own time inside the 10,000-row update, as EXPLAIN ANALYZE reports it next
    to the statement's (median of ``repeat``, each rolled back): a share that load on the
    machine scales alike. It leaves out capturing the transition tables."""
    import re

    from django.db import connection, transaction

    org_ids = state.org_ids[:500]
    shares = []
    trigger_ms = []
    for n in range(repeat):
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(
                "EXPLAIN (ANALYZE, FORMAT TEXT) UPDATE profiles_socialprofile SET name = %s "
                "WHERE organization_id = ANY(%s)",
                [f"explained {n}", org_ids],
            )
            text = "\n".join(row[0] for row in cursor.fetchall())
            transaction.set_rollback(True)
        trigger = float(re.search(r"Trigger profile_sync_mark_update: time=([\d.]+)", text)[1])
        total = float(re.search(r"Execution Time: ([\d.]+)", text)[1])
        shares.append(trigger / (total - trigger))
        trigger_ms.append(trigger)
    return statistics.median(trigger_ms), statistics.median(shares)


def measure_in_calls(state: State, *, calls: int) -> tuple[float, float, float]:
    """The trigger functions' own time in one set_asset_selection call, as PostgreSQL counts it
    (``track_functions``): ms a call with the mark there, with it cleared, and the median call
    with the triggers off. Unlike the side-by-side times, this is the triggers' work alone, not
    a difference between two noisy figures."""
    import psycopg
    from django.db import connection

    from connections.models import PlatformConnection
    from connections.services import set_asset_selection

    connection_ = PlatformConnection.objects.get(pk=state.connection_id)
    url = os.environ["DATABASE_URL"]

    def spent() -> float:
        """ms in the trigger functions so far, once this session's counts are flushed."""
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_stat_force_next_flush()")
        # The counts reach shared memory when the session next goes idle (it is now).
        with psycopg.connect(url, autocommit=True) as other:
            for _ in range(50):
                row = other.execute(
                    "SELECT coalesce(sum(self_time), 0), coalesce(sum(calls), 0) "
                    "FROM pg_stat_user_functions WHERE funcname LIKE 'profile_sync_mark%%'"
                ).fetchone()
                if row[1] >= expected:
                    return float(row[0])
                time.sleep(0.02)
        raise SystemExit("pg_stat_user_functions did not count the trigger calls")

    with connection.cursor() as cursor:
        cursor.execute("SET track_functions = 'pl'")
    set_triggers(enabled=True)
    figures = []
    expected = 0
    selected = False
    for cleared in (False, True):
        clear_marks()
        before = spent() if expected else 0.0
        for n in range(calls):
            if cleared:
                clear_marks()
            asset = state.asset_ids[n % len(state.asset_ids)]
            set_asset_selection(connection=connection_, asset_ids=[asset], selected=selected)
            if (n + 1) % len(state.asset_ids) == 0:
                selected = not selected
        expected += 2 * calls  # an asset's update and its profile's: one trigger call each
        figures.append((spent() - before) / calls)
    with connection.cursor() as cursor:
        cursor.execute("SET track_functions = 'none'")
    set_triggers(enabled=False)
    off = []
    for n in range(calls):
        asset = state.asset_ids[n % len(state.asset_ids)]
        started = time.perf_counter()
        set_asset_selection(connection=connection_, asset_ids=[asset], selected=selected)
        off.append((time.perf_counter() - started) * 1000)
        if (n + 1) % len(state.asset_ids) == 0:
            selected = not selected
    set_triggers(enabled=True)
    return figures[0], figures[1], statistics.median(off)


def measure_writer_block(*, calls: int) -> float:
    """Median ms of an empty ``writer()`` block inside a transaction: what tagging costs."""
    from django.db import transaction

    from profiles.change_marks import writer

    samples = []
    with transaction.atomic():
        for _ in range(calls):
            started = time.perf_counter()
            with writer("bench"):
                pass
            samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


if __name__ == "__main__":
    main()
