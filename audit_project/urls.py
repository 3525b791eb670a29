"""URLs: the Django admin is the operator's interface; /metrics and /health/ are for machines."""

from django.contrib import admin
from django.urls import path
from django.views.generic import RedirectView

from profiles.health import AuditHealthView
from profiles.metrics import metrics_view

urlpatterns = [
    path("admin/", admin.site.urls),
    path("metrics", metrics_view, name="metrics"),
    path("health/", AuditHealthView.as_view(), name="health"),
    path("", RedirectView.as_view(url="/admin/", permanent=False)),
]
