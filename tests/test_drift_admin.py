"""The operator's view of drift (DESIGN "Drift history and fights"): records by state with the
week's worst organizations and writers, the fights with *Resume fixing* (its own permission, a
confirmation, logged with who), each record linked to its findings and each finding to its
record, and the run page's writers and held findings."""

import re
import uuid
from datetime import timedelta

import pytest
from django.contrib.admin.models import CHANGE, LogEntry
from django.contrib.auth.models import Permission, User
from django.urls import reverse
from django.utils import timezone
from structlog.testing import capture_logs

from profiles.models import (
    AuditFinding,
    AuditRun,
    AuditStatus,
    AuditTrigger,
    DriftRecord,
    DriftState,
    FindingAction,
    FindingOutcome,
    FindingType,
)
from tests.factories import DriftRecordFactory, OrganizationFactory

pytestmark = pytest.mark.django_db

DRIFT = reverse("admin:profiles_driftrecord_changelist")
RESUME = reverse("admin:profiles_driftrecord_resume")
FINDINGS = reverse("admin:profiles_auditfinding_changelist")
VIEW = ["view_driftrecord", "view_auditfinding", "view_auditrun"]


def login(client, *codenames: str) -> User:
    user = User.objects.create(username=f"oncall-{len(codenames)}", is_staff=True)
    user.user_permissions.set(Permission.objects.filter(codename__in=[*VIEW, *codenames]))
    client.force_login(user)
    return user


def text(response) -> str:
    assert response.status_code == 200, response.status_code
    return re.sub(r"\s+", " ", response.content.decode())


def listed(client, **params) -> set[uuid.UUID]:
    response = client.get(DRIFT, params)
    assert response.status_code == 200
    return {record.id for record in response.context["cl"].result_list}


def section(page: str, id_: str) -> str:
    start = page.index(f'id="{id_}"')
    return page[start : page.index("</section>", start)]


def writers(*names: str, at=None) -> list[dict]:
    at = (at or timezone.now()).isoformat()
    return [{"writer": name, "application_name": "psql", "at": at} for name in names]


def fight(org, *, undone_by="crm-import", hours_ago=2.0, **fields) -> DriftRecord:
    now = timezone.now()
    return DriftRecordFactory(
        organization=org,
        state=DriftState.FIGHTING,
        times_found=4,
        times_fixed=3,
        last_fixed_at=now - timedelta(hours=hours_ago + 1),
        recent_fixes=[
            {"at": (now - timedelta(hours=hours_ago + n)).isoformat(), "run": str(uuid.uuid4())}
            for n in (3, 2, 1)
        ],
        held_since=now - timedelta(hours=hours_ago),
        undone_by=undone_by,
        undone_at=now - timedelta(hours=hours_ago, minutes=30),
        last_writers=writers(undone_by),
        **fields,
    )


@pytest.fixture
def drift():
    """A week of drift: a bakery whose three profiles partner-sync keeps reviving, a florist
    fighting crm-import, and records that do not count as this week's recurring drift."""
    bakery = OrganizationFactory(name="Acme Bakery")
    florist = OrganizationFactory(name="Blue Florist")
    recurring = [
        DriftRecordFactory(
            organization=bakery,
            state=DriftState.RECURRING,
            times_found=2,
            times_fixed=1,
            undone_by="partner-sync",
            undone_at=timezone.now() - timedelta(hours=5),
            last_writers=writers("partner-sync"),
        )
        for _ in range(3)
    ]
    fighting = fight(florist)
    old = DriftRecordFactory(
        organization=florist,
        state=DriftState.RECURRING,
        undone_by="partner-sync",
        last_seen_at=timezone.now() - timedelta(days=10),
    )
    resolved = DriftRecordFactory(
        organization=bakery, state=DriftState.RESOLVED, resolved_at=timezone.now()
    )
    missing = DriftRecordFactory(
        organization=bakery,
        type=FindingType.MISSING,
        object_id=None,
        platform="facebook",
        external_id="1234567890",
        last_writers=writers("billing"),
    )
    return {
        "bakery": bakery,
        "florist": florist,
        "recurring": recurring,
        "fighting": fighting,
        "old": old,
        "resolved": resolved,
        "missing": missing,
    }


