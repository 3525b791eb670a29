"""docker-compose.yml, read as data (no Docker engine runs here): every service starts a real
entry point of this project, the worker consumes what the tasks are routed to, start-up order
waits on health, and the environment comes from .env.example."""

import importlib
from importlib.metadata import entry_points
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from celery import Celery
from celery.utils.imports import symbol_by_name
from django.conf import settings
from django.core.management import get_commands
from django.urls import resolve
from django_celery_beat.schedulers import DatabaseScheduler

from audit_project.celery import app as celery_app

ROOT = Path(settings.BASE_DIR)
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
APP_SERVICES = ["migrate", "web", "worker", "beat"]


def env_example() -> dict[str, str]:
    pairs = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value.strip()
    return pairs


def option(command: list[str], *names: str) -> str:
    """The value of ``-X value``, ``--x value`` or ``--x=value`` in a command."""
    for i, arg in enumerate(command):
        for name in names:
            if arg == name:
                return command[i + 1]
            if arg.startswith(f"{name}="):
                return arg.split("=", 1)[1]
    raise AssertionError(f"no {names} in {command}")


def console_scripts() -> set[str]:
    return {ep.name for ep in entry_points(group="console_scripts")}


def check_celery_command(command: list[str]) -> str:
    assert command[0] == "celery" and "celery" in console_scripts()
    module = importlib.import_module(option(command, "-A", "--app"))
    assert isinstance(module.celery_app, Celery)
    return next(arg for arg in command[1:] if not arg.startswith("-") and arg != "audit_project")


def test_the_stack_has_the_services_of_the_design():
    assert set(SERVICES) == {"postgres", "redis", *APP_SERVICES}
    assert SERVICES["postgres"]["image"].startswith("postgres:")
    assert SERVICES["redis"]["image"].startswith("redis:")


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_services_build_this_project(name):
    service = SERVICES[name]
    assert service["build"] == "."
    assert isinstance(service["command"], list)  # exec form: no shell between Docker and us
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "FROM python:3.11" in dockerfile
    assert "pip install --no-deps ." in dockerfile


def test_migrate_runs_a_real_management_command_once():
    service = SERVICES["migrate"]
    command = service["command"]
    assert command[:2] == ["python", "manage.py"]
    assert command[2] in get_commands()
    assert command[2] == "migrate"
    assert service["restart"] == "no"


def test_web_serves_the_project_wsgi_application():
    command = SERVICES["web"]["command"]
    assert command[0] == "gunicorn" and "gunicorn" in console_scripts()
    module, attribute = command[1].split(":")
    assert callable(getattr(importlib.import_module(module), attribute))
    assert option(command, "--bind").endswith(":8000")
    assert "8000:8000" in SERVICES["web"]["ports"]
    probe = SERVICES["web"]["healthcheck"]["test"][-1]
    # Liveness, not readiness: a late audit or Redis down must not restart the admin.
    assert "http://127.0.0.1:8000/health/live/" in probe
    assert resolve("/health/live/")


def test_the_worker_consumes_maintenance_and_every_queue_a_task_is_routed_to():
    command = SERVICES["worker"]["command"]
    assert check_celery_command(command) == "worker"
    queues = set(option(command, "-Q", "--queues").split(","))
    assert "maintenance" in queues
    celery_app.loader.import_default_modules()  # what a worker does first: register the tasks
    routed = {
        celery_app.amqp.router.route({}, name)["queue"].name
        for name in celery_app.tasks
        if not name.startswith("celery.")
    }
    assert routed == {"maintenance", "celery"}
    assert routed <= queues
    probe = SERVICES["worker"]["healthcheck"]["test"][-1]
    assert probe.startswith("celery -A audit_project inspect ping")


def test_beat_uses_the_database_scheduler():
    command = SERVICES["beat"]["command"]
    assert check_celery_command(command) == "beat"
    scheduler = symbol_by_name(option(command, "--scheduler", "-S"))
    assert issubclass(scheduler, DatabaseScheduler)


def test_start_up_waits_on_health_and_on_migrations():
    for name, service in SERVICES.items():
        for dependency, spec in service.get("depends_on", {}).items():
            assert dependency in SERVICES, (name, dependency)
            condition = spec["condition"]
            if condition == "service_healthy":
                assert "healthcheck" in SERVICES[dependency], (name, dependency)
            else:
                assert condition == "service_completed_successfully", (name, dependency)
    for name in ("web", "worker", "beat"):
        assert SERVICES[name]["depends_on"] == {
            "postgres": {"condition": "service_healthy"},
            "redis": {"condition": "service_healthy"},
            "migrate": {"condition": "service_completed_successfully"},
        }
    assert SERVICES["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    for name in ("postgres", "redis", "web", "worker"):
        assert SERVICES[name]["healthcheck"]["test"], name


def test_configuration_comes_from_env_example():
    env = env_example()
    for name in ["postgres", *APP_SERVICES]:
        files = [f["path"] if isinstance(f, dict) else f for f in SERVICES[name]["env_file"]]
        assert files[0] == ".env.example", name
    for key in ("DATABASE_URL", "REDIS_URL", "DJANGO_SECRET_KEY", "DJANGO_ALLOWED_HOSTS"):
        assert env.get(key), key
    database = urlsplit(env["DATABASE_URL"])
    assert database.hostname == "postgres" and database.port == 5432
    assert (database.username, database.password, database.path.lstrip("/")) == (
        env["POSTGRES_USER"],
        env["POSTGRES_PASSWORD"],
        env["POSTGRES_DB"],
    )
    assert urlsplit(env["REDIS_URL"]).hostname == "redis"


def test_each_service_logs_to_its_own_directory_of_the_shared_volume():
    directories = [SERVICES[name]["environment"]["PROFILE_AUDIT_LOG_DIR"] for name in APP_SERVICES]
    assert len(set(directories)) == len(APP_SERVICES)
    assert all(d.startswith("/app/logs/") for d in directories)
    assert "audit-logs" in COMPOSE["volumes"]
