"""``profiles_audit_sync``: audit profiles against connections and selected assets; fix on request."""

from __future__ import annotations

import getpass
import importlib.metadata
import json
import time
import uuid

from django.conf import settings
from django.core.management.base import CommandError
from django.db import InterfaceError, OperationalError
from django.db import connection as db_connection

from orgs.models import Organization
from profiles.management.base import EXIT_CHECK, EXIT_FAILED, EXIT_LOCK_HELD, AuditCommand
from profiles.models import (
    OPEN_SHARD_STATUSES,
    AuditFinding,
    AuditStatus,
    AuditTrigger,
    FindingOutcome,
)
from profiles.plan import ALL_TYPES, SCOPES
from profiles.selectors import FINDING_CHANGE_FIELDS
from profiles.services.audit import (
    AuditRequest,
    NoRun,
    RunReport,
    resend_shards,
    run_audit,
    send_shards,
    start_change_run,
    start_run,
    sync_sent,
)
from profiles.services.revert import RevertLockHeld, RevertRejected, RevertReport, revert_run
from profiles.services.run_lock import RunLockUnavailable
from profiles.services.runs import cut_short, stale_shards

# The shape of --format json; raised when a field changes meaning or goes away.
JSON_SCHEMA_VERSION = 1
# --fan-out: how often the command looks at the run's record.
POLL_SECONDS = 0.5
WORKER_HINT = "start one with: celery -A audit_project worker -Q maintenance,celery"