# --- The list: by state, the week's summary, the fights -----------------------------------------


def test_the_drift_page_opens_on_the_weeks_recurring_drift_and_the_fights(client, drift):
    login(client)
    page = text(client.get(DRIFT))

    by_org = section(page, "drift-by-organization")
    # Recurring or fighting, seen in the last 7 days: the bakery's three, the florist's fight
    # (its 10-day-old recurring record does not count).
    assert re.search(
        r"Acme Bakery</a>: 3 records</li><li><a [^>]*>Blue Florist</a>: 1 record<", by_org
    )
    by_writer = section(page, "drift-by-writer")
    assert re.search(
        r"partner-sync</a>: 3 records</li><li><a [^>]*>crm-import</a>: 1 record<", by_writer
    )
    fights = section(page, "drift-fights")
    fighting = drift["fighting"]
    assert fights.count('class="fight"') == 1
    assert "Blue Florist: Orphaned profile" in fights
    undone = f"{fighting.undone_at:%Y-%m-%d %H:%M:%S} UTC"
    assert f"fighting: fixed 3 times in 24 h; undone by crm-import at {undone}" in fights
    assert f"{fighting.held_since:%Y-%m-%d %H:%M} UTC" in fights
    # Without the permission, nothing to press, and the page says which permission it takes.
    assert "Resume fixing" not in fights.replace("resume fixing a fighting", "")
    assert "Can resume fixing a fighting drift record" in fights
    assert "resume_fixing_selected" not in page
    # Every record is listed, newest first, its state in colour.
    assert len(listed(client)) == 7
    assert page.count('class="audit-badge" title="Fighting (fixing held)"') == 1


def test_records_are_filtered_by_state_type_organization_and_writer_and_searched(client, drift):
    login(client)
    recurring = {r.id for r in drift["recurring"]}
    assert listed(client, state="recurring") == recurring | {drift["old"].id}
    assert listed(client, state="fighting") == {drift["fighting"].id}
    assert listed(client, state="comes_back", seen="7d") == recurring | {drift["fighting"].id}
    assert listed(client, held="yes") == {drift["fighting"].id}
    assert listed(client, type__exact="missing") == {drift["missing"].id}
    assert listed(client, organization=str(drift["florist"].id)) == {
        drift["fighting"].id,
        drift["old"].id,
    }
    assert listed(client, organization="florist") == {drift["fighting"].id, drift["old"].id}
    # A writer: the one that undid the fix, or one of the writers of the changes before it.
    assert listed(client, writer="partner-sync") == recurring | {drift["old"].id}
    assert listed(client, writer="billing") == {drift["missing"].id}
    assert listed(client, writer="unknown") == {drift["missing"].id, drift["resolved"].id}
    # Search: an object id, or a missing profile's external id, exactly.
    one = drift["recurring"][1]
    assert listed(client, q=str(one.object_id)) == {one.id}
    assert listed(client, q=" 1234567890 ") == {drift["missing"].id}
    assert listed(client, q="12345") == set()
    # The summary's links are these filters.
    page = text(client.get(DRIFT))
    link = re.search(r'href="([^"]+)">partner-sync</a>', section(page, "drift-by-writer"))
    assert listed(client, **dict(p.split("=") for p in link[1].split("?")[1].split("&amp;"))) == (
        recurring
    )


def test_drift_records_are_read_only_history(client, drift):
    login(client, "add_driftrecord", "change_driftrecord", "delete_driftrecord")
    record = drift["fighting"]
    change = reverse("admin:profiles_driftrecord_change", args=[record.id])
    assert client.get(reverse("admin:profiles_driftrecord_add")).status_code == 403
    assert client.post(change, {"state": "resolved"}).status_code == 403
    delete = reverse("admin:profiles_driftrecord_delete", args=[record.id])
    assert client.post(delete, {"post": "yes"}).status_code == 403
    record.refresh_from_db()
    assert record.state == DriftState.FIGHTING and record.held_since is not None
    page = text(client.get(change))
    assert "Save" not in page and 'name="_save"' not in page


# --- Resume fixing: its own permission, a confirmation, a log entry ------------------------------


