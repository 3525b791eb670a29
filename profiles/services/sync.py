"""The profile sync: bring keys of organizations in step with their selection, set-based.

Called by the real-time selection change (``connections.services``) and, through the
``profiles.sync_profiles`` task, by the audit for a chunk's missing profiles. A batch of keys is
synced in one transaction: the organizations' locks in one statement, the keys' state in three
queries, the decisions of ``profiles.plan``, then one statement per kind of change (one insert
for every profile it creates) — whatever the number of keys (DESIGN "Speed on one core").
Idempotent, and safe to run twice at once: it holds the organizations' locks and decides from
what it reads under them; the conditional unique constraint on alive profiles is the last line.

A sync also settles the audit's records of its keys: a missing profile's finding, recorded
``sent`` when its job was dispatched, becomes ``fixed`` in the same transaction that makes the
profile exist (or ``stale`` if the key is selected no more), never before (DESIGN "Nothing is
lost").
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import NamedTuple
from uuid import UUID

from django.db import connection, transaction
from django.utils import timezone

from profiles.models import FindingOutcome, FindingType, SocialProfile
from profiles.plan import Finding, find_profile_findings
from profiles.selectors import (
    alive_profile_keys,
    load_keys_snapshots,
    sent_findings,
    unconfirmed_sync_keys,
)
from profiles.services.changes import Change, apply_profile_findings, planned_change
from profiles.services.organization_lock import lock_organizations
from profiles.services.recording import SentFinding, settle_sent_findings

SYNC_ACTIONS = {
    FindingType.ORPHANED: "deleted",
    FindingType.DESELECTED: "deleted",
    FindingType.RELINK: "relinked",
    FindingType.RESTORE: "restored",
    FindingType.MISSING: "created",
}
NO_LONGER_SELECTED = "not created: the key was no longer selected when its sync job ran"
# Keys per re-sent sync job: one message stays small, and one job one short transaction.
RESEND_BATCH = 2000


class SyncKey(NamedTuple):
    organization_id: UUID
    platform: str
    external_id: str


@dataclass(frozen=True)
class SyncResult:
    action: str
    """created, restored, relinked, deleted or unchanged."""
    profile_id: UUID | None


def sync_profiles(*, keys: Iterable[tuple[UUID, str, str]]) -> dict[SyncKey, SyncResult]:
    """Sync every key (organization, platform, external id): create or restore its profile on
    its backing connection, relink it there, or soft delete it when the key is selected nowhere
    in its organization; then settle the ``sent`` findings of these keys. One transaction."""
    wanted = {SyncKey(_uuid(org), platform, external_id) for org, platform, external_id in keys}
    if not wanted:
        return {}
    now = timezone.now()
    with transaction.atomic():
        lock_organizations(sorted({k.organization_id for k in wanted}, key=lambda o: o.int))
        snapshots = load_keys_snapshots(wanted)
        decision_of: dict[SyncKey, Finding] = {}
        organization_of: dict[int, UUID] = {}
        finding: Finding | None
        for org, snapshot in snapshots.items():
            for finding in find_profile_findings(snapshot):
                # One key has at most one alive profile, so one decision at most changes it.
                assert finding.key is not None  # profile findings all have their key
                decision_of[SyncKey(org, *finding.key)] = finding
                organization_of[id(finding)] = org
        created: list[SocialProfile] = []

        def create_profile(finding: Finding) -> Change:
            assert finding.key is not None  # a missing profile is known by its key only
            platform, external_id = finding.key
            created.append(
                SocialProfile(
                    id=uuid.uuid4(),
                    organization_id=organization_of[id(finding)],
                    connection_id=finding.target_connection_id,
                    platform=platform,
                    external_id=external_id,
                    name=finding.name,
                    created_at=now,
                )
            )
            return planned_change(finding, now=now)

        apply_profile_findings(list(decision_of.values()), now=now, on_missing=create_profile)
        _insert_profiles(created)
        created_id = {(p.organization_id, p.platform, p.external_id): p.id for p in created}

        results: dict[SyncKey, SyncResult] = {}
        alive_after: set[SyncKey] = set()
        for key in wanted:
            finding = decision_of.get(key)
            if finding is None:
                alive = next(
                    (
                        p.id
                        for p in snapshots[key.organization_id].profiles
                        if p.alive and p.key == (key.platform, key.external_id)
                    ),
                    None,
                )
                results[key] = SyncResult("unchanged", alive)
            else:
                action = SYNC_ACTIONS[finding.type]
                results[key] = SyncResult(action, created_id.get(key, finding.object_id))
            if results[key].action != "deleted" and results[key].profile_id is not None:
                alive_after.add(key)
        _settle(wanted, alive_after=alive_after)
    return results


def sync_profile(*, organization_id: UUID, platform: str, external_id: str) -> SyncResult:
    """Sync one key (a batch of one)."""
    key = SyncKey(organization_id, platform, external_id)
    return sync_profiles(keys=[key])[key]


def _settle(keys: set[SyncKey], *, alive_after: set[SyncKey]) -> None:
    """The ``sent`` findings of these keys (of any run): fixed where the key's profile exists
    now, stale where the key is selected no more. Inside the sync's transaction, so a finding
    is fixed exactly when its profile is there to see."""
    fixed: list[SentFinding] = []
    stale: list[SentFinding] = []
    for id_, run_id, type_, key in sent_findings(
        organization_ids={k.organization_id for k in keys}
    ):
        key = SyncKey(*key)
        if key in keys:
            (fixed if key in alive_after else stale).append(SentFinding(id_, run_id, type_))
    settle_sent_findings(fixed, outcome=FindingOutcome.FIXED)
    settle_sent_findings(stale, outcome=FindingOutcome.STALE, detail=NO_LONGER_SELECTED)


def confirm_sent_findings(*, organization_ids: Sequence[UUID]) -> int:
    """A later fixing audit's part: earlier runs' ``sent`` findings of these organizations whose
    profile exists now are fixed (one lookup on a partial index when there are none, the usual
    case; one more for their profiles otherwise). Returns how many were confirmed."""
    sent = sent_findings(organization_ids=organization_ids)
    if not sent:
        return 0
    alive = alive_profile_keys([key for _, _, _, key in sent])
    return settle_sent_findings(
        [SentFinding(id_, run_id, type_) for id_, run_id, type_, key in sent if key in alive],
        outcome=FindingOutcome.FIXED,
    )


@dataclass(frozen=True)
class ResendReport:
    findings: int
    jobs: int
    unsent: int

    def as_json(self) -> dict[str, int]:
        return {
            "sync_resent_findings": self.findings,
            "sync_resent_jobs": self.jobs,
            "sync_resend_failed": self.unsent,
        }


def resend_unconfirmed_syncs(
    *,
    older_than: timedelta,
    send: Callable[[list[list[str]], UUID], None],
    now: datetime | None = None,
    batch_size: int = RESEND_BATCH,
) -> ResendReport:
    """Send the sync job again for the findings still ``sent`` whose run has been quiet for
    ``older_than``: their job was lost (a broker restarted without persistence) or gave up
    after its retries. The job is idempotent and settles those findings when it runs; a job
    that cannot be sent now is tried again next time (the findings stay ``sent``)."""
    quiet_since = (now or timezone.now()) - older_than
    by_run: dict[UUID, list[list[str]]] = {}
    for run_id, (org, platform, external_id) in unconfirmed_sync_keys(quiet_since=quiet_since):
        by_run.setdefault(run_id, []).append([str(org), platform, external_id])
    findings = jobs = unsent = 0
    for run_id, keys in by_run.items():
        for start in range(0, len(keys), batch_size):
            batch = keys[start : start + batch_size]
            try:
                send(batch, run_id)
            except Exception:
                unsent += len(batch)
                continue
            findings += len(batch)
            jobs += 1
    return ResendReport(findings=findings, jobs=jobs, unsent=unsent)


def _insert_profiles(profiles: Sequence[SocialProfile]) -> None:
    """One INSERT for all the profiles a batch creates (PostgreSQL: one array per column)."""
    if not profiles:
        return
    if connection.vendor != "postgresql":
        SocialProfile.objects.bulk_create(profiles, batch_size=1000)
        return
    columns = (
        "id",
        "organization_id",
        "connection_id",
        "platform",
        "external_id",
        "name",
        "created_at",
    )
    arrays = [[getattr(p, c) for p in profiles] for c in columns]
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {SocialProfile._meta.db_table} ({', '.join(columns)}, deleted_at) "
            "SELECT *, NULL FROM unnest(%s::uuid[], %s::uuid[], %s::uuid[], %s::text[], "
            "%s::text[], %s::text[], %s::timestamptz[])",
            arrays,
        )


def _uuid(value: UUID | str) -> UUID:
    return value if isinstance(value, UUID) else UUID(value)
