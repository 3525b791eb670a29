"""URLs: the Django admin is the operator's interface; /metrics, /health/ and /health/live/ are for machines."""

from django.contrib import admin
from django.urls import path
from django.views.generic import RedirectView

from profiles.health import AuditHealthView, LivenessView
from profiles.metrics import metrics_view

urlpatterns = [
    path("admin/", admin.site.urls),
    path("metrics", metrics_view, name="metrics"),
    path("health/", AuditHealthView.as_view(), name="health"),
    path("health/live/", LivenessView.as_view(), name="health-live"),
    path("", RedirectView.as_view(url="/admin/", permanent=False)),
]