def test_resume_fixing_needs_its_permission(client, drift):
    record = drift["fighting"]
    login(client)
    assert client.post(RESUME, {"ids": str(record.id), "confirmed": "yes"}).status_code == 403
    # Nor through the list's action: it is not offered, so the POST does nothing.
    client.post(DRIFT, {"action": "resume_fixing_selected", "_selected_action": [str(record.id)]})
    page = text(client.get(reverse("admin:profiles_driftrecord_change", args=[record.id])))
    assert 'id="resume-fixing"' not in page
    record.refresh_from_db()
    assert record.held_since is not None and record.state == DriftState.FIGHTING
    assert not LogEntry.objects.exists()


def test_resume_fixing_asks_first_then_resumes_and_logs_who(client, drift):
    record = drift["fighting"]
    user = login(client, "resume_fixing_driftrecord")
    fights = section(text(client.get(DRIFT)), "drift-fights")
    assert "Resume fixing…" in fights
    page = text(client.get(reverse("admin:profiles_driftrecord_change", args=[record.id])))
    assert 'id="resume-fixing"' in page

    # One click asks (naming the fight) and changes nothing.
    asked = text(client.post(RESUME, {"ids": str(record.id)}))
    assert 'id="confirm-resume-fixing"' in asked
    assert "undone by crm-import" in asked and "Blue Florist" in asked
    record.refresh_from_db()
    assert record.held_since is not None

    with capture_logs() as logs:
        response = client.post(RESUME, {"ids": str(record.id), "confirmed": "yes"}, follow=True)
    assert "Resumed fixing of 1 drift record" in text(response)
    record.refresh_from_db()
    assert record.held_since is None and record.recent_fixes == []
    assert record.state == DriftState.RECURRING
    assert record.resumed_by == user.username and record.resumed_at is not None
    entry = LogEntry.objects.get(object_id=str(record.id))
    assert entry.user == user and entry.action_flag == CHANGE
    assert "Resumed fixing" in entry.get_change_message()
    event = next(e for e in logs if e["event"] == "profile_audit.drift_fixing_resumed")
    assert event["resumed_by"] == user.username and event["drift_ids"] == [str(record.id)]
    # No fight left to resume.
    assert section(text(client.get(DRIFT)), "drift-fights").count('class="fight"') == 0


def test_the_resume_action_takes_the_selected_fights_through_the_same_question(client, drift):
    user = login(client, "resume_fixing_driftrecord")
    second = fight(drift["bakery"], undone_by="partner-sync", hours_ago=1)
    selected = [drift["fighting"].id, second.id, drift["recurring"][0].id]  # one is not held
    asked = client.post(
        DRIFT,
        {"action": "resume_fixing_selected", "_selected_action": [str(i) for i in selected]},
    )
    page = text(asked)
    assert 'id="confirm-resume-fixing"' in page
    ids = re.search(r'name="ids" value="([^"]+)"', page)[1].split(",")
    assert set(ids) == {str(drift["fighting"].id), str(second.id)}

    client.post(RESUME, {"ids": ",".join(ids), "confirmed": "yes"})
    assert not DriftRecord.objects.filter(held_since__isnull=False).exists()
    assert set(LogEntry.objects.filter(user=user).values_list("object_id", flat=True)) == set(ids)


# --- Records and their findings ------------------------------------------------------------------


def finding(run, seq, record=None, **fields) -> AuditFinding:
    defaults = {
        "organization_id": record.organization_id if record else None,
        "type": record.type if record else FindingType.ORPHANED,
        "action": FindingAction.SOFT_DELETE,
        "model": "profiles.SocialProfile",
        "object_id": record.object_id if record else uuid.uuid4(),
        "platform": record.platform if record else "facebook",
        "external_id": record.external_id if record else f"ext-{seq}",
        "outcome": FindingOutcome.FIXED,
        "drift": record,
    }
    return AuditFinding.objects.create(run=run, seq=seq, **{**defaults, **fields})


def fixing_run(org, **fields) -> AuditRun:
    return AuditRun.objects.create(
        trigger=AuditTrigger.SCHEDULE,
        organization=org,
        fix=True,
        status=fields.pop("status", AuditStatus.SUCCEEDED),
        finished_at=timezone.now(),
        by_type={t.value: {"found": 0, "fixed": 0} for t in FindingType},
        **fields,
    )


