"""What the audit runs page opens on: the last scheduled run (and why it was not a success),
when the next is due, a found/fixed chart of recent runs (server-rendered SVG, no script), and
the fixing-run lock. Also the admin's one way of writing a moment, a schedule and a reason."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from django.conf import settings
from django.db.models import Count
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString
from django_celery_beat.models import PeriodicTask

from profiles import run_state
from profiles.models import AuditRun, AuditStatus, AuditTrigger, FindingOutcome, ShardStatus
from profiles.schedule import (
    AUDIT_ENTRY,
    ScheduleState,
    audit_schedule_state,
    change_backlog_problem,
    scheduled_audit_problem,
)
from profiles.services.run_lock import LockState, fixing_run_lock_state, redis_start_hint

CHART_WIDTH, CHART_HEIGHT = 720, 180
FOUND_COLOUR, FIXED_COLOUR = "#79aec8", "#2e7d32"
# Shared with the run list's badges, so a colour means one status everywhere.
STATUS_COLOURS = {
    AuditStatus.RUNNING: "#417690",
    AuditStatus.SUCCEEDED: "#2e7d32",
    AuditStatus.PARTIAL: "#b26a00",
    AuditStatus.FAILED: "#c62828",
    AuditStatus.SKIPPED: "#757575",
    AuditStatus.INTERRUPTED: "#c62828",
}
NOT_SUCCEEDED = (AuditStatus.PARTIAL, AuditStatus.FAILED, AuditStatus.INTERRUPTED)
MOMENT_FORMAT = "%Y-%m-%d %H:%M UTC"


# --- One way of writing a moment ------------------------------------------------------------


def moment(value: datetime | None) -> str:
    """Every page writes a moment the same way, with its zone: ``2026-12-01 20:04 UTC``."""
    if value is None:
        return "-"
    return value.astimezone(UTC).strftime(MOMENT_FORMAT)


def moment_html(value: datetime | None) -> SafeString:
    """``moment`` in a ``<time>`` element, the exact instant (seconds) on hover."""
    if value is None:
        return format_html("{}", "-")
    exact = value.astimezone(UTC).isoformat(timespec="seconds")
    return format_html('<time datetime="{}" title="{}">{}</time>', exact, exact, moment(value))


def plural(n: int, word: str, words: str | None = None) -> str:
    return f"{n:,} {word if n == 1 else (words or word + 's')}"


# --- Why a run is not a success -------------------------------------------------------------


def status_reason(run: AuditRun) -> str | None:
    """Why this run ended partial, failed, interrupted or skipped, in one line; None for a run
    that succeeded or is still running. A few indexed queries, whatever the run's size."""
    if run.status == AuditStatus.SKIPPED:
        return "another run held the fixing-run lock"
    if run.status not in NOT_SUCCEEDED:
        return None
    reasons = []
    if run.status == AuditStatus.PARTIAL:
        guarded = run_state.guarded_organization_ids(run)
        if guarded:
            reasons.append(
                f"{plural(len(guarded), 'organization')} held by the mass-deletion guard or "
                "the run budget"
            )
        failed = run_state.failed_organization_errors(run)
        if failed:
            first = next(iter(failed.values()))
            reasons.append(f"{plural(len(failed), 'organization')} failed ({_first_line(first)})")
        # Only all-organization runs are cut into shards.
        shards = (
            {}
            if run.organization_id
            else dict(
                run.shards.filter(status__in=[ShardStatus.SKIPPED, ShardStatus.FAILED])
                .values_list("status")
                .annotate(n=Count("id"))
                .order_by()
            )
        )
        if run.fix and run.trigger != AuditTrigger.REVERT:
            held = run.findings.filter(outcome=FindingOutcome.HELD).count()
            if held:
                reasons.append(
                    f"{plural(held, 'finding')} held: fixing them fights another writer "
                    "(see Drift records)"
                )
        if shards.get(ShardStatus.SKIPPED):
            reasons.append(f"{plural(shards[ShardStatus.SKIPPED], 'shard')} skipped (deadline)")
        if shards.get(ShardStatus.FAILED):
            reasons.append(f"{plural(shards[ShardStatus.FAILED], 'shard')} failed")
        if run.trigger == AuditTrigger.REVERT:
            conflicts = run.findings.filter(outcome=FindingOutcome.CONFLICT)
            total = conflicts.count()
            if total:
                common = conflicts.values_list("detail").annotate(n=Count("id"))
                shown = "; ".join(
                    f"{detail or 'no reason recorded'} ({n})"
                    for detail, n in common.order_by("-n", "detail")[:3]
                )
                reasons.append(f"{plural(total, 'conflict')} left alone, most often: {shown}")
        total = run.organizations_total
        if total and run.organizations_audited < total and run.trigger != AuditTrigger.REVERT:
            reasons.append(f"{run.organizations_audited:,} of {total:,} organizations audited")
    if run.error and not reasons:
        reasons.append(_first_line(run.error))
    if not reasons:
        if run.status == AuditStatus.INTERRUPTED:
            return "its process died before it finished; a later run closed it"
        return "no reason recorded"
    return "; ".join(reasons)


