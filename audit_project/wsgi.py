"""WSGI entry point for the admin (``gunicorn audit_project.wsgi``)."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "audit_project.settings")

application = get_wsgi_application()
