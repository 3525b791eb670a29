"""``/metrics``: the audit's state in Prometheus text format, read from the audit records when
Prometheus scrapes, not counted in memory, so every web process on every host says the same
whatever worker ran what. The alert rules in ``deploy/prometheus/alerts.yml`` use these."""

from __future__ import annotations

import hmac
import time
from collections.abc import Iterator

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.urls import reverse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from profiles import run_state
from profiles.models import AuditStatus, AuditTrigger, DriftState
from profiles.plan import ALL_TYPES
from profiles.schedule import AUDIT_ENTRY
from profiles.services.run_lock import fixing_run_lock_state

PREFIX = "profile_audit"
# Writers named as label values of the recurring drift per writer; the rest are summed as
# "other", so the series stay few whatever other programs call themselves.
TOP_WRITERS = 5


class AuditCollector(Collector):
    """Every metric of the audit, from a handful of indexed queries per scrape."""

    def collect(self) -> Iterator[Metric]:
        yield from self._last_runs()
        yield from self._last_scheduled_run()
        yield from self._last_finished_scheduled_run()
        yield from self._schedule()
        yield from self._runs()
        yield from self._lock()
        yield from self._shards()
        yield from self._changes()
        yield from self._drift()

    def _last_runs(self) -> Iterator[Metric]:
        start = _gauge("last_run_start_timestamp_seconds", "Start of the latest run", ["trigger"])
        end = _gauge(
            "last_run_end_timestamp_seconds",
            "End of the latest run (absent while it runs)",
            ["trigger"],
        )
        duration = _gauge(
            "last_run_duration_seconds",
            "Duration of the latest run (absent while it runs)",
            ["trigger"],
        )
        status = _gauge(
            "last_run_status",
            "1 for the status of the latest run of each trigger, 0 for the others",
            ["trigger", "status"],
        )
        for trigger, run in run_state.last_run_per_trigger().items():
            start.add_metric([trigger], run.started_at.timestamp())
            if run.finished_at is not None:
                end.add_metric([trigger], run.finished_at.timestamp())
            if run.duration_seconds is not None:
                duration.add_metric([trigger], run.duration_seconds)
            for value in AuditStatus.values:
                status.add_metric([trigger, value], 1.0 if run.status == value else 0.0)
        yield from (start, end, duration, status)

    def _last_scheduled_run(self) -> Iterator[Metric]:
        success = _gauge(
            "last_successful_scheduled_run_timestamp_seconds",
            "End of the latest scheduled run that succeeded",
        )
        if (run := run_state.last_successful_scheduled_run()) and run.finished_at:
            success.add_metric([], run.finished_at.timestamp())
        yield success

        completed = run_state.last_completed_scheduled_run()
        end = _gauge(
            "last_scheduled_run_end_timestamp_seconds",
            "End of the latest scheduled run that completed (succeeded or partial)",
        )
        found = _gauge(
            "last_scheduled_run_found", "Findings of the latest completed scheduled run", ["type"]
        )
        fixed = _gauge(
            "last_scheduled_run_fixed",
            "Findings fixed by the latest completed scheduled run",
            ["type"],
        )
        guarded = _gauge(
            "last_scheduled_run_guarded_organizations",
            "Organizations the mass-deletion guard or the run budget held in the latest completed scheduled run",
        )
        failed = _gauge(
            "last_scheduled_run_failed_organizations",
            "Organizations whose fix failed in the latest completed scheduled run",
        )
        if completed is not None:
            if completed.finished_at:
                end.add_metric([], completed.finished_at.timestamp())
            counts = completed.by_type or {}
            for finding_type in ALL_TYPES:
                c = counts.get(finding_type.value) or {}
                found.add_metric([finding_type.value], c.get("found", 0))
                fixed.add_metric([finding_type.value], c.get("fixed", 0))
            guarded.add_metric([], len(run_state.guarded_organization_ids(completed)))
            failed.add_metric([], len(run_state.failed_organization_errors(completed)))
        yield from (end, found, fixed, guarded, failed)

    def _last_finished_scheduled_run(self) -> Iterator[Metric]:
        """The one run the alerts judge: the latest scheduled run that ran and ended. Its id and
        admin link are labels of ``..._info`` only, so the other series stay the same series
        from run to run (``avg_over_time`` works) and rules join the labels in."""
        run = run_state.last_finished_scheduled_run()
        prefix = "last_finished_scheduled_run"
        info = _gauge(
            f"{prefix}_info",
            "1, labelled with the id, admin page and status of the latest scheduled run that ended "
            "(succeeded, partial, failed or interrupted)",
            ["run_id", "admin_url", "status"],
        )
        end = _gauge(f"{prefix}_end_timestamp_seconds", "End of that run")
        status = _gauge(f"{prefix}_status", "1 for that run's status, 0 for the others", ["status"])
        found = _gauge(f"{prefix}_found", "Findings of that run", ["type"])
        guarded = _gauge(
            f"{prefix}_guarded_organizations",
            "Organizations the mass-deletion guard or the run budget held in that run",
        )
        failed = _gauge(f"{prefix}_failed_organizations", "Organizations that failed in that run")
        failed_shards = _gauge(f"{prefix}_failed_shards", "Shards of that run that failed")
        unaudited = _gauge(
            f"{prefix}_unaudited_organizations",
            "Organizations that run did not reach (failed or skipped shards, deadline, a crash)",
        )
        if run is not None:
            info.add_metric([str(run.id), run_admin_url(run.id), run.status], 1.0)
            if run.finished_at is not None:
                end.add_metric([], run.finished_at.timestamp())
            for value in run_state.FINISHED:
                status.add_metric([value], 1.0 if run.status == value else 0.0)
            counts = run.by_type or {}
            for finding_type in ALL_TYPES:
                found.add_metric(
                    [finding_type.value], (counts.get(finding_type.value) or {}).get("found", 0)
                )
            guarded.add_metric([], len(run_state.guarded_organization_ids(run)))
            failed.add_metric([], len(run_state.failed_organization_errors(run)))
            failed_shards.add_metric([], run_state.failed_shards(run))
            unaudited.add_metric([], max(run.organizations_total - run.organizations_audited, 0))
        yield from (info, end, status, found, guarded, failed, failed_shards, unaudited)

    def _schedule(self) -> Iterator[Metric]:
        """The schedule as the rules need it: whether the entry is on, since when it is set, and
        the period and grace the settings judge lateness by (so the rules follow the settings)."""
        from django_celery_beat.models import PeriodicTask

        entry = PeriodicTask.objects.filter(name=AUDIT_ENTRY).values("enabled", "date_changed")
        entry = entry.first()
        enabled = _gauge(
            "schedule_enabled",
            "1 when the scheduled audit's beat entry exists and is enabled (admin: Periodic tasks)",
        )
        enabled.add_metric([], 1.0 if entry and entry["enabled"] else 0.0)
        changed = _gauge(
            "schedule_changed_timestamp_seconds",
            "When the scheduled audit's beat entry was created or last changed",
        )
        if entry is not None:
            changed.add_metric([], entry["date_changed"].timestamp())
        period = _gauge("schedule_period_seconds", "PROFILE_AUDIT_SCHEDULE_PERIOD")
        period.add_metric([], settings.PROFILE_AUDIT_SCHEDULE_PERIOD)
        grace = _gauge("schedule_grace_seconds", "PROFILE_AUDIT_SCHEDULE_GRACE")
        grace.add_metric([], settings.PROFILE_AUDIT_SCHEDULE_GRACE)
        admin = _gauge(
            "admin_info",
            "1, labelled with the admin's list of audit runs (PROFILE_AUDIT_ADMIN_BASE_URL)",
            ["runs_url"],
        )
        runs_url = reverse("admin:profiles_auditrun_changelist")
        admin.add_metric([f"{settings.PROFILE_AUDIT_ADMIN_BASE_URL}{runs_url}"], 1.0)
        yield from (enabled, changed, period, grace, admin)

    def _runs(self) -> Iterator[Metric]:
        runs = _gauge(
            "runs", "Audit runs on record (retention prunes old ones)", ["trigger", "status"]
        )
        counts = run_state.runs_by_trigger_and_status()
        for trigger in AuditTrigger.values:
            for status in AuditStatus.values:
                runs.add_metric([trigger, status], counts.get((trigger, status), 0))
        yield runs

    def _lock(self) -> Iterator[Metric]:
        state = fixing_run_lock_state()
        up = _gauge(
            "lock_up",
            "1 when the fixing-run lock's service (Redis, or the lock file) could be read",
        )
        up.add_metric([], 1.0 if state.reachable else 0.0)
        yield up
        if not state.reachable:
            return
        held = _gauge("lock_held", "1 while a fixing run holds the lock")
        held.add_metric([], 1.0 if state.held else 0.0)
        yield held
        age = _gauge("lock_held_seconds", "How long the run holding the lock has been running")
        expires = _gauge(
            "lock_expires_in_seconds", "Seconds before the lock expires unless its holder renews it"
        )
        if state.held:
            if (run := run_state.run_holding_lock(state.token)) is not None:
                age.add_metric([], max(time.time() - run.started_at.timestamp(), 0.0))
            if state.expires_in is not None:
                expires.add_metric([], state.expires_in)
        yield from (age, expires)

    def _shards(self) -> Iterator[Metric]:
        shards = _gauge("open_shards", "Shards of sharded runs not finished yet", ["status"])
        for status, n in run_state.open_shards_by_status().items():
            shards.add_metric([status], n)
        yield shards

    def _changes(self) -> Iterator[Metric]:
        """Change-driven runs (DESIGN "Change-driven runs"): the backlog now, the loop's
        heartbeat, its last runs, and what the last sweep found that the marks missed."""
        now = time.time()
        backlog = run_state.change_backlog()
        organizations = _gauge(
            "changes_backlog_organizations",
            "Organizations a change-driven run has still to audit (marked or unsettled)",
        )
        organizations.add_metric([], backlog.organizations)
        oldest = _gauge(
            "changes_oldest_mark_age_seconds",
            "Age of the oldest change mark not yet cleared (absent when nothing is marked)",
        )
        if backlog.oldest_mark_at is not None:
            oldest.add_metric([], max(now - backlog.oldest_mark_at.timestamp(), 0.0))
        checked = _gauge(
            "changes_last_check_timestamp_seconds",
            "When the change-driven loop last looked (with a run or without: nothing marked)",
        )
        if backlog.last_checked_at is not None:
            checked.add_metric([], backlog.last_checked_at.timestamp())
        success = _gauge(
            "changes_last_success_timestamp_seconds",
            "End of the latest change-driven run that succeeded",
        )
        if (good := run_state.last_successful_change_run()) and good.finished_at:
            success.add_metric([], good.finished_at.timestamp())
        latency = _gauge(
            "changes_detection_latency_seconds",
            "The latest finished change-driven run: from its oldest mark's write to its end",
        )
        last = run_state.last_finished_change_run()
        if last and last.finished_at and last.oldest_mark_at:
            latency.add_metric([], (last.finished_at - last.oldest_mark_at).total_seconds())
        missed = _gauge(
            "last_finished_scheduled_run_missed_by_changes",
            "Findings of the latest finished sweep in organizations no change mark named: "
            "drift the change-driven runs could not see. Should be 0.",
        )
        sweep = run_state.last_finished_scheduled_run()
        if sweep is not None:
            missed.add_metric([], sweep.missed_by_changes)
        yield from (organizations, oldest, checked, success, latency, missed)

    def _drift(self) -> Iterator[Metric]:
        """Drift history (DESIGN "Drift history and fights"): records by state and type, the
        fights held and the newest of them (for the alert), and recurring drift per writer."""
        records = _gauge(
            "drift_records",
            "Drift records (one per finding fingerprint) by state and finding type",
            ["state", "type"],
        )
        counts = run_state.drift_by_state_and_type()
        for state in DriftState.values:
            for finding_type in ALL_TYPES:
                records.add_metric(
                    [state, finding_type.value], counts.get((state, finding_type.value), 0)
                )
        held = _gauge(
            "drift_fights_held",
            "Drift records whose fixing is held: fixed PROFILE_AUDIT_FIGHT_FIXES times within "
            "PROFILE_AUDIT_FIGHT_WINDOW and back again (another writer undoes the fix)",
        )
        fights = run_state.fights()
        held.add_metric([], fights.count())
        newest = _gauge(
            "drift_newest_fight_info",
            "1, labelled with the newest held fight: its organization, type, the writer that "
            "undid the fix, its admin page and the admin's list of fights (absent without one)",
            ["organization_id", "type", "undone_by", "admin_url", "fights_url"],
        )
        since = _gauge(
            "drift_newest_fight_held_since_timestamp_seconds",
            "When fixing of the newest held fight was held",
        )
        record = (
            fights.order_by("-held_since", "id")
            .only("id", "organization_id", "type", "undone_by", "held_since")
            .first()
        )
        if record is not None and record.held_since is not None:
            newest.add_metric(
                [
                    str(record.organization_id),
                    record.type,
                    record.undone_by or run_state.UNKNOWN_WRITER,
                    drift_admin_url(record.id),
                    fights_admin_url(),
                ],
                1.0,
            )
            since.add_metric([], record.held_since.timestamp())
        by_writer = _gauge(
            "drift_recurring_by_writer",
            f"Drift records recurring or fighting seen in the last 7 days, by the writer that "
            f"last undid the fix: the top {TOP_WRITERS} writers, the rest as other, none named as "
            "unknown",
            ["writer"],
        )
        writers = run_state.bounded_writers(run_state.recurring_drift_by_writer(), top=TOP_WRITERS)
        for writer, n in writers.items():
            by_writer.add_metric([writer], n)
        yield from (records, held, newest, since, by_writer)


