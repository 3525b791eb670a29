"""Reverting a run (DESIGN "Nothing is lost"): put back what it changed, finding by finding in
reverse order, where the object is still as the run left it; anything changed since is a
conflict, recorded and left alone.

A revert is itself a recorded run (trigger ``revert``, ``reverted_run`` the run it undoes). Its
findings record before/after in the audit's shapes, so a revert can be reverted in turn. The
command (``profiles_audit_sync --revert``) and the admin are thin interfaces over ``revert_run``.
"""

from __future__ import annotations

import itertools
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from django.db import transaction
from django.utils import timezone

from audit_project.log_config import audit_logger
from boosts.models import BoostRule
from profiles.models import (
    AuditFinding,
    AuditRun,
    AuditStatus,
    AuditTrigger,
    FindingAction,
    FindingOutcome,
    SocialProfile,
)
from profiles.plan import Key
from profiles.selectors import (
    ProfileState,
    boost_rule_states,
    connection_organizations,
    fixed_findings_newest_first,
    profile_states,
    queue_setting_states,
)
from profiles.services.organization_lock import lock_organization
from profiles.services.recording import ABANDONED_AFTER, FindingRow, close_run, record_findings
from profiles.services.soft_delete import ProfileSoftDeleteService, to_json
from queues.models import QueueSetting

PROFILE = "profiles.SocialProfile"
QUEUE_SETTING = "queues.QueueSetting"
BOOST_RULE = "boosts.BoostRule"
# The fields a fix changes, per model: the only ones a revert compares and writes back.
REVERTIBLE_FIELDS: dict[str, tuple[str, ...]] = {
    PROFILE: ("deleted_at", "connection_id"),
    QUEUE_SETTING: ("deleted_at",),
    BOOST_RULE: ("deleted_at", "profile_ids"),
}
# Findings read, decided and written per step; keeps IN lists and memory small.
CHUNK_SIZE = 500
RUNS_HINT = "find run ids in the admin under Audit runs"
# A revert that has not progressed for this long lost its process (as the audit's lock
# expires after 60 minutes): it no longer stops the run from being reverted again.
REVERT_ABANDONED_AFTER = ABANDONED_AFTER


class RevertRejected(ValueError):
    """This run cannot be reverted; the message says why and what to do. Nothing was written."""


@dataclass
class RevertReport:
    """A finished revert: its own run record and what it put back."""

    run: AuditRun
    reverted_run: AuditRun
    put_back: int = 0
    """Findings put back (a dry run: that would be put back)."""
    conflicts: int = 0
    failed: int = 0

    @property
    def found(self) -> int:
        return self.put_back + self.conflicts + self.failed

    def as_json(self) -> dict[str, object]:
        run = self.run
        return {
            "run_id": str(run.id),
            "reverted_run_id": str(self.reverted_run.id),
            "fix": run.fix,
            "status": run.status,
            "totals": {"found": run.found, "fixed": run.fixed},
            "put_back": self.put_back,
            "conflicts": self.conflicts,
            "failed": self.failed,
            "by_type": run.by_type,
            "duration_seconds": run.duration_seconds,
            "error": run.error or None,
        }


# --- Which runs can be reverted -------------------------------------------------------------


def revert_blocker(*, run: AuditRun) -> str | None:
    """Why this run cannot be reverted now (one line saying what to do), or None."""
    if run.status == AuditStatus.RUNNING:
        return f"run {run.id} is still running; wait for it to finish, then revert it"
    if not run.fix:
        return f"run {run.id} is a dry run and changed nothing; there is nothing to revert"
    abandoned_before = timezone.now() - REVERT_ABANDONED_AFTER
    for revert in run.reverts.filter(fix=True).exclude(
        status__in=[AuditStatus.FAILED, AuditStatus.INTERRUPTED]
    ):
        if revert.status == AuditStatus.RUNNING:
            if (revert.last_progress_at or revert.started_at) > abandoned_before:
                return f"run {run.id} is being reverted right now (run {revert.id}); wait for it"
            continue  # its process died; what it committed shows up as conflicts next time
        # A revert that failed in some organization rolled those back: it may be run again.
        if not revert.failed_organizations:
            return (
                f"run {run.id} was already reverted by run {revert.id}; to undo that revert, "
                f"revert run {revert.id}"
            )
    # The findings, not the run's totals: a run that died may have fixed more than it counted.
    if not AuditFinding.objects.filter(
        run_id=run.id, outcome__in=(FindingOutcome.FIXED, FindingOutcome.SENT)
    ).exists():
        return f"run {run.id} changed nothing (no fixed findings); there is nothing to revert"
    return None


