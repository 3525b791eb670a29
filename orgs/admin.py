from django.contrib import admin

from orgs.models import Organization


@admin.register(Organization)
class OrganizationAdmin(admin.ModelAdmin):
    list_display = ["name", "id", "created_at"]
    search_fields = ["name", "=id"]
    ordering = ["name"]
    date_hierarchy = "created_at"