def _first_line(text: str, limit: int = 200) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit else line[: limit - 1] + "…"


# --- The schedule, readably ---------------------------------------------------------------


def readable_schedule() -> str:
    """The audit entry's schedule as a person says it: ``every 6 hours, at 00:00, 06:00, 12:00
    and 18:00 UTC (cron 0 */6 * * *)``."""
    task = (
        PeriodicTask.objects.select_related("crontab", "interval")
        .filter(name=AUDIT_ENTRY)
        .only("crontab", "interval", "solar", "clocked")
        .first()
    )
    if task is None:
        return ""
    if task.interval is not None:
        return str(task.interval)
    if task.crontab is None:
        return str(task.solar or task.clocked or "")
    cron = task.crontab
    expression = " ".join(
        [cron.minute, cron.hour, cron.day_of_month, cron.month_of_year, cron.day_of_week]
    )
    zone = str(cron.timezone)
    try:
        human = cron.human_readable.removesuffix(f" {zone}")
        schedule = cron.schedule
        daily = cron.day_of_month == "*" and cron.month_of_year == "*" and cron.day_of_week == "*"
        times = sorted(f"{h:02d}:{m:02d}" for h in schedule.hour for m in schedule.minute)
    except (ValueError, TypeError):
        return f"cron {expression} ({zone})"
    described = human[:1].lower() + human[1:]
    if daily and 1 < len(times) <= 8:
        described += ", at " + ", ".join(times[:-1]) + " and " + times[-1]
    elif daily and len(times) == 1:
        described = f"daily at {times[0]}"
    return f"{described} {zone} (cron {expression})"


# --- The dashboard --------------------------------------------------------------------------


@dataclass(frozen=True)
class LockView:
    state: LockState
    run: AuditRun | None
    since: datetime | None
    expires_at: datetime | None
    hint: str  # what to do when the lock's service does not answer


@dataclass(frozen=True)
class Dashboard:
    last_scheduled: AuditRun | None
    last_reason: str | None
    previous: AuditRun | None  # the scheduled run before the last, when it did not succeed
    previous_reason: str | None
    schedule: ScheduleState
    schedule_text: str
    overdue: str | None
    chart: SafeString
    chart_runs: int
    lock: LockView
    changes: run_state.ChangeBacklog
    last_change_run: AuditRun | None
    changes_behind: str | None
    fights_held: int  # drift records whose fixing is held (DESIGN "Drift history and fights")
    fights_url: str

    @property
    def chart_title(self) -> str:
        if self.chart_runs == 1:
            return "Found and fixed, the last run"
        return f"Found and fixed, last {self.chart_runs} runs"


