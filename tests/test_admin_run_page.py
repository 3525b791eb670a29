"""A run's page as the on-call engineer reads it: its shards (the ids Celery's tools show), why
it is not a success, what "forced" means, a revert that is only queued, and findings holding
values of megabytes, shown cut with the whole value one click away."""

import json
import re
import time
import uuid

import pytest
from django.urls import reverse

from boosts.models import BoostRule
from profiles.models import (
    AuditFinding,
    AuditRun,
    AuditStatus,
    AuditTrigger,
    FindingAction,
    FindingOutcome,
    FindingType,
    ShardStatus,
    SocialProfile,
)
from profiles.services.audit import ProfileConnectionAuditService
from profiles.services.revert import claim_revert
from tests.factories import AssetFactory, OrganizationFactory, ProfileFactory, profile_for
from tests.test_admin import recorded_run, run_url, staff  # noqa: F401  (a fixture)

pytestmark = pytest.mark.django_db


def text(response) -> str:
    assert response.status_code == 200, response.status_code
    return re.sub(r"\s+", " ", response.content.decode())


def test_the_run_page_lists_its_shards_with_ids_ranges_cursors_and_deliveries(
    staff,  # noqa: F811
    settings,
    django_capture_on_commit_callbacks,
):
    settings.PROFILE_AUDIT_SHARD_SIZE = 2
    for _ in range(5):
        ProfileFactory()  # an orphan in each of five organizations: three shards
    with django_capture_on_commit_callbacks(execute=True):
        run = (
            ProfileConnectionAuditService()
            .run_audit_for_all_orgs(fix=True, trigger=AuditTrigger.SCHEDULE)
            .run
        )
    shards = list(run.shards.order_by("index"))
    assert len(shards) == 3

    page = text(staff.get(run_url(run)))

    table = page[
        page.index('id="audit-shards"') : page.index("</table>", page.index('id="audit-shards"'))
    ]
    rows = re.findall(r'<tr class="shard-(\w+)">(.*?)</tr>', table)
    assert [status for status, _ in rows] == [ShardStatus.DONE] * 3
    for shard, (_, row) in zip(shards, rows, strict=True):
        # The index, and the id as `celery inspect active` shows it in the task's arguments.
        assert f'<td>{shard.index}<br><code class="shard-id">{shard.id}</code></td>' in row
        assert f'cursor <code class="cursor">{shard.cursor}</code>' in row
        # Deliveries that died: none here (continuations and clean stops do not count).
        assert f"<td>{shard.attempts}</td>" in row and shard.attempts == 0
        assert shard.worker and shard.worker in row
        assert f">{shard.started_at:%Y-%m-%d %H:%M} UTC</time><br><time" in row
    # The ranges: from the first organization, up to (not including) the next shard's first.
    assert 'from the first organization</span><br><span class="line">to <code>' in rows[0][1]
    assert f"to <code>{shards[2].first_organization_id}</code>" in rows[1][1]
    assert f"from <code>{shards[2].first_organization_id}</code>" in rows[2][1]
    assert "to the last organization" in rows[2][1]
    assert "2 / 2" in rows[0][1]  # found / fixed


def test_a_run_of_one_organization_says_it_has_no_shards(staff):  # noqa: F811
    run = recorded_run(findings=1)
    assert "none (one organization, or a run that was not cut into shards)" in text(
        staff.get(run_url(run))
    )


def test_forced_says_in_words_what_applied(staff):  # noqa: F811
    plain = recorded_run(findings=1)
    forced = recorded_run(findings=1, forced=True)
    page = text(staff.get(run_url(plain)))
    assert "no: the mass-deletion guard and the run budget applied" in page
    assert "The mass-deletion guard was overridden" not in page
    assert "icon-no.svg" not in page
    assert "yes: the mass-deletion guard and the run budget were overridden (--force)" in text(
        staff.get(run_url(forced))
    )


@pytest.fixture
def fixed_run():
    asset = AssetFactory(is_selected=False)
    profile_for(asset)
    profile_for(AssetFactory(connection=asset.connection, is_selected=False))
    return (
        ProfileConnectionAuditService()
        .run_full_audit(org_id=asset.connection.organization.id, fix=True)
        .run
    )


def test_a_revert_not_yet_taken_by_a_worker_says_queued(staff, fixed_run):  # noqa: F811
    revert = claim_revert(run_id=fixed_run.id, fix=True, requested_by="oncall")

    page = text(staff.get(run_url(revert)))

    assert f"queued since {revert.started_at:%Y-%m-%d %H:%M} UTC: waiting for a worker" in page
    assert "nothing of 2 findings put back yet" in page
    assert "running: 0 of" not in page


