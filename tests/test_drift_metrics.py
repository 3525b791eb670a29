"""/metrics on drift (DESIGN "Drift history and fights"), read with prometheus_client's own
parser: records by state and type, the fights held and the newest of them, and recurring drift
per writer with bounded label values, each equal to what the records say."""

import uuid
from datetime import timedelta

import pytest
from django.utils import timezone

from profiles.models import DriftRecord, DriftState
from profiles.plan import ALL_TYPES
from tests.factories import DriftRecordFactory, OrganizationFactory
from tests.test_metrics import scrape, value

pytestmark = pytest.mark.django_db


def recurring(org, writer: str, n: int = 1, *, days_ago: float = 0.5, **fields) -> None:
    state = fields.pop("state", DriftState.RECURRING)
    for _ in range(n):
        DriftRecordFactory(
            organization=org,
            state=state,
            undone_by=writer,
            last_seen_at=timezone.now() - timedelta(days=days_ago),
            **fields,
        )


def test_drift_records_by_state_and_type_and_the_fights_held(client, settings):
    settings.PROFILE_AUDIT_ADMIN_BASE_URL = "https://audit.example.com"
    org = OrganizationFactory()
    DriftRecordFactory.create_batch(3, organization=org)
    DriftRecordFactory(organization=org, type="missing", object_id=None, external_id="e-1")
    DriftRecordFactory(organization=org, state=DriftState.RESOLVED)
    older = DriftRecordFactory(
        organization=org,
        state=DriftState.FIGHTING,
        held_since=timezone.now() - timedelta(hours=5),
        undone_by="partner-sync",
    )
    newest = DriftRecordFactory(
        organization=org,
        type="stale_queue_setting",
        model="queues.QueueSetting",
        state=DriftState.FIGHTING,
        held_since=timezone.now() - timedelta(hours=1),
        undone_by="",
    )
    # Held, and resolved meanwhile: still a fight until it stays resolved for a window.
    DriftRecordFactory(
        organization=org,
        state=DriftState.RESOLVED,
        held_since=timezone.now() - timedelta(hours=3),
    )

    samples = scrape(client)

    for state in DriftState.values:
        for finding_type in ALL_TYPES:
            expected = DriftRecord.objects.filter(state=state, type=finding_type.value).count()
            assert value(samples, "drift_records", state=state, type=finding_type.value) == (
                expected
            )
    assert value(samples, "drift_records", state="open", type="orphaned") == 3
    assert value(samples, "drift_records", state="resolved", type="orphaned") == 2
    assert value(samples, "drift_fights_held") == 3
    info = {
        labels: v for (name, labels), v in samples.items() if name.endswith("newest_fight_info")
    }
    assert list(info.values()) == [1.0]
    assert dict(next(iter(info))) == {
        "organization_id": str(org.id),
        "type": "stale_queue_setting",
        "undone_by": "unknown",
        "admin_url": f"https://audit.example.com/admin/profiles/driftrecord/{newest.id}/change/",
        "fights_url": "https://audit.example.com/admin/profiles/driftrecord/?held=yes",
    }
    assert value(samples, "drift_newest_fight_held_since_timestamp_seconds") == pytest.approx(
        newest.held_since.timestamp()
    )
    assert older.held_since < newest.held_since

    DriftRecord.objects.update(held_since=None)
    samples = scrape(client)
    assert value(samples, "drift_fights_held") == 0
    assert not [k for k in samples if k[0].endswith("newest_fight_info")]


def test_recurring_drift_per_writer_names_the_top_five_and_sums_the_rest(client):
    org = OrganizationFactory()
    for n, writer in enumerate(["partner-sync", "crm", "billing", "import", "cron", "ops", "bi"]):
        recurring(org, writer, 7 - n)  # partner-sync 7, crm 6, ... ops 2, bi 1
    recurring(org, "", 2)  # no writer named
    recurring(org, "crm", 2, state=DriftState.FIGHTING, held_since=timezone.now())
    # Not this week's recurring drift: seen 8 days ago, or open, or resolved.
    recurring(org, "ops", 5, days_ago=8)
    recurring(org, "ops", 5, state=DriftState.OPEN)
    recurring(org, "ops", 5, state=DriftState.RESOLVED)

    samples = scrape(client)

    by_writer = {
        dict(labels)["writer"]: v
        for (name, labels), v in samples.items()
        if name == "profile_audit_drift_recurring_by_writer"
    }
    assert by_writer == {
        "crm": 8,
        "partner-sync": 7,
        "billing": 5,
        "import": 4,
        "cron": 3,
        "other": 3,  # ops 2 + bi 1
        "unknown": 2,
    }
    # Whatever the writers, the label values stay bounded.
    for _ in range(20):
        recurring(org, f"script-{uuid.uuid4()}", 1)
    assert len([k for k in scrape(client) if k[0].endswith("recurring_by_writer")]) == 7


def test_without_drift_the_series_are_there_at_zero(client):
    samples = scrape(client)
    assert value(samples, "drift_records", state="fighting", type="orphaned") == 0
    assert value(samples, "drift_fights_held") == 0
    assert value(samples, "drift_recurring_by_writer", writer="other") == 0
    assert value(samples, "drift_recurring_by_writer", writer="unknown") == 0


def test_the_drift_metrics_pass_promtool_check_metrics(client):
    from tests.test_alert_rules import run, tool

    org = OrganizationFactory()
    recurring(org, "partner-sync", 2)
    recurring(org, "", 1, state=DriftState.FIGHTING, held_since=timezone.now())
    exposition = client.get("/metrics").content.decode()
    assert "profile_audit_drift_newest_fight_info{" in exposition
    done = run(tool("promtool"), "check", "metrics", input=exposition)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == "" and done.stderr.strip() == "", done.stdout + done.stderr
