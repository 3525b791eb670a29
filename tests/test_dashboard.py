"""The audit runs page opens on the state of things: the last scheduled run and when the next is
due, a found/fixed chart, the fixing-run lock with its Release button, and Run now. Release and
Run now each need their own permission; both are recorded with who pressed them."""

import re
from datetime import timedelta

import pytest
from django.contrib.admin.models import LogEntry
from django.contrib.auth.models import Permission, User
from django.urls import reverse
from django.utils import timezone

from profiles.models import AuditRun, AuditStatus, AuditTrigger, FindingType
from profiles.services.run_lock import fixing_run_lock
from tests.factories import AssetFactory, OrganizationFactory, ProfileFactory

pytestmark = pytest.mark.django_db

RUNS = reverse("admin:profiles_auditrun_changelist")
RUN_NOW = reverse("admin:profiles_auditrun_run_now")
RELEASE = reverse("admin:profiles_auditrun_release_lock")
VIEW = ["view_auditrun", "view_auditfinding"]


def login(client, *codenames: str) -> User:
    user = User.objects.create(username=f"oncall-{len(codenames)}", is_staff=True)
    user.user_permissions.set(Permission.objects.filter(codename__in=[*VIEW, *codenames]))
    client.force_login(user)
    return user


def finished_run(*, trigger=AuditTrigger.SCHEDULE, hours_ago=1.0, found=4, fixed=3, **fields):
    started = timezone.now() - timedelta(hours=hours_ago)
    return AuditRun.objects.create(
        trigger=trigger,
        fix=fields.pop("fix", True),
        status=fields.pop("status", AuditStatus.SUCCEEDED),
        started_at=started,
        finished_at=started + timedelta(seconds=42),
        duration_seconds=42.0,
        found=found,
        fixed=fixed,
        **fields,
    )


def text(response) -> str:
    return re.sub(r"\s+", " ", response.content.decode())


def test_the_list_opens_on_the_last_scheduled_run_the_chart_and_the_lock(client):
    login(client)
    for hours in (30, 24, 18, 12):
        finished_run(hours_ago=hours, found=int(hours), fixed=int(hours) - 2)
    last = finished_run(hours_ago=6, found=17, fixed=15, status=AuditStatus.PARTIAL)
    finished_run(trigger=AuditTrigger.COMMAND, hours_ago=1, found=9, fixed=0, fix=False)

    page = text(client.get(RUNS))

    section = page[page.index('id="last-scheduled-run"') : page.index('class="trend"')]
    assert reverse("admin:profiles_auditrun_change", args=[last.id]) in section
    assert "Partial" in section and "17 / 15" in section
    assert f"{last.started_at:%Y-%m-%d %H:%M} UTC" in section
    assert re.search(r'id="next-due">\d{4}-\d\d-\d\d (00|06|12|18):00 UTC', page)
    # One pair of bars per recent run, each linking to its run; the dry run fixed nothing.
    assert page.count('<g class="audit-chart-run">') == 6
    assert "Found and fixed, last 6 runs" in page
    assert "9 found, - fixed" in page
    assert 'id="lock-free"' in page
    # Without the permissions, neither button is offered.
    assert 'id="run-now-fix"' not in page and 'id="release-lock"' not in page


def test_an_overdue_schedule_says_so(client):
    login(client)
    finished_run(hours_ago=8)
    assert "Overdue: the last scheduled run completed at" in text(client.get(RUNS))


def test_run_now_sends_the_task_recorded_with_who_asked(client, django_capture_on_commit_callbacks):
    user = login(client, "run_auditrun")
    ProfileFactory()
    AssetFactory()
    assert 'id="run-now-fix"' in text(client.get(RUNS))

    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(RUN_NOW, {"mode": "fix"}, follow=True)

    run = AuditRun.objects.get()
    assert (run.trigger, run.fix, run.status) == (AuditTrigger.ADMIN, True, AuditStatus.SUCCEEDED)
    assert run.requested_by == user.username
    assert run.task_id
    assert run.fixed == 2
    assert f"(task {run.task_id})" in text(response)
    assert "Sent: a fixing run of every organization" in text(response)

    client.post(RUN_NOW, {"mode": "dry_run"})
    dry = AuditRun.objects.exclude(id=run.id).get()
    assert (dry.trigger, dry.fix, dry.requested_by) == (AuditTrigger.ADMIN, False, user.username)