class Command(AuditCommand):
    help = (
        "Find inconsistencies between platform connections, selected assets, social profiles, "
        "queue settings and boost rules. A dry run (the default) reports the plan and changes "
        "nothing; --fix applies it. --revert RUN_ID puts back what a fixing run changed. "
        "Every run is recorded (admin: Audit runs)."
    )

    def get_version(self) -> str:
        """``--version``: this project's version (Django's own is in ``django-admin version``)."""
        try:
            return importlib.metadata.version("profile-sync-audit")
        except importlib.metadata.PackageNotFoundError:
            return "unknown (the project is not installed: pip install -e .)"

    def add_arguments(self, parser):
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help="Report the plan and change nothing: the default, spelled out. Not with --fix.",
        )
        parser.add_argument(
            "--fix",
            action="store_true",
            help="Apply the fixes. Without it, nothing in the domain tables is changed. A fixing "
            "run takes the fixing-run lease (the Redis lock, or a file without REDIS_URL, and "
            "its epoch in the database): if another run holds it, nothing is changed, the run "
            f"is recorded as skipped and the exit status is {EXIT_LOCK_HELD}; if Redis or the "
            f"database does not answer, nothing is changed and the exit status is {EXIT_FAILED}.",
        )
        self.add_organization_argument(parser, help="Audit only this organization (its id)")
        parser.add_argument(
            "--type",
            dest="scopes",
            action="append",
            choices=list(SCOPES),
            help="Only this kind of finding; repeat for several (cleanup = stale queue "
            "settings and invalid boost rule references). Default: all.",
        )
        self.add_format_argument(parser)
        parser.add_argument(
            "--force",
            action="store_true",
            help="Override the mass-deletion guard (fix organizations even when the plan "
            "would soft-delete more than the guard allows).",
        )
        parser.add_argument(
            "--revert",
            metavar="RUN_ID",
            help="Put back what this fixing run changed, finding by finding, where the object "
            "is still as the run left it (the rest is reported as a conflict). With --fix it is "
            "applied; without, a dry run shows what would be put back. Recorded as a run.",
        )
        parser.add_argument(
            "--fan-out",
            action="store_true",
            help="Send the run's shards to the Celery workers on the `maintenance` queue "
            "instead of working them in this process; wait for them with progress and print "
            "the same report. Without a broker (no REDIS_URL) the shards run here anyway.",
        )
        parser.add_argument(
            "--changed",
            action="store_true",
            help="Audit only what changed: the organizations written to since they were last "
            "audited (the database triggers' change marks) and those whose last fixing audit "
            "left something not done. Recorded with trigger `changes`; with nothing to audit, "
            "no run is recorded. Not with --org.",
        )
        parser.add_argument(
            "--check",
            action="store_true",
            help="For monitoring: exit with status 1 when issues remain (found by a dry run, "
            "or left unfixed by --fix) or the run is partial.",
        )

    def handle(self, *args, fix, dry_run, revert, **options) -> None:
        if fix and dry_run:
            raise CommandError(
                "--dry-run and --fix contradict each other; drop one (a dry run is the default)",
                returncode=EXIT_FAILED,
            )
        if revert is not None:
            self._handle_revert(revert, fix=fix, **options)
        else:
            self._handle_audit(fix=fix, **options)

    def _handle_revert(
        self, run_id: str, *, fix, org, scopes, force, fan_out, check, output_format, verbosity, **_
    ) -> None:
        self._reject_with_revert(org=org, scopes=scopes, force=force, fan_out=fan_out)
        report = self._revert(run_id, fix=fix)
        self._write_revert(report, output_format=output_format, verbosity=verbosity)
        if check and report.run.status != AuditStatus.SUCCEEDED:
            raise CommandError("conflicts remain (--check)", returncode=EXIT_CHECK)

    def _handle_audit(
        self, *, fix, org, scopes, output_format, force, check, verbosity, fan_out, changed, **_
    ) -> None:
        if changed and org:
            raise CommandError(
                "--changed audits the organizations that changed; drop --org (or --changed)",
                returncode=EXIT_FAILED,
            )
        request = AuditRequest(
            changed=changed,
            fix=fix,
            organization_id=self.organization_id(org),
            scopes=tuple(scopes or ()),
            force=force,
            trigger=AuditTrigger.COMMAND,
            requested_by=_os_user(),
        )
        interactive = request.organization_id is None and _interactive(self.stderr)
        progress = Progress(self.stderr) if interactive else None
        try:
            if fan_out:
                report = self._fan_out(request, progress)
            else:
                report = run_audit(request, progress=progress)
        except CommandError:
            raise
        except RunLockUnavailable as exc:
            raise CommandError(str(exc), returncode=EXIT_FAILED) from exc
        except Exception as exc:
            raise CommandError(
                f"audit failed: {type(exc).__name__}: {exc}", returncode=EXIT_FAILED
            ) from exc
        if progress:
            progress.done()
        if isinstance(report, NoRun):
            self._write_no_run(report, output_format=output_format, verbosity=verbosity)
            return

        run = report.run
        if output_format == "json":
            document = {"schema_version": JSON_SCHEMA_VERSION, **report.as_json()}
            if verbosity >= 2:
                document["findings"] = list(_findings_json(run.id))
            self.stdout.write(json.dumps(document))
        if run.status == AuditStatus.SKIPPED:
            raise CommandError(
                f"skipped: {run.error}; nothing was changed (run {run.id} recorded as skipped)",
                returncode=EXIT_LOCK_HELD,
            )
        if output_format != "json" and verbosity > 0:
            self._write_text(report, verbosity=verbosity)
        if reason := cut_short(run):
            raise CommandError(
                f"run {run.id} was cut short ({run.status}): {reason}. It audited "
                f"{run.organizations_audited} of {run.organizations_total or '?'} organizations"
                + (
                    f" and committed {run.fixed} fixes, recorded with the run (undo them with "
                    f"--revert {run.id} --fix)"
                    if run.fix
                    else ""
                ),
                returncode=EXIT_FAILED,
            )
        if check and _issues_remain(report):
            raise CommandError("issues remain (--check)", returncode=EXIT_CHECK)

    def _write_no_run(self, report: NoRun, *, output_format: str, verbosity: int) -> None:
        if output_format == "json":
            self.stdout.write(
                json.dumps({"schema_version": JSON_SCHEMA_VERSION, **report.as_json()})
            )
        elif verbosity > 0:
            self.stdout.write(f"Nothing audited: {report.reason}; no run recorded.")

    def _fan_out(self, request: AuditRequest, progress: Progress | None) -> RunReport | NoRun:
        """Start the run, send its shards to the workers, and wait for whoever finishes it.

        Shards are durable in the database, their messages are not: after
        PROFILE_AUDIT_SHARD_STALE_AFTER without progress the open shards are sent again; after
        as long again, the command says what it saw and exits 2 (the run stays open for the
        workers). A database that stops answering is waited out for as long."""
        started = start_change_run(request) if request.changed else start_run(request)
        if isinstance(started, NoRun):
            return started
        run = started
        if run.status != AuditStatus.RUNNING:
            return RunReport(run)
        send_shards(run)
        stale = settings.PROFILE_AUDIT_SHARD_STALE_AFTER
        last_done, idle_since, resent_at = -1, time.monotonic(), None
        while True:
            try:
                run.refresh_from_db()
                if run.status != AuditStatus.RUNNING:
                    return RunReport(run)
                if progress:
                    progress(run.organizations_audited, run.organizations_total or 0)
                if run.organizations_audited != last_done:
                    last_done, idle_since = run.organizations_audited, time.monotonic()
                elif time.monotonic() - idle_since > stale:
                    if resent_at is not None:
                        raise CommandError(_stalled(run, stale=stale), returncode=EXIT_FAILED)
                    resent_at = time.monotonic()
                    idle_since = resent_at
                    sent = resend_shards(run, stale_shards(run))
                    self.stderr.write(
                        f"no progress for {stale:g} s on run {run.id}: sent its {sent} open "
                        f"shards again (their messages may be lost); is a worker taking tasks "
                        f"from the maintenance queue? {WORKER_HINT}"
                    )
            except (OperationalError, InterfaceError) as exc:
                # The run goes on in the workers; read its record again when the database is back.
                db_connection.close()
                if time.monotonic() - idle_since > stale:
                    raise CommandError(
                        f"cannot read run {run.id} from the database for {stale:g} s "
                        f"({type(exc).__name__}); the run may still finish in the workers: "
                        f"see its record in the admin or --format json later",
                        returncode=EXIT_FAILED,
                    ) from exc
            time.sleep(POLL_SECONDS)

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
        # A fix's missing profiles are sent to the sync job: fixed only once they exist.
        sent_header = f"{'sync sent':>11}" if run.fix else ""
        out.write(f"  {'type':<22}{'found':>7}{'fixed':>7}{sent_header}")
        for finding_type in ALL_TYPES:
            counts = run.by_type[finding_type]
            fixed = counts["fixed"] if run.fix else "-"
            sent = f"{counts.get('sync_sent', ''):>11}" if run.fix else ""
            out.write(f"  {finding_type.value:<22}{counts['found']:>7}{fixed:>7}{sent}")
        total_fixed = run.fixed if run.fix else "-"
        sync_sent = _sync_sent(run)
        total_sent = f"{sync_sent:>11}" if run.fix else ""
        out.write(
            self.style.MIGRATE_LABEL(f"  {'total':<22}{run.found:>7}{total_fixed:>7}{total_sent}")
        )
        out.write("")
        if sync_sent:
            out.write(
                f"{sync_sent} missing profiles were sent to the sync job and are not created "
                "yet: each counts as fixed once its profile exists (the job confirms it, or "
                "the next fixing audit sees it)."
            )
            out.write("")

        if verbosity >= 2 and report.findings_recorded:
            self._write_findings(run.id)

        flagged = [o for o in report.organizations if o.guarded or o.held or o.error]
        names = _organization_names(o.organization_id for o in flagged)
        for org in flagged:
            label = f"{org.organization_id} ({names.get(org.organization_id, 'deleted')})"
            if org.guarded:
                out.write(
                    self.style.WARNING(
                        f"Guarded: organization {label} — the plan would "
                        "soft-delete too many of its profiles; nothing fixed there "
                        "(--force overrides)."
                    )
                )
            if org.held:
                out.write(
                    self.style.WARNING(
                        f"Held: organization {label} — {org.held} findings fight another "
                        "writer (fixed too often lately); left alone until resumed in the "
                        "admin (Drift records → Resume fixing)."
                    )
                )
            if org.error:
                out.write(self.style.ERROR(f"Failed: organization {label}: {org.error}"))
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
                "organization__name",
                "type",
                "action",
                "object_id",
                "platform",
                "external_id",
                "outcome",
                "detail",
                "recurring",
            )
        )
        for (
            org_id,
            org_name,
            type_,
            action,
            object_id,
            platform,
            external_id,
            outcome,
            detail,
            recurring,
        ) in rows.iterator(chunk_size=2000):
            key = f"{platform}:{external_id}" if platform else ""
            seen = "recurring" if recurring else "new"
            line = (
                f"  {type_:<20} {action:<14} {outcome:<8} {seen:<9} org={org_id} ({org_name}) "
                f"obj={object_id or '-'} {key}"
            )
            self.stdout.write(line + (f"  ({detail})" if detail else ""))
        self.stdout.write("")

    # --- Revert -------------------------------------------------------------------------------

    def _reject_with_revert(self, *, org, scopes, force, fan_out) -> None:
        given = [
            flag
            for flag, value in (
                ("--org", org),
                ("--type", scopes),
                ("--force", force),
                ("--fan-out", fan_out),
            )
            if value
        ]
        if given:
            raise CommandError(
                f"--revert puts back a whole run and takes no {', '.join(given)}; drop "
                f"{'it' if len(given) == 1 else 'them'} (add --fix to apply the revert)",
                returncode=EXIT_FAILED,
            )

    def _revert(self, run_id: str, *, fix: bool) -> RevertReport:
        try:
            return revert_run(run_id=run_id, fix=fix, source="command", requested_by=_os_user())
        except RevertLockHeld as exc:
            raise CommandError(str(exc), returncode=EXIT_LOCK_HELD) from None
        except RevertRejected as exc:
            raise CommandError(str(exc), returncode=EXIT_FAILED) from None
        except Exception as exc:
            raise CommandError(
                f"revert failed: {type(exc).__name__}: {exc}", returncode=EXIT_FAILED
            ) from exc

    def _write_revert(self, report: RevertReport, *, output_format: str, verbosity: int) -> None:
        if output_format == "json":
            self.stdout.write(
                json.dumps({"schema_version": JSON_SCHEMA_VERSION, **report.as_json()})
            )
            return
        if verbosity == 0:
            return
        run, out = report.run, self.stdout
        mode = "revert" if run.fix else "dry run of a revert"
        out.write(
            self.style.MIGRATE_HEADING(
                f"Profile-connection sync audit: {mode} of run {report.reverted_run.id}"
            )
        )
        if not run.fix:
            out.write("Nothing was changed; run with --fix to put these back.")
        out.write("")
        verb = "put back" if run.fix else "would put back"
        # A dry run puts nothing back: its per-type counts are the run's, the summary says more.
        out.write(f"  {'type':<22}{'fixed by the run':>18}" + (f"{verb:>12}" if run.fix else ""))
        for finding_type, counts in run.by_type.items():
            if counts["found"]:
                put_back = f"{counts['fixed']:>12}" if run.fix else ""
                out.write(f"  {finding_type:<22}{counts['found']:>18}{put_back}")
        out.write("")
        summary = f"{report.put_back} {verb}, {report.conflicts} conflicts (left alone)"
        if report.failed:
            summary += f", {report.failed} failed"
        out.write(summary)
        if report.conflicts and verbosity >= 2:
            self._write_conflicts(run.id)
        elif report.conflicts:
            out.write("  -v 2 lists the conflicts; so does the run's page in the admin.")
        status_style = {
            AuditStatus.SUCCEEDED: self.style.SUCCESS,
            AuditStatus.PARTIAL: self.style.WARNING,
        }.get(run.status, self.style.ERROR)
        out.write(f"Run {run.id} · {status_style(run.status)} · {run.duration_seconds:.2f} s")

    def _write_conflicts(self, run_id: uuid.UUID) -> None:
        rows = (
            AuditFinding.objects.filter(run_id=run_id, outcome=FindingOutcome.CONFLICT)
            .order_by("seq")
            .values_list("type", "model", "object_id", "detail")
        )
        for type_, model, object_id, detail in rows.iterator(chunk_size=2000):
            self.stdout.write(f"  conflict {type_:<20} {model} {object_id or '-'}: {detail}")


