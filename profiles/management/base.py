"""What the audit's commands share (STYLE.md, as Zulip's ``ZulipBaseCommand`` holds ``--realm``):
``--org`` parsed into a known organization, ``--format``, and the exit statuses of DESIGN
"Operating it", raised only as ``CommandError(returncode=...)``."""

from __future__ import annotations

import uuid

from django.core.management.base import BaseCommand, CommandError, CommandParser

from orgs.models import Organization

LIST_ORGS_HINT = "list them with `python manage.py list_organizations`"
# DESIGN "Operating it": 1 --check found issues left; 2 the audit could not run or was cut short;
# 75 (sysexits.h EX_TEMPFAIL) another fixing run holds the lock, nothing was changed.
EXIT_CHECK = 1
EXIT_FAILED = 2
EXIT_LOCK_HELD = 75


class AuditCommand(BaseCommand):
    """A command of the audit: ``--org`` and ``--format`` for every one that takes them."""

    def add_organization_argument(self, parser: CommandParser, *, help: str) -> None:
        parser.add_argument("--org", metavar="UUID", help=f"{help} ({LIST_ORGS_HINT}).")

    def add_format_argument(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--format",
            dest="output_format",
            choices=["text", "json"],
            default="text",
            help="text (a table, the default) or json (one object on stdout).",
        )

    def organization_id(self, value: str | None) -> uuid.UUID | None:
        """The ``--org`` value as the id of an existing organization, or a one-line error."""
        if value is None:
            return None
        try:
            org_id = uuid.UUID(value)
        except ValueError:
            raise CommandError(
                f"--org {value!r} is not an organization id (a UUID); {LIST_ORGS_HINT}",
                returncode=EXIT_FAILED,
            ) from None
        if not Organization.objects.filter(id=org_id).exists():
            raise CommandError(
                f"no organization with id {org_id}; {LIST_ORGS_HINT}", returncode=EXIT_FAILED
            )
        return org_id
