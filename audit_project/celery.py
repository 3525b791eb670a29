"""The Celery application, configured from Django settings (``CELERY_*``)."""

import os

from celery import Celery
from celery.signals import setup_logging

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "audit_project.settings")

app = Celery("audit_project")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@setup_logging.connect
def keep_django_logging(**kwargs) -> None:
    """Logging is configured once, by Django's ``LOGGING`` (structlog, JSON lines). Without a
    receiver of this signal a worker reconfigures logging itself and strips the ``celery``
    logger's handlers, which silences the worker's own records (task received, failed, time
    limit exceeded)."""