def test_a_record_links_to_its_findings_and_each_finding_to_its_record(client, drift):
    login(client, "view_socialprofile")
    record, missing = drift["recurring"][0], drift["missing"]
    first, second = fixing_run(drift["bakery"]), fixing_run(drift["bakery"])
    mine = [
        finding(first, 1, record),
        finding(second, 1, record, recurring=True, writers=writers("partner-sync")),
    ]
    finding(second, 2, drift["recurring"][1])  # another object of the same organization
    finding(second, 3, record, type=FindingType.DESELECTED)  # another type: another record
    wanted_missing = finding(
        second, 4, missing, model="profiles.SocialProfile", action=FindingAction.DISPATCH_SYNC
    )
    finding(second, 5, missing, platform="instagram")  # same external id, another platform

    page = text(client.get(reverse("admin:profiles_driftrecord_change", args=[record.id])))
    url = re.search(r'<a href="([^"]+)">findings</a>', page)[1].replace("&amp;", "&")
    response = client.get(url)
    assert {f.id for f in response.context["cl"].result_list} == {f.id for f in mine}
    page = text(client.get(reverse("admin:profiles_driftrecord_change", args=[missing.id])))
    url = re.search(r'<a href="([^"]+)">findings</a>', page)[1].replace("&amp;", "&")
    assert [f.id for f in client.get(url).context["cl"].result_list] == [wanted_missing.id]

    # A finding's page: its record (with the record's state now), new or recurring, writers.
    page = text(client.get(reverse("admin:profiles_auditfinding_change", args=[mine[1].id])))
    assert reverse("admin:profiles_driftrecord_change", args=[record.id]) in page
    assert 'title="Recurring"' in page
    assert "recurring: found again after it was fixed or resolved" in page
    assert "partner-sync" in page and "application psql" in page
    page = text(client.get(reverse("admin:profiles_auditfinding_change", args=[mine[0].id])))
    assert "new: first found by this run" in page
    # The findings list: each row says new or recurring, linking to its record.
    rows = text(client.get(FINDINGS, {"run": second.id}))
    assert rows.count('class="audit-drift quiet"') == 5 and ">recurring</a>" in rows

    # A record pruned after a long quiet period leaves its findings' link dangling: said so.
    DriftRecord.objects.filter(id=record.id).delete()
    page = text(client.get(reverse("admin:profiles_auditfinding_change", args=[mine[1].id])))
    assert "gone: pruned after a long quiet period" in page


def test_the_run_page_shows_its_findings_writers_and_counts_held_ones(client, drift):
    login(client)
    record = drift["fighting"]
    run = fixing_run(drift["florist"], status=AuditStatus.PARTIAL, found=3, fixed=1)
    finding(
        run,
        1,
        record,
        outcome=FindingOutcome.HELD,
        recurring=True,
        detail="fighting: fixed 3 times in 24 h; undone by crm-import",
        writers=writers("crm-import"),
    )
    finding(run, 2, outcome=FindingOutcome.HELD, writers=writers("crm-import", "billing"))
    finding(run, 3, writers=None)

    page = text(client.get(reverse("admin:profiles_auditrun_change", args=[run.id])))

    assert re.search(r'id="held-findings">2 findings</a> held, not fixed', page)
    assert "2 findings held: fixing them fights another writer" in page  # why it is partial
    table = page[page.index('class="audit-findings"') :]
    assert "<th>detail, writers</th>" in table
    rows = re.findall(r'<tr class="row[12]">(.*?)</tr>', table)
    assert len(rows) == 3
    assert '<span class="writer">crm-import</span>' in rows[0] and ">recurring</a>" in rows[0]
    assert '<span class="writer">billing</span>' in rows[1] and "crm-import" in rows[1]
    assert 'class="writer"' not in rows[2]
    # The held count links to the held findings.
    url = re.search(r'href="([^"]+)" id="held-findings"', page)[1].replace("&amp;", "&")
    held = client.get(url).context["cl"].result_list
    assert {f.seq for f in held} == {1, 2}


