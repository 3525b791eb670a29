"""/metrics, read as Prometheus reads it (prometheus_client's own parser), after real runs: every
value is the one the audit records hold, and every metric the shipped alert rules use is there."""

import re
from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from django.conf import settings
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from profiles.models import AuditRun, AuditShard, AuditStatus, AuditTrigger, ShardStatus
from profiles.plan import ALL_TYPES
from profiles.services.audit import AuditRequest, run_audit
from profiles.services.run_lock import fixing_run_lock
from profiles.tasks import audit_sync_task
from tests.factories import (
    AssetFactory,
    DriftRecordFactory,
    OrganizationFactory,
    ProfileFactory,
)

pytestmark = pytest.mark.django_db
RULES = Path(settings.BASE_DIR) / "deploy" / "prometheus" / "alerts.yml"


def scrape(client, **headers) -> dict[tuple[str, tuple], float]:
    response = client.get("/metrics", **headers)
    assert response.status_code == 200, response.content
    assert response["Content-Type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.content.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name, **labels):
    return samples.get((f"profile_audit_{name}", tuple(sorted(labels.items()))))


def names(samples) -> set[str]:
    return {name for name, _ in samples}


@pytest.fixture
def two_scheduled_runs(committed):
    """A scheduled run that fixed one organization and was held by the guard in another
    (partial), after a dry run sent by hand."""
    ProfileFactory()  # orphaned
    AssetFactory()  # missing profile
    guarded_org = OrganizationFactory(name="Expired Token Ltd")
    for _ in range(6):  # more than max(5, 50 %) of its profiles would go: the guard holds it
        ProfileFactory(organization=guarded_org)
    committed(audit_sync_task.delay, fix=False, trigger=AuditTrigger.COMMAND)
    committed(audit_sync_task.delay, fix=True, trigger=AuditTrigger.SCHEDULE)
    return AuditRun.objects.get(trigger=AuditTrigger.SCHEDULE)


def test_metrics_after_real_runs_are_the_records(client, two_scheduled_runs):
    scheduled = two_scheduled_runs
    dry = AuditRun.objects.get(trigger=AuditTrigger.COMMAND)
    assert scheduled.status == AuditStatus.PARTIAL

    samples = scrape(client)

    for run in (scheduled, dry):
        trigger = run.trigger
        assert value(samples, "last_run_start_timestamp_seconds", trigger=trigger) == pytest.approx(
            run.started_at.timestamp()
        )
        assert value(samples, "last_run_end_timestamp_seconds", trigger=trigger) == pytest.approx(
            run.finished_at.timestamp()
        )
        assert value(samples, "last_run_duration_seconds", trigger=trigger) == pytest.approx(
            run.duration_seconds
        )
        for status in AuditStatus.values:
            expected = 1.0 if status == run.status else 0.0
            assert value(samples, "last_run_status", trigger=trigger, status=status) == expected
    # No admin or revert run yet: nothing made up for them.
    assert value(samples, "last_run_start_timestamp_seconds", trigger="admin") is None

    assert value(samples, "last_scheduled_run_end_timestamp_seconds") == pytest.approx(
        scheduled.finished_at.timestamp()
    )
    for finding_type in ALL_TYPES:
        counts = scheduled.by_type.get(finding_type.value, {})
        assert value(samples, "last_scheduled_run_found", type=finding_type.value) == counts.get(
            "found", 0
        )
        assert value(samples, "last_scheduled_run_fixed", type=finding_type.value) == counts.get(
            "fixed", 0
        )
    assert value(samples, "last_scheduled_run_found", type="orphaned") == 7  # 1 + the 6 guarded
    assert value(samples, "last_scheduled_run_fixed", type="orphaned") == 1
    assert value(samples, "last_scheduled_run_guarded_organizations") == 1
    assert value(samples, "last_scheduled_run_failed_organizations") == 0
    # Partial is not a success.
    assert value(samples, "last_successful_scheduled_run_timestamp_seconds") is None
    assert value(samples, "runs", trigger="schedule", status="partial") == 1
    assert value(samples, "runs", trigger="command", status=dry.status) == 1
    assert value(samples, "runs", trigger="admin", status="succeeded") == 0
    assert value(samples, "lock_up") == 1 and value(samples, "lock_held") == 0


def test_a_succeeded_scheduled_run_is_the_last_success(client, committed):
    ProfileFactory()
    committed(audit_sync_task.delay, fix=True, trigger=AuditTrigger.SCHEDULE)
    run = AuditRun.objects.get()
    assert run.status == AuditStatus.SUCCEEDED
    samples = scrape(client)
    assert value(samples, "last_successful_scheduled_run_timestamp_seconds") == pytest.approx(
        run.finished_at.timestamp()
    )


def test_the_lock_shows_held_its_age_and_expiry(client):
    lock = fixing_run_lock()
    assert lock.acquire()
    try:
        token = lock.client.get(settings.PROFILE_AUDIT_LOCK_KEY).decode()
        AuditRun.objects.create(
            trigger=AuditTrigger.SCHEDULE,
            fix=True,
            started_at=timezone.now() - timedelta(minutes=10),
            lock_token=token,
        )
        samples = scrape(client)
    finally:
        lock.release()
    assert value(samples, "lock_held") == 1
    assert 600 <= value(samples, "lock_held_seconds") < 660
    assert 0 < value(samples, "lock_expires_in_seconds") <= settings.PROFILE_AUDIT_LOCK_TTL
    assert value(scrape(client), "lock_held") == 0


def test_open_shards_are_counted_by_status(client):
    run = AuditRun.objects.create(trigger=AuditTrigger.SCHEDULE, fix=True)
    for index, status in enumerate(
        [ShardStatus.DONE, ShardStatus.RUNNING, ShardStatus.PENDING, ShardStatus.PENDING]
    ):
        AuditShard.objects.create(run=run, index=index, status=status)
    samples = scrape(client)
    assert value(samples, "open_shards", status="pending") == 2
    assert value(samples, "open_shards", status="running") == 1
    assert value(samples, "runs", trigger="schedule", status="running") == 1


def test_a_metrics_token_is_asked_for_when_set(client, settings):
    settings.PROFILE_AUDIT_METRICS_TOKEN = "s3cret-scrape-token"
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer wrong").status_code == 401
    samples = scrape(client, HTTP_AUTHORIZATION="Bearer s3cret-scrape-token")
    assert value(samples, "lock_up") == 1


def test_every_metric_the_alert_rules_use_is_exported(client, two_scheduled_runs):
    rules = [
        rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]
    ]
    used = {m for rule in rules for m in re.findall(r"\bprofile_audit_[a-z_]+", rule["expr"])}
    assert len(rules) >= 8 and len(used) >= 6
    ProfileFactory()  # a mark, and the change-driven loop's heartbeat: a dry check
    run_audit(AuditRequest(changed=True))
    # A drift fight held: the newest fight's series exists only then.
    DriftRecordFactory(state="fighting", held_since=timezone.now(), undone_by="partner-sync")
    lock = fixing_run_lock()
    assert lock.acquire()
    try:
        AuditRun.objects.filter(id=two_scheduled_runs.id).update(
            lock_token=lock.client.get(settings.PROFILE_AUDIT_LOCK_KEY).decode()
        )
        exported = names(scrape(client))
    finally:
        lock.release()
    assert used <= exported, f"used by the rules but not exported: {sorted(used - exported)}"
    # The rules cover what the design asks to alert on.
    alerts = {rule["alert"] for rule in rules}
    assert {
        "ProfileAuditScheduledRunMissed",
        "ProfileAuditScheduledRunFailed",
        "ProfileAuditScheduledRunPartial",
        "ProfileAuditGuardTripped",
        "ProfileAuditFindingsSurge",
    } <= alerts


