"""The shipped alert rules and routing, checked by the operators' own tools: promtool's unit tests
for every alert (deploy/prometheus/alerts_test.yml), `promtool check rules`, `promtool check
metrics` on what /metrics serves after real runs, and `amtool check-config` on the Alertmanager
example. .ci/run installs Debian's prometheus and prometheus-alertmanager packages for them."""

import shutil
import subprocess

import pytest
import yaml
from django.conf import settings

from profiles.models import AuditTrigger
from profiles.tasks import audit_sync_task
from tests.factories import OrganizationFactory, ProfileFactory

DEPLOY = settings.BASE_DIR / "deploy"
RULES = DEPLOY / "prometheus" / "alerts.yml"
RULE_TESTS = DEPLOY / "prometheus" / "alerts_test.yml"


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is needed: apt-get install prometheus prometheus-alertmanager"
    return path


def run(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, **kwargs)


def alert_names() -> set[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {rule["alert"] for group in groups for rule in group["rules"]}


def test_the_rules_pass_promtool_check():
    done = run(tool("promtool"), "check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(alert_names())} rules found" in done.stdout


def test_every_alert_has_promtool_unit_tests_that_pass():
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    tested = {case["alertname"] for t in tests for case in t["alert_rule_test"]}
    firing = {
        case["alertname"] for t in tests for case in t["alert_rule_test"] if case["exp_alerts"]
    }
    silent = {
        case["alertname"] for t in tests for case in t["alert_rule_test"] if not case["exp_alerts"]
    }
    assert tested == alert_names()
    assert firing == alert_names(), "an alert never shown firing"
    assert silent == alert_names(), "an alert never shown silent"
    done = run(tool("promtool"), "test", "rules", str(RULE_TESTS))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_every_alert_has_a_runbook_section_and_the_run_where_there_is_one():
    groups = yaml.safe_load(RULES.read_text())["groups"]
    operating = (settings.BASE_DIR / "docs" / "operating.md").read_text()
    for rule in (rule for group in groups for rule in group["rules"]):
        name = rule["alert"]
        assert rule["annotations"]["runbook_url"] == f"docs/operating.md#{name.lower()}"
        assert f"\n### {name}\n" in operating, f"no runbook section for {name}"
        assert rule["labels"]["severity"] in ("page", "ticket")
        about_a_run = "last_finished_scheduled_run" in rule["expr"]
        if about_a_run:
            assert "run_id" in rule["expr"] and "admin_url" in rule["expr"], name
    severities = {
        rule["alert"]: rule["labels"]["severity"] for group in groups for rule in group["rules"]
    }
    # A guard or budget trip is work for the day, not a page.
    assert severities["ProfileAuditGuardTripped"] == "ticket"
    assert severities["ProfileAuditScheduledRunPartial"] == "ticket"


def test_the_alertmanager_example_passes_amtool_and_routes_pages_and_tickets():
    config = DEPLOY / "alertmanager" / "alertmanager.yml"
    amtool = tool("amtool")
    done = run(amtool, "check-config", str(config))
    assert done.returncode == 0, done.stdout + done.stderr
    for severity, receiver in (("page", "audit-pager"), ("ticket", "audit-tickets")):
        done = run(
            amtool,
            "config",
            "routes",
            "test",
            f"--config.file={config}",
            "service=profile-sync-audit",
            f"severity={severity}",
            "alertname=ProfileAuditGuardTripped",
        )
        assert done.stdout.strip() == receiver, done.stdout + done.stderr


@pytest.mark.django_db
def test_what_metrics_serves_after_real_runs_passes_promtool_check_metrics(client, committed):
    ProfileFactory()
    guarded = OrganizationFactory()
    for _ in range(6):
        ProfileFactory(organization=guarded)
    committed(audit_sync_task.delay, fix=True, trigger=AuditTrigger.SCHEDULE)
    exposition = client.get("/metrics").content.decode()
    assert "profile_audit_last_finished_scheduled_run_info{" in exposition
    done = run(tool("promtool"), "check", "metrics", input=exposition)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == "" and done.stderr.strip() == "", done.stdout + done.stderr
