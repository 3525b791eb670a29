"""What the audit runs page opens on: the last scheduled run, when the next is due, a found/fixed
chart of recent runs (server-rendered SVG, no script), and the fixing-run lock."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString

from profiles import run_state
from profiles.models import AuditRun
from profiles.schedule import ScheduleState, audit_schedule_state, scheduled_audit_problem
from profiles.services.run_lock import LockState, fixing_run_lock_state

CHART_WIDTH, CHART_HEIGHT = 720, 160
FOUND_COLOUR, FIXED_COLOUR = "#79aec8", "#2e7d32"


@dataclass(frozen=True)
class LockView:
    state: LockState
    run: AuditRun | None
    since: datetime | None
    expires_at: datetime | None


@dataclass(frozen=True)
class Dashboard:
    last_scheduled: AuditRun | None
    schedule: ScheduleState
    overdue: str | None
    chart: SafeString
    chart_runs: int
    lock: LockView


def build_dashboard() -> Dashboard:
    now = timezone.now()
    last = run_state.last_scheduled_run()
    schedule = audit_schedule_state(now=now)
    runs = run_state.recent_runs(limit=settings.PROFILE_AUDIT_DASHBOARD_RUNS)
    return Dashboard(
        last_scheduled=last,
        schedule=schedule,
        overdue=scheduled_audit_problem(),
        chart=trend_chart(runs),
        chart_runs=len(runs),
        lock=_lock_view(now),
    )


def _lock_view(now: datetime) -> LockView:
    state = fixing_run_lock_state()
    run = run_state.run_holding_lock(state.token) if state.held else None
    expires_at = now + timedelta(seconds=state.expires_in) if state.expires_in is not None else None
    return LockView(
        state=state, run=run, since=run.started_at if run else None, expires_at=expires_at
    )


def trend_chart(runs: list[AuditRun]) -> SafeString:
    """Found (light) and fixed (dark) per run, oldest left; each pair links to its run and says
    what it is on hover. Dry runs fix nothing, so they show found only."""
    if not runs:
        return format_html('<p class="audit-chart-empty">{}</p>', "No runs yet.")
    top = max(max(run.found for run in runs), 1)
    left, bottom, top_pad = 44, 22, 8
    plot_w, plot_h = CHART_WIDTH - left - 6, CHART_HEIGHT - bottom - top_pad
    slot = plot_w / len(runs)
    bar = max(min(slot * 0.38, 14), 1.5)

    def height(value: int) -> float:
        return plot_h * value / top

    bars = []
    for i, run in enumerate(runs):
        x = left + i * slot + (slot - 2 * bar) / 2
        found_h, fixed_h = height(run.found), height(run.fixed)
        label = (
            f"{run.started_at:%Y-%m-%d %H:%M} UTC, {run.get_trigger_display().lower()}, "
            f"{'fix' if run.fix else 'dry run'}, {run.status}: "
            f"{run.found} found, {run.fixed if run.fix else '-'} fixed"
        )
        bars.append(
            (
                reverse("admin:profiles_auditrun_change", args=[run.id]),
                label,
                f"{x:.1f}",
                f"{top_pad + plot_h - found_h:.1f}",
                f"{bar:.1f}",
                f"{max(found_h, 0.5 if run.found else 0):.1f}",
                f"{x + bar:.1f}",
                f"{top_pad + plot_h - fixed_h:.1f}",
                f"{fixed_h:.1f}",
            )
        )
    body = format_html_join(
        "",
        '<a href="{}"><g class="audit-chart-run"><title>{}</title>'
        '<rect class="found" x="{}" y="{}" width="{}" height="{}" fill="{}"/>'
        '<rect class="fixed" x="{}" y="{}" width="{}" height="{}" fill="{}"/></g></a>',
        (
            (url, label, x, fy, w, fh, FOUND_COLOUR, x2, xy, w, xh, FIXED_COLOUR)
            for url, label, x, fy, w, fh, x2, xy, xh in bars
        ),
    )
    first, last = runs[0].started_at, runs[-1].started_at
    return format_html(
        '<svg id="audit-trend" class="audit-chart" viewBox="0 0 {w} {h}" role="img" '
        'aria-label="Found and fixed for the last {n} runs" preserveAspectRatio="none">'
        '<line x1="{left}" y1="{base}" x2="{w}" y2="{base}" stroke="#999"/>'
        '<line x1="{left}" y1="{top_pad}" x2="{left}" y2="{base}" stroke="#999"/>'
        '<text x="{lx}" y="{ty}" text-anchor="end" font-size="11">{top}</text>'
        '<text x="{lx}" y="{base}" text-anchor="end" font-size="11">0</text>'
        "{body}"
        '<text x="{left}" y="{h2}" font-size="11">{first}</text>'
        '<text x="{w2}" y="{h2}" font-size="11" text-anchor="end">{last}</text>'
        "</svg>",
        w=CHART_WIDTH,
        h=CHART_HEIGHT,
        n=len(runs),
        left=left,
        base=top_pad + plot_h,
        top_pad=top_pad,
        lx=left - 4,
        ty=top_pad + 10,
        top=top,
        body=body,
        h2=CHART_HEIGHT - 6,
        w2=CHART_WIDTH - 6,
        first=f"{first:%b %d %H:%M}",
        last=f"{last:%b %d %H:%M}",
    )
