"""The operator's view of the audit: runs and findings (read-only history), and revert.

On-call engineers open these pages after an alert: what did the audit change, where, why, and
can it be put back. Every page runs a fixed number of queries whatever the size of a run.
"""

from __future__ import annotations

import json
import uuid
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.contrib import admin, messages
from django.contrib.admin.views.main import ChangeList
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.db import connection
from django.db.models import Q, QuerySet
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import NoReverseMatch, path, reverse
from django.utils import timezone
from django.utils.dateparse import parse_datetime
from django.utils.functional import cached_property
from django.utils.html import format_html, format_html_join
from django.utils.http import urlencode
from django.utils.safestring import SafeString

from audit_project.admin import AliveListFilter, InputFilter, OrganizationFilter
from audit_project.log_config import audit_logger
from profiles import run_state
from profiles.dashboard import (
    STATUS_COLOURS,
    build_dashboard,
    moment,
    moment_html,
    plural,
    status_reason,
)
from profiles.models import (
    OPEN_SHARD_STATUSES,
    AuditFinding,
    AuditRun,
    AuditStatus,
    AuditTrigger,
    DriftRecord,
    DriftState,
    FindingOutcome,
    ShardStatus,
    SocialProfile,
)
from profiles.plan import ALL_TYPES
from profiles.selectors import run_findings_page
from profiles.services.drift import fight_detail, resume_fixing, writer_name
from profiles.services.revert import (
    RevertRejected,
    claim_revert,
    revert_blocker,
    revert_outcomes,
)
from profiles.services.run_lock import (
    RunLockUnavailable,
    fixing_run_lock_state,
    force_release_fixing_run_lock,
)
from profiles.services.runs import finish_run

FINDINGS_PER_PAGE = 100
# A run's page names at most this many guarded or failed organizations (the findings list
# filtered to the run has them all).
ORGANIZATIONS_NAMED = 50

# A run's page lists at most this many shards (an all-organization run of a million
# organizations has a thousand); the rest are counted.
SHARDS_SHOWN = 200
SHARD_COLOURS = {
    ShardStatus.PENDING: "#757575",
    ShardStatus.RUNNING: "#417690",
    ShardStatus.DONE: "#2e7d32",
    ShardStatus.SKIPPED: "#b26a00",
    ShardStatus.FAILED: "#c62828",
}
# Before/after values longer than this are cut on the run page and on a finding's page (a
# boost rule of 20 MB made its run's page 45 MB); the whole value is one link away, as JSON.
VALUE_SHOWN_CHARS = 2_000
VALUE_SHOWN_CHARS_DETAIL = 20_000
OUTCOME_COLOURS = {
    FindingOutcome.PLANNED: "#417690",
    FindingOutcome.FIXED: "#2e7d32",
    FindingOutcome.STALE: "#757575",
    FindingOutcome.GUARDED: "#b26a00",
    FindingOutcome.FAILED: "#c62828",
    FindingOutcome.CONFLICT: "#b26a00",
    FindingOutcome.SENT: "#417690",
    FindingOutcome.HELD: "#b26a00",
}
DRIFT_STATE_COLOURS = {
    DriftState.OPEN: "#417690",
    DriftState.RESOLVED: "#2e7d32",
    DriftState.RECURRING: "#b26a00",
    DriftState.FIGHTING: "#c62828",
}
# The drift page's "this week": this many organizations and writers, and fights listed.
DRIFT_TOP = 5
FIGHTS_SHOWN = 50
# Resume fixing acts on at most this many records at once (one log entry each).
RESUME_AT_MOST = 500


@admin.register(SocialProfile)
class SocialProfileAdmin(admin.ModelAdmin):
    list_display = [
        "name",
        "platform",
        "external_id",
        "organization",
        "connection",
        "created",
        "deleted",
    ]
    list_filter = [AliveListFilter, "platform", "connection__status", OrganizationFilter]
    list_select_related = ["organization", "connection"]
    search_fields = ["name", "external_id", "=id", "=organization__id", "organization__name"]
    raw_id_fields = ["organization", "connection"]

    # Moments as every audit page writes them (zone included), not Django's "Dec. 1, 2026, 8:01
    # p.m.".
    @admin.display(description="created at", ordering="created_at")
    def created(self, profile: SocialProfile) -> str:
        return moment_html(profile.created_at)

    @admin.display(description="deleted at", ordering="deleted_at")
    def deleted(self, profile: SocialProfile) -> str:
        return moment_html(profile.deleted_at)


class ReadOnlyAdmin(admin.ModelAdmin):
    """Records of what the audit did are history: viewable by staff, never edited here."""

    # "Show counts" would count every filter choice over every finding ever recorded.
    show_facets = admin.ShowFacets.NEVER

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    def _confirm(
        self,
        request: HttpRequest,
        *,
        title: str,
        action_url: str,
        fields: dict[str, str],
        lines: list[str],
        button: str,
        button_id: str,
        cancel_url: str = "",
    ) -> HttpResponse:
        """A page that asks before an action acts: the same POST again, with ``confirmed``."""
        context = {
            **self.admin_site.each_context(request),
            "title": title,
            "opts": self.model._meta,
            "action_url": action_url,
            "fields": fields,
            "lines": lines,
            "button": button,
            "button_id": button_id,
            "cancel_url": cancel_url
            or reverse(
                f"admin:{self.model._meta.app_label}_{self.model._meta.model_name}_changelist"
            ),
        }
        return TemplateResponse(request, "admin/profiles/confirm_action.html", context)


# --- Filters that never list all organizations or runs --------------------------------------


class RunFilter(InputFilter):
    title = "run"
    parameter_name = "run"
    placeholder = "run id"

    def filter_typed(self, queryset, value):
        try:
            return queryset.filter(run_id=uuid.UUID(value))
        except ValueError:
            return queryset.none()


class ObjectIdFilter(InputFilter):
    """A finding's object, by id (indexed): a drift record links its findings with it."""

    title = "object id"
    parameter_name = "object_id"
    placeholder = "object id"

    def filter_typed(self, queryset, value):
        try:
            return queryset.filter(object_id=uuid.UUID(value))
        except ValueError:
            return queryset.none()


class ExternalIdFilter(InputFilter):
    """A finding's external id (indexed), with its platform when the URL gives one (a missing
    profile's drift record links its findings with both)."""

    title = "external id"
    parameter_name = "external_id"
    placeholder = "external id"

    def filter_typed(self, queryset, value):
        return queryset.filter(external_id=value)


class FixedFilter(admin.SimpleListFilter):
    title = "fixed"
    parameter_name = "fixed"

    def lookups(self, request, model_admin):
        return [("yes", "Fixed (or put back)"), ("no", "Not fixed (see outcome for why)")]

    def queryset(self, request, queryset):
        if self.value() == "yes":
            return queryset.filter(outcome=FindingOutcome.FIXED)
        if self.value() == "no":
            return queryset.exclude(outcome=FindingOutcome.FIXED)
        return queryset


# --- Audit runs -----------------------------------------------------------------------------


