"""``profiles_audit_sync`` (and the other commands) as an operator uses them."""

import json
import os
import uuid
from io import StringIO

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from connections.models import ConnectionStatus
from profiles.models import AuditFinding, AuditRun, SocialProfile
from tests.domain import domain_state
from tests.factories import AssetFactory, ConnectionFactory, OrganizationFactory, profile_for

pytestmark = pytest.mark.django_db


def run(*args, **kwargs):
    out, err = StringIO(), StringIO()
    call_command("profiles_audit_sync", *args, stdout=out, stderr=err, **kwargs)
    return out.getvalue(), err.getvalue()


@pytest.fixture
def org():
    """An organization with one deselected and one orphaned profile, and one missing."""
    org = OrganizationFactory(name="Bakery")
    connection = ConnectionFactory(organization=org)
    profile_for(AssetFactory(connection=connection, is_selected=False))
    profile_for(AssetFactory(connection=ConnectionFactory(organization=org, status="expired")))
    AssetFactory(connection=connection, asset_type="instagram_account")
    return org


def test_default_is_a_dry_run_that_reports_a_table(org):
    before = domain_state()

    out, _ = run()

    assert domain_state() == before
    assert "dry run, all organizations (1 audited)" in out
    assert "Nothing was changed; run with --fix" in out
    lines = {
        line.split()[0]: line.split()[1:] for line in out.splitlines() if line.startswith("  ")
    }
    assert lines["deselected"] == ["1", "-"]
    assert lines["orphaned"] == ["1", "-"]
    assert lines["missing"] == ["1", "-"]
    assert lines["total"] == ["3", "-"]
    run_record = AuditRun.objects.get()
    assert f"Run {run_record.id}" in out


def test_fix_applies_the_plan(org, committed):
    out, _ = committed(run, "--fix")

    assert "fix, all organizations" in out
    total = next(line for line in out.splitlines() if line.strip().startswith("total"))
    # The sync job ran (eagerly) once the chunk committed: the missing profile exists, so it
    # is fixed, and nothing is left only sent.
    assert total.split() == ["total", "3", "3", "0"]
    assert "sent to the sync job" not in out
    assert SocialProfile.objects.alive().filter(organization=org).count() == 1
    assert AuditRun.objects.get(fix=True).by_type["missing"] == {
        "found": 1,
        "fixed": 1,
        "sync_sent": 0,
    }
    totals = json.loads(run("--format", "json")[0])["totals"]
    assert totals == {"found": 0, "fixed": 0, "sync_sent": 0}


def test_org_limits_the_run_to_that_organization(org):
    other = OrganizationFactory()
    profile_for(AssetFactory(connection=ConnectionFactory(organization=other), is_selected=False))

    out, _ = run("--org", str(org.id), "--fix")

    assert f"organization {org.id}" in out
    assert AuditRun.objects.get().organization_id == org.id
    assert set(AuditFinding.objects.values_list("organization_id", flat=True)) == {org.id}
    assert SocialProfile.objects.alive().filter(organization=other).count() == 1


def test_type_is_repeatable_and_limits_the_findings(org):
    payload = json.loads(run("--type", "orphaned", "--type", "missing", "--format", "json")[0])

    found = {t: c["found"] for t, c in payload["by_type"].items() if c["found"]}
    assert found == {"orphaned": 1, "missing": 1}
    assert payload["types"] == ["missing", "orphaned"]


def test_json_output_has_the_documented_shape(org):
    out, _ = run("--format", "json")

    payload = json.loads(out)
    assert {
        "run_id",
        "fix",
        "status",
        "totals",
        "by_type",
        "organizations",
        "duration_seconds",
    } <= set(payload)
    assert payload["fix"] is False
    assert payload["status"] == "succeeded"
    assert payload["totals"] == {"found": 3, "fixed": 0, "sync_sent": 0}
    assert payload["by_type"]["deselected"] == {"found": 1, "fixed": 0}
    [org_report] = payload["organizations"]
    assert org_report["org_id"] == str(org.id)
    assert org_report["totals"] == {"found": 3, "fixed": 0, "sync_sent": 0}
    assert uuid.UUID(payload["run_id"]) == AuditRun.objects.get().id


def test_verbosity_2_lists_the_findings(org):
    out, _ = run("-v", "2")

    assert "Findings:" in out
    assert out.count("planned") == 3
    assert "instagram:" in out


