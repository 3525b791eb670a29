"""Seen in a real browser: an on-call engineer logs in to the admin, opens the audit run, reads
its findings and reverts it. Drives the distribution's Chromium (``apt-get install chromium``)
through Playwright; ``make test-browser`` runs it (``.ci/run`` installs Chromium first).

The run page is saved as a screenshot (``PROFILE_AUDIT_SCREENSHOT``, default
``var/browser/audit-run.png``; ``docs/audit-run.png`` in the README is one of these), and so are
the top of the run page down to its shards (``audit-run-shards.png``), the dashboard's trend
chart (``trend-chart.png``) and the drift records page (``drift-records.png``), next to it in the
same directory.
"""

import os
from datetime import timedelta
from io import StringIO
from pathlib import Path

import pytest
from django.conf import settings
from django.contrib.auth.models import User
from django.core.management import call_command
from django.utils import timezone

from profiles.models import AuditRun, AuditStatus, AuditTrigger
from profiles.services.audit import ProfileConnectionAuditService

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

CHROMIUM = os.environ.get("PROFILE_AUDIT_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOT = Path(
    os.environ.get(
        "PROFILE_AUDIT_SCREENSHOT", str(settings.BASE_DIR / "var" / "browser" / "audit-run.png")
    )
)


@pytest.fixture
def fixed_demo_run(django_capture_on_commit_callbacks, settings):
    """The demo organizations, fixed by one all-organization run cut into shards of two."""
    settings.PROFILE_AUDIT_SHARD_SIZE = 2
    call_command("seed_demo", stdout=StringIO())
    with django_capture_on_commit_callbacks(execute=True):
        report = ProfileConnectionAuditService().run_audit_for_all_orgs(
            fix=True, trigger=AuditTrigger.SCHEDULE
        )
    assert report.run.fixed > 5
    return report.run


def test_an_operator_opens_a_run_sees_its_findings_and_reverts_it(
    live_server, fixed_demo_run, monkeypatch
):
    from playwright.sync_api import expect, sync_playwright

    User.objects.create_superuser("oncall", "oncall@example.com", "a long test password")
    run = fixed_demo_run
    # A real page id can be 20 digits with nowhere to wrap.
    missing = run.findings.filter(object_id=None).order_by("seq").first()
    run.findings.filter(id=missing.id).update(external_id="1234567890" * 3)
    # Playwright's sync API runs an event loop in this thread; the ORM is not used meanwhile.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        try:
            page = browser.new_page(viewport={"width": 1366, "height": 900})
            page.set_default_timeout(20_000)

            page.goto(f"{live_server.url}/admin/login/?next=/admin/profiles/auditrun/")
            page.fill("#id_username", "oncall")
            page.fill("#id_password", "a long test password")
            page.click("input[type=submit]")
            expect(page.locator("#result_list")).to_be_visible()

            # The newest run is the fix: open it from the list.
            page.locator("#result_list tbody tr").first.locator("th a").click()
            expect(page.locator("#findings")).to_contain_text(
                f"Findings 1-{run.found} of {run.found}"
            )
            findings = page.locator("table.audit-findings tbody tr")
            expect(findings).to_have_count(run.found)
            expect(page.locator("table.audit-findings")).to_contain_text("Missing profile")
            expect(page.locator(".audit-by-type")).to_be_visible()
            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOT), full_page=True)
            # Findings, with their writers, fit the window: nothing scrolls sideways at 1366 px.
            assert page.evaluate("document.documentElement.scrollWidth") <= 1366

            # Its shards, each with the id `celery inspect active` shows for its task.
            shards = page.locator("#audit-shards tbody tr")
            expect(shards).to_have_count(run.shards.count())
            for shard in run.shards.all():
                expect(page.locator("#audit-shards")).to_contain_text(str(shard.id))
            page.locator("#shards").screenshot(
                path=str(SCREENSHOT.with_name("audit-run-shards.png"))
            )
            assert in_view(page, "#audit-shards"), "the shards table is cut off at 1366 px"
            page.locator("#shards").screenshot(
                path=str(SCREENSHOT.with_name("audit-run-shards.png"))
            )

            # The findings list keeps its last column in view at 1366 and 1400 pixels.
            for width, query in ((1366, f"?run={run.id}"), (1400, ""), (1366, "")):
                page.goto(f"{live_server.url}/admin/profiles/auditfinding/{query}")
                page.set_viewport_size({"width": width, "height": 900})
                expect(page.locator("#result_list th.column-external_key")).to_be_visible()
                assert page.evaluate("document.documentElement.scrollWidth") <= width
                page.screenshot(
                    path=str(SCREENSHOT.with_name(f"findings-{width}{bool(query)}.png"))
                )
                assert in_view(page, "#result_list th.column-external_key"), width
                assert in_view(page, "#result_list td.field-external_key"), width
            page.set_viewport_size({"width": 1366, "height": 900})
            page.goto(f"{live_server.url}/admin/profiles/auditrun/{run.id}/change/")

            # A finding links to the object it concerns.
            page.locator("table.audit-findings tbody tr").first.locator("a").first.click()
            expect(page.locator("pre.audit-json").first).to_be_visible()
            page.go_back()

            page.click("#revert-run")
            expect(page.locator("#confirm-revert")).to_be_visible()
            page.click("#confirm-revert")
            expect(page.locator(".messagelist")).to_contain_text(
                f"Reverted run {str(run.id)[:8]}: {run.fixed} put back, 0 conflicts"
            )
            expect(page.locator("#findings")).to_contain_text("Put back (revert)")
        finally:
            browser.close()

    monkeypatch.delenv("DJANGO_ALLOW_ASYNC_UNSAFE")
    revert = AuditRun.objects.get(reverted_run=run)
    assert revert.fix and revert.status == AuditStatus.SUCCEEDED
    assert revert.fixed == run.fixed
    assert SCREENSHOT.stat().st_size > 10_000