@admin.register(AuditRun)
class AuditRunAdmin(ReadOnlyAdmin):
    change_form_template = "admin/profiles/auditrun/change_form.html"
    change_list_template = "admin/profiles/auditrun/change_list.html"
    list_display = [
        "started",
        "trigger",
        "scope",
        "fix_mode",
        "status_badge",
        "found",
        "fixed",
        "duration",
    ]
    list_filter = ["status", "trigger", "fix", "started_at", OrganizationFilter]
    list_select_related = ["organization"]
    search_fields = ["=id", "=organization__id", "organization__name"]
    date_hierarchy = "started_at"
    show_full_result_count = False
    actions = ["revert_selected_run"]
    fieldsets = [
        (
            None,
            {
                "fields": [
                    "id",
                    "status_badge",
                    "status_reason_text",
                    "trigger",
                    "scope",
                    "fix_mode",
                    "forced_text",
                    "reverted_run_link",
                    "reverted_by",
                ]
            },
        ),
        (
            "When",
            {"fields": ["started_at_text", "finished_at_text", "duration", "progress"]},
        ),
        ("Who asked", {"fields": ["requested_by_text", "requested_host", "task_id"]}),
        (
            "What it found and fixed",
            {
                "fields": [
                    "organizations_audited",
                    "types_list",
                    "by_type_table",
                    "held_text",
                    "changes_text",
                    "error_text",
                ]
            },
        ),
        (
            "Organizations not fixed",
            {"fields": ["guarded_organizations_list", "failed_organizations_list"]},
        ),
    ]
    # Every field shown is read-only: a run is history.
    readonly_fields = [name for _, options in fieldsets for name in options["fields"]]

    def get_queryset(self, request):
        return super().get_queryset(request).select_related("organization")

    def get_fieldsets(self, request, obj=None):
        # "Why" only for a run that has a reason to give (partial, failed, interrupted, skipped).
        if obj is None or obj.status not in (AuditStatus.SUCCEEDED, AuditStatus.RUNNING):
            return self.fieldsets
        first, *rest = self.fieldsets
        fields = [f for f in first[1]["fields"] if f != "status_reason_text"]
        return [(first[0], {**first[1], "fields": fields}), *rest]

    # --- Columns and fields -------------------------------------------------------------

    @admin.display(description="changes")
    def changes_text(self, run: AuditRun) -> str:
        """A change-driven run: how old its oldest mark was. A sweep: what the marks missed."""
        if run.trigger == AuditTrigger.CHANGES:
            if run.oldest_mark_at is None:
                return "audited the organizations its last audit left unsettled (none marked)"
            age = (run.started_at - run.oldest_mark_at).total_seconds()
            return f"audited what changed; its oldest change mark was {age:.0f} s old at its start"
        if run.organization_id is None and run.trigger != AuditTrigger.REVERT:
            if run.missed_by_changes:
                return (
                    f"missed by changes: {run.missed_by_changes} findings in organizations no "
                    "change mark named (writes with the triggers off?)"
                )
            return "missed by changes: 0 (every finding was in a marked or unsettled organization)"
        return "-"

    @admin.display(description="held (fighting)")
    def held_text(self, run: AuditRun) -> str:
        """Findings a fixing run left alone because they fight another writer (one indexed
        count on (run, outcome))."""
        if not run.fix or run.trigger == AuditTrigger.REVERT:
            return "-"
        held = run.findings.filter(outcome=FindingOutcome.HELD).count()
        if not held:
            return "none: nothing it found was fighting another writer"
        findings = reverse("admin:profiles_auditfinding_changelist")
        return format_html(
            '<a href="{}" id="held-findings">{}</a> held, not fixed: another writer keeps undoing '
            'their fix (<a href="{}">the fights</a>)',
            f"{findings}?" + urlencode({"run": run.id, "outcome__exact": FindingOutcome.HELD}),
            plural(held, "finding"),
            reverse("admin:profiles_driftrecord_changelist") + "?held=yes",
        )

    @admin.display(description="started", ordering="started_at")
    def started(self, run: AuditRun) -> str:
        # Unambiguous (UTC), and on two lines (date, time), so the list keeps its counts and
        # duration in view at 1366 px.
        exact = run.started_at.isoformat(timespec="seconds")
        date, time_, zone = moment(run.started_at).split(" ")
        return format_html(
            '<time datetime="{}" title="{}">{}<br>{} {}</time>', exact, exact, date, time_, zone
        )

    @admin.display(description="started")
    def started_at_text(self, run: AuditRun) -> str:
        return moment_html(run.started_at)

    @admin.display(description="finished")
    def finished_at_text(self, run: AuditRun) -> str:
        return moment_html(run.finished_at)

    @admin.display(description="why")
    def status_reason_text(self, run: AuditRun) -> str:
        """Why the run is not a success (partial, failed, interrupted, skipped), in one line."""
        return status_reason(run) or "-"

    @admin.display(description="forced")
    def forced_text(self, run: AuditRun) -> str:
        # The model's help text next to a bare "no" icon read "✖ The mass-deletion guard was
        # overridden": say what applied, in words.
        if run.forced:
            return "yes: the mass-deletion guard and the run budget were overridden (--force)"
        return "no: the mass-deletion guard and the run budget applied"

    @admin.display(description="shards")
    def shards_table(self, run: AuditRun) -> str:
        """Each shard of an all-organization run: its id (as Celery's tools show it), its range
        of organizations, where it is and who worked it. One query, at most SHARDS_SHOWN rows."""
        shards = list(run.shards.order_by("index")[: SHARDS_SHOWN + 1])
        if not shards:
            return "none (one organization, or a run that was not cut into shards)"
        more = ""
        if len(shards) > SHARDS_SHOWN:
            shards = shards[:SHARDS_SHOWN]
            more = format_html(
                '<p class="help">The first {} shards of {} are shown.</p>',
                SHARDS_SHOWN,
                run.shards.count(),
            )
        # The error column only when a shard has one: the table fits beside the admin's menu.
        errors = any(shard.error or shard.failed_organizations for shard in shards)
        rows = format_html_join(
            "",
            '<tr class="shard-{}"><td>{}<br><code class="shard-id">{}</code></td>'
            '<td class="range">{}<br><span class="line">cursor <code class="cursor">{}</code>'
            "</span></td><td>{}</td>"
            "<td>{}</td><td>{} / {}</td><td>{}</td><td>{}</td><td>{}<br>{}</td>{}</tr>",
            (
                (
                    shard.status,
                    shard.index,
                    shard.id,
                    _organization_range(shard.first_organization_id, shard.end_organization_id),
                    shard.cursor or "none yet",
                    _badge(
                        shard.status,
                        SHARD_COLOURS.get(shard.status, "#757575"),
                        title=shard.get_status_display(),
                    ),
                    f"{shard.organizations_audited:,}",
                    f"{shard.found:,}",
                    f"{shard.fixed:,}" if run.fix else "-",
                    shard.attempts,
                    shard.worker or "-",
                    moment_html(shard.started_at),
                    moment_html(shard.finished_at),
                    format_html("<td>{}</td>", _shard_problem(shard)) if errors else "",
                )
                for shard in shards
            ),
        )
        return format_html(
            '<div class="audit-shard-scroll"><table class="audit-shard-table" id="audit-shards">'
            "<thead><tr><th>#, id</th><th>organizations by id (to: not included); cursor: the last done</th>"
            "<th>status</th><th>audited</th><th>found / fixed</th>"
            '<th title="Deliveries that died working it (a kill, a lost worker); continuations '
            'do not count. At PROFILE_AUDIT_SHARD_MAX_ATTEMPTS it is failed.">deliveries died</th>'
            "<th>worker</th><th>started, finished</th>{}</tr>"
            "</thead><tbody>{}</tbody></table></div>{}",
            format_html("<th>{}</th>", "error") if errors else "",
            rows,
            more,
        )

    @admin.display(description="scope", ordering="organization__name")
    def scope(self, run: AuditRun) -> str:
        scope = str(run.organization) if run.organization_id else "all organizations"
        if run.reverted_run_id:
            return f"{scope} (revert of run {str(run.reverted_run_id)[:8]})"
        return scope

    @admin.display(description="fix mode", ordering="fix")
    def fix_mode(self, run: AuditRun) -> str:
        mode = "fix" if run.fix else "dry run"
        return f"{mode}, forced" if run.forced else mode

    @admin.display(description="status", ordering="status")
    def status_badge(self, run: AuditRun) -> str:
        # The short name in the badge, the explanation on hover: long labels ("Skipped
        # (another run held the lock)") pushed the counts off narrow screens.
        return _badge(
            run.status, STATUS_COLOURS.get(run.status, "#757575"), title=run.get_status_display()
        )

    @admin.display(description="asked by")
    def requested_by_text(self, run: AuditRun) -> str:
        if run.requested_by:
            return run.requested_by
        return "the schedule" if run.trigger == AuditTrigger.SCHEDULE else "-"

    @admin.display(description="guarded (mass-deletion guard or run budget)")
    def guarded_organizations_list(self, run: AuditRun) -> str:
        ids = run_state.guarded_organization_ids(run)
        return self._organizations_html(run, ids, {}, outcome=FindingOutcome.GUARDED)

    @admin.display(description="failed")
    def failed_organizations_list(self, run: AuditRun) -> str:
        errors = run_state.failed_organization_errors(run)
        return self._organizations_html(run, list(errors), errors, outcome=FindingOutcome.FAILED)

    def _organizations_html(
        self, run: AuditRun, ids: list[str], errors: dict[str, str], *, outcome: str
    ) -> str:
        if not ids:
            return "none"
        named, total = run_state.organizations_named(ids, limit=ORGANIZATIONS_NAMED)
        findings = reverse("admin:profiles_auditfinding_changelist")
        items = format_html_join(
            "",
            '<li><a href="{}">{}</a> <span class="quiet">{}</span>{}</li>',
            (
                (
                    f"{findings}?" + urlencode({"run": run.id, "organization": org.id}),
                    org.name or "(deleted organization)",
                    org.id,
                    format_html(": {}", errors[org.id]) if org.id in errors else "",
                )
                for org in named
            ),
        )
        more = ""
        if total > len(named):
            more = format_html(
                '<li><a href="{}">and {} more</a></li>',
                f"{findings}?" + urlencode({"run": run.id, "outcome__exact": outcome}),
                total - len(named),
            )
        return format_html('<ul class="audit-orgs">{}{}</ul>', items, more)

    @admin.display(description="duration", ordering="duration_seconds")
    def duration(self, run: AuditRun) -> str:
        return "-" if run.duration_seconds is None else f"{run.duration_seconds:.2f} s"

    @admin.display(description="progress")
    def progress(self, run: AuditRun) -> str:
        """While a run works: how far it is, from its record (written as each unit commits)."""
        if run.status != AuditStatus.RUNNING:
            return "-"
        since = run.last_progress_at or run.started_at
        if run.trigger == AuditTrigger.REVERT:
            total = run.reverted_run.fixed if run.reverted_run_id else 0
            if run.findings_recorded == 0:
                # The request records the revert (last progress = its start) and sends the task;
                # nothing moves until a worker takes it and its first organization commits, so
                # until then it is queued as far as anyone can tell from its record.
                if run.last_progress_at is None or run.last_progress_at <= run.started_at:
                    return (
                        f"queued since {moment(run.started_at)}: waiting for a worker on the "
                        f"maintenance queue (or for its first organization to commit); nothing "
                        f"of {total:,} findings put back yet (refreshes itself)"
                    )
                return (
                    f"started: working on its first organization, nothing of {total:,} findings "
                    f"put back yet; last progress {moment(since)} (refreshes itself)"
                )
            done = f"{run.findings_recorded} of {total} findings"
        else:
            total = run.organizations_total or 0
            done = f"{run.organizations_audited} of {total} organizations"
            open_shards = run.shards.filter(status__in=OPEN_SHARD_STATUSES).count()
            done += f", {plural(open_shards, 'shard')} open"
        return f"running: {done}; last progress {moment(since)} (refreshes itself)"

    @admin.display(description="reverts run")
    def reverted_run_link(self, run: AuditRun) -> str:
        if not run.reverted_run_id:
            return "-"
        return _link(_run_url(run.reverted_run_id), str(run.reverted_run_id))

    @admin.display(description="reverted by")
    def reverted_by(self, run: AuditRun) -> str:
        reverts = list(run.reverts.order_by("started_at").values_list("id", "fix", "status"))
        if not reverts:
            return "-"
        return format_html_join(
            ", ",
            '<a href="{}">{}</a> ({}, {})',
            (
                (_run_url(id_), str(id_)[:8], "fix" if fix else "dry run", status)
                for id_, fix, status in reverts
            ),
        )

    @admin.display(description="types looked for")
    def types_list(self, run: AuditRun) -> str:
        return ", ".join(run.types) if isinstance(run.types, list) else str(run.types)

    @admin.display(description="per type")
    def by_type_table(self, run: AuditRun) -> str:
        counts = run.by_type or {}
        rows = [(t.label, counts.get(t.value, {})) for t in ALL_TYPES]
        rows += [(k, v) for k, v in counts.items() if k not in {t.value for t in ALL_TYPES}]
        fixed_label = "put back" if run.trigger == AuditTrigger.REVERT else "fixed"
        body = format_html_join(
            "",
            "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
            (
                (label, c.get("found", 0), c.get("fixed", 0) if run.fix else "-")
                for label, c in rows
            ),
        )
        return format_html(
            '<table class="audit-by-type"><thead><tr><th>type</th><th>found</th><th>{}</th>'
            "</tr></thead><tbody>{}</tbody><tfoot><tr><th>total</th><th>{}</th><th>{}</th>"
            "</tr></tfoot></table>",
            fixed_label,
            body,
            run.found,
            run.fixed if run.fix else "-",
        )

    @admin.display(description="error")
    def error_text(self, run: AuditRun) -> str:
        if not run.error:
            return "-"
        return format_html('<pre class="audit-error">{}</pre>', run.error)

    # --- The detail page: one page of findings and the revert button -----------------------

    def render_change_form(self, request, context, add=False, change=False, form_url="", obj=None):
        if obj is not None:
            context.update(self._findings_context(request, obj))
            context["revert_blocked"] = revert_blocker(run=obj)
            context["can_revert"] = self.has_revert_permission(request)
            context["revert_url"] = reverse("admin:profiles_auditrun_revert", args=[obj.pk])
            context["dry_run_retention_days"] = settings.PROFILE_AUDIT_DRY_RUN_RETENTION_DAYS
            context["shards_table"] = self.shards_table(obj)
        return super().render_change_form(request, context, add, change, form_url, obj)

    def _findings_context(self, request: HttpRequest, run: AuditRun) -> dict[str, Any]:
        try:
            wanted = int(request.GET.get("findings_page", 1))
        except ValueError:
            wanted = 1
        rows, pages = run_findings_page(
            run_id=run.id, page=wanted, per_page=FINDINGS_PER_PAGE, value_chars=VALUE_SHOWN_CHARS
        )
        page = min(max(wanted, 1), pages)

        def page_url(n: int) -> str:
            return "?" + urlencode({"findings_page": n})

        return {
            "findings": [_finding_row(f) for f in rows],
            "findings_page": page,
            "findings_pages": pages,
            "findings_first": (page - 1) * FINDINGS_PER_PAGE + 1,
            "findings_last": (page - 1) * FINDINGS_PER_PAGE + len(rows),
            "findings_total": run.found if run.status != AuditStatus.RUNNING else None,
            "findings_prev_url": page_url(page - 1) if page > 1 else None,
            "findings_next_url": page_url(page + 1) if page < pages else None,
            "findings_first_url": page_url(1) if page > 1 else None,
            "findings_last_url": page_url(pages) if page < pages else None,
            "findings_list_url": reverse("admin:profiles_auditfinding_changelist")
            + "?"
            + urlencode({"run": run.id}),
        }

    # --- Revert: an action and a button, both through one confirmation page ---------------

    def has_revert_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("profiles.revert_auditrun")

    @admin.action(description="Revert selected run", permissions=["revert"])
    def revert_selected_run(self, request: HttpRequest, queryset: QuerySet[AuditRun]):
        runs = list(queryset.values_list("id", flat=True)[:2])
        if len(runs) != 1:
            self.message_user(
                request,
                "Select exactly one run: runs are reverted one at a time.",
                messages.ERROR,
            )
            return None
        return HttpResponseRedirect(reverse("admin:profiles_auditrun_revert", args=[runs[0]]))

    def get_urls(self):
        return [
            path(
                "<uuid:run_id>/revert/",
                self.admin_site.admin_view(self.revert_view),
                name="profiles_auditrun_revert",
            ),
            path(
                "run-now/",
                self.admin_site.admin_view(self.run_now_view),
                name="profiles_auditrun_run_now",
            ),
            path(
                "release-lock/",
                self.admin_site.admin_view(self.release_lock_view),
                name="profiles_auditrun_release_lock",
            ),
            *super().get_urls(),
        ]

    # --- The dashboard: the list opens on the state of things ------------------------------

    def has_run_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("profiles.run_auditrun")

    def has_release_lock_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("profiles.release_lock_auditrun")

    def changelist_view(self, request, extra_context=None):
        context = {
            "dashboard": build_dashboard(),
            "can_run": self.has_run_permission(request),
            "can_release_lock": self.has_release_lock_permission(request),
            "run_now_url": reverse("admin:profiles_auditrun_run_now"),
            "release_lock_url": reverse("admin:profiles_auditrun_release_lock"),
            **(extra_context or {}),
        }
        return super().changelist_view(request, extra_context=context)

    def run_now_view(self, request: HttpRequest) -> HttpResponse:
        """POST: send the audit of every organization as a task (trigger admin), dry or fix."""
        if request.method != "POST":
            return HttpResponseRedirect(reverse("admin:profiles_auditrun_changelist"))
        if not (self.has_view_permission(request) and self.has_run_permission(request)):
            raise PermissionDenied
        fix = request.POST.get("mode") == "fix"
        if fix and request.POST.get("confirmed") != "yes":
            # A fixing run changes every organization: one click asks, the second sends.
            return self._confirm(
                request,
                title="Fix every organization now?",
                action_url=reverse("admin:profiles_auditrun_run_now"),
                fields={"mode": "fix"},
                lines=[
                    "This sends a fixing run of every organization to the workers, as the "
                    "schedule does: it soft-deletes, relinks and restores profiles and cleans "
                    "queue settings and boost rules, within the mass-deletion guard and the "
                    "run budget.",
                    "A dry run (the other button) records what it would do and changes nothing.",
                ],
                button="Yes, fix every organization",
                button_id="confirm-run-now-fix",
            )
        user = request.user.get_username()
        # Imported here: the admin sends the task, the services never import the task module.
        from profiles.tasks import audit_sync_task

        try:
            sent = audit_sync_task.delay(fix=fix, trigger=AuditTrigger.ADMIN, requested_by=user)
        except Exception as exc:  # the broker did not take it: say so, change nothing
            audit_logger().error(
                "profile_audit.run_request_failed", requested_by=user, fix_mode=fix, error=str(exc)
            )
            self.message_user(
                request,
                f"The run was not sent: the broker did not answer ({type(exc).__name__}: {exc}).",
                messages.ERROR,
            )
            return HttpResponseRedirect(reverse("admin:profiles_auditrun_changelist"))
        audit_logger().info(
            "profile_audit.run_requested", requested_by=user, fix_mode=fix, task_id=sent.id
        )
        self.message_user(
            request,
            f"Sent: a {'fixing run' if fix else 'dry run'} of every organization (task {sent.id}). "
            "It is listed here once a worker starts it.",
            messages.SUCCESS,
        )
        return HttpResponseRedirect(reverse("admin:profiles_auditrun_changelist"))

    def release_lock_view(self, request: HttpRequest) -> HttpResponse:
        """POST: free the fixing-run lock, if the holder shown on the page still holds it."""
        changelist = reverse("admin:profiles_auditrun_changelist")
        if request.method != "POST":
            return HttpResponseRedirect(changelist)
        if not (self.has_view_permission(request) and self.has_release_lock_permission(request)):
            raise PermissionDenied
        token = request.POST.get("token", "")
        state = fixing_run_lock_state()
        holding = run_state.run_holding_lock(token)
        if request.POST.get("confirmed") != "yes":
            holder = token.rsplit(":", 1)[0] or "nobody"
            lines = [
                f"The fixing-run lock is held by {holder}"
                + (
                    f", run {holding.id} (started {moment(holding.started_at)})."
                    if holding
                    else "."
                ),
                "Release it only when its holder is gone (its host or process died): a run "
                "that is still alive stops before its next organization, and another fixing "
                "run may start at once.",
            ]
            return self._confirm(
                request,
                title="Release the fixing-run lock?",
                action_url=reverse("admin:profiles_auditrun_release_lock"),
                fields={"token": token},
                lines=lines,
                button="Yes, release the lock",
                button_id="confirm-release-lock",
            )
        user = request.user.get_username()
        try:
            released = force_release_fixing_run_lock(token=token)
        except RunLockUnavailable as exc:
            self.message_user(request, f"Not released: {exc}", messages.ERROR)
            return HttpResponseRedirect(changelist)
        if not released:
            self.message_user(
                request,
                "Not released: the lock is free or now held by another run; look again below.",
                messages.WARNING,
            )
            return HttpResponseRedirect(changelist)
        holder = token.rsplit(":", 1)[0]
        audit_logger().warning(
            "profile_audit.lock_released_by_operator",
            released_by=user,
            holder=holder,
            run_id=str(holding.id) if holding else None,
            lock=state.where,
        )
        if holding is not None:
            self.log_change(request, holding, f"Released the fixing-run lock held by {holder}")
        self.message_user(
            request,
            f"Released the fixing-run lock held by {holder}. If that run is still alive it "
            "stops before its next organization.",
            messages.SUCCESS,
        )
        return HttpResponseRedirect(changelist)

    def revert_view(self, request: HttpRequest, run_id: uuid.UUID) -> HttpResponse:
        """GET: what a revert of this run would do. POST: revert it (or record a dry run)."""
        if not (self.has_view_permission(request) and self.has_revert_permission(request)):
            raise PermissionDenied
        run = get_object_or_404(AuditRun.objects.select_related("organization"), id=run_id)
        if request.method == "POST":
            return self._revert(request, run, fix=request.POST.get("mode") != "dry_run")
        context = {
            **self.admin_site.each_context(request),
            "title": "Revert this run?",
            "opts": self.model._meta,
            "run": run,
            "scope": self.scope(run),
            "started": moment_html(run.started_at),
            "by_type_table": self.by_type_table(run),
            "blocked": revert_blocker(run=run),
            "run_url": _run_url(run.id),
        }
        return TemplateResponse(
            request, "admin/profiles/auditrun/revert_confirmation.html", context
        )

    def _revert(self, request: HttpRequest, run: AuditRun, *, fix: bool) -> HttpResponse:
        """Record the revert and send it as a task on ``maintenance``: a request never does
        long work. The revert's own page shows its progress."""
        from profiles.tasks import revert_run_task

        try:
            revert = claim_revert(
                run_id=run.id,
                fix=fix,
                requested_by=request.user.get_username(),
                requested_host=request.META.get("REMOTE_ADDR", ""),
            )
        except RevertRejected as exc:
            self.message_user(request, f"Not reverted: {exc}", messages.ERROR)
            return HttpResponseRedirect(_run_url(run.id))
        try:
            revert_run_task.delay(str(revert.id))
        except Exception as exc:
            error = f"the revert task could not be sent: {type(exc).__name__}: {exc}"
            finish_run(revert, status=AuditStatus.FAILED, error=error)  # and frees its lease
            self.message_user(request, f"Not reverted: {error}", messages.ERROR)
            return HttpResponseRedirect(_run_url(revert.id))
        if fix:
            self.log_change(request, run, f"Revert sent as run {revert.id}")
        revert.refresh_from_db()
        if revert.status == AuditStatus.RUNNING:
            text = format_html(
                "{} run {} sent as run {}: this page shows its progress.",
                "Revert of" if fix else "Dry run of a revert of",
                str(run.id)[:8],
                str(revert.id)[:8],
            )
            self.message_user(request, text, messages.SUCCESS)
            return HttpResponseRedirect(_run_url(revert.id))
        # Done already (no broker: tasks run in the request): say what it did.
        put_back, conflicts, failed = revert_outcomes(revert)
        text = format_html(
            "{} {}: {} {}, {} (left alone){}. This is the revert's own run, {}.",
            "Reverted run" if fix else "Dry run of a revert of run",
            str(run.id)[:8],
            put_back,
            "put back" if fix else "would be put back",
            plural(conflicts, "conflict"),
            f", {failed} failed" if failed else "",
            str(revert.id)[:8],
        )
        level = messages.SUCCESS if not conflicts and not failed else messages.WARNING
        self.message_user(request, text, level)
        return HttpResponseRedirect(_run_url(revert.id))