def test_a_revert_partial_for_conflicts_says_why(staff, fixed_run):  # noqa: F811
    # Someone restored one of the two profiles by hand since the run: that one is a conflict.
    touched = SocialProfile.objects.dead().first()
    touched.restore()

    response = staff.post(
        reverse("admin:profiles_auditrun_revert", args=[fixed_run.id]), {"mode": "fix"}, follow=True
    )

    revert = AuditRun.objects.get(reverted_run=fixed_run)
    assert revert.status == AuditStatus.PARTIAL
    page = text(staff.get(run_url(revert)))
    why = re.search(r'<label>Why:</label> <div class="readonly">([^<]*)</div>', page)
    assert why
    assert why.group(1).startswith("1 conflict left alone, most often: ")
    conflict = revert.findings.get(outcome=FindingOutcome.CONFLICT)
    assert conflict.detail and conflict.detail in why.group(1)
    assert "1 conflicts" not in text(response)


# --- Values of megabytes ------------------------------------------------------------------------


def big_boost_finding(megabytes: int = 20) -> AuditFinding:
    """A run whose one finding holds a boost rule of ``megabytes`` MB of profile ids, as a
    real tenant's runaway rule did."""
    org = OrganizationFactory()
    ids = [str(uuid.uuid4()) for _ in range(megabytes * 1_000_000 // 40)]
    rule = BoostRule.objects.create(organization=org, name="runaway", profile_ids=ids)
    run = AuditRun.objects.create(
        trigger=AuditTrigger.COMMAND,
        organization=org,
        fix=True,
        status=AuditStatus.SUCCEEDED,
        found=1,
        fixed=1,
    )
    return AuditFinding.objects.create(
        run=run,
        seq=1,
        organization=org,
        type=FindingType.INVALID_BOOST_REF,
        action=FindingAction.REMOVE_REFS,
        model="boosts.BoostRule",
        object_id=rule.id,
        before={"profile_ids": ids},
        after={"profile_ids": ids[:1]},
        outcome=FindingOutcome.FIXED,
    )


def test_a_finding_of_20_mb_is_shown_cut_with_the_whole_value_one_click_away(staff):  # noqa: F811
    finding = big_boost_finding()
    whole = json.dumps(finding.before, indent=2, sort_keys=True)
    assert len(whole) > 20_000_000

    started = time.perf_counter()
    response = staff.get(run_url(finding.run))
    took = time.perf_counter() - started
    page = response.content.decode()

    assert len(page) < 200_000, len(page)  # was 44.9 MB
    assert took < 5, took
    value_url = reverse("admin:profiles_auditfinding_value", args=[finding.id, "before"])
    assert f'<a class="audit-whole-value" href="{value_url}">whole value (' in page
    assert finding.before["profile_ids"][0] in page  # the start of the value is shown
    small = f"{{&quot;profile_ids&quot;: [&quot;{finding.after['profile_ids'][0]}&quot;]}}"
    assert small in page  # the after value is small: shown whole

    detail = staff.get(reverse("admin:profiles_auditfinding_change", args=[finding.id]))
    assert len(detail.content) < 200_000 and value_url in detail.content.decode()

    value = staff.get(value_url)
    assert value.status_code == 200 and value["Content-Type"] == "application/json"
    assert json.loads(value.content) == finding.before
    assert (
        staff.get(
            reverse("admin:profiles_auditfinding_value", args=[finding.id, "other"])
        ).status_code
        == 404
    )


def test_the_whole_value_needs_the_view_permission(client):
    from django.contrib.auth.models import User

    finding = big_boost_finding(megabytes=1)
    client.force_login(User.objects.create(username="nobody", is_staff=True))
    response = client.get(reverse("admin:profiles_auditfinding_value", args=[finding.id, "before"]))
    assert response.status_code == 403


def test_every_page_writes_a_moment_the_same_way_with_its_zone(staff, fixed_run):  # noqa: F811
    moment = f"{fixed_run.started_at:%Y-%m-%d %H:%M} UTC"
    profile = SocialProfile.objects.get(id=fixed_run.findings.first().object_id)
    pages = {
        "run list": text(staff.get(reverse("admin:profiles_auditrun_changelist"))),
        "run page": text(staff.get(run_url(fixed_run))),
        "revert page": text(
            staff.get(reverse("admin:profiles_auditrun_revert", args=[fixed_run.id]))
        ),
        "profiles": text(staff.get(reverse("admin:profiles_socialprofile_changelist"))),
    }
    for name, page in pages.items():
        assert re.search(r"\d{4}-\d\d-\d\d(<br>| )\d\d:\d\d UTC", page), name
        assert not re.search(r"\b(a\.m\.|p\.m\.)", page), name
    assert moment in pages["run page"] and moment in pages["revert page"]
    assert f"{profile.deleted_at:%Y-%m-%d %H:%M} UTC" in pages["profiles"]