def claim_revert(
    *, run_id: UUID | str, fix: bool, requested_by: str = "", requested_host: str = ""
) -> AuditRun:
    """Record a revert of run ``run_id`` (its own run, ``running``) to be carried out by
    ``perform_revert`` — in a task, for the admin. Raises ``RevertRejected`` when it cannot be."""
    _, run = _claim_run(
        run_id=run_id, fix=fix, requested_by=requested_by, requested_host=requested_host
    )
    return run


def _claim_run(
    *, run_id: UUID | str, fix: bool, requested_by: str = "", requested_host: str = ""
) -> tuple[AuditRun, AuditRun]:
    """Check the run can be reverted and record the revert run, atomically: two reverts of one
    run started at once are serialized on the run's row, and the second is rejected."""
    try:
        run_id = run_id if isinstance(run_id, UUID) else UUID(str(run_id))
    except ValueError:
        raise RevertRejected(f"{run_id!r} is not an audit run id (a UUID); {RUNS_HINT}") from None
    with transaction.atomic():
        target = AuditRun.objects.select_for_update().filter(id=run_id).first()
        if target is None:
            raise RevertRejected(f"no audit run with id {run_id}; {RUNS_HINT}")
        reason = revert_blocker(run=target)
        if reason:
            raise RevertRejected(reason)
        now = timezone.now()
        run = AuditRun.objects.create(
            trigger=AuditTrigger.REVERT,
            organization_id=target.organization_id,
            types=target.types,
            fix=fix,
            reverted_run=target,
            started_at=now,
            last_progress_at=now,
            requested_by=requested_by,
            requested_host=requested_host or socket.gethostname(),
        )
    return target, run


# --- The revert -----------------------------------------------------------------------------


def revert_run(
    *, run_id: UUID | str, fix: bool, source: str = "command", requested_by: str = ""
) -> RevertReport:
    """Put back what run ``run_id`` changed (with ``fix``; without, record what would be put
    back and change nothing). Raises ``RevertRejected`` before writing anything when the run is
    unknown, a dry run, still running, already reverted or changed nothing."""
    _, run = _claim_run(run_id=run_id, fix=fix, requested_by=requested_by)
    return perform_revert(revert_run_id=run.id, source=source)


def perform_revert(*, revert_run_id: UUID, source: str = "task") -> RevertReport:
    """Carry out a claimed revert, one organization per transaction; its record's counts grow
    as each commits, so its page shows its progress."""
    run = AuditRun.objects.select_related("reverted_run").get(id=revert_run_id)
    target = run.reverted_run
    report = RevertReport(run=run, reverted_run=target)
    if run.status != AuditStatus.RUNNING or target is None:
        return report
    fix = run.fix
    failed: dict[str, str] = {}
    log = audit_logger().bind(run_id=str(run.id), reverted_run_id=str(target.id), fix_mode=fix)
    log.info("profile_audit.revert_started", source=source, requested_by=run.requested_by or None)
    try:
        findings = fixed_findings_newest_first(run_id=target.id, page_size=CHUNK_SIZE)
        # A run records organization after organization, so each group is one organization.
        for org_id, group in itertools.groupby(findings, key=lambda f: f.organization_id):
            _OrganizationRevert(
                target=target, run=run, organization_id=org_id, fix=fix, report=report
            ).run(group, log, failed)
    except Exception as exc:
        log.exception("profile_audit.revert_failed")
        close_run(
            run,
            status=AuditStatus.FAILED,
            error=f"{type(exc).__name__}: {exc}",
            failed_organizations=failed,
        )
        raise
    partial = report.conflicts or failed
    close_run(
        run,
        status=AuditStatus.PARTIAL if partial else AuditStatus.SUCCEEDED,
        error="; ".join(f"organization {o}: {e}" for o, e in failed.items()),
        failed_organizations=failed,
    )
    log.info(
        "profile_audit.revert_completed",
        org_id=str(run.organization_id) if run.organization_id else None,
        status=run.status,
        total_issues_found=report.found,
        total_issues_fixed=run.fixed,
        put_back=report.put_back,
        conflicts=report.conflicts,
        duration_seconds=run.duration_seconds,
    )
    return report


