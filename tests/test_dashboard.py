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
    assert re.search(r'id="next-due"><time [^>]*>\d{4}-\d\d-\d\d (00|06|12|18):00 UTC', page)
    # One group of bars per recent run, each linking to its run; the dry run fixed nothing.
    assert page.count('<g class="audit-chart-run') == 6
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
        response = client.post(RUN_NOW, {"mode": "fix", "confirmed": "yes"}, follow=True)

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
        response = client.post(RUN_NOW, {"mode": "fix", "confirmed": "yes"}, follow=True)
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
    assert f"{run.started_at:%Y-%m-%d %H:%M} UTC</time> (12" in page
    assert "UTC</time> unless renewed" in page


def test_release_frees_the_lock_and_records_who_pressed_it(client, held_lock):
    lock, token, run = held_lock
    user = login(client, "release_lock_auditrun")
    assert 'id="release-lock"' in text(client.get(RUNS))

    response = client.post(RELEASE, {"token": token, "confirmed": "yes"}, follow=True)

    assert not lock.client.exists(lock.key)
    assert "Released the fixing-run lock held by" in text(response)
    entry = LogEntry.objects.get(object_id=str(run.id))
    assert entry.user == user and "Released the fixing-run lock" in entry.get_change_message()
    assert not lock.still_held()  # the run that held it stops at its next organization


def test_release_leaves_a_lock_that_changed_hands(client, held_lock):
    lock, token, _ = held_lock
    login(client, "release_lock_auditrun")
    response = client.post(
        RELEASE, {"token": token + "-not-the-current-one", "confirmed": "yes"}, follow=True
    )
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


# --- The chart: readable whatever the sizes, every run visible, dry runs apart ------------------


def chart_runs(page: str) -> dict[str, str]:
    """Each run's group in the chart, by its hover title."""
    chart = page[
        page.index('id="audit-trend"') : page.index("</svg>", page.index('id="audit-trend"'))
    ]
    groups = re.findall(
        r'<g class="audit-chart-run ([^"]+)"><title>([^<]+)</title>(.*?)</g>', chart
    )
    return {title: (classes, body) for classes, title, body in groups}


def bar_height(body: str, kind: str) -> float:
    match = re.search(
        rf'<rect class="{kind}[^"]*" x="[\d.]+" y="[\d.]+" width="[\d.]+" height="([\d.]+)"', body
    )
    return float(match.group(1)) if match else 0.0


def test_the_chart_is_on_a_log_scale_with_ticks_so_one_big_run_does_not_flatten_the_rest(client):
    login(client)
    finished_run(hours_ago=30, found=3, fixed=3)
    finished_run(hours_ago=24, found=120_000, fixed=100_000)
    finished_run(hours_ago=18, found=12, fixed=10)

    page = text(client.get(RUNS))

    runs = chart_runs(page)
    small = next(body for title, (_, body) in runs.items() if "3 found" in title)
    big = next(body for title, (_, body) in runs.items() if "120,000 found" in title)
    # Linear, 3 of 120,000 would be 0.004 px tall: on a log scale it is a tenth of the big one.
    assert bar_height(small, "found") > bar_height(big, "found") / 10 > 10
    # A tick at every power of ten up to the top, not only 0 and the maximum.
    ticks = re.findall(r'text-anchor="end" font-size="11">([\d,]+)</text>', page)
    assert ticks == ["0", "1", "10", "100", "1,000", "10,000", "100,000", "1,000,000"]
    assert "(log scale)" in page


def test_failed_and_empty_runs_are_visible_dry_runs_distinct_and_status_in_colour(client):
    login(client)
    finished_run(hours_ago=30, found=0, fixed=0)
    finished_run(hours_ago=24, found=0, fixed=0, status=AuditStatus.FAILED, error="boom")
    finished_run(hours_ago=18, found=7, fixed=0, fix=False, trigger=AuditTrigger.COMMAND)
    finished_run(hours_ago=12, found=7, fixed=5, status=AuditStatus.PARTIAL)

    runs = chart_runs(text(client.get(RUNS)))

    assert len(runs) == 4
    by_status = {
        classes.split()[1]: body for classes, body in runs.values() if "fix " in classes + " "
    }
    # Every run has a strip in its status's colour under the axis.
    assert (
        'class="status status-failed"' in by_status["failed"] and "#c62828" in by_status["failed"]
    )
    assert "#b26a00" in by_status["partial"] and "#2e7d32" in by_status["succeeded"]
    # Runs that found nothing are marked on the axis.
    assert sum('class="nothing-found"' in body for _, body in runs.values()) == 2
    # The dry run: a hatched, outlined found bar and no fixed bar.
    dry = [body for classes, body in runs.values() if classes.startswith("dry-run")]
    assert len(dry) == 1
    assert 'class="found dry"' in dry[0] and 'fill="url(#audit-dry)"' in dry[0]
    assert 'class="fixed"' not in dry[0]


def test_one_run_is_not_called_runs(client):
    login(client)
    finished_run(hours_ago=2)
    page = text(client.get(RUNS))
    assert "Found and fixed, the last run" in page and "last 1 runs" not in page


# --- Why the last run is partial, and that the one before failed --------------------------------


