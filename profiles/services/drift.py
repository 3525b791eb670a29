"""Drift history and fights (DESIGN "Drift history and fights").

Every finding has a **fingerprint** — (organization, type, key): the object's id, or
``platform:external_id`` for a missing profile — and one ``DriftRecord`` per fingerprint keeps
its history across runs. A chunk reads its organizations' records once (``DriftBook.read``, in
the chunk's transaction), a fixing chunk asks it which findings to hold (``DriftBook.holds``),
and the chunk's findings update the records in one statement (``DriftBook.record``; on
PostgreSQL the new ones, and those only seen again, are written from their findings once those
are in, ``DriftBook.write_from_findings``).

States: *open* while found and not fixed; *resolved* once an audit of its organization (for its
type) no longer finds it; *recurring* when found again after it was fixed or resolved;
*fighting* when it was fixed PROFILE_AUDIT_FIGHT_FIXES times within PROFILE_AUDIT_FIGHT_WINDOW
and is found again: some other writer keeps undoing the fix, so fixing runs hold it (outcome
``held``) until an operator resumes it (``resume_fixing``) or it has stayed resolved for one
window. A dry run updates the history but never holds or resumes. A revert takes its run's fixes
out of the count (``forget_fixes``): the audit never fights itself.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol
from uuid import UUID

from django.conf import settings
from django.db import connection
from django.db.models import F, JSONField, QuerySet, TextField
from django.db.models.expressions import RawSQL
from django.db.models.functions import Cast
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from orgs.models import Organization
from profiles.change_marks import AUDIT_FIX, AUDIT_REVERT
from profiles.models import (
    AuditFinding,
    ChangeMark,
    DriftRecord,
    DriftState,
    FindingOutcome,
    FindingType,
    OrganizationAudits,
)
from profiles.selectors import binary_cursor
from profiles.services.recording import FindingRow

# The audit's own writers: never "the other writer" of a fight.
AUDIT_WRITERS = frozenset({AUDIT_FIX, AUDIT_REVERT})
# Writers kept on a record and on a finding, newest last.
KEPT_WRITERS = 5
# A finding whose fix counts towards a fight: its change was made (or its sync job sent).
FIXING_OUTCOMES = frozenset({FindingOutcome.FIXED, FindingOutcome.SENT})

# What any run writes of a record it saw (or resolved) ...
OBSERVED_FIELDS = [
    "state",
    "last_seen_at",
    "times_found",
    "resolved_at",
    "last_writers",
    "undone_by",
    "undone_at",
    "audits_seen",
]
# ... and what only a fixing run does: its fixes and holds. Fixing runs of an organization take
# turns on its lock, and a dry run never writes these, so no run overwrites another's fixes or
# holds, and the records are read without row locks. A dry run racing a hold leaves the record
# fighting (the state is judged on held_since in the statement itself).
FIXING_FIELDS = ["times_fixed", "last_fixed_at", "recent_fixes", "held_since"]
UPDATED_FIELDS = OBSERVED_FIELDS + FIXING_FIELDS

# (organization, type, key), the organization's id as its int: a UUID hashes in Python, and a
# chunk looks its fingerprints up a dozen times each.
Fingerprint = tuple[int, str, str]


def fingerprint_key(*, object_id: UUID | None, platform: str, external_id: str) -> str:
    """A fingerprint's key: the object's id, or platform:external_id for a missing profile."""
    return str(object_id) if object_id is not None else f"{platform}:{external_id}"


def writer_name(entry: dict[str, Any]) -> str:
    """How a mark's writer is named: its writer tag, else its application_name."""
    return str(entry.get("writer") or entry.get("application_name") or "unknown")


def _at(entry: dict[str, Any]) -> datetime | None:
    """An entry's time: ISO 8601 with its zone, as the triggers and this module write it."""
    value = entry.get("at")
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value)  # C, unlike Django's parse_datetime
    except ValueError:
        return parse_datetime(value)


