"""``/metrics``: the audit's state in Prometheus text format, read from the audit records when
Prometheus scrapes, not counted in memory, so every web process on every host says the same
whatever worker ran what. The alert rules in ``deploy/prometheus/alerts.yml`` use these."""

from __future__ import annotations

import hmac
import time
from collections.abc import Iterator

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from profiles import run_state
from profiles.models import AuditStatus, AuditTrigger
from profiles.plan import ALL_TYPES
from profiles.services.run_lock import fixing_run_lock_state

PREFIX = "profile_audit"


class AuditCollector(Collector):
    """Every metric of the audit, from a handful of indexed queries per scrape."""

    def collect(self) -> Iterator[Metric]:
        yield from self._last_runs()
        yield from self._last_scheduled_run()
        yield from self._runs()
        yield from self._lock()
        yield from self._shards()

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