DASHBOARD_SCREENSHOT = Path(
    os.environ.get(
        "PROFILE_AUDIT_DASHBOARD_SCREENSHOT",
        str(settings.BASE_DIR / "var" / "browser" / "dashboard.png"),
    )
)


def right_edge(page, selector: str) -> float:
    box = page.locator(selector).first.bounding_box()
    assert box is not None, selector
    return box["x"] + box["width"]


# Whether the element's right edge is in view: inside the window and inside every ancestor that
# clips or scrolls sideways (the admin's results table scrolls inside its own box).
IN_VIEW = """sel => {
  const el = document.querySelector(sel);
  let right = window.innerWidth;
  for (let p = el.parentElement; p; p = p.parentElement) {
    if (["auto", "scroll", "hidden"].includes(getComputedStyle(p).overflowX))
      right = Math.min(right, p.getBoundingClientRect().right);
  }
  return el.getBoundingClientRect().right <= right + 0.5;
}"""


def in_view(page, selector: str) -> bool:
    return page.evaluate(IN_VIEW, selector)


def test_an_operator_reads_the_dashboard_and_runs_the_audit_now(
    live_server, fixed_demo_run, monkeypatch
):
    from playwright.sync_api import expect, sync_playwright

    from profiles.services.run_lock import fixing_run_lock

    User.objects.create_superuser("oncall", "oncall@example.com", "a long test password")
    run = fixed_demo_run
    # Two days of history before it, for the chart: scheduled runs every six hours, one of
    # them large, one failed, one that found nothing, and a dry run.
    for n in range(1, 9):
        started = run.started_at - timedelta(hours=6 * n)
        AuditRun.objects.create(
            trigger=AuditTrigger.SCHEDULE,
            fix=True,
            status=AuditStatus.SUCCEEDED,
            started_at=started,
            finished_at=started + timedelta(seconds=40),
            duration_seconds=40.0,
            found=3 + (n * 5) % 11,
            fixed=2 + (n * 5) % 11,
        )
    history = AuditRun.objects.exclude(id=run.id).order_by("started_at")
    AuditRun.objects.filter(id=history[1].id).update(found=4_200, fixed=4_100)
    AuditRun.objects.filter(id=history[3].id).update(
        status=AuditStatus.FAILED, found=0, fixed=0, error="OperationalError: server closed"
    )
    AuditRun.objects.filter(id=history[5].id).update(found=0, fixed=0)
    AuditRun.objects.filter(id=history[6].id).update(fix=False, trigger=AuditTrigger.COMMAND)
    # Long cells, as in real life: a revert of one organization, a run skipped on the lock.
    AuditRun.objects.create(
        trigger=AuditTrigger.REVERT,
        organization=run.findings.exclude(organization=None).first().organization,
        reverted_run=run,
        fix=True,
        status=AuditStatus.SKIPPED,
    )
    # A fixing run in progress holds the lock.
    lock = fixing_run_lock()
    assert lock.acquire()
    token = lock.client.get(lock.key).decode()
    AuditRun.objects.filter(id=run.id).update(lock_token=token)
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")

    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
            )
            try:
                page = browser.new_page(viewport={"width": 1366, "height": 900})
                page.set_default_timeout(20_000)
                page.goto(f"{live_server.url}/admin/login/?next=/admin/profiles/auditrun/")
                page.fill("#id_username", "oncall")
                page.fill("#id_password", "a long test password")
                page.click("input[type=submit]")

                expect(page.locator("#last-scheduled-run")).to_contain_text(
                    f"{run.found} / {run.fixed}"
                )
                expect(page.locator("#next-due")).to_contain_text("UTC")
                chart = page.locator("#audit-trend")
                expect(chart).to_be_visible()
                assert chart.bounding_box()["height"] > 100
                expect(page.locator("#audit-trend .audit-chart-run")).to_have_count(9)
                expect(page.locator("#lock-holder")).to_have_text(token.rsplit(":", 1)[0])
                # Found, fixed and duration in view without scrolling sideways.
                width = page.evaluate("window.innerWidth")
                assert page.evaluate("document.documentElement.scrollWidth") <= width
                for column in ("found", "fixed", "duration"):
                    assert in_view(page, f"#result_list th.column-{column}"), column
                DASHBOARD_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(DASHBOARD_SCREENSHOT), full_page=True)
                page.locator("section.trend").screenshot(
                    path=str(DASHBOARD_SCREENSHOT.with_name("trend-chart.png"))
                )
                # The chart: log scale with its ticks, failed and empty runs marked, dry runs apart.
                expect(page.locator("section.trend h2")).to_contain_text("(log scale)")
                expect(page.locator("#audit-trend .audit-chart-run.failed")).to_have_count(1)
                expect(page.locator("#audit-trend .nothing-found")).to_have_count(2)
                expect(page.locator("#audit-trend rect.found.dry")).to_have_count(1)
                tick = page.locator("#audit-trend text", has_text="1,000").first
                expect(tick).to_be_visible()

                # Fix asks first: one click shows a question and sends nothing.
                page.click("#run-now-fix")
                expect(page.locator("#confirm-run-now-fix")).to_be_visible()
                page.click("#cancel-action")
                expect(page.locator("#audit-dashboard")).to_be_visible()
                assert not AuditRun.objects.filter(trigger=AuditTrigger.ADMIN).exists()
                # And so does Release.
                page.click("#release-lock")
                expect(page.locator("#confirm-release-lock")).to_be_visible()
                assert lock.client.get(lock.key).decode() == token
                page.click("#cancel-action")

                # Run now (a dry run: the fixing lock is held) sends a run that appears.
                page.click("#run-now-dry")
                expect(page.locator(".messagelist")).to_contain_text(
                    "Sent: a dry run of every organization"
                )
                first_row = page.locator("#result_list tbody tr").first
                expect(first_row).to_contain_text("Admin")
                expect(first_row).to_contain_text("dry run")

                # A run's before/after stay readable in an 800-pixel window.
                page.set_viewport_size({"width": 800, "height": 900})
                page.goto(f"{live_server.url}/admin/profiles/auditrun/{run.id}/change/")
                assert page.evaluate("document.documentElement.scrollWidth") <= 800
                after = page.locator("table.audit-findings td.after").first
                assert after.bounding_box()["width"] >= 300
            finally:
                browser.close()
    finally:
        lock.release()
        monkeypatch.delenv("DJANGO_ALLOW_ASYNC_UNSAFE")

    asked = AuditRun.objects.get(trigger=AuditTrigger.ADMIN)
    assert asked.requested_by == "oncall" and not asked.fix
    assert DASHBOARD_SCREENSHOT.stat().st_size > 10_000


