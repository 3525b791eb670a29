"""Every management command of the project explains itself (STYLE: one test runs ``--help`` on
every command)."""

import pytest
from django.core.management import ManagementUtility, get_commands, load_command_class

PROJECT_APPS = {"orgs", "connections", "profiles", "queues", "boosts"}
OURS = sorted((app, name) for name, app in get_commands().items() if app in PROJECT_APPS)


@pytest.mark.parametrize(("app", "name"), OURS)
def test_help(app, name, capsys):
    with pytest.raises(SystemExit) as exit_:
        ManagementUtility(["manage.py", name, "--help"]).execute()
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert f"usage: manage.py {name}" in text
    command = load_command_class(app, name)
    assert command.help.split()[0] in text
    for action in command.create_parser("manage.py", name)._actions:
        assert action.help, f"{name} {action.option_strings} has no help text"
    if name == "profiles_audit_sync":
        for flag in ("--fix", "--org", "--type", "--format", "--force", "--check"):
            assert flag in text


def test_every_command_of_the_project_is_there():
    assert {"profiles_audit_sync", "list_organizations", "seed_demo"} <= {n for _, n in OURS}


def test_the_revert_and_retention_commands_are_there():
    commands = get_commands()
    assert commands["profiles_audit_sync"] == "profiles"
    assert commands["prune_audit_runs"] == "profiles"