# --- Audit findings -------------------------------------------------------------------------


class CappedCountPaginator(Paginator):
    """Counts at most ``cap`` + 1 rows. The admin counts the filtered list for every page, and
    an exact count of millions of findings costs more than the page itself; past the cap the
    list says "more than" and the operator narrows it with a filter."""

    cap = 10_000

    @cached_property
    def count(self) -> int:
        return self.object_list.order_by()[: self.cap + 1].count()

    @property
    def capped(self) -> bool:
        return self.count > self.cap


class SortableOnlyChangeList(ChangeList):
    """Applies a sort from the URL only for a column in ``sortable_by``: the headers of the others
    are not links, and ``?o=`` must not ask for a sort of every finding stored either."""

    def get_ordering_field(self, field_name):
        if field_name not in self.sortable_by:
            return None
        return super().get_ordering_field(field_name)


@admin.register(AuditFinding)
class AuditFindingAdmin(ReadOnlyAdmin):
    list_display = [
        "seq",
        "run_link",
        "organization",
        "type",
        "outcome_badge",
        "object_link",
        "external_key",
    ]
    list_filter = [
        "type",
        "action",
        FixedFilter,
        "outcome",
        RunFilter,
        OrganizationFilter,
        ObjectIdFilter,
        ExternalIdFilter,
    ]
    list_select_related = ["organization"]
    search_fields = ["=object_id", "=external_id", "=run__id"]
    search_help_text = "An object id, a run id or an external id, exactly."
    show_full_result_count = False
    # Sorting by any other column sorts every finding stored (millions) for one page.
    sortable_by = ["seq", "run_link"]
    paginator = CappedCountPaginator

    def get_changelist(self, request, **kwargs):
        return SortableOnlyChangeList

    def get_list_display(self, request):
        # The External ID stays in view at 1366 px beside the admin's menu and the filters: no
        # action column (each type has one fix; the filter and the finding's page have it), the
        # platform under the external id, and no run column once the list is filtered to one run.
        if request.GET.get(RunFilter.parameter_name):
            return [name for name in self.list_display if name != "run_link"]
        return self.list_display

    fields = [
        "run_link",
        "seq",
        "organization_link",
        "type",
        "action",
        "outcome_badge",
        "detail",
        "drift_link",
        "recurring_text",
        "writers_text",
        "model",
        "object_link",
        "platform",
        "external_id",
        "before_json",
        "after_json",
    ]
    readonly_fields = fields

    def lookup_allowed(self, lookup, value, request=None):
        # A missing profile's drift record links its findings by platform and external id.
        return lookup == "platform" or super().lookup_allowed(lookup, value, request)

    def get_search_results(self, request, queryset, search_term):
        """Exact matches only, each on its own index: an id is an object's or a run's, anything
        else an external id. (Django's default ORs the three fields in one condition, which
        PostgreSQL answers by reading every finding.)"""
        term = search_term.strip()
        if not term:
            return queryset, False
        try:
            value = uuid.UUID(term)
        except ValueError:
            return queryset.filter(external_id=term), False
        return queryset.filter(Q(object_id=value) | Q(run_id=value) | Q(external_id=term)), False

    def get_ordering(self, request):
        # One run's findings in the order the run made them (the (run, seq) index); across
        # runs, the newest run first.
        if request.GET.get(RunFilter.parameter_name):
            return ["run_id", "seq"]
        return ["-run__started_at", "run_id", "seq"]

    @admin.display(description="run", ordering="run_id")
    def run_link(self, finding: AuditFinding) -> str:
        return _link(_run_url(finding.run_id), str(finding.run_id)[:8])

    @admin.display(description="organization")
    def organization_link(self, finding: AuditFinding) -> str:
        if not finding.organization_id:
            return "-"
        url = reverse("admin:orgs_organization_change", args=[finding.organization_id])
        return _link(url, str(finding.organization))

    @admin.display(description="outcome", ordering="outcome")
    def outcome_badge(self, finding: AuditFinding) -> str:
        return format_html("{}{}", _outcome_badge(finding), _drift_mark(finding))

    @admin.display(description="drift record")
    def drift_link(self, finding: AuditFinding) -> str:
        """Its fingerprint's history, with the record's state now (one query)."""
        if finding.drift_id is None:
            return "-"
        record = DriftRecord.objects.filter(id=finding.drift_id).only("id", "state").first()
        if record is None:
            return "gone: pruned after a long quiet period (PROFILE_AUDIT_DRIFT_RETENTION_DAYS)"
        return format_html(
            "{} {}",
            _link(_drift_url(record.id), f"drift record {str(record.id)[:8]}"),
            _drift_state_badge(record),
        )

    @admin.display(description="new or recurring")
    def recurring_text(self, finding: AuditFinding) -> str:
        if finding.drift_id is None:
            return "-"
        if finding.recurring:
            return "recurring: found again after it was fixed or resolved"
        return "new: first found by this run, or open since it was first found"

    @admin.display(description="writers")
    def writers_text(self, finding: AuditFinding) -> str:
        """Who changed the organization before it was found (its change marks' writers)."""
        return _writers_html(finding.writers, empty="none named (no change mark, or no writer tag)")

    @admin.display(description="object")
    def object_link(self, finding: AuditFinding) -> str:
        return _object_link(finding)

    @admin.display(description="external id")
    def external_key(self, finding: AuditFinding) -> str:
        if not finding.external_id:
            return "-"
        return format_html(
            '{}<br><span class="quiet">{}</span>', finding.external_id, finding.platform or "-"
        )

    @admin.display(description="before")
    def before_json(self, finding: AuditFinding) -> str:
        return _pretty_json(finding, "before")

    @admin.display(description="after")
    def after_json(self, finding: AuditFinding) -> str:
        return _pretty_json(finding, "after")

    def get_urls(self):
        return [
            path(
                "<uuid:finding_id>/value/<str:side>/",
                self.admin_site.admin_view(self.value_view),
                name="profiles_auditfinding_value",
            ),
            *super().get_urls(),
        ]

    def value_view(self, request: HttpRequest, finding_id: uuid.UUID, side: str) -> HttpResponse:
        """The whole before or after value of one finding, as JSON (the pages show it cut)."""
        if side not in ("before", "after"):
            raise Http404("a finding has a before and an after value")
        if not self.has_view_permission(request):
            raise PermissionDenied
        finding = get_object_or_404(AuditFinding.objects.only("id", side), id=finding_id)
        return HttpResponse(
            json.dumps(getattr(finding, side), indent=2, sort_keys=True),
            content_type="application/json",
        )