PUT_BACK, CONFLICT, FAILED = "put_back", "conflict", "failed"


@dataclass
class _Decision:
    """What reverting one finding does (or why it does not): one finding of the revert run."""

    original: AuditFinding
    result: str
    """PUT_BACK, CONFLICT or FAILED."""
    detail: str
    object_id: UUID | None = None
    before: dict[str, Any] | None = None
    after: dict[str, Any] | None = None
    restores_profile: UUID | None = None


class _OrganizationRevert:
    """One organization's findings, newest first, in one transaction under its lock.

    Each chunk is decided against ``_Objects`` (the rows as they are now, then as each earlier
    decision leaves them), and, with ``fix``, the changed rows are written at its end.
    """

    def __init__(
        self,
        *,
        target: AuditRun,
        run: AuditRun,
        organization_id: UUID | None,
        fix: bool,
        report: RevertReport,
    ) -> None:
        self.target = target
        self.revert = run
        self.organization_id = organization_id
        self.fix = fix
        self.report = report
        self.now = timezone.now()
        self.objects = _Objects(organization_id) if organization_id else None

    def run(self, findings: Iterable[AuditFinding], log, failed_organizations: dict) -> None:
        org = str(self.organization_id) if self.organization_id else None
        seen: list[AuditFinding] = []
        report_before = (self.report.put_back, self.report.conflicts)
        findings = iter(findings)
        try:
            with transaction.atomic():
                if self.organization_id:
                    lock_organization(self.organization_id)
                first = True
                for chunk in _chunks(findings, CHUNK_SIZE):
                    seen += chunk
                    self._revert_chunk(chunk, organizations=1 if first else 0)
                    first = False
        except Exception as exc:
            # Contained: this organization's transaction rolled back; record what was intended.
            error = f"{type(exc).__name__}: {exc}"
            log.error("profile_audit.revert_org_failed", org_id=org, error=error, exc_info=True)
            self.report.put_back, self.report.conflicts = report_before
            failed = [*seen, *findings]
            with transaction.atomic():
                self._record(
                    [_Decision(f, FAILED, f"not put back: {error}") for f in failed],
                    organizations=1,
                )
            failed_organizations[org or "none"] = error
            self.report.failed += len(failed)
            return
        log.info("profile_audit.revert_org_completed", org_id=org, findings=len(seen))

    def _revert_chunk(self, chunk: list[AuditFinding], *, organizations: int) -> None:
        if self.objects is None:
            decisions = [_Decision(f, CONFLICT, "the organization no longer exists") for f in chunk]
        else:
            self.objects.load(chunk)
            decisions = [self._decide(f) for f in chunk]
            restored = [d for d in decisions if d.restores_profile]
            if self.fix:
                self.objects.write()
                settings = ProfileSoftDeleteService().restore_queue_settings(
                    profile_ids=[d.restores_profile for d in restored]
                )
            else:
                settings = self.objects.settings_restored_with(
                    [d.restores_profile for d in restored]
                )
            for decision in restored:
                self._attach_settings(decision, settings.get(decision.restores_profile, {}))
        self._record(decisions, organizations=organizations)

    def _record(self, decisions: list[_Decision], *, organizations: int) -> None:
        rows = []
        put_back = FindingOutcome.FIXED if self.fix else FindingOutcome.PLANNED
        outcomes = {
            PUT_BACK: put_back,
            CONFLICT: FindingOutcome.CONFLICT,
            FAILED: FindingOutcome.FAILED,
        }
        for d in decisions:
            f = d.original
            outcome = outcomes[d.result]
            rows.append(
                FindingRow(
                    organization_id=self.organization_id,
                    type=f.type,
                    action=FindingAction.REVERT,
                    model=f.model,
                    object_id=d.object_id or f.object_id,
                    platform=f.platform,
                    external_id=f.external_id,
                    before=d.before,
                    after=d.after,
                    outcome=outcome,
                    detail=f"{d.detail} (finding {f.seq} of run {self.target.id})",
                )
            )
            self.report.conflicts += d.result == CONFLICT
            self.report.put_back += d.result == PUT_BACK
        record_findings(run_id=self.revert.id, rows=rows, organizations=organizations)

    # --- Decisions: read the overlay, change it, never the database -------------------------

    def _decide(self, finding: AuditFinding) -> _Decision:
        if finding.action == FindingAction.DISPATCH_SYNC:
            return self._decide_created_profile(finding)
        return self._decide_change(finding)

    def _decide_change(self, f: AuditFinding) -> _Decision:
        """Put back ``before`` if the object is exactly as ``after`` says the run left it."""
        fields = REVERTIBLE_FIELDS.get(f.model)
        before, after = _own_fields(f.before), _own_fields(f.after)
        if fields is None or f.object_id is None or not set(before) | set(after) <= set(fields):
            return _Decision(f, CONFLICT, f"cannot put back a change to {f.model} {sorted(after)}")
        current = self.objects.get(f.model, f.object_id)
        if current is None:
            return _Decision(f, CONFLICT, f"the {_label(f.model)} no longer exists")
        # Every fix acts on an alive object and leaves it alive unless its after says otherwise.
        left = {"deleted_at": None, **after}
        changed = [k for k, v in left.items() if not _same(k, current[k], v)]
        if changed:
            if before and all(_same(k, current[k], v) for k, v in before.items()):
                return _Decision(f, CONFLICT, "already as it was before the run")
            what = "; ".join(f"{k} is {current[k]!r}, the run left {left[k]!r}" for k in changed)
            return _Decision(f, CONFLICT, f"changed since the run: {what}")
        restores_profile = (
            f.model == PROFILE
            and current["deleted_at"] is not None
            and "deleted_at" in before
            and before["deleted_at"] is None
        )
        if restores_profile:
            holder = self.objects.alive_profile(current["key"], other_than=f.object_id)
            if holder is not None:
                platform, external_id = current["key"]
                return _Decision(
                    f, CONFLICT, f"another alive profile ({holder}) holds {platform}:{external_id}"
                )
        put_back, connection_stays = self._without_foreign_connection(
            before, stays_on=current.get("connection_id")
        )
        if connection_stays and not put_back:
            # A relink changed nothing but the connection: nothing of it can be put back.
            return _Decision(f, CONFLICT, f"not put back: {connection_stays}")

        decision = _Decision(
            f,
            PUT_BACK,
            f"put back {', '.join(put_back)}; {connection_stays}"
            if connection_stays
            else "put back",
            # Only what is written back is recorded, so reverting this revert is exact too.
            before={k: current[k] for k in put_back},
            after=dict(put_back),
            restores_profile=f.object_id if restores_profile else None,
        )
        self.objects.change(f.model, f.object_id, put_back)
        self._put_back_settings(decision, f)
        return decision

    def _without_foreign_connection(
        self, before: dict[str, Any], *, stays_on: str | None
    ) -> tuple[dict[str, Any], str]:
        """``before`` without a connection a revert may not point the profile at, and why the
        profile stays on ``stays_on`` (empty when nothing is left out).

        A connection of another organization stays out (DESIGN rule 5: a revert never points a
        profile at another organization's connection); so does one deleted since the run, which
        cannot be pointed at, and pointing at none would leave an alive profile without a
        connection, the very thing the audit fixes. The rest of the finding (``deleted_at``) is
        still put back: refusing it whole would leave alive a profile the run had restored.
        """
        connection_id = before.get("connection_id")
        if not connection_id:
            return before, ""
        owner = self.objects.connection_organization(UUID(connection_id))
        if owner == self.organization_id:
            return before, ""
        if owner is None:
            why = f"connection {connection_id} no longer exists"
        else:
            why = (
                f"connection {connection_id} belongs to another organization, and a revert "
                "never points a profile at another organization's connection"
            )
        rest = {k: v for k, v in before.items() if k != "connection_id"}
        return rest, f"{why}, so the profile stays on connection {stays_on}"

    def _put_back_settings(self, decision: _Decision, f: AuditFinding) -> None:
        """The queue settings a restore brought back with its profile go back with it."""
        left = (f.after or {}).get("queue_settings") or {}
        was = (f.before or {}).get("queue_settings") or {}
        put_back: dict[str, Any] = {}
        skipped = []
        for setting_id, deleted_at in left.items():
            current = self.objects.get(QUEUE_SETTING, UUID(setting_id))
            if (
                current is None
                or setting_id not in was
                or not _same("deleted_at", current["deleted_at"], deleted_at)
            ):
                skipped.append(setting_id)
                continue
            put_back[setting_id] = current["deleted_at"]
            self.objects.change(QUEUE_SETTING, UUID(setting_id), {"deleted_at": was[setting_id]})
            decision.after.setdefault("queue_settings", {})[setting_id] = was[setting_id]
        if put_back:
            decision.before["queue_settings"] = put_back
        if skipped:
            decision.detail += f"; queue settings changed since, left alone: {', '.join(skipped)}"

    def _decide_created_profile(self, f: AuditFinding) -> _Decision:
        """A missing profile: the sync job created it after the run. Soft delete it if it is
        still as the job left it (alive, on the connection the run chose)."""
        after = f.after or {}
        key: Key = (after.get("platform", f.platform), after.get("external_id", f.external_id))
        connection_id = after.get("connection_id")
        holder = self.objects.alive_profile(key)
        if holder is None:
            return _Decision(
                f,
                CONFLICT,
                "no alive profile with this key: the sync job has not created it yet, "
                "or it was deleted since",
            )
        current = self.objects.get(PROFILE, holder)
        if current["created_at"] < self.target.started_at:
            return _Decision(f, CONFLICT, f"the alive profile {holder} predates the run")
        if not _same("connection_id", current["connection_id"], connection_id):
            return _Decision(
                f,
                CONFLICT,
                f"changed since the run: profile {holder} is on connection "
                f"{current['connection_id']}, the job created it on {connection_id}",
            )
        deleted_at = to_json(self.now)
        self.objects.change(PROFILE, holder, {"deleted_at": deleted_at})
        return _Decision(
            f,
            PUT_BACK,
            "put back: soft-deleted the profile the sync job created",
            object_id=holder,
            before={"deleted_at": None},
            after={"deleted_at": deleted_at},
        )

    def _attach_settings(self, decision: _Decision, settings: dict[str, str]) -> None:
        if not settings:
            return
        decision.before.setdefault("queue_settings", {}).update(settings)
        decision.after.setdefault("queue_settings", {}).update(dict.fromkeys(settings))
        self.objects.settings_came_back(settings)


