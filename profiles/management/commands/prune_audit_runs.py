"""``prune_audit_runs``: retention of audit records, by hand (beat runs it daily)."""

import json

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from profiles.services.retention import prune_audit_runs


class Command(BaseCommand):
    help = (
        "Delete audit runs older than --days (default PROFILE_AUDIT_RETENTION_DAYS) and their "
        "findings, in batches; the latest run of each organization and the latest "
        "all-organization run are always kept."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--days",
            type=int,
            default=None,
            metavar="N",
            help="Prune runs started more than N days ago "
            f"(default: PROFILE_AUDIT_RETENTION_DAYS, now {settings.PROFILE_AUDIT_RETENTION_DAYS}).",
        )
        parser.add_argument(
            "--batch-size",
            type=int,
            default=None,
            metavar="ROWS",
            help="Rows deleted per statement (default: PROFILE_AUDIT_PRUNE_BATCH_SIZE, "
            f"now {settings.PROFILE_AUDIT_PRUNE_BATCH_SIZE}).",
        )
        parser.add_argument(
            "--format",
            dest="output_format",
            choices=["text", "json"],
            default="text",
            help="text (one line, the default) or json (one object on stdout).",
        )

    def handle(self, *args, days, batch_size, output_format, verbosity, **options) -> None:
        days = settings.PROFILE_AUDIT_RETENTION_DAYS if days is None else days
        batch_size = settings.PROFILE_AUDIT_PRUNE_BATCH_SIZE if batch_size is None else batch_size
        if days < 1:
            raise CommandError(f"--days {days}: give a number of days of at least 1")
        if batch_size < 1:
            raise CommandError(f"--batch-size {batch_size}: give a number of rows of at least 1")
        report = prune_audit_runs(older_than_days=days, batch_size=batch_size)
        if output_format == "json":
            self.stdout.write(json.dumps(report.as_json()))
        elif verbosity > 0:
            self.stdout.write(
                self.style.SUCCESS(
                    f"Pruned {report.runs_deleted} audit runs and {report.findings_deleted} "
                    f"findings started before {report.cutoff} (the latest run of each "
                    "organization is kept)."
                )
            )
