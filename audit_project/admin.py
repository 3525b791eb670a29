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


class InputFilter(admin.SimpleListFilter):
    """A filter typed in, not picked from a list: there may be thousands of organizations."""

    template = "admin/input_filter.html"
    placeholder = ""

    def lookups(self, request, model_admin):
        return ()

    def has_output(self) -> bool:
        return True

    def queryset(self, request, queryset):
        value = (self.value() or "").strip()
        if not value:
            return queryset
        if "\x00" in value:
            # Whatever is typed gets a page: PostgreSQL holds no NUL in text, so nothing can
            # match it, and it rejects a query parameter holding one (a server error).
            return queryset.none()
        return self.filter_typed(queryset, value)

    def filter_typed(self, queryset, value: str):
        """The rows matching ``value``: stripped, never empty, never holding a NUL."""
        raise NotImplementedError

    def choices(self, changelist):
        # One "choice": the form's hidden fields keep every other filter in place.
        yield {
            "selected": self.value() is not None,
            "query_string": changelist.get_query_string(remove=[self.parameter_name]),
            "display": "All",
            "hidden_params": [
                (key, value)
                for key, values in changelist.get_filters_params().items()
                if key != self.parameter_name
                for value in (values if isinstance(values, list) else [values])
            ],
            "placeholder": self.placeholder,
            "parameter_name": self.parameter_name,
            "value": self.value() or "",
        }


class OrganizationFilter(InputFilter):
    """By organization id (exact) or name (contains)."""

    title = "organization"
    parameter_name = "organization"
    placeholder = "organization id or name"
    organization_path = "organization"

    def filter_typed(self, queryset, value):
        try:
            return queryset.filter(**{f"{self.organization_path}_id": uuid.UUID(value)})
        except ValueError:
            return queryset.filter(**{f"{self.organization_path}__name__icontains": value})


class AssetOrganizationFilter(OrganizationFilter):
    organization_path = "connection__organization"