class _Objects:
    """The rows one organization's revert touches, as JSON values (as before/after hold them):
    loaded from the database a chunk at a time, then changed in memory decision by decision,
    so each finding is judged against the state the later findings' reverts left."""

    def __init__(self, organization_id: UUID) -> None:
        self.organization_id = organization_id
        self.rows: dict[tuple[str, UUID], dict[str, Any] | None] = {}
        self.profiles_by_key: dict[Key, set[UUID]] = {}
        self.keys_loaded: set[Key] = set()
        # Connection id -> its organization, None once it no longer exists.
        self.connections: dict[UUID, UUID | None] = {}
        self.dirty: set[tuple[str, UUID]] = set()

    def load(self, findings: list[AuditFinding]) -> None:
        """Read what these findings need and is not known yet: a fixed number of queries."""
        ids: dict[str, set[UUID]] = {PROFILE: set(), QUEUE_SETTING: set(), BOOST_RULE: set()}
        keys: set[Key] = set()
        connections: set[UUID] = set()
        for f in findings:
            if f.action == FindingAction.DISPATCH_SYNC:
                after = f.after or {}
                keys.add(
                    (after.get("platform", f.platform), after.get("external_id", f.external_id))
                )
            elif f.model in ids and f.object_id:
                ids[f.model].add(f.object_id)
            for side in (f.before, f.after):
                side = side if isinstance(side, dict) else {}
                ids[QUEUE_SETTING].update(UUID(s) for s in side.get("queue_settings") or {})
                if side.get("connection_id"):
                    connections.add(UUID(side["connection_id"]))
        for model in ids:
            ids[model] = {i for i in ids[model] if (model, i) not in self.rows}

        for profile in profile_states(
            organization_id=self.organization_id, profile_ids=ids[PROFILE]
        ):
            self._add_profile(profile)
        keys |= {row["key"] for (model, _), row in self.rows.items() if model == PROFILE and row}
        keys -= self.keys_loaded
        for profile in profile_states(organization_id=self.organization_id, keys=keys):
            self._add_profile(profile)
        self.keys_loaded |= keys
        settings = queue_setting_states(
            organization_id=self.organization_id, setting_ids=ids[QUEUE_SETTING]
        )
        rules = boost_rule_states(organization_id=self.organization_id, rule_ids=ids[BOOST_RULE])
        for model, found in ((QUEUE_SETTING, settings), (BOOST_RULE, rules)):
            for id_ in ids[model]:
                if id_ not in found:
                    self.rows[(model, id_)] = None
        for id_, deleted_at in settings.items():
            self.rows[(QUEUE_SETTING, id_)] = {"deleted_at": to_json(deleted_at)}
        for id_, (deleted_at, profile_ids) in rules.items():
            self.rows[(BOOST_RULE, id_)] = {
                "deleted_at": to_json(deleted_at),
                "profile_ids": profile_ids,
            }
        for id_ in ids[PROFILE]:
            self.rows.setdefault((PROFILE, id_), None)
        connections -= set(self.connections)
        owners = connection_organizations(connection_ids=connections)
        self.connections.update({c: owners.get(c) for c in connections})

    def _add_profile(self, profile: ProfileState) -> None:
        if (PROFILE, profile.id) in self.rows and self.rows[(PROFILE, profile.id)] is not None:
            return  # known already, perhaps changed by an earlier decision
        key = (profile.platform, profile.external_id)
        self.rows[(PROFILE, profile.id)] = {
            "deleted_at": to_json(profile.deleted_at),
            "connection_id": to_json(profile.connection_id),
            "key": key,
            "created_at": profile.created_at,
        }
        self.profiles_by_key.setdefault(key, set()).add(profile.id)

    def get(self, model: str, id_: UUID) -> dict[str, Any] | None:
        return self.rows.get((model, id_))

    def change(self, model: str, id_: UUID, values: dict[str, Any]) -> None:
        self.rows[(model, id_)].update(values)
        self.dirty.add((model, id_))

    def alive_profile(self, key: Key, *, other_than: UUID | None = None) -> UUID | None:
        for id_ in sorted(self.profiles_by_key.get(key, ())):
            if id_ != other_than and self.rows[(PROFILE, id_)]["deleted_at"] is None:
                return id_
        return None

    def connection_organization(self, connection_id: UUID) -> UUID | None:
        return self.connections.get(connection_id)

    def settings_restored_with(self, profile_ids: list[UUID]) -> dict[UUID, dict[str, str]]:
        """Dry run: what ``restore_queue_settings`` would bring back, given the decisions so
        far (a setting this revert has already changed is judged by its new state)."""
        if not profile_ids:
            return {}
        candidates = ProfileSoftDeleteService().queue_settings_to_restore(profile_ids=profile_ids)
        kept: dict[UUID, dict[str, str]] = {}
        for profile_id, settings in candidates.items():
            for setting_id, deleted_at in settings.items():
                current = self.rows.get((QUEUE_SETTING, UUID(setting_id)))
                if current is None or _same("deleted_at", current["deleted_at"], deleted_at):
                    kept.setdefault(profile_id, {})[setting_id] = deleted_at
        return kept

    def settings_came_back(self, settings: dict[str, str]) -> None:
        for setting_id in settings:
            self.rows[(QUEUE_SETTING, UUID(setting_id))] = {"deleted_at": None}

    def write(self) -> None:
        """Write the rows changed since the last write. Deletions first, so a profile that
        goes and another of the same key that comes back never meet in the unique index."""
        dying: list[tuple[UUID, tuple]] = []
        other: list[tuple[UUID, tuple]] = []
        settings: list[tuple[UUID, tuple]] = []
        rules = []
        for model, id_ in sorted(self.dirty, key=str):
            row = self.rows[(model, id_)]
            deleted_at = _as_datetime(row["deleted_at"])
            if model == PROFILE:
                values = (deleted_at, _as_uuid(row["connection_id"]))
                (dying if deleted_at else other).append((id_, values))
            elif model == QUEUE_SETTING:
                settings.append((id_, (deleted_at,)))
            else:
                rules.append(
                    BoostRule(id=id_, deleted_at=deleted_at, profile_ids=row["profile_ids"])
                )
        for changes in (dying, other):
            _update(SocialProfile, ("deleted_at", "connection_id"), changes)
        _update(QueueSetting, ("deleted_at",), settings)
        # A rule's profile_ids are its own; rules are few next to profiles.
        BoostRule.objects.bulk_update(rules, ["deleted_at", "profile_ids"])
        self.dirty.clear()


