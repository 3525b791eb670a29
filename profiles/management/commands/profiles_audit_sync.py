"""``profiles_audit_sync``: audit profiles against connections and selected assets; fix on request."""

from __future__ import annotations

import json
import sys
import uuid

from django.core.management.base import BaseCommand, CommandError

from orgs.models import Organization
from profiles.models import AuditFinding, AuditStatus, AuditTrigger
from profiles.plan import ALL_TYPES, SCOPES
from profiles.services.audit import RunReport
from profiles.services.locked_run import run_locked_audit
from profiles.services.run_lock import RunLockUnavailable

LIST_ORGS_HINT = "list them with `python manage.py list_organizations`"
# sysexits.h EX_TEMPFAIL: another fixing run holds the lock; nothing was changed, try later.
EXIT_LOCK_HELD = 75


class Command(BaseCommand):
    help = (
        "Find inconsistencies between platform connections, selected assets, social profiles, "
        "queue settings and boost rules. A dry run (the default) reports the plan and changes "
        "nothing; --fix applies it. Every run is recorded (admin: Audit runs)."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--fix",
            action="store_true",
            help="Apply the fixes. Without it, nothing in the domain tables is changed. A fixing "
            "run takes the fixing-run lock (Redis, or a file without REDIS_URL): if another "
            "run holds it, nothing is changed, the run is recorded as skipped and the exit "
            f"status is {EXIT_LOCK_HELD}; if Redis does not answer, nothing is changed and the "
            "exit status is 1.",
        )
        parser.add_argument(
            "--org",
            metavar="UUID",
            help=f"Audit only this organization (its id; {LIST_ORGS_HINT}).",
        )
        parser.add_argument(
            "--type",
            dest="scopes",
            action="append",
            choices=list(SCOPES),
            help="Only this kind of finding; repeat for several (cleanup = stale queue "
            "settings and invalid boost rule references). Default: all.",
        )
        parser.add_argument(
            "--format",
            dest="output_format",
            choices=["text", "json"],
            default="text",
            help="text (a table, the default) or json (one object on stdout).",
        )
        parser.add_argument(
            "--force",
            action="store_true",
            help="Override the mass-deletion guard (fix organizations even when the plan "
            "would soft-delete more than the guard allows).",
        )
        parser.add_argument(
            "--check",
            action="store_true",
            help="For monitoring: exit with status 1 when issues remain (found by a dry run, "
            "or left unfixed by --fix) or the run is partial.",
        )

    def handle(
        self, *args, fix, org, scopes, output_format, force, check, verbosity, **options
    ) -> None:
        org_id = self._organization_id(org)
        progress = Progress(self.stderr) if org_id is None and _interactive(self.stderr) else None
        try:
            report = run_locked_audit(
                org_id=org_id,
                fix=fix,
                scopes=scopes,
                force=force,
                trigger=AuditTrigger.COMMAND,
                progress=progress,
            )
        except RunLockUnavailable as exc:
            raise CommandError(str(exc)) from exc
        except Exception as exc:
            raise CommandError(f"audit failed: {type(exc).__name__}: {exc}") from exc
        if progress:
            progress.done()

        if output_format == "json":
            self.stdout.write(json.dumps(report.as_json()))
        if report.run.status == AuditStatus.SKIPPED:
            self.stderr.write(
                f"skipped: {report.run.error}; nothing was changed "
                f"(run {report.run.id} recorded as skipped)"
            )
            sys.exit(EXIT_LOCK_HELD)
        if output_format != "json" and verbosity > 0:
            self._write_text(report, verbosity=verbosity)
        if check and _issues_remain(report):
            self.stderr.write("issues remain (--check)")
            sys.exit(1)

    def _organization_id(self, value: str | None) -> uuid.UUID | None:
        if value is None:
            return None
        try:
            org_id = uuid.UUID(value)
        except ValueError:
            raise CommandError(
                f"--org {value!r} is not an organization id (a UUID); {LIST_ORGS_HINT}"
            ) from None
        if not Organization.objects.filter(id=org_id).exists():
            raise CommandError(f"no organization with id {org_id}; {LIST_ORGS_HINT}")
        return org_id

    # --- Text report -------------------------------------------------------------------------

    def _write_text(self, report: RunReport, *, verbosity: int) -> None:
        run = report.run
        out = self.stdout
        scope = (
            f"organization {run.organization_id}" if run.organization_id else "all organizations"
        )
        mode = "fix" if run.fix else "dry run"
        out.write(
            self.style.MIGRATE_HEADING(
                f"Profile-connection sync audit: {mode}, {scope} "
                f"({run.organizations_audited} audited)"
            )
        )
        if not run.fix:
            out.write("Nothing was changed; run with --fix to apply the plan.")
        out.write("")
        out.write(f"  {'type':<22}{'found':>7}{'fixed':>7}")
        for finding_type in ALL_TYPES:
            counts = run.by_type[finding_type]
            fixed = counts["fixed"] if run.fix else "-"
            out.write(f"  {finding_type.value:<22}{counts['found']:>7}{fixed:>7}")
        total_fixed = run.fixed if run.fix else "-"
        out.write(self.style.MIGRATE_LABEL(f"  {'total':<22}{run.found:>7}{total_fixed:>7}"))
        out.write("")

        if verbosity >= 2 and report.findings_recorded:
            self._write_findings(run.id)

        for org in report.organizations:
            if org.guarded:
                out.write(
                    self.style.WARNING(
                        f"Guarded: organization {org.organization_id} — the plan would "
                        "soft-delete too many of its profiles; nothing fixed there "
                        "(--force overrides)."
                    )
                )
            if org.error:
                out.write(
                    self.style.ERROR(f"Failed: organization {org.organization_id}: {org.error}")
                )
        status_style = {
            AuditStatus.SUCCEEDED: self.style.SUCCESS,
            AuditStatus.PARTIAL: self.style.WARNING,
        }.get(run.status, self.style.ERROR)
        out.write(f"Run {run.id} · {status_style(run.status)} · {run.duration_seconds:.2f} s")

    def _write_findings(self, run_id: uuid.UUID) -> None:
        self.stdout.write("  Findings:")
        rows = (
            AuditFinding.objects.filter(run_id=run_id)
            .order_by("seq")
            .values_list(
                "organization_id",
                "type",
                "action",
                "object_id",
                "platform",
                "external_id",
                "outcome",
                "detail",
            )
        )
        for (
            org_id,
            type_,
            action,
            object_id,
            platform,
            external_id,
            outcome,
            detail,
        ) in rows.iterator(chunk_size=2000):
            key = f"{platform}:{external_id}" if platform else ""
            line = (
                f"  {type_:<20} {action:<14} {outcome:<8} org={org_id} obj={object_id or '-'} {key}"
            )
            self.stdout.write(line + (f"  ({detail})" if detail else ""))
        self.stdout.write("")


def _issues_remain(report: RunReport) -> bool:
    run = report.run
    return run.status != AuditStatus.SUCCEEDED or run.found > run.fixed


def _interactive(stream) -> bool:
    isatty = getattr(getattr(stream, "_out", stream), "isatty", None)
    return bool(isatty and isatty())


class Progress:
    """A one-line progress indicator on stderr, for all-organization runs at a terminal."""

    def __init__(self, stream) -> None:
        self.stream = stream

    def __call__(self, done: int, total: int) -> None:
        self.stream.write(f"\raudited {done}/{total} organizations", ending="")
        self.stream.flush()

    def done(self) -> None:
        self.stream.write("")