# --- Drift records --------------------------------------------------------------------------


class DriftStateFilter(admin.SimpleListFilter):
    title = "state"
    parameter_name = "state"

    def lookups(self, request, model_admin):
        return [
            *DriftState.choices,
            ("comes_back", "Recurring or fighting"),
        ]

    def queryset(self, request, queryset):
        value = self.value()
        if value == "comes_back":
            return queryset.filter(state__in=run_state.COMES_BACK)
        if value in DriftState.values:
            return queryset.filter(state=value)
        return queryset


class HeldFilter(admin.SimpleListFilter):
    title = "fixing"
    parameter_name = "held"

    def lookups(self, request, model_admin):
        return [("yes", "Held (fights)"), ("no", "Not held")]

    def queryset(self, request, queryset):
        if self.value() == "yes":
            return queryset.filter(held_since__isnull=False)
        if self.value() == "no":
            return queryset.filter(held_since__isnull=True)
        return queryset


class SeenFilter(admin.SimpleListFilter):
    title = "last seen"
    parameter_name = "seen"

    def lookups(self, request, model_admin):
        return [("7d", "In the last 7 days"), ("30d", "In the last 30 days")]

    def queryset(self, request, queryset):
        days = {"7d": 7, "30d": 30}.get(self.value() or "")
        if days is None:
            return queryset
        return queryset.filter(seen_at__gte=timezone.now() - timedelta(days=days))