def test_the_last_finished_scheduled_run_names_itself_and_what_it_left(
    client, settings, two_scheduled_runs
):
    settings.PROFILE_AUDIT_ADMIN_BASE_URL = "https://audit.example.com"
    run = two_scheduled_runs
    samples = scrape(client)
    admin_url = f"https://audit.example.com/admin/profiles/auditrun/{run.id}/change/"
    assert (
        value(
            samples,
            "last_finished_scheduled_run_info",
            run_id=str(run.id),
            admin_url=admin_url,
            status="partial",
        )
        == 1
    )
    assert client.get(admin_url.removeprefix("https://audit.example.com")).status_code == 302
    assert value(samples, "last_finished_scheduled_run_status", status="partial") == 1
    assert value(samples, "last_finished_scheduled_run_guarded_organizations") == 1
    assert value(samples, "last_finished_scheduled_run_failed_organizations") == 0
    assert value(samples, "last_finished_scheduled_run_failed_shards") == 0
    assert value(samples, "last_finished_scheduled_run_unaudited_organizations") == 0
    assert value(samples, "last_finished_scheduled_run_found", type="orphaned") == 7
    assert (
        value(samples, "admin_info", runs_url="https://audit.example.com/admin/profiles/auditrun/")
        == 1
    )


def test_a_failure_stays_the_last_word_while_a_retry_runs(client):
    started = timezone.now() - timedelta(minutes=30)
    failed = AuditRun.objects.create(
        trigger=AuditTrigger.SCHEDULE,
        fix=True,
        status=AuditStatus.FAILED,
        started_at=started,
        finished_at=started + timedelta(minutes=1),
        organizations_total=250,
        organizations_audited=100,
    )
    AuditShard.objects.create(run=failed, index=0, status=ShardStatus.FAILED)
    AuditRun.objects.create(trigger=AuditTrigger.SCHEDULE, fix=True)  # the retry, running
    AuditRun.objects.create(  # found the lock held: it did not run, so it is not the last word
        trigger=AuditTrigger.SCHEDULE,
        fix=True,
        status=AuditStatus.SKIPPED,
        finished_at=timezone.now(),
    )
    samples = scrape(client)
    assert value(samples, "last_run_status", trigger="schedule", status="skipped") == 1
    assert value(samples, "last_finished_scheduled_run_status", status="failed") == 1
    assert value(samples, "last_finished_scheduled_run_failed_shards") == 1
    assert value(samples, "last_finished_scheduled_run_unaudited_organizations") == 150
    info = [k for k in samples if k[0] == "profile_audit_last_finished_scheduled_run_info"]
    assert [dict(labels)["run_id"] for _, labels in info] == [str(failed.id)]


