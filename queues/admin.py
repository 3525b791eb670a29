from django.contrib import admin

from audit_project.admin import AliveListFilter, OrganizationFilter
from queues.models import QueueSetting


@admin.register(QueueSetting)
class QueueSettingAdmin(admin.ModelAdmin):
    list_display = ["name", "profile", "organization", "created_at", "deleted_at"]
    list_filter = [AliveListFilter, "profile__platform", OrganizationFilter]
    list_select_related = ["profile", "organization"]
    search_fields = ["name", "=id", "=profile__id", "=organization__id", "organization__name"]
    raw_id_fields = ["organization", "profile"]