def test_the_dashboard_says_why_the_last_run_is_partial_and_that_the_one_before_failed(client):
    login(client)
    guarded, broken = OrganizationFactory(), OrganizationFactory()
    before = finished_run(
        hours_ago=12,
        status=AuditStatus.FAILED,
        error="OperationalError: could not connect to server\nTraceback ...",
    )
    finished_run(
        hours_ago=6,
        status=AuditStatus.PARTIAL,
        guarded_organizations=[str(guarded.id)],
        failed_organizations={str(broken.id): "IntegrityError: duplicate key"},
        organizations_total=10,
        organizations_audited=9,
    )

    page = text(client.get(RUNS))

    assert (
        'id="last-run-reason">1 organization held by the mass-deletion guard or the run budget; '
        "1 organization failed (IntegrityError: duplicate key); 9 of 10 organizations audited<"
    ) in page
    previous = page[page.index('id="previous-run"') :]
    assert reverse("admin:profiles_auditrun_change", args=[before.id]) in previous
    assert "failed: OperationalError: could not connect to server." in previous


def test_a_partial_run_cut_by_its_deadline_says_so_on_its_page(client):
    from profiles.models import AuditShard, ShardStatus

    login(client)
    run = finished_run(hours_ago=6, status=AuditStatus.PARTIAL)
    for index, status in enumerate([ShardStatus.DONE, ShardStatus.SKIPPED, ShardStatus.SKIPPED]):
        AuditShard.objects.create(run=run, index=index, status=status)
    page = text(client.get(reverse("admin:profiles_auditrun_change", args=[run.id])))
    assert "2 shards skipped (deadline)" in page


# --- The schedule and the dates, readably -------------------------------------------------------


def test_the_schedule_reads_as_words_and_dates_carry_their_zone(client):
    login(client)
    run = finished_run(hours_ago=3)
    page = text(client.get(RUNS))
    assert "every 6 hours, at 00:00, 06:00, 12:00 and 18:00 UTC (cron 0 */6 * * *)</a>" in page
    assert "(m/h/dM/MY/d)" not in page
    # The run's own page writes its moments as the list does.
    run_page = text(client.get(reverse("admin:profiles_auditrun_change", args=[run.id])))
    assert f">{run.started_at:%Y-%m-%d %H:%M} UTC</time>" in run_page
    assert f">{run.finished_at:%Y-%m-%d %H:%M} UTC</time>" in run_page
    assert f"{run.started_at:%Y-%m-%d %H:%M} UTC" in page
    assert "a.m." not in run_page and "p.m." not in run_page


# --- Fix and Release ask first --------------------------------------------------------------


def test_run_now_fix_asks_before_it_sends_and_the_dry_run_does_not(
    client, django_capture_on_commit_callbacks
):
    login(client, "run_auditrun")
    ProfileFactory()

    with django_capture_on_commit_callbacks(execute=True):
        asked = client.post(RUN_NOW, {"mode": "fix"})
    assert asked.status_code == 200
    assert not AuditRun.objects.exists()  # one click did not act
    page = text(asked)
    assert "Fix every organization now?" in page
    assert 'name="confirmed" value="yes"' in page and 'id="confirm-run-now-fix"' in page

    with django_capture_on_commit_callbacks(execute=True):
        client.post(RUN_NOW, {"mode": "fix", "confirmed": "yes"})
    assert AuditRun.objects.get().fix

    client.post(RUN_NOW, {"mode": "dry_run"})
    assert AuditRun.objects.filter(fix=False).count() == 1


def test_release_asks_before_it_frees_the_lock(client, held_lock):
    lock, token, run = held_lock
    login(client, "release_lock_auditrun")

    asked = client.post(RELEASE, {"token": token})

    assert asked.status_code == 200
    assert lock.client.get(lock.key).decode() == token  # one click did not act
    page = text(asked)
    assert "Release the fixing-run lock?" in page and str(run.id) in page
    assert f'name="token" value="{token}"' in page and 'id="confirm-release-lock"' in page
    client.post(RELEASE, {"token": token, "confirmed": "yes"})
    assert not lock.client.exists(lock.key)


# --- The lock's hint names the configured Redis ---------------------------------------------


def test_an_unreachable_lock_names_the_configured_host_and_port_never_the_password(
    client, settings
):
    login(client, "release_lock_auditrun")
    settings.PROFILE_AUDIT_LOCK_REDIS_URL = "redis://:s3cret@127.0.0.1:6391/4"
    page = text(client.get(RUNS))
    assert "Cannot be read:" in page
    assert "redis-server --daemonize yes --bind 127.0.0.1 --port 6391 --save &quot;&quot;" in page
    assert "--port 6379" not in page and "s3cret" not in page
    # Release says the same when it cannot reach the lock.
    released = text(client.post(RELEASE, {"token": "h:1:x", "confirmed": "yes"}, follow=True))
    assert "Not released: cannot reach Redis at redis://:***@127.0.0.1:6391/4" in released
    assert "--port 6391" in released and "--port 6379" not in released

    settings.PROFILE_AUDIT_LOCK_REDIS_URL = "redis://cache.internal:6400/0"
    page = text(client.get(RUNS))
    assert "check that Redis on cache.internal port 6400 is up" in page
    assert "redis-server" not in page