def test_the_schedule_is_exported_with_the_period_from_the_settings(client, settings):
    from django_celery_beat.models import PeriodicTask

    from profiles.schedule import AUDIT_ENTRY

    settings.PROFILE_AUDIT_SCHEDULE_PERIOD = 43200
    samples = scrape(client)
    assert value(samples, "schedule_enabled") == 1
    assert value(samples, "schedule_period_seconds") == 43200
    assert value(samples, "schedule_grace_seconds") == settings.PROFILE_AUDIT_SCHEDULE_GRACE
    entry = PeriodicTask.objects.get(name=AUDIT_ENTRY)
    assert value(samples, "schedule_changed_timestamp_seconds") == pytest.approx(
        entry.date_changed.timestamp()
    )
    PeriodicTask.objects.filter(name=AUDIT_ENTRY).update(enabled=False)
    assert value(scrape(client), "schedule_enabled") == 0
    # No finished scheduled run yet: no run to name.
    assert not [k for k in samples if k[0] == "profile_audit_last_finished_scheduled_run_info"]


def test_the_change_driven_backlog_its_loop_and_what_the_sweep_missed(client, committed):
    """DESIGN "Change-driven runs": the backlog (marked organizations, oldest mark's age), the
    loop's last check and success, the detection latency, and the sweep's missed_by_changes."""
    from profiles.models import ChangeMark

    orphan = ProfileFactory()  # its organization is marked by the write
    ChangeMark.objects.filter(organization_id=orphan.organization_id).update(
        first_marked_at=timezone.now() - timedelta(minutes=5)
    )
    samples = scrape(client)
    assert value(samples, "changes_backlog_organizations") == 1
    assert 300 <= value(samples, "changes_oldest_mark_age_seconds") < 400

    report = committed(run_audit, AuditRequest(fix=True, changed=True))
    samples = scrape(client)
    assert value(samples, "changes_last_success_timestamp_seconds") == pytest.approx(
        report.run.finished_at.timestamp()
    )
    assert 300 <= value(samples, "changes_detection_latency_seconds") < 400
    assert (
        value(samples, "changes_last_check_timestamp_seconds") >= report.run.started_at.timestamp()
    )

    unmarked = ProfileFactory()
    ChangeMark.objects.filter(organization_id=unmarked.organization_id).delete()  # missed
    ChangeMark.objects.all().delete()
    committed(run_audit, AuditRequest(fix=True, trigger=AuditTrigger.SCHEDULE))
    assert value(scrape(client), "last_finished_scheduled_run_missed_by_changes") == 1
