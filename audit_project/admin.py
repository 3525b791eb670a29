"""Admin pieces shared by the domain apps."""

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
