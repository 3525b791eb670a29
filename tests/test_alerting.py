"""The shipped rules and routing as they run: Debian's Prometheus scrapes the app's /metrics
(a live server), evaluates deploy/prometheus/alerts.yml and sends to Debian's Alertmanager, run
with deploy/alertmanager/alertmanager.yml (receivers pointed at a webhook receiver of this test's
own). A scheduled run that the guard made partial raises two alerts for the same run; operators
get one notification, a ticket, naming the run, its admin page and the runbook."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml
from django.conf import settings

from profiles.models import AuditRun, AuditStatus, AuditTrigger
from profiles.tasks import audit_sync_task
from tests.factories import OrganizationFactory, ProfileFactory
from tests.support import free_port, wait_for

DEPLOY = settings.BASE_DIR / "deploy"


class Receiver(BaseHTTPRequestHandler):
    notifications: list[tuple[str, dict]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Receiver.notifications.append((self.path, json.loads(body)))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def webhook():
    """The receiver, on a port the system picks (another suite may run this test at once)."""
    Receiver.notifications = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], Receiver.notifications
    server.shutdown()
    server.server_close()


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is needed: apt-get install prometheus prometheus-alertmanager"
    return path


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture
def monitoring(tmp_path, live_server, webhook):
    """Prometheus scraping the live server every second, and Alertmanager with the shipped
    routing (only its waits shortened, and its receivers pointed at the test's webhook), each
    on a free port."""
    webhook_port, notifications = webhook
    prometheus_port, alertmanager_port = free_port(), free_port()
    routing = yaml.safe_load((DEPLOY / "alertmanager" / "alertmanager.yml").read_text())
    routing["route"].update(group_wait="1s", group_interval="2s")
    for receiver in routing["receivers"]:
        for hook in receiver["webhook_configs"]:
            hook["url"] = f"http://127.0.0.1:{webhook_port}/{receiver['name']}"
    (tmp_path / "alertmanager.yml").write_text(yaml.safe_dump(routing))
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    scrape["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    scrape["rule_files"] = [str(DEPLOY / "prometheus" / "alerts.yml")]
    scrape["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] = [
        f"127.0.0.1:{alertmanager_port}"
    ]
    scrape["scrape_configs"][0]["static_configs"][0]["targets"] = [
        live_server.url.removeprefix("http://")
    ]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(scrape))

    logs = (tmp_path / "monitoring.log").open("w")
    alertmanager = subprocess.Popen(
        [
            tool("prometheus-alertmanager"),
            f"--config.file={tmp_path / 'alertmanager.yml'}",
            f"--storage.path={tmp_path / 'am'}",
            f"--web.listen-address=127.0.0.1:{alertmanager_port}",
            "--cluster.listen-address=",  # one instance: no gossip port
        ],
        stdout=logs,
        stderr=subprocess.STDOUT,
    )
    prometheus = subprocess.Popen(
        [
            tool("prometheus"),
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prometheus_port}",
        ],
        stdout=logs,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(
            lambda: answers(f"http://127.0.0.1:{alertmanager_port}/-/ready"),
            timeout=60,
            what="Alertmanager to be ready",
        )
        wait_for(
            lambda: answers(f"http://127.0.0.1:{prometheus_port}/-/ready"),
            timeout=60,
            what="Prometheus to be ready",
        )
        yield f"http://127.0.0.1:{alertmanager_port}", notifications
    finally:
        for proc in (prometheus, alertmanager):
            proc.terminate()
        for proc in (prometheus, alertmanager):
            proc.wait(timeout=30)


def firing_alerts(alertmanager: str) -> dict[str, dict]:
    alerts = get_json(f"{alertmanager}/api/v2/alerts")
    return {alert["labels"]["alertname"]: alert for alert in alerts}


@pytest.mark.django_db(transaction=True)
def test_a_partial_run_makes_one_ticket_naming_the_run(monitoring, settings):
    alertmanager, received = monitoring
    settings.PROFILE_AUDIT_ADMIN_BASE_URL = "https://audit.example.com"
    ProfileFactory()  # an orphaned profile, fixed
    guarded = OrganizationFactory(name="Expired Token Ltd")
    for _ in range(6):  # more than max(5, 50 %) would go: the guard holds the organization
        ProfileFactory(organization=guarded)
    audit_sync_task.delay(fix=True, trigger=AuditTrigger.SCHEDULE)
    run = AuditRun.objects.get(trigger=AuditTrigger.SCHEDULE)
    assert run.status == AuditStatus.PARTIAL

    # Both alerts about the run reach Alertmanager; the detail is held back by the summary.
    def both_there():
        alerts = firing_alerts(alertmanager)
        wanted = {"ProfileAuditScheduledRunPartial", "ProfileAuditGuardTripped"}
        return alerts if wanted <= set(alerts) else None

    alerts = wait_for(both_there, timeout=90, what="the run's alerts to reach Alertmanager")
    assert alerts["ProfileAuditGuardTripped"]["status"]["inhibitedBy"]
    assert not alerts["ProfileAuditScheduledRunPartial"]["status"]["inhibitedBy"]
    notifications = wait_for(
        lambda: list(received), timeout=30, what="the webhook to receive a notification"
    )
    # Alertmanager has had both alerts for longer than the group's wait: what it sent is final
    # for this group until group_interval, and every alert of the run is in that one group.
    path, notification = notifications[0]
    assert path == "/audit-tickets"  # a ticket, not a page
    assert [a["labels"]["alertname"] for a in notification["alerts"]] == [
        "ProfileAuditScheduledRunPartial"
    ]
    assert notification["groupLabels"] == {
        "service": "profile-sync-audit",
        "run_id": str(run.id),
    }
    alert = notification["alerts"][0]
    assert alert["labels"]["run_id"] == str(run.id)
    assert (
        alert["labels"]["admin_url"]
        == f"https://audit.example.com/admin/profiles/auditrun/{run.id}/change/"
    )
    assert alert["annotations"]["runbook_url"] == (
        "docs/operating.md#profileauditscheduledrunpartial"
    )
    assert "Guarded organizations: 1;" in alert["annotations"]["description"]
    assert len(notifications) == 1, notifications