def build_dashboard() -> Dashboard:
    now = timezone.now()
    scheduled = list(
        AuditRun.objects.filter(trigger=AuditTrigger.SCHEDULE).order_by("-started_at")[:2]
    )
    last = scheduled[0] if scheduled else None
    previous = scheduled[1] if len(scheduled) > 1 else None
    if previous is not None and previous.status not in (*NOT_SUCCEEDED, AuditStatus.SKIPPED):
        previous = None
    runs = run_state.recent_runs(limit=settings.PROFILE_AUDIT_DASHBOARD_RUNS)
    changes = run_state.change_backlog()
    return Dashboard(
        last_scheduled=last,
        last_reason=status_reason(last) if last else None,
        previous=previous,
        previous_reason=status_reason(previous) if previous else None,
        schedule=audit_schedule_state(now=now),
        schedule_text=readable_schedule(),
        overdue=scheduled_audit_problem(),
        chart=trend_chart(runs),
        chart_runs=len(runs),
        lock=_lock_view(now),
        changes=changes,
        last_change_run=AuditRun.objects.filter(trigger=AuditTrigger.CHANGES)
        .order_by("-started_at")
        .first(),
        changes_behind=change_backlog_problem(changes),
        fights_held=run_state.fights_held(),
        fights_url=reverse("admin:profiles_driftrecord_changelist") + "?held=yes",
    )


def _lock_view(now: datetime) -> LockView:
    state = fixing_run_lock_state()
    run = run_state.run_holding_lock(state.token) if state.held else None
    expires_at = now + timedelta(seconds=state.expires_in) if state.expires_in is not None else None
    url = settings.PROFILE_AUDIT_LOCK_REDIS_URL
    hint = redis_start_hint(url) if url and not state.reachable else ""
    return LockView(
        state=state,
        run=run,
        since=run.started_at if run else None,
        expires_at=expires_at,
        hint=hint,
    )


# --- The trend chart ------------------------------------------------------------------------


def _log_top(value: int) -> int:
    """The smallest power of ten at or above ``value`` (at least 10): the chart's top tick."""
    return 10 ** max(1, math.ceil(math.log10(max(value, 1))))


def _svg(template: str, *args: object) -> SafeString:
    """``format_html`` for SVG: coordinates written with one decimal."""
    return format_html(
        template.replace("{:.1f}", "{}"),
        *(
            f"{a:.1f}" if isinstance(a, float | int) and not isinstance(a, bool) else a
            for a in args
        ),
    )