def run_admin_url(run_id) -> str:
    """The run's page in the admin, absolute when PROFILE_AUDIT_ADMIN_BASE_URL is set."""
    path = reverse("admin:profiles_auditrun_change", args=[run_id])
    return f"{settings.PROFILE_AUDIT_ADMIN_BASE_URL}{path}"


def drift_admin_url(record_id) -> str:
    """A drift record's page in the admin, absolute when PROFILE_AUDIT_ADMIN_BASE_URL is set."""
    path = reverse("admin:profiles_driftrecord_change", args=[record_id])
    return f"{settings.PROFILE_AUDIT_ADMIN_BASE_URL}{path}"


def fights_admin_url() -> str:
    """The admin's list of drift records, filtered to the fights."""
    path = reverse("admin:profiles_driftrecord_changelist")
    return f"{settings.PROFILE_AUDIT_ADMIN_BASE_URL}{path}?held=yes"


def _gauge(name: str, documentation: str, labels: list[str] | None = None) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{PREFIX}_{name}", documentation, labels=labels or [])


def exposition() -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AuditCollector())
    return generate_latest(registry)


@never_cache
@require_GET
def metrics_view(request: HttpRequest) -> HttpResponse:
    token = settings.PROFILE_AUDIT_METRICS_TOKEN
    if token:
        sent = request.headers.get("Authorization", "")
        if not hmac.compare_digest(sent.encode(), f"Bearer {token}".encode()):
            response = HttpResponse(
                "A bearer token is required.\n", status=401, content_type="text/plain"
            )
            response["WWW-Authenticate"] = 'Bearer realm="metrics"'
            return response
    return HttpResponse(exposition(), content_type=CONTENT_TYPE_LATEST)
