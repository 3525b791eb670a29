"""The findings list stays fast with millions of findings: searches are exact matches on indexed
columns, the count stops at a cap, and only indexed columns can be sorted on. Measured figures
at 5 million findings are in the README (bench/admin_at_scale.py)."""

import pytest
from django.urls import reverse

from profiles.admin import CappedCountPaginator
from profiles.models import AuditFinding
from tests.test_admin import recorded_run, staff  # noqa: F401  (a fixture)

pytestmark = pytest.mark.django_db
FINDINGS = reverse("admin:profiles_auditfinding_changelist")


def listed(response) -> list[AuditFinding]:
    assert response.status_code == 200
    return list(response.context["cl"].result_list)


def test_search_finds_a_finding_by_object_id_run_id_or_external_id(staff):  # noqa: F811
    run = recorded_run(findings=30)
    other = recorded_run(findings=5)
    finding = AuditFinding.objects.filter(run=run, object_id__isnull=False).order_by("seq")[3]

    assert [f.id for f in listed(staff.get(FINDINGS, {"q": str(finding.object_id)}))] == [
        finding.id
    ]
    assert {f.run_id for f in listed(staff.get(FINDINGS, {"q": str(other.id)}))} == {other.id}
    by_external = listed(staff.get(FINDINGS, {"q": " ext-3 "}))
    assert {f.external_id for f in by_external} == {"ext-3"} and len(by_external) == 2
    assert listed(staff.get(FINDINGS, {"q": "ext-"})) == []  # exact, not contains


def test_past_the_cap_the_list_says_more_than_instead_of_counting(staff, monkeypatch):  # noqa: F811
    monkeypatch.setattr(CappedCountPaginator, "cap", 50)
    recorded_run(findings=120)
    page = staff.get(FINDINGS).content.decode()
    assert "More than 50 audit findings: filter to narrow them down." in page
    narrowed = staff.get(FINDINGS, {"q": "ext-3"}).content.decode()
    assert "1 audit finding" in narrowed and "More than" not in narrowed


def test_only_indexed_columns_sort(staff):  # noqa: F811
    run = recorded_run(findings=12)
    default = [f.id for f in listed(staff.get(FINDINGS, {"run": run.id}))]
    # Columns 3 and 4 are the type and the action: not sortable, so asking changes nothing.
    for column in ("3", "-4"):
        sorted_by = listed(staff.get(FINDINGS, {"run": run.id, "o": column}))
        assert [f.id for f in sorted_by] == default
    by_seq_desc = listed(staff.get(FINDINGS, {"run": run.id, "o": "-0"}))
    assert [f.seq for f in by_seq_desc] == sorted((f.seq for f in by_seq_desc), reverse=True)
    page = staff.get(FINDINGS).content.decode()
    assert 'class="sortable column-seq' in page and 'class="sortable column-type' not in page


def test_the_list_keeps_the_external_id_in_few_columns(staff):  # noqa: F811
    """Beside the admin's menu and the filters, at 1366 px (the browser test measures it): no
    action column, the platform under the external id, no run column within one run."""
    run = recorded_run(findings=4)
    page = staff.get(FINDINGS).content.decode()
    assert 'class="column-external_key"' in page and "column-action" not in page
    assert 'ext-1<br><span class="quiet">facebook</span>' in page
    assert "column-run_link" in page
    within = staff.get(FINDINGS, {"run": run.id}).content.decode()
    assert "column-run_link" not in within and 'class="column-external_key"' in within
