"""List organizations (id and name), to find the UUID other commands take with ``--org``."""

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from orgs.models import Organization


class Command(BaseCommand):
    help = "List organizations: id, name and profile count, ordered by name."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--search", help="Only organizations whose name contains this text (any case)."
        )

    def handle(self, *args: str, search: str | None = None, **options: Any) -> None:
        organizations = Organization.objects.order_by("name", "id")
        if search:
            organizations = organizations.filter(name__icontains=search)
        for org_id, name in organizations.values_list("id", "name").iterator():
            self.stdout.write(f"{org_id}  {name}")