def test_an_operator_reads_the_fights_and_resumes_fixing(live_server, monkeypatch):
    """The drift page at 1366 px: the week's organizations and writers, the fights, and every
    column of the list in view; Resume fixing asks on a page of its own, then resumes."""
    from playwright.sync_api import expect, sync_playwright

    from profiles.models import DriftRecord, DriftState
    from tests.factories import DriftRecordFactory, OrganizationFactory

    User.objects.create_superuser("oncall", "oncall@example.com", "a long test password")
    now = timezone.now()
    writers = ["partner-sync", "crm-import", "billing"]
    for n, name in enumerate(["Acme Bakery", "Blue Florist", "Corner Garage"]):
        org = OrganizationFactory(name=name)
        for m in range(3 - n):
            writer = writers[(n + m) % 3]
            DriftRecordFactory(
                organization=org,
                state=DriftState.RECURRING,
                times_found=2 + m,
                times_fixed=1 + m,
                undone_by=writer,
                undone_at=now - timedelta(hours=m + 1),
                last_writers=[
                    {"writer": writer, "application_name": "psql", "at": now.isoformat()}
                ],
            )
        DriftRecordFactory(
            organization=org,
            type="missing",
            object_id=None,
            platform="facebook",
            external_id="1234567890" * 3,
            state=DriftState.FIGHTING,
            times_found=5,
            times_fixed=3,
            held_since=now - timedelta(hours=n + 1),
            undone_by=writers[n],
            undone_at=now - timedelta(hours=n + 1, minutes=20),
            recent_fixes=[{"at": (now - timedelta(hours=h)).isoformat()} for h in (9, 6, 3)],
        )
    fight = DriftRecord.objects.filter(held_since__isnull=False).order_by("-held_since").first()
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        try:
            page = browser.new_page(viewport={"width": 1366, "height": 900})
            page.set_default_timeout(20_000)
            page.goto(f"{live_server.url}/admin/login/?next=/admin/profiles/driftrecord/")
            page.fill("#id_username", "oncall")
            page.fill("#id_password", "a long test password")
            page.click("input[type=submit]")

            expect(page.locator("#drift-by-organization li").first).to_contain_text(
                "Acme Bakery: 4 records"
            )
            expect(page.locator("#drift-by-writer li")).to_have_count(3)
            expect(page.locator("#drift-fights tr.fight")).to_have_count(3)
            page.screenshot(
                path=str(DASHBOARD_SCREENSHOT.with_name("drift-records.png")), full_page=True
            )
            assert page.evaluate("document.documentElement.scrollWidth") <= 1366
            for column in ("last_seen", "state_badge", "findings_link"):
                assert in_view(page, f"#result_list th.column-{column}"), column

            # Resume fixing asks first; cancelling changes nothing.
            page.locator("#drift-fights tr.fight").first.locator("button.resume-fixing").click()
            expect(page.locator("#confirm-resume-fixing")).to_be_visible()
            expect(page.locator("#content-main")).to_contain_text("Acme Bakery: Missing profile")
            page.click("#cancel-action")
            expect(page.locator("#drift-fights tr.fight")).to_have_count(3)
            page.locator("#drift-fights tr.fight").first.locator("button.resume-fixing").click()
            page.click("#confirm-resume-fixing")
            expect(page.locator(".messagelist")).to_contain_text("Resumed fixing of 1 drift record")
        finally:
            browser.close()
    monkeypatch.delenv("DJANGO_ALLOW_ASYNC_UNSAFE")
    fight.refresh_from_db()
    assert fight.held_since is None and fight.resumed_by == "oncall"
