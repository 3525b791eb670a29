"""The admin an on-call engineer opens after an alert: runs, findings, revert. Staff only, and
every page costs the same few queries whether a run has 20 findings or 2,000."""

import uuid
from datetime import timedelta

import pytest
from django.contrib.auth.models import Permission, User
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from profiles.models import (
    AuditFinding,
    AuditRun,
    AuditStatus,
    AuditTrigger,
    FindingAction,
    FindingOutcome,
    FindingType,
    SocialProfile,
)
from profiles.services.audit import ProfileConnectionAuditService
from tests.factories import AssetFactory, OrganizationFactory, profile_for

pytestmark = pytest.mark.django_db

RUNS = reverse("admin:profiles_auditrun_changelist")
FINDINGS = reverse("admin:profiles_auditfinding_changelist")
MAX_QUERIES = 15


def run_url(run):
    return reverse("admin:profiles_auditrun_change", args=[run.id])


def revert_url(run):
    return reverse("admin:profiles_auditrun_revert", args=[run.id])


@pytest.fixture
def staff(client):
    """An on-call engineer: staff, may view runs, findings and profiles, and revert runs."""
    user = User.objects.create(username="oncall", is_staff=True)
    user.user_permissions.set(
        Permission.objects.filter(
            codename__in=[
                "view_auditrun",
                "view_auditfinding",
                "revert_auditrun",
                "view_socialprofile",
            ]
        )
    )
    client.force_login(user)
    return client


def recorded_run(*, findings: int, org=None, **fields) -> AuditRun:
    """A finished fixing run with ``findings`` findings of every kind, made with bulk_create."""
    org = org or OrganizationFactory(name="Acme Bakery")
    run = AuditRun.objects.create(
        trigger=AuditTrigger.SCHEDULE,
        organization=org,
        fix=True,
        status=AuditStatus.PARTIAL,
        found=findings,
        fixed=findings // 2,
        by_type={t.value: {"found": 0, "fixed": 0} for t in FindingType},
        error="organization 123: OperationalError: the database went away",
        finished_at=timezone.now(),
        duration_seconds=1.5,
        **fields,
    )
    kinds = [
        (FindingType.ORPHANED, FindingAction.SOFT_DELETE, "profiles.SocialProfile"),
        (FindingType.STALE_QUEUE_SETTING, FindingAction.SOFT_DELETE, "queues.QueueSetting"),
        (FindingType.INVALID_BOOST_REF, FindingAction.REMOVE_REFS, "boosts.BoostRule"),
        (FindingType.MISSING, FindingAction.DISPATCH_SYNC, "profiles.SocialProfile"),
    ]
    rows = []
    for n in range(findings):
        type_, action, model = kinds[n % len(kinds)]
        missing = type_ == FindingType.MISSING
        rows.append(
            AuditFinding(
                run=run,
                seq=n + 1,
                organization=org,
                type=type_,
                action=action,
                model=model,
                object_id=None if missing else uuid.uuid4(),
                platform="facebook",
                external_id=f"ext-{n}",
                before=None if missing else {"deleted_at": None},
                after={"deleted_at": "2030-01-01T00:00:00+00:00"},
                outcome=FindingOutcome.FIXED if n % 2 else FindingOutcome.STALE,
                detail="" if n % 2 else "no longer held when re-checked",
            )
        )
    AuditFinding.objects.bulk_create(rows, batch_size=1000)
    return run


def queries(client, url):
    with CaptureQueriesContext(connection) as captured:
        response = client.get(url)
    assert response.status_code == 200, response.status_code
    return response, len(captured)


# --- Pages, and what they cost ----------------------------------------------------------------


def test_the_run_list_shows_status_in_colour_and_costs_a_few_queries(staff):
    recorded_run(findings=2000)
    for n in range(30):
        AuditRun.objects.create(
            trigger=AuditTrigger.COMMAND,
            organization=OrganizationFactory(),
            status=AuditStatus.SUCCEEDED,
            started_at=timezone.now() - timedelta(hours=n),
        )

    response, count = queries(staff, RUNS)

    html = response.content.decode()
    # The dashboard on top of the list adds its change-driven section: the backlog (one query),
    # the last change-driven run and its schedule entry; and its drift section: the fights held,
    # and the held findings of the last run when it is partial (one indexed count each).
    assert count <= MAX_QUERIES + 5
    assert 'title="Partial" style="background:#b26a00' in html  # partial, in orange
    assert "Acme Bakery" in html and "fix" in html and "1.50 s" in html
    assert "Revert selected run" in html
    assert "Show counts" not in html  # facet counts would scan every finding ever recorded