def _update(model, fields: tuple[str, ...], changes: list[tuple[UUID, tuple]]) -> None:
    """One UPDATE per distinct set of new values (a run's fixes share their timestamp, so a
    chunk is typically one or two statements); values met once go in one bulk_update."""
    by_values: dict[tuple, list[UUID]] = {}
    for id_, values in changes:
        by_values.setdefault(values, []).append(id_)
    single = []
    for values, ids in by_values.items():
        if len(ids) == 1:
            single.append(model(id=ids[0], **dict(zip(fields, values, strict=True))))
        else:
            model.objects.filter(id__in=ids).update(**dict(zip(fields, values, strict=True)))
    model.objects.bulk_update(single, list(fields))


# --- Values as before/after hold them -------------------------------------------------------


def _own_fields(side: Any) -> dict[str, Any]:
    """A before/after without the queue settings a restore carried along."""
    if not isinstance(side, dict):
        return {}
    return {k: v for k, v in side.items() if k != "queue_settings"}


def _same(field_name: str, current: Any, expected: Any) -> bool:
    if field_name == "deleted_at":
        return _as_datetime(current) == _as_datetime(expected)
    if field_name == "connection_id":
        return _as_uuid(current) == _as_uuid(expected)
    return current == expected


def _as_datetime(value: Any) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value
    return datetime.fromisoformat(value)


def _as_uuid(value: Any) -> UUID | None:
    if value is None or isinstance(value, UUID):
        return value
    return UUID(str(value))


def _label(model: str) -> str:
    return {PROFILE: "profile", QUEUE_SETTING: "queue setting", BOOST_RULE: "boost rule"}[model]


def _chunks(items: Iterator[AuditFinding], size: int) -> Iterator[list[AuditFinding]]:
    while chunk := list(itertools.islice(items, size)):
        yield chunk
