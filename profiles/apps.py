from django.apps import AppConfig
from django.db.models.signals import post_migrate


class ProfilesConfig(AppConfig):
    name = "profiles"
    verbose_name = "Social profiles and audits"

    def ready(self) -> None:
        # Registers the tasks that services send by name (``celery.signature``), in every
        # process, so services never import the task module.
        from profiles import tasks  # noqa: F401
        from profiles.schedule import install_beat_entries_after_migrate

        assert self.apps is not None  # set before ready()
        # Sent once per migrated app; the beat app's signal is the one after its tables exist.
        post_migrate.connect(
            install_beat_entries_after_migrate,
            sender=self.apps.get_app_config("django_celery_beat"),
            dispatch_uid="profiles.install_beat_entries",
        )