def test_the_run_page_shows_counts_error_and_one_page_of_findings(staff):
    small = recorded_run(findings=20)
    big = recorded_run(findings=2000)
    queries(staff, run_url(small))  # once: the content type cache fills on first use

    _, small_count = queries(staff, run_url(small))
    response, big_count = queries(staff, run_url(big))

    html = response.content.decode()
    assert big_count == small_count <= MAX_QUERIES
    assert "Findings 1-100 of 2000 · page 1 of 20" in html
    assert html.count('<tr class="row') == 100
    assert "OperationalError: the database went away" in html
    assert 'class="audit-by-type"' in html
    assert 'href="?findings_page=2#findings"' in html
    assert "Revert this run" in html and revert_url(big) in html


def test_any_page_of_findings_costs_the_same(staff):
    run = recorded_run(findings=2000)

    _, first = queries(staff, run_url(run))
    response, last = queries(staff, run_url(run) + "?findings_page=20")
    assert first == last
    assert "Findings 1901-2000 of 2000 · page 20 of 20" in response.content.decode()
    for odd in ("999", "-3", "x"):
        response, _ = queries(staff, run_url(run) + f"?findings_page={odd}")
        assert "page 20 of 20" in response.content.decode() or "page 1 of 20" in (
            response.content.decode()
        )


def test_the_findings_list_filters_links_to_objects_and_costs_a_few_queries(staff):
    run = recorded_run(findings=2000)
    other = recorded_run(findings=10, org=OrganizationFactory(name="Other Org"))

    response, count = queries(staff, f"{FINDINGS}?run={run.id}")
    html = response.content.decode()
    assert count <= MAX_QUERIES
    assert "/admin/profiles/socialprofile/" in html
    assert "/admin/queues/queuesetting/" in html
    assert "/admin/boosts/boostrule/" in html
    assert "/admin/profiles/socialprofile/?q=ext-" in html  # a missing profile: its key
    assert str(other.id)[:8] not in html

    for query, expected in [
        (f"organization={other.organization_id}", 10),
        ("organization=other", 10),
        (f"run={run.id}&fixed=yes", 1000),
        (f"run={run.id}&fixed=no&outcome=stale", 1000),
        (f"run={run.id}&type=missing", 500),
        ("run=not-a-uuid", 0),
    ]:
        response = staff.get(f"{FINDINGS}?{query}")
        assert response.status_code == 200
        assert response.context["cl"].result_count == expected, query


def test_a_finding_shows_before_and_after_readably(staff):
    run = recorded_run(findings=4)
    finding = run.findings.get(seq=2)

    response = staff.get(reverse("admin:profiles_auditfinding_change", args=[finding.id]))

    html = response.content.decode()
    assert response.status_code == 200
    assert '<pre class="audit-json">{\n  &quot;deleted_at&quot;: null\n}</pre>' in html
    assert f"/admin/queues/queuesetting/{finding.object_id}/change/" in html
    assert run_url(run) in html


def test_runs_are_searched_by_id_and_organization_and_filtered_by_organization(staff):
    run = recorded_run(findings=1)
    other = recorded_run(findings=1, org=OrganizationFactory(name="Other Org"))

    for query in (
        f"q={run.id}",
        "q=Acme",
        f"organization={run.organization_id}",
        "organization=acme",
    ):
        response = staff.get(f"{RUNS}?{query}")
        assert response.status_code == 200, query
        assert [r.id for r in response.context["cl"].result_list] == [run.id], query
    listed = staff.get(f"{RUNS}?q=Acme").content.decode().split('id="result_list"')[1]
    assert str(other.id) not in listed


def test_history_cannot_be_edited_or_deleted(staff):
    run = recorded_run(findings=1)
    assert staff.post(run_url(run), {"status": "succeeded"}).status_code == 403
    delete = reverse("admin:profiles_auditrun_delete", args=[run.id])
    assert staff.post(delete, {"post": "yes"}).status_code == 403
    assert staff.get(reverse("admin:profiles_auditrun_add")).status_code == 403
    assert AuditRun.objects.get(id=run.id).status == AuditStatus.PARTIAL


# --- Revert from the admin ----------------------------------------------------------------------


@pytest.fixture
def fixed_run():
    asset = AssetFactory(is_selected=False)
    profile_for(asset)
    org = asset.connection.organization
    return ProfileConnectionAuditService().run_full_audit(org_id=org.id, fix=True).run