def _stalled(run, *, stale: float) -> str:
    shards = list(
        run.shards.filter(status__in=OPEN_SHARD_STATUSES)
        .order_by("index")
        .values_list("index", "status", "attempts")
    )
    seen = ", ".join(f"shard {i} {status} ({n} died)" for i, status, n in shards[:5])
    more = f" and {len(shards) - 5} more" if len(shards) > 5 else ""
    return (
        f"no progress for {2 * stale:g} s on run {run.id}, its open shards sent again "
        f"{stale:g} s ago: {run.organizations_audited} of {run.organizations_total or '?'} "
        f"organizations audited; open: {seen}{more}. No worker is taking them: {WORKER_HINT}. "
        "The run stays open: a worker that starts finishes it"
    )


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return ""


def _issues_remain(report: RunReport) -> bool:
    """Issues left that the run did not act on: a missing profile sent to the sync job is being
    acted on (and sent again by the daily maintenance if its job is lost), not left."""
    run = report.run
    return run.status != AuditStatus.SUCCEEDED or run.found > run.fixed + _sync_sent(run)


def _sync_sent(run) -> int:
    return sync_sent(run.by_type) if run.fix else 0


def _interactive(stream) -> bool:
    isatty = getattr(getattr(stream, "_out", stream), "isatty", None)
    return bool(isatty and isatty())