def test_verbosity_0_prints_nothing(org):
    assert run("-v", "0") == ("", "")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--org", "not-a-uuid"], "is not an organization id .* list_organizations"),
        (["--org", str(uuid.UUID(int=7))], "no organization with id .* list_organizations"),
        (["--type", "everything"], "invalid choice: 'everything'"),
        (["--format", "yaml"], "invalid choice: 'yaml'"),
    ],
)
def test_bad_input_is_a_one_line_error_and_writes_nothing(org, args, message):
    before = domain_state()

    with pytest.raises(CommandError, match=message) as error:
        run(*args, "--fix")

    assert "\n" not in str(error.value)
    assert AuditRun.objects.count() == 0
    assert domain_state() == before


def test_check_exits_non_zero_while_issues_remain(org, committed):
    with pytest.raises(CommandError, match=r"issues remain \(--check\)") as exit_:
        run("--check")
    assert exit_.value.returncode == 1

    committed(run, "--fix")
    out, _ = run("--check")
    assert "total" in out


def test_guarded_organization_is_shown_and_check_fails(committed):
    org = OrganizationFactory()
    expired = ConnectionFactory(organization=org, status=ConnectionStatus.EXPIRED)
    for _ in range(6):
        profile_for(AssetFactory(connection=expired))

    with pytest.raises(CommandError) as exit_:
        run("--fix", "--check")
    assert exit_.value.returncode == 1

    assert SocialProfile.objects.alive().count() == 6
    out, _ = run()
    assert f"Guarded: organization {org.id}" in out
    committed(run, "--fix", "--force")
    assert SocialProfile.objects.alive().count() == 0


def test_progress_goes_to_a_terminal_on_stderr(org):
    master, slave = os.openpty()
    try:
        with open(slave, "w", closefd=False) as terminal:
            call_command("profiles_audit_sync", stdout=StringIO(), stderr=terminal)
        shown = os.read(master, 4096).decode()
    finally:
        os.close(master)
        os.close(slave)

    assert "audited 1/1 organizations (100 %)" in shown
    assert "\x1b[" not in shown, "progress is plain text, not the error style"


def test_exit_status_2_when_the_audit_cannot_run(org):
    with pytest.raises(CommandError) as error:
        run("--org", "not-a-uuid")
    assert error.value.returncode == 2


def test_dry_run_is_the_default_spelled_out_and_not_with_fix(org):
    before = domain_state()
    out, _ = run("--dry-run")
    assert "Nothing was changed" in out
    with pytest.raises(CommandError, match="--dry-run and --fix contradict") as error:
        run("--dry-run", "--fix")
    assert error.value.returncode == 2
    assert domain_state() == before
    assert AuditRun.objects.count() == 1  # only the explicit dry run


def test_version_is_the_projects(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit):
        call_command("profiles_audit_sync", "--version")
    assert capsys.readouterr().out.strip() == version("profile-sync-audit")


def test_json_has_a_schema_version_and_v2_carries_the_findings(org):
    plain = json.loads(run("--format", "json")[0])
    detailed = json.loads(run("--format", "json", "-v", "2")[0])

    assert plain["schema_version"] == detailed["schema_version"] == 1
    assert "findings" not in plain
    findings = detailed["findings"]
    assert len(findings) == detailed["totals"]["found"] == 3
    assert {f["organization_name"] for f in findings} == {"Bakery"}
    assert [f["seq"] for f in findings] == [1, 2, 3]
    assert {f["type"] for f in findings} == {"deselected", "orphaned", "missing"}


def test_text_output_names_organizations_next_to_their_ids(committed):
    org = OrganizationFactory(name="Florist on Main")
    expired = ConnectionFactory(organization=org, status=ConnectionStatus.EXPIRED)
    for _ in range(6):
        profile_for(AssetFactory(connection=expired))

    out, _ = run("-v", "2")

    assert f"Guarded: organization {org.id} (Florist on Main)" in out
    assert f"org={org.id} (Florist on Main)" in out


def test_no_warning_noise_before_the_report_for_unknown_asset_types(org, capsys):
    AssetFactory(connection=ConnectionFactory(organization=org), asset_type="myspace_page")
    out, err = run()
    assert "unknown_asset_types" not in err + capsys.readouterr().err
    assert out.startswith("Profile-connection sync audit")


def test_no_progress_when_stderr_is_not_a_terminal(org):
    _, err = run()
    assert "audited" not in err


def test_list_organizations_lists_ids_for_org(org):
    out = StringIO()
    call_command("list_organizations", stdout=out)
    assert f"{org.id}  Bakery" in out.getvalue()


def test_seed_demo_builds_every_finding_type_and_replaces_itself():
    out = StringIO()
    call_command("seed_demo", stdout=out)
    call_command("seed_demo", stdout=out)

    payload = json.loads(run("--format", "json")[0])
    assert all(counts["found"] > 0 for counts in payload["by_type"].values())
    assert payload["organizations_audited"] == 4