def test_run_now_needs_its_permission(client):
    login(client)
    ProfileFactory()
    assert client.post(RUN_NOW, {"mode": "fix"}).status_code == 403
    assert not AuditRun.objects.exists()


def test_run_now_with_the_broker_down_says_so_and_sends_nothing(client, settings):
    from audit_project.celery import app

    login(client, "run_auditrun")
    previous = (
        app.conf.task_always_eager,
        app.conf.broker_url,
        app._pool,
        app.amqp._producer_pool,
    )
    # A broker nobody listens on, with pools of its own (the suite's stay as they were).
    app.conf.task_always_eager = False
    app.conf.broker_url = "redis://127.0.0.1:1/0"
    app._pool = app.amqp._producer_pool = None
    try:
        response = client.post(RUN_NOW, {"mode": "fix"}, follow=True)
    finally:
        if app._pool is not None:
            app._pool.force_close_all()
        (
            app.conf.task_always_eager,
            app.conf.broker_url,
            app._pool,
            app.amqp._producer_pool,
        ) = previous
    assert "The run was not sent: the broker did not answer" in text(response), [
        str(m) for m in response.context["messages"]
    ]
    assert not AuditRun.objects.exists()


@pytest.fixture
def held_lock():
    """The fixing-run lock held by a scheduled run that started 12 minutes ago."""
    lock = fixing_run_lock()
    assert lock.acquire()
    token = lock.client.get(lock.key).decode()
    run = AuditRun.objects.create(
        trigger=AuditTrigger.SCHEDULE,
        fix=True,
        started_at=timezone.now() - timedelta(minutes=12),
        lock_token=token,
    )
    yield lock, token, run
    lock.release()


def test_the_lock_shows_its_holder_since_and_expiry(client, held_lock):
    login(client)
    _, token, run = held_lock
    page = text(client.get(RUNS))
    holder = token.rsplit(":", 1)[0]
    assert f'id="lock-holder">{holder}<' in page
    assert f"{run.started_at:%Y-%m-%d %H:%M} UTC (12" in page
    assert "UTC unless renewed" in page


def test_release_frees_the_lock_and_records_who_pressed_it(client, held_lock):
    lock, token, run = held_lock
    user = login(client, "release_lock_auditrun")
    assert 'id="release-lock"' in text(client.get(RUNS))

    response = client.post(RELEASE, {"token": token}, follow=True)

    assert not lock.client.exists(lock.key)
    assert "Released the fixing-run lock held by" in text(response)
    entry = LogEntry.objects.get(object_id=str(run.id))
    assert entry.user == user and "Released the fixing-run lock" in entry.get_change_message()
    assert not lock.still_held()  # the run that held it stops at its next organization


def test_release_leaves_a_lock_that_changed_hands(client, held_lock):
    lock, token, _ = held_lock
    login(client, "release_lock_auditrun")
    response = client.post(RELEASE, {"token": token + "-not-the-current-one"}, follow=True)
    assert lock.client.get(lock.key).decode() == token
    assert "Not released: the lock is free or now held by another run" in text(response)


def test_release_needs_its_permission(client, held_lock):
    lock, token, _ = held_lock
    login(client, "run_auditrun")
    assert client.post(RELEASE, {"token": token}).status_code == 403
    assert lock.client.get(lock.key).decode() == token


def test_a_runs_page_names_guarded_and_failed_organizations_and_who_asked(client):
    login(client)
    guarded = OrganizationFactory(name="Expired Token Ltd")
    failed = OrganizationFactory(name="Broken Data Inc")
    run = finished_run(
        trigger=AuditTrigger.ADMIN,
        status=AuditStatus.PARTIAL,
        guarded_organizations=[str(guarded.id)],
        failed_organizations={str(failed.id): "IntegrityError: duplicate key"},
        requested_by="alice",
        requested_host="web-2",
        task_id="3f1c0d2e-task",
        by_type={t.value: {"found": 0, "fixed": 0} for t in FindingType},
    )
    page = text(client.get(reverse("admin:profiles_auditrun_change", args=[run.id])))
    assert "Expired Token Ltd" in page and str(guarded.id) in page
    assert "Broken Data Inc" in page and "IntegrityError: duplicate key" in page
    for shown in ("alice", "web-2", "3f1c0d2e-task"):
        assert shown in page


def test_the_dashboard_costs_a_fixed_number_of_queries(client, django_assert_max_num_queries):
    login(client)
    for hours in range(40):
        finished_run(hours_ago=hours + 1)
    with django_assert_max_num_queries(25):
        assert client.get(RUNS).status_code == 200
