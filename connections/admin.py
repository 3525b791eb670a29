from django.contrib import admin

from audit_project.admin import (
    AliveListFilter,
    AssetOrganizationFilter,
    OrganizationFilter,
)
from connections.models import ConnectionAsset, PlatformConnection


class ConnectionAssetInline(admin.TabularInline):
    model = ConnectionAsset
    extra = 0
    fields = ["asset_type", "external_id", "name", "is_selected", "created_at"]
    show_change_link = True


@admin.register(PlatformConnection)
class PlatformConnectionAdmin(admin.ModelAdmin):
    list_display = ["name", "provider", "status", "organization", "created_at", "deleted_at"]
    list_filter = [AliveListFilter, "status", "provider", OrganizationFilter]
    list_select_related = ["organization"]
    search_fields = ["name", "=id", "=organization__id", "organization__name"]
    raw_id_fields = ["organization"]
    inlines = [ConnectionAssetInline]


@admin.register(ConnectionAsset)
class ConnectionAssetAdmin(admin.ModelAdmin):
    list_display = ["external_id", "name", "asset_type", "is_selected", "connection", "created_at"]
    list_filter = [
        "is_selected",
        "asset_type",
        "connection__status",
        "connection__provider",
        AssetOrganizationFilter,
    ]
    list_select_related = ["connection"]
    search_fields = [
        "external_id",
        "name",
        "=id",
        "=connection__id",
        "=connection__organization__id",
    ]
    raw_id_fields = ["connection"]