def trend_chart(runs: list[AuditRun]) -> SafeString:
    """Found (light) and fixed (dark) per run, oldest left, on a log scale with a tick at every
    power of ten, so one run of 100,000 findings does not flatten runs of 3. Under each run a
    strip in its status's colour; a run that found nothing gets a hollow mark on the axis; a dry
    run's found bar is outlined and hatched (it fixes nothing). Each run links to its page and
    says what it is on hover."""
    if not runs:
        return format_html('<p class="audit-chart-empty">{}</p>', "No runs yet.")
    top = _log_top(max(run.found for run in runs))
    left, bottom, top_pad = 52, 34, 8
    plot_w, plot_h = CHART_WIDTH - left - 6, CHART_HEIGHT - bottom - top_pad
    base = top_pad + plot_h
    slot = plot_w / len(runs)
    bar = max(min(slot * 0.38, 14), 1.5)
    scale = math.log10(top + 1)

    def height(value: int) -> float:
        return plot_h * math.log10(value + 1) / scale if value > 0 else 0.0

    ticks = []
    value = 0
    while value <= top:
        y = base - height(value)
        ticks.append(
            (left, f"{y:.1f}", CHART_WIDTH, f"{y:.1f}", left - 4, f"{y + 4:.1f}", f"{value:,}")
        )
        value = 1 if value == 0 else value * 10
    grid = format_html_join(
        "",
        '<line class="tick" x1="{}" y1="{}" x2="{}" y2="{}" stroke="#ddd"/>'
        '<text x="{}" y="{}" text-anchor="end" font-size="11">{}</text>',
        ticks,
    )

    marks = []
    for i, run in enumerate(runs):
        x = left + i * slot + (slot - 2 * bar) / 2
        found_h = max(height(run.found), 1.5 if run.found else 0)
        fixed_h = max(height(run.fixed), 1.5 if run.fixed else 0) if run.fix else 0
        label = (
            f"{moment(run.started_at)}, {run.get_trigger_display().lower()}, "
            f"{'fix' if run.fix else 'dry run'}, {run.status}: "
            f"{run.found:,} found, {f'{run.fixed:,}' if run.fix else '-'} fixed"
        )
        if run.fix:
            found = _svg(
                '<rect class="found" x="{:.1f}" y="{:.1f}" width="{:.1f}" height="{:.1f}" '
                'fill="{}"/>',
                x,
                base - found_h,
                bar,
                found_h,
                FOUND_COLOUR,
            )
        else:
            found = _svg(
                '<rect class="found dry" x="{:.1f}" y="{:.1f}" width="{:.1f}" height="{:.1f}" '
                'fill="url(#audit-dry)" stroke="{}" stroke-width="1"/>',
                x,
                base - found_h,
                bar * 2,
                found_h,
                FOUND_COLOUR,
            )
        fixed = (
            _svg(
                '<rect class="fixed" x="{:.1f}" y="{:.1f}" width="{:.1f}" height="{:.1f}" '
                'fill="{}"/>',
                x + bar,
                base - fixed_h,
                bar,
                fixed_h,
                FIXED_COLOUR,
            )
            if run.fix
            else ""
        )
        nothing = (
            _svg(
                '<circle class="nothing-found" cx="{:.1f}" cy="{:.1f}" r="3.5" fill="#fff" '
                'stroke="#666" stroke-width="1.2"/>',
                x + bar,
                base - 4,
            )
            if run.found == 0
            else ""
        )
        status = _svg(
            '<rect class="status status-{}" x="{:.1f}" y="{:.1f}" width="{:.1f}" height="6" '
            'fill="{}"/>',
            run.status,
            left + i * slot + 1,
            base + 3,
            max(slot - 2, 1),
            STATUS_COLOURS.get(run.status, "#757575"),
        )
        marks.append(
            _svg(
                '<a href="{}"><g class="audit-chart-run {} {}"><title>{}</title>'
                '<rect class="slot" x="{:.1f}" y="{}" width="{:.1f}" height="{}" '
                'fill="transparent"/>{}{}{}{}</g></a>',
                reverse("admin:profiles_auditrun_change", args=[run.id]),
                "fix" if run.fix else "dry-run",
                run.status,
                label,
                left + i * slot,
                top_pad,
                slot,
                plot_h + 10,
                found,
                fixed,
                nothing,
                status,
            )
        )
    first, last = runs[0].started_at, runs[-1].started_at
    return format_html(
        '<svg id="audit-trend" class="audit-chart" viewBox="0 0 {w} {h}" role="img" '
        'aria-label="Found and fixed for {what}, log scale" preserveAspectRatio="none">'
        '<defs><pattern id="audit-dry" width="5" height="5" patternUnits="userSpaceOnUse" '
        'patternTransform="rotate(45)"><rect width="5" height="5" fill="#fff"/>'
        '<line x1="0" y1="0" x2="0" y2="5" stroke="{found}" stroke-width="2"/></pattern></defs>'
        "{grid}"
        '<line x1="{left}" y1="{base}" x2="{w}" y2="{base}" stroke="#999"/>'
        '<line x1="{left}" y1="{top_pad}" x2="{left}" y2="{base}" stroke="#999"/>'
        "{body}"
        '<text x="{left}" y="{h2}" font-size="11">{first}</text>'
        '<text x="{w2}" y="{h2}" font-size="11" text-anchor="end">{last}</text>'
        "</svg>",
        w=CHART_WIDTH,
        h=CHART_HEIGHT,
        what=plural(len(runs), "run"),
        found=FOUND_COLOUR,
        grid=grid,
        left=left,
        base=base,
        top_pad=top_pad,
        body=SafeString("".join(marks)),
        h2=CHART_HEIGHT - 6,
        w2=CHART_WIDTH - 6,
        first=moment(first),
        last=moment(last),
    )
