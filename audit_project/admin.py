"""Admin pieces shared by the domain apps."""

import uuid

from django.contrib import admin


class AliveListFilter(admin.SimpleListFilter):
    """Alive / dead filter for soft-deletable models (their default manager shows both)."""

    title = "state"
    parameter_name = "state"

    def lookups(self, request, model_admin):
        return [("alive", "Alive"), ("dead", "Soft-deleted")]

    def queryset(self, request, queryset):
        if self.value() == "alive":
            return queryset.alive()
        if self.value() == "dead":
            return queryset.dead()
        return queryset


class OrganizationIdFilter(admin.SimpleListFilter):
    """Filter by organization id, typed in: a list of every organization would not scale."""

    title = "organization"
    parameter_name = "organization_id"
    template = "admin/input_filter.html"
    field_path = "organization_id"

    def lookups(self, request, model_admin):
        # A non-empty lookup list keeps the filter on the page; the template draws an input.
        return [("", "")]

    def choices(self, changelist):
        # The template reads the other query parameters and the clear link from here.
        self.other_params = {k: v for k, v in changelist.params.items() if k != self.parameter_name}
        self.clear_url = changelist.get_query_string(remove=[self.parameter_name])
        return []

    def queryset(self, request, queryset):
        if not self.value():
            return queryset
        try:
            org_id = uuid.UUID(self.value())
        except ValueError:
            return queryset.none()
        return queryset.filter(**{self.field_path: org_id})


class AssetOrganizationIdFilter(OrganizationIdFilter):
    field_path = "connection__organization_id"