class WriterFilter(InputFilter):
    """Records a writer is named on: as the one that undid the fix, or among the writers of the
    changes that led to it. ``unknown``: records no writer is named on as the one that undid it."""

    title = "writer"
    parameter_name = "writer"
    placeholder = "writer tag or application"

    def filter_typed(self, queryset, value):
        if value == run_state.UNKNOWN_WRITER:
            return queryset.filter(Q(undone_by="") | Q(undone_by=value))
        # Matched in the JSON text, on both backends (SQLite keeps it ASCII-escaped).
        quoted = json.dumps(value, ensure_ascii=connection.vendor != "postgresql")
        return queryset.filter(Q(undone_by=value) | Q(last_writers__icontains=quoted))


@admin.register(DriftRecord)
class DriftRecordAdmin(ReadOnlyAdmin):
    change_list_template = "admin/profiles/driftrecord/change_list.html"
    change_form_template = "admin/profiles/driftrecord/change_form.html"
    list_display = [
        "last_seen",
        "drift_text",
        "state_badge",
        "counts",
        "undone_by_text",
        "findings_link",
    ]
    list_filter = [
        DriftStateFilter,
        HeldFilter,
        SeenFilter,
        "type",
        OrganizationFilter,
        WriterFilter,
    ]
    list_select_related = ["organization"]
    search_fields = ["=key", "=external_id"]
    search_help_text = "An object id, or a missing profile's external id, exactly."
    show_full_result_count = False
    sortable_by = ["last_seen"]
    paginator = CappedCountPaginator
    actions = ["resume_fixing_selected"]
    fieldsets = [
        (
            None,
            {
                "fields": [
                    "organization_link",
                    "type",
                    "object_text",
                    "key",
                    "state_badge",
                    "fight_text",
                    "findings_link",
                ]
            },
        ),
        (
            "History",
            {
                "fields": [
                    "first_seen_at_text",
                    "last_seen",
                    "times_found_text",
                    "times_fixed",
                    "last_fixed_at_text",
                    "recent_fixes_text",
                    "resolved_at_text",
                ]
            },
        ),
        (
            "Who caused it",
            {"fields": ["undone_text", "last_writers_text"]},
        ),
        ("Fixing held and resumed", {"fields": ["held_since_text", "resumed_text"]}),
    ]
    readonly_fields = [name for _, options in fieldsets for name in options["fields"]]

    def get_changelist(self, request, **kwargs):
        return SortableOnlyChangeList

    def get_search_results(self, request, queryset, search_term):
        term = search_term.strip()
        if not term:
            return queryset, False
        return queryset.filter(Q(key=term) | Q(external_id=term)), False

    def get_ordering(self, request):
        # Last seen as with_sightings() tells it (a method: the admin's checks know fields only).
        return ["-seen_at"]

    def get_queryset(self, request):
        # Times found and last seen with the audits that found it again since it was written.
        # (Not super()'s: it orders before the annotation is there to order on.)
        records = DriftRecord.objects.with_sightings().select_related("organization")
        return records.order_by(*self.get_ordering(request))

    # --- Columns and fields -------------------------------------------------------------

    @admin.display(description="last seen", ordering="seen_at")
    def last_seen(self, record: DriftRecord) -> str:
        return moment_html(record.seen_at)

    @admin.display(description="times found")
    def times_found_text(self, record: DriftRecord) -> str:
        return f"{record.found:,}"

    @admin.display(description="organization")
    def organization_link(self, record: DriftRecord) -> str:
        url = reverse("admin:orgs_organization_change", args=[record.organization_id])
        return _link(url, str(record.organization))

    @admin.display(description="object")
    def object_text(self, record: DriftRecord) -> str:
        if record.object_id is None:
            return f"{record.platform}:{record.external_id}"
        app_label, _, model_name = record.model.partition(".")
        try:
            url = reverse(f"admin:{app_label}_{model_name.lower()}_change", args=[record.object_id])
        except NoReverseMatch:
            return f"{record.model} {record.object_id}"
        return _link(url, f"{model_name} {str(record.object_id)[:8]}")

    @admin.display(description="organization, type, object")
    def drift_text(self, record: DriftRecord) -> str:
        # The fingerprint in one column: the list keeps its findings link in view at 1366 px
        # beside the admin's menu and the filters.
        return format_html(
            '{}<br>{}<br><span class="quiet">{}</span>',
            record.organization,
            record.get_type_display(),
            self.object_text(record),
        )

    @admin.display(description="undone by")
    def undone_by_text(self, record: DriftRecord) -> str:
        """The writer only (the moment on hover, and on the record's page)."""
        if not record.undone_by:
            return "-"
        exact = record.undone_at.isoformat(timespec="seconds") if record.undone_at else ""
        return format_html('<span title="{}">{}</span>', exact, record.undone_by)

    @admin.display(description="state", ordering="state")
    def state_badge(self, record: DriftRecord) -> str:
        return _drift_state_badge(record)

    @admin.display(description="found / fixed")
    def counts(self, record: DriftRecord) -> str:
        return f"{record.found:,} / {record.times_fixed:,}"

    @admin.display(description="undone by")
    def undone_text(self, record: DriftRecord) -> str:
        if not record.undone_by:
            return "-"
        return format_html("{}<br>{}", record.undone_by, moment_html(record.undone_at))

    @admin.display(description="findings")
    def findings_link(self, record: DriftRecord) -> str:
        return _link(drift_findings_url(record), "findings")

    @admin.display(description="fight")
    def fight_text(self, record: DriftRecord) -> str:
        if record.held_since is None:
            return "-"
        return fight_detail(record)

    @admin.display(description="first seen")
    def first_seen_at_text(self, record: DriftRecord) -> str:
        return moment_html(record.first_seen_at)

    @admin.display(description="last fixed")
    def last_fixed_at_text(self, record: DriftRecord) -> str:
        return moment_html(record.last_fixed_at)

    @admin.display(description="resolved")
    def resolved_at_text(self, record: DriftRecord) -> str:
        return moment_html(record.resolved_at)

    @admin.display(description="recent fixes (a fight is judged on them)")
    def recent_fixes_text(self, record: DriftRecord) -> str:
        fixes = [f for f in record.recent_fixes or [] if isinstance(f, dict)]
        if not fixes:
            return "-"
        items = []
        for fix in fixes:
            at = parse_datetime(str(fix.get("at") or ""))
            run = _uuid(fix.get("run"))
            items.append(
                format_html(
                    "<li>{}{}</li>",
                    moment_html(at) if at else "-",
                    format_html(" by run {}", _link(_run_url(run), str(run)[:8])) if run else "",
                )
            )
        return format_html('<ul class="audit-orgs">{}</ul>', SafeString("".join(items)))

    @admin.display(description="writers of the changes that led to it")
    def last_writers_text(self, record: DriftRecord) -> str:
        return _writers_html(record.last_writers, empty="none named")

    @admin.display(description="held since")
    def held_since_text(self, record: DriftRecord) -> str:
        if record.held_since is None:
            return "not held"
        return moment_html(record.held_since)

    @admin.display(description="resumed")
    def resumed_text(self, record: DriftRecord) -> str:
        if not record.resumed_at:
            return "-"
        return format_html("by {} at {}", record.resumed_by or "-", moment_html(record.resumed_at))

    # --- This week, and the fights ---------------------------------------------------------

    def has_resume_fixing_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("profiles.resume_fixing_driftrecord")

    def changelist_view(self, request, extra_context=None):
        changelist = reverse("admin:profiles_driftrecord_changelist")
        fights = list(
            run_state.fights()
            .select_related("organization")
            .order_by("-held_since", "id")[: FIGHTS_SHOWN + 1]
        )
        shown = fights[:FIGHTS_SHOWN]

        def filtered(**params: str) -> str:
            return f"{changelist}?" + urlencode({"state": "comes_back", "seen": "7d", **params})

        context = {
            "by_organization": [
                (org, n, filtered(organization=org.id))
                for org, n in run_state.recurring_drift_by_organization(limit=DRIFT_TOP)
            ],
            "by_writer": [
                (writer, n, filtered(writer=writer))
                for writer, n in list(run_state.recurring_drift_by_writer().items())[:DRIFT_TOP]
            ],
            "fights": [
                {
                    "record": record,
                    "url": _drift_url(record.id),
                    "held_since": moment_html(record.held_since),
                    "detail": fight_detail(record),
                    "findings_url": drift_findings_url(record),
                }
                for record in shown
            ],
            "fights_more": len(fights) > FIGHTS_SHOWN,
            "fights_url": f"{changelist}?held=yes",
            "can_resume": self.has_resume_fixing_permission(request),
            "resume_url": reverse("admin:profiles_driftrecord_resume"),
            **(extra_context or {}),
        }
        return super().changelist_view(request, extra_context=context)

    def render_change_form(self, request, context, add=False, change=False, form_url="", obj=None):
        if obj is not None:
            context["can_resume"] = (
                self.has_resume_fixing_permission(request) and obj.held_since is not None
            )
            context["resume_url"] = reverse("admin:profiles_driftrecord_resume")
        return super().render_change_form(request, context, add, change, form_url, obj)

    def get_urls(self):
        return [
            path(
                "resume/",
                self.admin_site.admin_view(self.resume_view),
                name="profiles_driftrecord_resume",
            ),
            *super().get_urls(),
        ]

    # --- Resume fixing: an action and a button, both through one confirmation page ---------

    @admin.action(description="Resume fixing of the selected fights", permissions=["resume_fixing"])
    def resume_fixing_selected(self, request: HttpRequest, queryset: QuerySet[DriftRecord]):
        ids = list(
            queryset.filter(held_since__isnull=False).values_list("id", flat=True)[
                : RESUME_AT_MOST + 1
            ]
        )
        if not ids:
            self.message_user(request, "None of the selected records is held.", messages.WARNING)
            return None
        if len(ids) > RESUME_AT_MOST:
            self.message_user(
                request,
                f"Select at most {RESUME_AT_MOST} fights at a time.",
                messages.ERROR,
            )
            return None
        return self._confirm_resume(request, ids)

    def resume_view(self, request: HttpRequest) -> HttpResponse:
        """POST: ask, then resume fixing of the records named (those still held)."""
        changelist = reverse("admin:profiles_driftrecord_changelist")
        if request.method != "POST":
            return HttpResponseRedirect(changelist)
        if not (self.has_view_permission(request) and self.has_resume_fixing_permission(request)):
            raise PermissionDenied
        ids = [i for i in (_uuid(v) for v in request.POST.get("ids", "").split(",")) if i]
        if not ids or len(ids) > RESUME_AT_MOST:
            self.message_user(request, "Not resumed: no fight named.", messages.ERROR)
            return HttpResponseRedirect(changelist)
        if request.POST.get("confirmed") != "yes":
            return self._confirm_resume(request, ids)
        user = request.user.get_username()
        held = list(
            DriftRecord.objects.filter(id__in=ids, held_since__isnull=False).select_related(
                "organization"
            )
        )
        resumed = resume_fixing(DriftRecord.objects.filter(id__in=[r.id for r in held]), by=user)
        if not resumed:
            self.message_user(
                request, "Not resumed: none of them is held any more.", messages.WARNING
            )
            return HttpResponseRedirect(changelist)
        for record in held:
            self.log_change(
                request,
                record,
                f"Resumed fixing (held since {moment(record.held_since)}, "
                f"undone by {record.undone_by or 'a writer not named'})",
            )
        audit_logger().info(
            "profile_audit.drift_fixing_resumed",
            resumed_by=user,
            records=resumed,
            drift_ids=[str(r.id) for r in held],
            org_ids=sorted({str(r.organization_id) for r in held}),
        )
        self.message_user(
            request,
            f"Resumed fixing of {plural(resumed, 'drift record')}: the next fixing run fixes "
            f"{'it' if resumed == 1 else 'them'} again, and a fight is judged afresh.",
            messages.SUCCESS,
        )
        if len(held) == 1:
            return HttpResponseRedirect(_drift_url(held[0].id))
        return HttpResponseRedirect(changelist)

    def _confirm_resume(self, request: HttpRequest, ids: list[uuid.UUID]) -> HttpResponse:
        records = list(
            DriftRecord.objects.filter(id__in=ids, held_since__isnull=False)
            .select_related("organization")
            .order_by("-held_since", "id")[:20]
        )
        lines = [
            f"{record.organization}: {record.get_type_display()} {record.key} — "
            f"{fight_detail(record)}"
            for record in records
        ]
        if len(ids) > len(records):
            lines.append(f"… {plural(len(ids), 'record')} selected in all.")
        one = len(ids) == 1
        lines += [
            f"Resuming lets the next fixing run fix {'it' if one else 'them'} again. If the "
            f"other writer still undoes the fix, {'it is' if one else 'they are'} held again "
            f"after {settings.PROFILE_AUDIT_FIGHT_FIXES} more fixes within the window "
            "(PROFILE_AUDIT_FIGHT_FIXES, PROFILE_AUDIT_FIGHT_WINDOW): stop or correct that "
            "writer first.",
        ]
        return self._confirm(
            request,
            title="Resume fixing?",
            action_url=reverse("admin:profiles_driftrecord_resume"),
            fields={"ids": ",".join(str(i) for i in ids)},
            lines=lines,
            button="Yes, resume fixing",
            button_id="confirm-resume-fixing",
        )


