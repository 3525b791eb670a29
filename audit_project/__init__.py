"""Django project for the profile-connection sync audit; loads the Celery app with Django."""

from audit_project.celery import app as celery_app

__all__ = ["celery_app"]
