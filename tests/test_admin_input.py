"""Whatever is typed into an admin filter or search box gets a page, never a server error:
PostgreSQL rejects NUL in text parameters, UUID columns reject anything but a UUID, and a URL
can carry any of it, even bytes that are not UTF-8."""

from urllib.parse import quote

import pytest
from django.contrib import admin
from django.contrib.admin.views.main import SEARCH_VAR
from django.urls import reverse

from audit_project.admin import InputFilter
from profiles.services.audit import ProfileConnectionAuditService
from tests.factories import AssetFactory, QueueSettingFactory, profile_for

pytestmark = pytest.mark.django_db

# As they arrive in a query string (percent-encoded), so bytes that are not UTF-8 can be sent.
HOSTILE = {
    "NUL": "%00",
    "NUL inside a word": quote("acme\x00bakery"),
    "very long": "x" * 20_000,
    "almost a UUID": "0d8c6c0e-7f3a-4b0e-9d8e-zzzzzzzzzzzz",
    "odd unicode": quote("\u202e\ufeff\U0001f4a9 \u03a9mega \u0301"),
    "not UTF-8": "%ED%A0%80%FF",
    "quotes, wildcards, backslash": quote("'\"%_\\"),
    "only spaces": "%20%20",
}


@pytest.fixture
def some_of_everything():
    """Rows on every changelist, so a filter that matches nothing shows an empty page."""
    asset = AssetFactory()
    QueueSettingFactory(profile=profile_for(asset))
    ProfileConnectionAuditService().run_full_audit(org_id=asset.connection.organization_id)


def typed_parameters(model_admin, request) -> list[tuple[str, bool]]:
    """(parameter, is a typed filter) for the search box and every filter typed in."""
    params = [(SEARCH_VAR, False)] if model_admin.get_search_fields(request) else []
    changelist = model_admin.get_changelist_instance(request)
    params += [
        (spec.parameter_name, True)
        for spec in changelist.filter_specs
        if isinstance(spec, InputFilter)
    ]
    return params


@pytest.mark.parametrize(
    "model", [pytest.param(model, id=model._meta.label) for model in admin.site._registry]
)
def test_any_text_typed_into_a_filter_or_the_search_box_of_any_changelist_gets_a_page(
    admin_client, rf, admin_user, some_of_everything, model
):
    url = reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_changelist")
    request = rf.get(url)
    request.user = admin_user
    params = typed_parameters(admin.site._registry[model], request)
    for param, typed_filter in params:
        for label, value in HOSTILE.items():
            response = admin_client.get(f"{url}?{param}={value}")
            assert response.status_code == 200, (param, label, response.status_code)
            if typed_filter and "%00" in value:
                # Nothing stored can hold a NUL, so nothing matches it.
                assert response.context["cl"].result_count == 0, (param, label)


@pytest.mark.parametrize(
    "url_name",
    [
        "admin:profiles_socialprofile_changelist",
        "admin:profiles_auditrun_changelist",
        "admin:profiles_auditfinding_changelist",
        "admin:queues_queuesetting_changelist",
    ],
)
def test_a_nul_in_the_organization_filter_lists_nothing_instead_of_a_server_error(
    admin_client, some_of_everything, url_name
):
    response = admin_client.get(f"{reverse(url_name)}?organization=%00")

    assert response.status_code == 200
    assert response.context["cl"].result_count == 0


def choice_parameters(model_admin, request) -> list[str]:
    """The query parameters of the changelist's filters that are not typed in (choices, dates,
    related objects), and of its date hierarchy."""
    changelist = model_admin.get_changelist_instance(request)
    params = []
    for spec in changelist.filter_specs:
        if isinstance(spec, InputFilter):
            continue
        params += getattr(spec, "expected_parameters", lambda: [])()
    if model_admin.date_hierarchy:
        params.append(f"{model_admin.date_hierarchy}__year")
    return params


@pytest.mark.parametrize(
    "model", [pytest.param(model, id=model._meta.label) for model in admin.site._registry]
)
def test_any_value_in_any_filter_parameter_of_any_changelist_gets_a_page(
    admin_client, rf, admin_user, some_of_everything, model
):
    url = reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_changelist")
    request = rf.get(url)
    request.user = admin_user
    for param in choice_parameters(admin.site._registry[model], request):
        for value in ("%00", quote("a\x00b"), "99999999999999999999", "-1", "x" * 5000):
            response = admin_client.get(f"{url}?{param}={value}", follow=True)
            assert response.status_code == 200, (param, value, response.status_code)
