from django.contrib import admin

from audit_project.admin import AliveListFilter, OrganizationFilter
from boosts.models import BoostRule


@admin.register(BoostRule)
class BoostRuleAdmin(admin.ModelAdmin):
    list_display = ["name", "organization", "profile_count", "created_at", "deleted_at"]
    list_filter = [AliveListFilter, OrganizationFilter]
    list_select_related = ["organization"]
    search_fields = ["name", "=id", "=organization__id", "organization__name"]
    raw_id_fields = ["organization"]

    @admin.display(description="profiles")
    def profile_count(self, rule: BoostRule) -> int | str:
        return len(rule.profile_ids) if isinstance(rule.profile_ids, list) else "malformed"