# --- Rendering helpers ----------------------------------------------------------------------


def _run_url(run_id: uuid.UUID) -> str:
    return reverse("admin:profiles_auditrun_change", args=[run_id])


def _uuid(value: object) -> uuid.UUID | None:
    try:
        return uuid.UUID(str(value).strip())
    except ValueError:
        return None


def _drift_url(record_id: uuid.UUID) -> str:
    return reverse("admin:profiles_driftrecord_change", args=[record_id])


def drift_findings_url(record: DriftRecord) -> str:
    """The findings of a drift record, on indexed columns: its organization, type and object id,
    or platform and external id for a missing profile."""
    params: dict[str, Any] = {"organization": record.organization_id, "type__exact": record.type}
    if record.object_id is not None:
        params["object_id"] = record.object_id
    else:
        params.update(platform=record.platform, external_id=record.external_id)
    return reverse("admin:profiles_auditfinding_changelist") + "?" + urlencode(params)


def _drift_state_badge(record: DriftRecord) -> str:
    return _badge(
        record.state,
        DRIFT_STATE_COLOURS.get(record.state, "#757575"),
        title=record.get_state_display(),
    )


def _drift_mark(finding: AuditFinding) -> str:
    """Under a finding's outcome: new or recurring, linking to its drift record."""
    if finding.drift_id is None:
        return ""
    return format_html(
        '<br><a class="audit-drift quiet" href="{}" title="Its drift record">{}</a>',
        _drift_url(finding.drift_id),
        "recurring" if finding.recurring else "new",
    )


