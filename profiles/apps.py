from django.apps import AppConfig


class ProfilesConfig(AppConfig):
    name = "profiles"
    verbose_name = "Social profiles and audits"

    def ready(self) -> None:
        # Registers the tasks that services send by name (``celery.signature``), in every
        # process, so services never import the task module.
        from profiles import tasks  # noqa: F401
