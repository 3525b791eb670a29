from django.contrib import admin

from audit_project.admin import AliveListFilter, OrganizationIdFilter
from profiles.models import AuditFinding, AuditRun, SocialProfile


@admin.register(SocialProfile)
class SocialProfileAdmin(admin.ModelAdmin):
    list_display = [
        "name",
        "platform",
        "external_id",
        "organization",
        "connection",
        "created_at",
        "deleted_at",
    ]
    list_filter = [AliveListFilter, "platform", "connection__status", OrganizationIdFilter]
    list_select_related = ["organization", "connection"]
    search_fields = ["name", "external_id", "=id", "=organization__id", "organization__name"]
    raw_id_fields = ["organization", "connection"]


class ReadOnlyAdmin(admin.ModelAdmin):
    """Records of what the audit did are history: viewable by staff, never edited here."""

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(AuditRun)
class AuditRunAdmin(ReadOnlyAdmin):
    list_display = [
        "started_at",
        "trigger",
        "organization",
        "fix",
        "status",
        "found",
        "fixed",
        "duration_seconds",
    ]
    list_filter = ["status", "trigger", "fix", "started_at"]
    list_select_related = ["organization"]
    search_fields = ["=id", "=organization__id", "organization__name"]
    date_hierarchy = "started_at"


@admin.register(AuditFinding)
class AuditFindingAdmin(ReadOnlyAdmin):
    list_display = [
        "run",
        "seq",
        "type",
        "action",
        "outcome",
        "model",
        "object_id",
        "platform",
        "external_id",
    ]
    list_filter = ["type", "action", "outcome"]
    list_select_related = ["run"]
    search_fields = ["=object_id", "external_id", "=run__id"]
    show_full_result_count = False