def merge_writers(*lists: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The distinct writers of several lists, each with its latest time, newest last, at most
    KEPT_WRITERS; the audit's own fixes are not writers that led to a finding."""
    latest: dict[tuple[Any, Any], dict[str, Any]] = {}
    for entries in lists:
        for entry in entries:
            if entry.get("writer") == AUDIT_FIX:
                continue
            pair = (entry.get("writer"), entry.get("application_name"))
            at = _at(entry)
            if pair not in latest or (at is not None and at >= (_at(latest[pair]) or at)):
                latest[pair] = {
                    "writer": entry.get("writer"),
                    "application_name": entry.get("application_name"),
                    "at": entry.get("at"),
                }
    never = datetime.min.replace(tzinfo=UTC)
    return sorted(latest.values(), key=lambda e: _at(e) or never)[-KEPT_WRITERS:]


def other_writer(
    writers: Sequence[dict[str, Any]], *, after: datetime | None
) -> dict[str, Any] | None:
    """The latest writer other than the audit itself that wrote after ``after``."""
    for entry in reversed(writers):
        if entry.get("writer") in AUDIT_WRITERS:
            continue
        at = _at(entry)
        if after is None or at is None or at >= after:
            return entry
    return None


class FightFacts(Protocol):
    """What a fight's detail is made of: a ``Drift`` (a chunk's) or a ``DriftRecord`` (the
    admin's)."""

    recent_fixes: list[dict[str, Any]]
    undone_by: str
    undone_at: datetime | None


def fight_detail(record: FightFacts) -> str:
    """Why a finding is held: 'fighting: fixed 3 times in 24 h; undone by partner-sync at ...'."""
    window = settings.PROFILE_AUDIT_FIGHT_WINDOW
    span = f"{window // 3600:g} h" if window % 3600 == 0 else f"{window // 60} min"
    fixes = len(record.recent_fixes) or settings.PROFILE_AUDIT_FIGHT_FIXES
    undone = (
        f"undone by {record.undone_by} at {record.undone_at:%Y-%m-%d %H:%M:%S} UTC"
        if record.undone_by and record.undone_at
        else "undone by a writer the change marks did not name"
    )
    return f"fighting: fixed {fixes} times in {span}; {undone}"


# Not frozen, slots: one per finding of a chunk, cheap to make (a model instance is not).
@dataclass(slots=True)
class Drift:
    """A drift record as a chunk reads and writes it (the columns of ``DriftRecord``): first
    its fingerprint and what a run may change, then what only a new record is made with."""

    id: UUID
    organization_id: UUID
    type: str
    key: str
    state: str
    last_seen_at: datetime
    times_found: int = 0
    times_fixed: int = 0
    last_fixed_at: datetime | None = None
    resolved_at: datetime | None = None
    recent_fixes: list[dict[str, Any]] = field(default_factory=list)
    held_since: datetime | None = None
    last_writers: list[dict[str, Any]] = field(default_factory=list)
    undone_by: str = ""
    undone_at: datetime | None = None
    audits_seen: int = 0
    # Not read on PostgreSQL, where a record read is only ever updated, never written whole.
    model: str = ""
    object_id: UUID | None = None
    platform: str = ""
    external_id: str = ""
    first_seen_at: datetime | None = None
    resumed_by: str = ""


COLUMNS = [f.name for f in fields(Drift)]
# What PostgreSQL reads of a record: its fingerprint and what a run may change (a prefix of
# COLUMNS, so a row of them makes a Drift as it is). SQLite reads them all (its upsert writes
# whole rows).
READ_COLUMNS = COLUMNS[: COLUMNS.index("audits_seen") + 1]
_FIELDS = {f.attname: f for f in DriftRecord._meta.concrete_fields}
JSON_COLUMNS = ("recent_fixes", "last_writers")


@dataclass
class DriftBook:
    """The drift records of a chunk's organizations, read once in the chunk's transaction, and
    the writers of their change marks as the chunk found them."""

    records: dict[Fingerprint, Drift]
    mark_writers: dict[UUID, list[dict[str, Any]]]
    now: datetime
    # Fingerprints a fixing run resumes by itself (they stayed resolved for a window).
    released: set[Fingerprint]
    # Fingerprints held (fighting) when read: few or none, so most findings skip the lookup.
    held: set[Fingerprint] = field(default_factory=set)
    # The organizations' OrganizationAudits.audits (by the id's int), as read and as bumped.
    audits: dict[int, int] = field(default_factory=dict)
    # PostgreSQL, for ``write_from_findings``: the records ``record`` created, and those it
    # wrote itself (the others it saw are counted from their findings).
    unwritten: list[Drift] = field(default_factory=list)
    rewritten: list[UUID] = field(default_factory=list)
    any_seen: bool = False
    # The organizations this chunk counted one more audit of (``_count_audits``).
    counted: list[UUID] = field(default_factory=list)
    fixing: bool = False

    @classmethod
    def read(
        cls,
        organization_ids: Sequence[UUID],
        *,
        now: datetime | None = None,
        mark_writers: dict[UUID, list[dict[str, Any]]] | None = None,
    ) -> DriftBook:
        """``mark_writers``: the writers of the organizations' change marks, if the caller read
        them already (a fix, with their versions); else read here."""
        ids = list(organization_ids)
        # JSON read as text and decoded once per distinct value: an organization's records
        # mostly share their writers (and have no recent fixes), so most rows cost no decoding.
        decoded: dict[str, Any] = {}

        def decode(text: str | None) -> Any:
            if text is None:
                return []
            if (value := decoded.get(text)) is None:
                value = decoded[text] = json.loads(text)
            return value

        fixes_at, writers_at = (COLUMNS.index(c) for c in JSON_COLUMNS)
        # The organizations' audits (OrganizationAudits), as a write of their records sets
        # ``audits_seen``: on PostgreSQL each record read carries its organization's (and
        # those without records need none: a new record's is the server's).
        audits: dict[int, int] = {}
        records = {}
        for row in _record_rows(ids, audits):
            values = list(row)
            values[fixes_at] = decode(values[fixes_at])
            values[writers_at] = decode(values[writers_at])
            r = Drift(*values)
            org = r.organization_id.int
            audits[org] = r.audits_seen
            records[(org, r.type, r.key)] = r
        if mark_writers is None:
            marks = ChangeMark.objects.filter(organization_id__in=ids).values_list(
                "organization_id", "writers"
            )
            mark_writers = {org: list(writers or []) for org, writers in marks}
        return cls(
            records=records,
            mark_writers=mark_writers,
            now=now or timezone.now(),
            released=set(),
            held={fp for fp, r in records.items() if r.held_since is not None},
            audits=audits,
        )

    def _window_start(self) -> datetime:
        return self.now - timedelta(seconds=settings.PROFILE_AUDIT_FIGHT_WINDOW)

    @staticmethod
    def _fingerprint(
        organization_id: UUID, type: str, object_id: UUID | None, platform: str, external_id: str
    ) -> Fingerprint:
        return (
            organization_id.int,
            str(type),
            fingerprint_key(object_id=object_id, platform=platform, external_id=external_id),
        )

    def fighting(self, row: FindingRow) -> bool:
        """Whether a fixing run would hold this finding's fingerprint (it is fighting)."""
        if row.organization_id is None or not self.held:
            return False
        fp = self._fingerprint(
            row.organization_id, row.type, row.object_id, row.platform, row.external_id
        )
        return fp in self.held

    def holds(
        self,
        organization_id: UUID,
        *,
        type: str,
        object_id: UUID | None,
        key: tuple[str, str] | None,
    ) -> str | None:
        """For a fixing run: why this finding must be left alone (it is fighting), or None."""
        if not self.records:
            return None
        platform, external_id = key or ("", "")
        fp = self._fingerprint(organization_id, type, object_id, platform, external_id)
        record = self.records.get(fp)
        if record is None:
            return None
        since = self._window_start()
        if record.held_since is not None:
            if (
                record.state == DriftState.RESOLVED
                and record.resolved_at is not None
                and record.resolved_at <= since
            ):
                self.released.add(fp)  # it stayed resolved for a window: fixing resumes
                return None
            return fight_detail(record)
        recent = [f for f in record.recent_fixes if (_at(f) or since) > since]
        if len(recent) >= settings.PROFILE_AUDIT_FIGHT_FIXES:
            record.recent_fixes = recent
            return fight_detail(record)
        return None

    def record(
        self,
        rows: Sequence[FindingRow],
        *,
        audited: Iterable[UUID],
        types: Iterable[str],
        run_id: UUID,
        fix: bool,
    ) -> None:
        """Count the chunk's findings on their records (new ones created), resolve the records of
        ``audited`` organizations (of the run's ``types``) that were not found again, and link
        each row to its record: one statement (on PostgreSQL the new records, and those only seen
        again, follow from their findings in ``write_from_findings``).

        A run of every type counts the records it finds again with nothing new to say (most of
        them: drift that stays) by adding one to their organizations' audits
        (``OrganizationAudits``) instead of rewriting each one; a run of some types only,
        after which their organizations' other records were not found again, counts them on
        the records themselves."""
        now = self.now
        fix_needed = settings.PROFILE_AUDIT_FIGHT_FIXES
        since = self._window_start()
        by_audits = {str(t) for t in types} >= set(FindingType.values)
        changed: dict[Fingerprint, Drift] = {}
        created: set[Fingerprint] = set()
        # Records found again whose story and writers did not change (most of them, drift that
        # stays), or changed only by this fix's count: counted, by their organizations' audits
        # (``by_audits``) or from their findings on PostgreSQL (``write_from_findings``); the
        # ones with a fix counted are in ``seen_fixed`` too.
        seen: set[Fingerprint] = set()
        seen_fixed: set[Fingerprint] = set()
        # The writers of a new record are its organization's marks' writers: shared.
        org_writers: dict[int, list[dict[str, Any]]] = {}
        # (writers merged, the same as the record's) per organization and list of writers.
        merged: dict[tuple[int, int], tuple[list[dict[str, Any]], bool]] = {}

        def with_marks(record: Drift, org: UUID) -> tuple[list[dict[str, Any]], bool]:
            """The record's writers and its organization's marks' merged, and whether that is
            what the record had: the lists are shared (decoded once), so merged once per
            organization and list."""
            pair = (org.int, id(record.last_writers))
            if (known := merged.get(pair)) is None:
                writers = merge_writers(record.last_writers, self.mark_writers.get(org, ()))
                known = merged[pair] = (writers, writers == record.last_writers)
            return known

        fix_entry = {"at": now.isoformat(), "run": str(run_id)}
        for row in rows:
            org = row.organization_id
            if org is None:
                continue
            fp = self._fingerprint(org, row.type, row.object_id, row.platform, row.external_id)
            record = self.records.get(fp)
            if (
                record is not None
                and record.state == DriftState.OPEN
                and record.last_fixed_at is None
                and record.held_since is None
                and not (fix and (fp in self.released or row.outcome in _FIX_STORIES))
            ):
                # Drift that stays, never fixed (most of a dry run's): open as it was, and
                # nothing to say but that it was seen again if its writers did not change.
                writers, same_writers = with_marks(record, org)
                record.times_found += 1
                record.last_seen_at = now
                record.last_writers = writers
                record.resolved_at = None
                changed[fp] = record
                if same_writers:
                    seen.add(fp)
                row.drift_id, row.recurring, row.writers = record.id, False, writers or None
                continue
            if record is None:
                created.add(fp)
                record = self.records[fp] = Drift(
                    # A new record takes its first finding's id (both random): the server then
                    # knows the findings that make a record (``write_from_findings``).
                    id=row.id,
                    organization_id=org,
                    type=str(row.type),
                    model=row.model,
                    key=fp[2],
                    object_id=row.object_id,
                    platform=row.platform,
                    external_id=row.external_id,
                    state=DriftState.OPEN,
                    first_seen_at=now,
                    last_seen_at=now,
                )
                recurring, story = False, None
            else:
                recurring = record.state != DriftState.OPEN or record.last_fixed_at is not None
                story = _story(record)
            if record.last_writers and record.state != DriftState.RESOLVED:
                writers, same_writers = with_marks(record, org)
            else:
                shared = org_writers.get(fp[0])
                if shared is None:
                    shared = org_writers[fp[0]] = merge_writers(self.mark_writers.get(org, ()))
                writers, same_writers = shared, not shared and not record.last_writers
            if recurring and (other := other_writer(writers, after=record.last_fixed_at)):
                record.undone_by = writer_name(other)[:255]
                record.undone_at = _at(other)
            record.times_found += 1
            record.last_seen_at = now
            record.last_writers = writers
            if fix and fp in self.released:
                record.held_since = None
                record.recent_fixes = []
            counted_fix = False
            if fix and row.outcome == FindingOutcome.HELD:
                record.held_since = record.held_since or now
            elif fix and row.outcome in FIXING_OUTCOMES:
                counted_fix = True
                record.times_fixed += 1
                record.last_fixed_at = now
                recent = [f for f in record.recent_fixes if (_at(f) or since) > since]
                record.recent_fixes = [*recent, fix_entry][-fix_needed:]
            if record.held_since is not None:
                record.state = DriftState.FIGHTING
            elif recurring or record.state == DriftState.RECURRING:
                record.state = DriftState.RECURRING
            else:
                record.state = DriftState.OPEN
            record.resolved_at = None
            changed[fp] = record
            if (
                story is not None
                and same_writers
                and _same_story(story, _story(record), fix_counted=counted_fix)
            ):
                seen.add(fp)
                if counted_fix:
                    seen_fixed.add(fp)
            row.drift_id = record.id
            row.recurring = recurring
            row.writers = writers or None
        audited_orgs, audited_types = {o.int: o for o in audited}, {str(t) for t in types}
        for fp, record in self.records.items():
            if (
                fp not in changed
                and record.state != DriftState.RESOLVED
                and fp[0] in audited_orgs
                and record.type in audited_types
            ):
                record.state = DriftState.RESOLVED
                record.resolved_at = now
                changed[fp] = record
        if not changed:
            return
        # The organizations whose records only seen again (their fixes not counted) this audit
        # counts, by one more audit of each; those records are not written.
        counted: set[int] = set()
        if by_audits:
            counted = {fp[0] for fp in seen if fp not in seen_fixed} & audited_orgs.keys()
            self._count_audits([audited_orgs[o] for o in counted])
        covered = {fp for fp in seen if fp[0] in counted and fp not in seen_fixed}
        new = [r for fp, r in changed.items() if fp in created]
        read = [r for fp, r in changed.items() if fp not in created and fp not in covered]
        if connection.vendor == "postgresql":
            # A new record is made of its finding's columns, and one only seen again is counted
            # from its finding: the server does both once the findings are in
            # (``write_from_findings``), instead of Python sending each row twice.
            read = [r for fp, r in changed.items() if fp not in created and fp not in seen]
            self.unwritten, self.rewritten, self.fixing = new, [r.id for r in read], fix
            self.counted = [audited_orgs[o] for o in counted]
            self.any_seen = len(seen) > len(covered)
            new = []
        for r in (*new, *read):  # what Python writes (PostgreSQL makes a new record's itself)
            r.audits_seen = self.audits.get(r.organization_id.int, 0)
        upsert(new, read, fix=fix)
        if new:
            _link_to_existing(new, rows)

    def _count_audits(self, organizations: list[UUID]) -> None:
        """One more audit of these organizations found their records (``OrganizationAudits``),
        taken in the organizations' order (concurrent runs of the same organizations queue
        instead of deadlocking)."""
        if not organizations:
            return
        ids = sorted(organizations)
        if connection.vendor == "postgresql":
            table = OrganizationAudits._meta.db_table
            with connection.cursor() as cursor:
                cursor.execute(
                    f"INSERT INTO {table} AS a (organization_id, audits, last_audit_at) "
                    "SELECT o, 1, %s FROM unnest(%s::uuid[]) AS o ORDER BY o "
                    "ON CONFLICT (organization_id) DO UPDATE SET audits = a.audits + 1, "
                    "last_audit_at = GREATEST(a.last_audit_at, EXCLUDED.last_audit_at)",
                    # One text literal: psycopg dumps a list of UUIDs element by element.
                    [self.now, "{" + ",".join(map(str, ids)) + "}"],
                )
        else:
            OrganizationAudits.objects.filter(organization_id__in=ids).update(
                audits=F("audits") + 1, last_audit_at=self.now
            )
            OrganizationAudits.objects.bulk_create(
                [
                    OrganizationAudits(organization_id=o, audits=1, last_audit_at=self.now)
                    for o in ids
                ],
                ignore_conflicts=True,
            )
        # What this chunk writes of these organizations' records counts from its own audit:
        # one that another run counted meanwhile found them too, as it counted.
        for o in ids:
            self.audits[o.int] = self.audits.get(o.int, 0) + 1

    def write_from_findings(self, *, run_id: UUID, first_seq: int, last_seq: int) -> None:
        """PostgreSQL, once the chunk's findings are recorded (``run_id``'s ``first_seq`` to
        ``last_seq``): count the records seen again whose story did not change, and insert
        those ``record`` created, each from its finding (one statement each). A record another
        run created meanwhile stays as that run wrote it, and the findings are linked to it."""
        if connection.vendor != "postgresql" or last_seq < first_seq:
            return
        if self.any_seen:
            self._count_seen(run_id=run_id, first_seq=first_seq, last_seq=last_seq)
        if self.unwritten:
            self._insert_new(run_id=run_id, first_seq=first_seq, last_seq=last_seq)

    def _params(self, *, run_id: UUID, first_seq: int, last_seq: int) -> dict[str, Any]:
        """What the statements written from the chunk's findings share: the findings, now,
        and (``_FIXED``, ``_FIX_ENTRY``) whether and how a finding's fix is counted."""
        return {
            "run": run_id,
            "first": first_seq,
            "last": last_seq,
            "now": self.now,
            "fix": self.fixing,
            "fixed": list(FIXING_OUTCOMES),
            "at": self.now.isoformat(),
            "run_text": str(run_id),
        }

    def _count_seen(self, *, run_id: UUID, first_seq: int, last_seq: int) -> None:
        params = self._params(run_id=run_id, first_seq=first_seq, last_seq=last_seq) | {
            # The ids as one text literal: psycopg dumps a list of UUIDs element by element,
            # slowly.
            "rewritten": "{" + ",".join(map(str, self.rewritten)) + "}",
            "counted": "{" + ",".join(map(str, self.counted)) + "}",
            "since": self._window_start(),
            "kept": settings.PROFILE_AUDIT_FIGHT_FIXES - 1,
        }
        with connection.cursor() as cursor:
            # Before the insert: a new record's finding must not count it twice.
            cursor.execute(_count_seen_sql(fix=self.fixing), params)
        self.rewritten, self.counted, self.any_seen = [], [], False

    def _insert_new(self, *, run_id: UUID, first_seq: int, last_seq: int) -> None:
        expected = len(self.unwritten)
        params = self._params(run_id=run_id, first_seq=first_seq, last_seq=last_seq)
        with connection.cursor() as cursor:
            cursor.execute(_insert_new_sql(), params)
            if cursor.rowcount < expected:
                cursor.execute(_link_to_existing_sql(), params)
        self.unwritten = []


def _link_to_existing(new: Sequence[Drift], rows: Sequence[FindingRow]) -> None:
    """SQLite, after the upsert: a new record another run made meanwhile was updated, not made
    anew, so its rows are linked to that run's record (PostgreSQL: ``_link_to_existing_sql``)."""
    made = set(DriftRecord.objects.filter(id__in=[r.id for r in new]).values_list("id", flat=True))
    lost = {(r.organization_id, r.type, r.key): r.id for r in new if r.id not in made}
    if not lost:
        return
    existing = DriftRecord.objects.filter(
        organization_id__in={fp[0] for fp in lost}, key__in={fp[2] for fp in lost}
    ).values_list("id", "organization_id", "type", "key")
    relinked = {lost[(o, t, k)]: id_ for id_, o, t, k in existing if (o, t, k) in lost}
    for row in rows:
        if row.drift_id in relinked:
            row.drift_id = relinked[row.drift_id]


def _record_rows(organization_ids: list[UUID], audits: dict[int, int]) -> Iterable[tuple[Any, ...]]:
    """The records of these organizations, as tuples in COLUMNS' order (on PostgreSQL only
    READ_COLUMNS), JSON columns as text; times found and last seen as ``with_sightings`` tells
    them (the audits of the organization since a record was written added), and
    ``audits_seen`` its organization's audits now (SQLite: those are put in ``audits``).

    On PostgreSQL each organization's records are read through the fingerprint's index (it
    leads with the organization), one index scan per organization: a plain ``IN`` is planned on
    the table's statistics, and while they are missing or stale (a table that grew since its
    last ANALYZE, as in a first run over many organizations) that was a scan of every record
    for every chunk, quadratic in the installation.
    """
    if connection.vendor != "postgresql":
        audits.update(
            (org.int, n)
            for org, n in OrganizationAudits.objects.filter(
                organization_id__in=organization_ids
            ).values_list("organization_id", "audits")
        )
        found = {"times_found": "found", "last_seen_at": "seen_at"}
        columns = [
            Cast(c, output_field=TextField()) if c in JSON_COLUMNS else found.get(c, c)
            for c in COLUMNS
        ]
        org_at, audits_at = COLUMNS.index("organization_id"), COLUMNS.index("audits_seen")
        for row in (
            DriftRecord.objects.filter(organization_id__in=organization_ids)
            .with_sightings()
            .values_list(*columns)
        ):
            yield (*row[:audits_at], audits.get(row[org_at].int, 0), *row[audits_at + 1 :])
        return
    # Since it was written, found again by every audit of its organization while unresolved.
    later = f"(d.state <> '{DriftState.RESOLVED}' AND a.audits > d.audits_seen)"
    sighted = {
        "times_found": f"d.times_found + CASE WHEN {later} THEN a.audits - d.audits_seen ELSE 0 END",
        "last_seen_at": (
            f"CASE WHEN {later} THEN GREATEST(d.last_seen_at, a.last_audit_at) "
            "ELSE d.last_seen_at END"
        ),
        "audits_seen": "coalesce(a.audits, 0)",
    }
    select = ", ".join(
        sighted.get(c) or f"d.{_FIELDS[c].column}" + ("::text" if c in JSON_COLUMNS else "")
        for c in READ_COLUMNS
    )
    # OFFSET 0 keeps the subquery from being flattened into a join the planner may hash.
    sql = (
        f"SELECT {select} FROM unnest(%b::uuid[]) AS o(id) CROSS JOIN LATERAL "
        f"(SELECT * FROM {DriftRecord._meta.db_table} r WHERE r.organization_id = o.id "
        f"OFFSET 0) d LEFT JOIN {OrganizationAudits._meta.db_table} a "
        "ON a.organization_id = o.id"
    )
    # Read in binary: a chunk's records carry thousands of time stamps, which Django's text
    # loader parses in Python.
    with binary_cursor() as cursor:
        cursor.execute(sql, [list(organization_ids)])
        yield from cursor.fetchall()


def upsert(created: Sequence[Drift], changed: Sequence[Drift], *, fix: bool) -> None:
    """Write the chunk's new records and the changed ones it read from the table.

    PostgreSQL: the read ones in one UPDATE by id of only the columns a run changes, their
    shared writers' lists sent once (the new ones, and those only seen again, are
    ``DriftBook.write_from_findings``'). SQLite:
    Django's bulk upsert of both, batched by its parameter limit. A dry run's writes leave the
    fixing runs' columns as they are."""
    if connection.vendor != "postgresql":
        DriftRecord.objects.bulk_create(
            [DriftRecord(**{c: getattr(r, c) for c in COLUMNS}) for r in (*created, *changed)],
            update_conflicts=True,
            unique_fields=["organization", "type", "key"],
            update_fields=UPDATED_FIELDS if fix else OBSERVED_FIELDS,
        )
        if not fix and changed:  # as _dry_state does on PostgreSQL (a new one is not held)
            DriftRecord.objects.filter(
                id__in=[r.id for r in changed], held_since__isnull=False
            ).exclude(state__in=[DriftState.RESOLVED, DriftState.FIGHTING]).update(
                state=DriftState.FIGHTING
            )
        return
    assert not created, "new records are written from their findings (write_from_findings)"
    if not changed:
        return
    texts: dict[object, str] = {}  # the chunk's few times, each made once

    def text(value: datetime) -> str:
        if (made := texts.get(value)) is None:
            made = texts[value] = value.isoformat()
        return made

    # An organization's records share their writers' list (one object): sent once.
    writers: dict[int, int] = {}
    lists: list[list[dict[str, Any]]] = []

    def value(record: Drift, name: str) -> Any:
        v = getattr(record, name)
        if name == "last_writers":
            if (at := writers.get(id(v))) is None:
                at = writers[id(v)] = len(lists)
                lists.append(v)
            return at
        return text(v) if isinstance(v, datetime) else v

    names = UPDATED_FIELDS if fix else OBSERVED_FIELDS
    rows = [[str(r.id), *(value(r, n) for n in names)] for r in changed]
    with connection.cursor() as cursor:
        cursor.execute(_update_sql(fix=fix), [json.dumps(lists), json.dumps(rows)])


UPDATE_SQL = """
UPDATE {table} AS d SET {updates}
FROM jsonb_array_elements(%s::jsonb) AS r WHERE d.id = (r->>0)::uuid
"""


def _finding_key(f: str) -> str:
    """A finding's fingerprint key in SQL, as ``fingerprint_key`` makes it."""
    return f"coalesce({f}.object_id::text, {f}.platform || ':' || {f}.external_id)"


# A fixing run's outcomes that change a record's story: a fix counted, or a hold.
_FIX_STORIES = FIXING_OUTCOMES | {FindingOutcome.HELD}

# In the statements written from a chunk's findings (``DriftBook._params``): whether the
# finding ``f`` is a fix that counts, and that fix as an entry of a record's recent fixes.
_FIXED = "(%(fix)s AND f.outcome = ANY(%(fixed)s))"
_FIX_ENTRY = "jsonb_build_array(jsonb_build_object('at', %(at)s::text, 'run', %(run_text)s::text))"


def _insert_new_sql() -> str:
    """The records of a chunk's new fingerprints, made of their findings: first seen now, found
    once, fixed once if a fixing run fixed (or sent) the finding, its writers the finding's."""
    values = {
        "id": "f.drift_id",
        "organization_id": "f.organization_id",
        "type": "f.type",
        "key": _finding_key("f"),
        "state": f"'{DriftState.OPEN}'",
        "last_seen_at": "%(now)s",
        "times_found": "1",
        "times_fixed": f"CASE WHEN {_FIXED} THEN 1 ELSE 0 END",
        "last_fixed_at": f"CASE WHEN {_FIXED} THEN %(now)s END",
        "resolved_at": "NULL",
        "recent_fixes": f"CASE WHEN {_FIXED} THEN {_FIX_ENTRY} ELSE '[]'::jsonb END",
        "held_since": "NULL",
        "last_writers": "coalesce(f.writers, '[]'::jsonb)",
        "undone_by": "''",
        "undone_at": "NULL",
        # A probe of the primary key per record: a join would be planned on the statistics of
        # a table that grows from empty (a scan of it per chunk, once they are stale).
        "audits_seen": (
            f"coalesce((SELECT a.audits FROM {OrganizationAudits._meta.db_table} a "
            "WHERE a.organization_id = f.organization_id), 0)"
        ),
        "model": "f.model",
        "object_id": "f.object_id",
        "platform": "f.platform",
        "external_id": "f.external_id",
        "first_seen_at": "%(now)s",
        "resumed_by": "''",
    }
    assert list(values) == COLUMNS
    return (
        f"INSERT INTO {DriftRecord._meta.db_table} "
        f"({', '.join(_FIELDS[c].column for c in COLUMNS)}) "
        f"SELECT {', '.join(values.values())} FROM {AuditFinding._meta.db_table} f "
        "WHERE f.run_id = %(run)s AND f.seq BETWEEN %(first)s AND %(last)s "
        "AND f.drift_id = f.id ON CONFLICT DO NOTHING"
    )


def _count_seen_sql(*, fix: bool) -> str:
    """The records the chunk's findings point at, but those written whole (new, or their story
    changed) and those only seen again in an organization this audit counted (``counted``):
    found once more, last seen now, their writers the finding's — and, in a counted
    organization, its audits since written as they were (this one is counted here); and,
    fixing, a finding fixed (or its sync sent) counted as ``DriftBook.record`` counts it: fixed
    once more, now, the fix added to those of the window (the last PROFILE_AUDIT_FIGHT_FIXES
    kept)."""
    counted = "f.organization_id = ANY(%(counted)s::uuid[])"
    counts = [
        "times_found = d.times_found + 1, last_seen_at = %(now)s, "
        "last_writers = coalesce(f.writers, '[]'::jsonb), "
        f"audits_seen = d.audits_seen + CASE WHEN {counted} THEN 1 ELSE 0 END"
    ]
    if fix:
        # (A record never fixed has none: no subquery for it, the first fix of most.)
        kept = (
            "CASE WHEN d.recent_fixes = '[]'::jsonb THEN d.recent_fixes ELSE "
            "(SELECT coalesce(jsonb_agg(k.e ORDER BY k.n), '[]'::jsonb) FROM "
            "(SELECT x.e, x.n FROM jsonb_array_elements(d.recent_fixes) WITH ORDINALITY "
            "AS x(e, n) WHERE (x.e ->> 'at')::timestamptz > %(since)s "
            "ORDER BY x.n DESC LIMIT %(kept)s) k) END"
        )
        counts.append(
            f"times_fixed = d.times_fixed + CASE WHEN {_FIXED} THEN 1 ELSE 0 END, "
            f"last_fixed_at = CASE WHEN {_FIXED} THEN %(now)s ELSE d.last_fixed_at END, "
            f"recent_fixes = CASE WHEN {_FIXED} THEN {kept} || {_FIX_ENTRY} ELSE d.recent_fixes END"
        )
    return (
        f"UPDATE {DriftRecord._meta.db_table} d SET {', '.join(counts)} "
        f"FROM {AuditFinding._meta.db_table} f "
        "WHERE f.run_id = %(run)s AND f.seq BETWEEN %(first)s AND %(last)s "
        "AND d.id = f.drift_id AND NOT (f.drift_id = ANY(%(rewritten)s::uuid[])) "
        f"AND (NOT {counted} OR {_FIXED})"
    )


def _story(record: Drift) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """What of a record says more than that it was seen again: what any run sees of it, and
    its fixes."""
    return (
        (record.state, record.undone_by, record.undone_at, record.held_since),
        (record.times_fixed, record.last_fixed_at, record.recent_fixes),
    )


def _same_story(
    before: tuple[tuple[Any, ...], ...], after: tuple[tuple[Any, ...], ...], *, fix_counted: bool
) -> bool:
    """Whether a record found again is only counted (``_count_seen_sql``): its story did not
    change, or (``fix_counted``) only by this run's fix, which the statement counts as
    ``DriftBook.record`` does."""
    return before[0] == after[0] and (fix_counted or before[1] == after[1])


def _link_to_existing_sql() -> str:
    """Findings whose new record lost the race to another run's: linked to that one."""
    drift, findings = DriftRecord._meta.db_table, AuditFinding._meta.db_table
    return (
        f"UPDATE {findings} f SET drift_id = d.id FROM {drift} d "
        "WHERE f.run_id = %(run)s AND f.seq BETWEEN %(first)s AND %(last)s "
        "AND f.drift_id = f.id "
        f"AND NOT EXISTS (SELECT 1 FROM {drift} x WHERE x.id = f.id) "
        f"AND d.organization_id = f.organization_id AND d.type = f.type "
        f"AND d.key = {_finding_key('f')}"
    )


def _update_sql(*, fix: bool) -> str:
    """The UPDATE of records read from the table: each row a JSON array of its id and the
    changed columns (UPDATED_FIELDS or OBSERVED_FIELDS, in order; ``last_writers`` an index into
    the first parameter, the chunk's distinct writers' lists)."""
    updates = []
    for i, name in enumerate(UPDATED_FIELDS if fix else OBSERVED_FIELDS, start=1):
        if name == "last_writers":
            value = f"(SELECT l -> ((r->>{i})::int) FROM lists)"
        else:
            value = _json_value(i, name)
        if name == "state" and not fix:
            value = _dry_state("d.held_since", value)
        updates.append(f"{_FIELDS[name].column} = {value}")
    # The writers' lists come first in the statement's text, so first in its parameters.
    return "WITH lists AS MATERIALIZED (SELECT %s::jsonb AS l) " + UPDATE_SQL.format(
        table=DriftRecord._meta.db_table, updates=", ".join(updates)
    )


def _json_value(i: int, name: str) -> str:
    """Element ``i`` of a JSON row as column ``name``'s value: JSON columns as they are, the
    rest as text cast to the column's type (JSON null is SQL NULL either way)."""
    if name in JSON_COLUMNS:
        return f"r->{i}"
    return f"(r->>{i})::{_FIELDS[name].db_type(connection)}"


def _dry_state(held_since: str, state: str) -> str:
    """A dry run's state: held meanwhile by a fixing run (the dry run read the record before),
    it stays fighting unless the dry run found it resolved."""
    return (
        f"CASE WHEN {held_since} IS NOT NULL AND {state} <> '{DriftState.RESOLVED}' "
        f"THEN '{DriftState.FIGHTING}' ELSE {state} END"
    )


def forget_fixes(*, run_id: UUID, drift_ids: Iterable[UUID | None]) -> int:
    """A revert put back the run's changes to these records' objects: their fixes by that run no
    longer count towards a fight (the audit does not fight its own revert). One statement."""
    ids = [d for d in drift_ids if d is not None]
    if not ids:
        return 0
    if connection.vendor == "postgresql":
        kept = (
            "(SELECT coalesce(jsonb_agg(e ORDER BY n), '[]'::jsonb) FROM "
            "jsonb_array_elements(recent_fixes) WITH ORDINALITY AS f(e, n) "
            "WHERE e ->> 'run' IS DISTINCT FROM %s)"
        )
    else:
        kept = (
            "(SELECT json_group_array(json(value)) FROM "
            "(SELECT value FROM json_each(recent_fixes) "
            "WHERE json_extract(value, '$.run') IS NOT %s ORDER BY key))"
        )
    return DriftRecord.objects.filter(id__in=ids).update(
        recent_fixes=RawSQL(kept, [str(run_id)], output_field=JSONField())
    )


def resume_fixing(records: QuerySet[DriftRecord], *, by: str) -> int:
    """An operator resumes fixing of fighting records: the next fixing run fixes them again, and
    their fight is judged afresh. Returns how many were held."""
    return records.filter(held_since__isnull=False).update(
        held_since=None,
        recent_fixes=[],
        state=DriftState.RECURRING,
        resumed_by=by[:150],
        resumed_at=timezone.now(),
    )


def prune_quiet_records(*, before: datetime, batch_size: int = 5000) -> int:
    """Delete drift records not seen since ``before`` and not held (a held fight stays until it
    is resumed), in batches, and the audit counts of organizations deleted since (their records
    went with them). Returns how many records were deleted."""
    deleted = 0
    while True:
        ids = list(
            DriftRecord.objects.with_sightings()
            .filter(seen_at__lt=before, held_since__isnull=True)  # type: ignore[misc]
            .values_list("id", flat=True)[:batch_size]
        )
        if not ids:
            break
        deleted += DriftRecord.objects.filter(id__in=ids).delete()[0]
    OrganizationAudits.objects.exclude(
        organization_id__in=Organization.objects.values("id")
    ).delete()
    return deleted
