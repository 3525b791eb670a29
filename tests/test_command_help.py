"""Every management command of the project explains itself (STYLE: one test runs ``--help`` on
every command)."""

import pytest
from django.core.management import get_commands, load_command_class

PROJECT_APPS = {"orgs", "connections", "profiles", "queues", "boosts"}


@pytest.mark.parametrize(
    ("app", "name"),
    sorted((app, name) for name, app in get_commands().items() if app in PROJECT_APPS),
)
def test_help(app, name):
    command = load_command_class(app, name)
    text = command.create_parser("manage.py", name).format_help()
    assert command.help.split()[0] in text
    for action in command.create_parser("manage.py", name)._actions:
        assert action.help, f"{name} {action.option_strings} has no help text"


def test_the_revert_and_retention_commands_are_there():
    commands = get_commands()
    assert commands["profiles_audit_sync"] == "profiles"
    assert commands["prune_audit_runs"] == "profiles"