def test_the_revert_action_asks_then_reverts_and_says_what_it_did(staff, fixed_run):
    response = staff.post(
        RUNS, {"action": "revert_selected_run", "_selected_action": [str(fixed_run.id)]}
    )
    assert response.status_code == 302 and response.url == revert_url(fixed_run)

    response, count = queries(staff, revert_url(fixed_run))
    assert count <= MAX_QUERIES
    assert "Yes, revert this run" in response.content.decode()
    assert "prefer" not in response.content.decode()  # small: no advice to use the command

    response = staff.post(revert_url(fixed_run), {"mode": "fix"}, follow=True)

    revert = AuditRun.objects.get(reverted_run=fixed_run)
    assert revert.fix and revert.trigger == AuditTrigger.REVERT
    assert response.redirect_chain[-1][0] == run_url(revert)
    assert f"Reverted run {str(fixed_run.id)[:8]}: 1 put back, 0 conflicts" in (
        response.content.decode()
    )
    assert SocialProfile.objects.alive().count() == 1

    # A second time: refused with the reason, nothing written.
    response = staff.post(revert_url(fixed_run), {"mode": "fix"}, follow=True)
    assert "already reverted by run" in response.content.decode()
    assert AuditRun.objects.filter(reverted_run=fixed_run).count() == 1


def test_an_admin_revert_is_recorded_by_who_asked_and_sent_as_a_task(staff, fixed_run):
    """The request records the revert and sends it (here the task runs eagerly); the page it
    lands on is the revert's own run, with who asked and from where."""
    response = staff.post(revert_url(fixed_run), {"mode": "fix"}, follow=True)

    revert = AuditRun.objects.get(trigger=AuditTrigger.REVERT)
    assert response.redirect_chain[-1][0].endswith(f"/{revert.id}/change/")
    assert f"This is the revert's own run, {str(revert.id)[:8]}" in response.content.decode()
    assert (revert.status, revert.fixed, revert.requested_by) == (
        AuditStatus.SUCCEEDED,
        1,
        "oncall",
    )
    assert revert.requested_host == "127.0.0.1"


def test_the_revert_action_takes_one_run_at_a_time(staff, fixed_run):
    other = recorded_run(findings=1)
    response = staff.post(
        RUNS,
        {"action": "revert_selected_run", "_selected_action": [str(fixed_run.id), str(other.id)]},
        follow=True,
    )
    assert "Select exactly one run" in response.content.decode()
    assert not AuditRun.objects.filter(trigger=AuditTrigger.REVERT).exists()


def test_a_dry_run_of_a_revert_from_the_admin_changes_nothing(staff, fixed_run):
    response = staff.post(revert_url(fixed_run), {"mode": "dry_run"}, follow=True)

    assert "Dry run of a revert" in response.content.decode()
    assert "1 would be put back" in response.content.decode()
    assert SocialProfile.objects.alive().count() == 0
    assert AuditRun.objects.get(reverted_run=fixed_run).fix is False


def test_a_dry_run_cannot_be_reverted_and_the_page_says_why(staff):
    asset = AssetFactory(is_selected=False)
    profile_for(asset)
    dry = ProfileConnectionAuditService().run_full_audit(org_id=asset.connection.organization.id)

    html = staff.get(run_url(dry.run)).content.decode()
    assert 'id="revert-run"' not in html
    assert "Cannot be reverted: run" in html and "is a dry run" in html
    html = staff.get(revert_url(dry.run)).content.decode()
    assert "This run cannot be reverted" in html and "confirm-revert" not in html


# --- Who may see and do what ------------------------------------------------------------------


def test_non_staff_users_are_refused_everything(client, fixed_run):
    user = User.objects.create(username="customer", is_staff=False)
    user.user_permissions.set(Permission.objects.filter(codename__endswith="auditrun"))
    client.force_login(user)
    finding = fixed_run.findings.first()
    for url in (
        RUNS,
        run_url(fixed_run),
        FINDINGS,
        reverse("admin:profiles_auditfinding_change", args=[finding.id]),
        revert_url(fixed_run),
    ):
        response = client.get(url)
        assert response.status_code == 302 and "/admin/login/" in response.url, url
    response = client.post(revert_url(fixed_run), {"mode": "fix"})
    assert response.status_code == 302 and "/admin/login/" in response.url
    assert not AuditRun.objects.filter(trigger=AuditTrigger.REVERT).exists()


def test_staff_without_the_revert_permission_can_look_but_not_revert(client, fixed_run):
    user = User.objects.create(username="viewer", is_staff=True)
    user.user_permissions.set(Permission.objects.filter(codename="view_auditrun"))
    client.force_login(user)

    html = client.get(run_url(fixed_run)).content.decode()
    assert "Revert this run" not in html
    assert "Revert selected run" not in client.get(RUNS).content.decode()
    assert client.get(revert_url(fixed_run)).status_code == 403
    assert client.post(revert_url(fixed_run), {"mode": "fix"}).status_code == 403
    assert not AuditRun.objects.filter(trigger=AuditTrigger.REVERT).exists()
