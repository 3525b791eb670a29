from django.apps import AppConfig


class BoostsConfig(AppConfig):
    name = "boosts"
    verbose_name = "Boost rules"