def _writers_html(writers: object, *, empty: str, compact: bool = False) -> str:
    """Writers as the marks name them, newest first: the tag (else the application) and when;
    the application beside a tag (``compact``: on hover, for the run page's narrow column)."""
    entries = [e for e in writers or [] if isinstance(e, dict)] if isinstance(writers, list) else []
    if not entries:
        return empty
    rows = []
    for entry in reversed(entries):
        application = entry.get("application_name") if entry.get("writer") else None
        at = moment(parse_datetime(str(entry.get("at") or "")))
        if compact:
            rows.append(
                format_html(
                    '<li title="{}"><span class="writer">{}</span><br>'
                    '<span class="quiet">{}</span></li>',
                    f"application {application}" if application else "",
                    writer_name(entry),
                    at,
                )
            )
        else:
            rows.append(
                format_html(
                    '<li><span class="writer">{}</span> <span class="quiet">{}{}</span></li>',
                    writer_name(entry),
                    at,
                    format_html(", application {}", application) if application else "",
                )
            )
    return format_html('<ul class="audit-writers">{}</ul>', SafeString("".join(rows)))


def _link(url: str, text: str) -> str:
    return format_html('<a href="{}">{}</a>', url, text)


def _badge(label: str, colour: str, *, title: str = "") -> str:
    return format_html(
        '<span class="audit-badge" title="{}" style="background:{};color:#fff;padding:1px 7px;'
        'border-radius:9px;white-space:nowrap">{}</span>',
        title or label,
        colour,
        label,
    )