def test_the_drift_pages_cost_a_fixed_number_of_queries(
    client, drift, django_assert_max_num_queries
):
    login(client, "resume_fixing_driftrecord")
    for n in range(30):
        fight(OrganizationFactory(name=f"Org {n}"), undone_by=f"writer-{n % 7}")
    with django_assert_max_num_queries(20):
        assert client.get(DRIFT).status_code == 200
    with django_assert_max_num_queries(20):
        assert client.get(DRIFT, {"state": "comes_back", "writer": "writer-3"}).status_code == 200


def test_the_dashboard_counts_the_fights_held_and_links_to_them(client, drift):
    login(client)
    runs = reverse("admin:profiles_auditrun_changelist")
    box = section(text(client.get(runs)), "drift-fights")
    link = re.search(
        r'<a href="([^"]+)" class="audit-overdue" id="fights-held">1 fight held</a>', box
    )
    assert link, box
    assert listed(client, **dict([link[1].split("?")[1].split("=")])) == {drift["fighting"].id}
    fight(drift["bakery"])
    assert "2 fights held" in text(client.get(runs))
    DriftRecord.objects.update(held_since=None)
    assert "No fight held" in section(text(client.get(runs)), "drift-fights")


# --- After real runs: what the audit recorded is what the pages and /metrics say ----------------


def test_a_real_fight_is_shown_counted_and_resumed_from_the_admin(client, committed):
    """partner-sync revives a profile the audit soft-deletes, three times: the fourth fixing run
    holds it; the run page, the drift page and /metrics say so, and Resume fixing lets the next
    run fix it again."""
    from profiles.services.audit import ProfileConnectionAuditService
    from tests.test_drift import deselected_profile, revive
    from tests.test_metrics import scrape, value

    org, profile = deselected_profile(name="Partnered Ltd")
    audit = ProfileConnectionAuditService()

    def fix():
        return committed(audit.run_full_audit, org_id=org.id, fix=True).run

    for _ in range(3):
        fix()
        revive(profile)  # by partner-sync
    held_run = fix()
    assert held_run.status == AuditStatus.PARTIAL

    login(client, "resume_fixing_driftrecord")
    page = text(client.get(reverse("admin:profiles_auditrun_change", args=[held_run.id])))
    assert re.search(r'id="held-findings">1 finding</a> held', page)
    assert "1 finding held: fixing them fights another writer" in page
    assert '<span class="writer">partner-sync</span>' in page
    record = DriftRecord.objects.get(object_id=profile.id)
    fights = section(text(client.get(DRIFT)), "drift-fights")
    assert "Partnered Ltd: Deselected profile" in fights and "undone by partner-sync" in fights
    assert "Partnered Ltd</a>: 1 record" in section(
        text(client.get(DRIFT)), "drift-by-organization"
    )

    samples = scrape(client)
    assert value(samples, "drift_fights_held") == 1
    assert value(samples, "drift_records", state="fighting", type="deselected") == 1
    assert value(samples, "drift_recurring_by_writer", writer="partner-sync") == 1
    assert value(samples, "drift_recurring_by_writer", writer="other") == 0

    client.post(RESUME, {"ids": str(record.id), "confirmed": "yes"})
    assert value(scrape(client), "drift_fights_held") == 0
    after = fix()
    assert AuditFinding.objects.get(run=after, object_id=profile.id).outcome == FindingOutcome.FIXED
    profile.refresh_from_db()
    assert profile.deleted_at is not None


def test_drift_that_stays_shows_every_audit_that_found_it(client):
    """Three dry runs find the same drift; the record is written once, and the list, the
    record's page and the "seen" filter still count all three and the last one."""
    from profiles.services.audit import ProfileConnectionAuditService
    from tests.test_drift import deselected_profile

    org, profile = deselected_profile(name="Steady Ltd")
    audit = ProfileConnectionAuditService()
    for _ in range(3):
        audit.run_full_audit(org_id=org.id)
    record = DriftRecord.objects.get(object_id=profile.id)
    DriftRecord.objects.filter(id=record.id).update(
        last_seen_at=timezone.now() - timedelta(days=40)
    )

    login(client)
    assert "3 / 0" in text(client.get(DRIFT, {"organization": str(org.id)}))
    page = text(client.get(reverse("admin:profiles_driftrecord_change", args=[record.id])))
    assert 'Times found:</label> <div class="readonly">3<' in page
    assert record.id in listed(client, seen="7d")