class Progress:
    """A one-line progress indicator on stderr for all-organization runs at a terminal: how far,
    how fast, how long still. Plain text (the error style is for errors)."""

    def __init__(self, stream) -> None:
        self.stream = stream
        self.started = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        rate = done / elapsed
        line = f"\raudited {done:,}/{total:,} organizations"
        if total:
            line += f" ({100 * done / total:.0f} %)"
        if done:
            line += f", {rate:,.0f}/s"
            if total > done:
                line += f", about {_duration((total - done) / rate)} left"
        self.stream.write(line.ljust(78), style_func=_plain, ending="")
        self.stream.flush()

    def done(self) -> None:
        self.stream.write("", style_func=_plain)


def _plain(text: str) -> str:
    return text


def _duration(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _organization_names(org_ids) -> dict[uuid.UUID, str]:
    return dict(Organization.objects.filter(id__in=list(org_ids)).values_list("id", "name"))


def _findings_json(run_id: uuid.UUID):
    fields = ("seq", "organization__name", *FINDING_CHANGE_FIELDS, "outcome", "detail")
    for row in (
        AuditFinding.objects.filter(run_id=run_id)
        .order_by("seq")
        .values_list(*fields)
        .iterator(chunk_size=2000)
    ):
        finding = dict(zip(fields, row, strict=True))
        finding["organization_name"] = finding.pop("organization__name")
        for key in ("organization_id", "object_id"):
            finding[key] = str(finding[key]) if finding[key] else None
        yield finding