def _outcome_badge(finding: AuditFinding) -> str:
    return _badge(finding.outcome, OUTCOME_COLOURS.get(finding.outcome, "#757575"))


def _object_link(finding: AuditFinding) -> str:
    """The object's own admin page; a missing profile (no id yet): the profiles of its key."""
    app_label, _, model_name = finding.model.partition(".")
    if finding.object_id is None:
        url = reverse("admin:profiles_socialprofile_changelist")
        query = urlencode({"q": finding.external_id})
        return _link(f"{url}?{query}", f"{finding.platform}:{finding.external_id}")
    try:
        url = reverse(f"admin:{app_label}_{model_name.lower()}_change", args=[finding.object_id])
    except NoReverseMatch:
        return f"{finding.model} {finding.object_id}"
    return _link(url, f"{model_name} {str(finding.object_id)[:8]}")


def _organization_range(first: uuid.UUID | None, end: uuid.UUID | None) -> str:
    return format_html(
        '<span class="line">from {}</span><br><span class="line">to {}</span>',
        format_html("<code>{}</code>", first) if first else "the first organization",
        format_html("<code>{}</code>", end) if end else "the last organization",
    )


def _shard_problem(shard) -> str:
    parts = []
    if shard.error:
        parts.append(shard.error.strip().splitlines()[0][:200])
    if shard.failed_organizations:
        parts.append(plural(len(shard.failed_organizations), "organization") + " failed")
    return "; ".join(parts) or "-"


def _value_url(finding: AuditFinding, side: str) -> str:
    return reverse("admin:profiles_auditfinding_value", args=[finding.id, side])


def _size(chars: int) -> str:
    if chars >= 1_000_000:
        return f"{chars / 1_000_000:.1f} MB"
    if chars >= 1_000:
        return f"{chars / 1_000:.0f} kB"
    return f"{chars} characters"


def _cut(text: str, *, limit: int, url: str) -> str:
    """``text`` as it is when short; else its first ``limit`` characters and a link to the
    whole value (the value's size in the link)."""
    if len(text) <= limit:
        return text
    return format_html(
        '{}… <a class="audit-whole-value" href="{}">whole value ({})</a>',
        text[:limit],
        url,
        _size(len(text)),
    )


def _pretty_json(finding: AuditFinding, side: str) -> str:
    value = getattr(finding, side)
    if value is None:
        return "-"
    text = json.dumps(value, indent=2, sort_keys=True)
    return format_html(
        '<pre class="audit-json">{}</pre>',
        _cut(text, limit=VALUE_SHOWN_CHARS_DETAIL, url=_value_url(finding, side)),
    )


def _compact_json(finding: AuditFinding, side: str) -> str:
    """One line of JSON, from the head the database cut (``run_findings_page``): whole and
    with sorted keys when short, else cut with a link to the whole value."""
    head, chars = getattr(finding, f"{side}_head"), getattr(finding, f"{side}_chars")
    if head is None:
        return ""
    if chars <= VALUE_SHOWN_CHARS:
        try:
            return json.dumps(json.loads(head), sort_keys=True, separators=(", ", ": "))
        except ValueError:
            return head
    return format_html(
        '{}… <a class="audit-whole-value" href="{}">whole value ({})</a>',
        head,
        _value_url(finding, side),
        _size(chars),
    )


def _finding_row(finding: AuditFinding) -> dict[str, Any]:
    """One row of the run page's findings table: everything from the row itself (and its
    organization, joined), so a page costs no query per row."""
    return {
        "seq": finding.seq,
        "url": reverse("admin:profiles_auditfinding_change", args=[finding.id]),
        "organization": finding.organization.name if finding.organization_id else "-",
        "type": finding.get_type_display(),
        "action": finding.get_action_display(),
        "outcome": format_html("{}{}", _outcome_badge(finding), _drift_mark(finding)),
        "writers": _writers_html(finding.writers, empty="", compact=True),
        "object": _object_link(finding),
        "before": _compact_json(finding, "before"),
        "after": _compact_json(finding, "after"),
        "detail": finding.detail,
    }
