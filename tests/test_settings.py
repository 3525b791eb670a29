"""The environment is read strictly: a value that does not parse stops every entry point with one
line naming the variable (never a traceback, never a silent default), and the production
settings pass Django's deployment checklist."""

import os
import subprocess
import sys

import pytest
from django.conf import settings

ROOT = settings.BASE_DIR
PRODUCTION = {
    "DJANGO_SECRET_KEY": "a-production-secret-" + "k3y" * 20,
    "DJANGO_ALLOWED_HOSTS": "audit.example.com",
    "DJANGO_CSRF_TRUSTED_ORIGINS": "https://audit.example.com",
    "DJANGO_SECURE_PROXY_SSL_HEADER": "HTTP_X_FORWARDED_PROTO,https",
    "DJANGO_HTTPS": "true",
}


def manage(*args: str, **env: str) -> subprocess.CompletedProcess:
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DJANGO_", "PROFILE_AUDIT_")) or k == "PROFILE_AUDIT_LOG_DIR"
    }
    clean.update(DJANGO_SETTINGS_MODULE="audit_project.settings", **env)
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env=clean,
        capture_output=True,
        text=True,
        timeout=60,
    )


def printed_setting(name: str, **env: str) -> str:
    done = manage("shell", "-c", f"from django.conf import settings; print(settings.{name})", **env)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        ("PROFILE_AUDIT_GUARD_MIN", "five", "'five' is not a whole number"),
        ("PROFILE_AUDIT_GUARD_RATIO", "half", "'half' is not a number"),
        ("PROFILE_AUDIT_CONSOLE_LEVEL", "LOUD", "'LOUD' is not one of DEBUG, INFO"),
        ("DJANGO_DEBUG", "maybe", "'maybe' is not true or false"),
        ("PROFILE_AUDIT_LOCK_TTL", "-5", "below the minimum"),
        ("DATABASE_URL", "postgress://nowhere/db", "is not a database URL"),
        ("REDIS_URL", "localhost:6379", "is not a Redis URL"),
        ("DJANGO_CSRF_TRUSTED_ORIGINS", "audit.example.com", "needs its scheme"),
        ("DJANGO_SECURE_PROXY_SSL_HEADER", "HTTP_X_FORWARDED_PROTO", "must be HEADER,VALUE"),
    ],
)
def test_a_bad_value_stops_with_one_line_naming_the_variable(variable, value, says):
    done = manage("check", **{"DJANGO_DEBUG": "true", variable: value})
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"Invalid setting {variable}: ")
    assert says in lines[0]


def test_the_same_line_stops_a_worker_before_it_starts():
    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "audit_project", "inspect", "ping"],
        cwd=ROOT,
        env={
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "audit_project.settings",
            "PROFILE_AUDIT_GUARD_MIN": "five",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert "Invalid setting PROFILE_AUDIT_GUARD_MIN: 'five' is not a whole number" in done.stderr


@pytest.mark.parametrize(
    ("value", "debug"),
    [("true", "True"), ("1", "True"), ("yes", "True"), ("false", "False"), ("0", "False")],
)
def test_debug_reads_the_usual_spellings_of_true_and_false(value, debug):
    assert (
        printed_setting(
            "DEBUG",
            DJANGO_DEBUG=value,
            **({} if debug == "True" else {"DJANGO_SECRET_KEY": PRODUCTION["DJANGO_SECRET_KEY"]}),
        )
        == debug
    )


def test_the_placeholder_secret_is_refused_with_debug_off():
    for placeholder in settings.PLACEHOLDER_SECRET_KEYS:
        done = manage("check", DJANGO_SECRET_KEY=placeholder, DJANGO_DEBUG="false")
        assert done.returncode != 0
        assert "Traceback" not in done.stderr
        assert done.stderr.startswith("Invalid setting DJANGO_SECRET_KEY: set it")
    # Unset, with debug off: refused too (the default is the placeholder).
    assert manage("check").returncode != 0
    assert manage("check", DJANGO_DEBUG="true").returncode == 0


def test_production_settings_pass_the_deployment_checklist():
    done = manage("check", "--deploy", "--fail-level", "WARNING", **PRODUCTION)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "System check identified no issues" in done.stdout


def test_deployment_settings_come_from_the_environment():
    env = dict(
        PRODUCTION, DJANGO_CSRF_TRUSTED_ORIGINS="https://a.example.com,https://b.example.com"
    )
    assert printed_setting("CSRF_TRUSTED_ORIGINS", **env) == str(
        ["https://a.example.com", "https://b.example.com"]
    )
    assert printed_setting("SECURE_PROXY_SSL_HEADER", **env) == str(
        ("HTTP_X_FORWARDED_PROTO", "https")
    )
    assert printed_setting("SESSION_COOKIE_SECURE", **env) == "True"


def test_the_image_installs_dependencies_before_copying_the_code():
    # So a change to the code does not reinstall every dependency: the layer with them is
    # built from pyproject.toml alone.
    lines = (ROOT / "Dockerfile").read_text().splitlines()

    def first(predicate) -> int:
        return next(n for n, line in enumerate(lines) if predicate(line.strip()))

    copy_manifest = first(lambda line: line.startswith("COPY pyproject.toml"))
    install_dependencies = first(lambda line: "pip install -r" in line)
    copy_code = first(lambda line: line.startswith("COPY . "))
    install_project = first(lambda line: "pip install --no-deps ." in line)
    assert copy_manifest < install_dependencies < copy_code < install_project


@pytest.mark.parametrize(
    ("env", "variable", "says"),
    [
        (
            {"PROFILE_AUDIT_SCHEDULE_PERIOD": "garbage"},
            "PROFILE_AUDIT_SCHEDULE_PERIOD",
            "not a whole number",
        ),
        (
            {"PROFILE_AUDIT_LOCK_TTL": "99999999999999999999"},
            "PROFILE_AUDIT_LOCK_TTL",
            "above the maximum of 604800",
        ),
        (
            {"PROFILE_AUDIT_LOCK_SOCKET_TIMEOUT": "0"},
            "PROFILE_AUDIT_LOCK_SOCKET_TIMEOUT",
            "must be above 0",
        ),
        (
            {"PROFILE_AUDIT_LOCK_SOCKET_TIMEOUT": "nan"},
            "PROFILE_AUDIT_LOCK_SOCKET_TIMEOUT",
            "'nan' is not a number",
        ),
        (
            {"REDIS_URL": "redis://127.0.0.1:notaport/0"},
            "REDIS_URL",
            "port that is not a number from 1 to 65535",
        ),
        ({"REDIS_URL": "redis://127.0.0.1:6379/cache"}, "REDIS_URL", "not a number 0-15"),
        (
            {"PROFILE_AUDIT_LOCK_REDIS_URL": "redis:///0"},
            "PROFILE_AUDIT_LOCK_REDIS_URL",
            "names no host",
        ),
        ({"DATABASE_URL": "postgres://u@db:99999/x"}, "DATABASE_URL", "Port out of range 0-65535"),
        (
            {"PROFILE_AUDIT_SOFT_TIME_LIMIT": "700"},
            "PROFILE_AUDIT_SOFT_TIME_LIMIT",
            "must be below PROFILE_AUDIT_TIME_LIMIT (600 s)",
        ),
        (
            {"PROFILE_AUDIT_TIME_LIMIT": "7200"},
            "PROFILE_AUDIT_LOCK_TTL",
            "must cover PROFILE_AUDIT_TIME_LIMIT (7200 s)",
        ),
        (
            {"PROFILE_AUDIT_SCHEDULE_PERIOD": "300"},
            "PROFILE_AUDIT_TIME_LIMIT",
            "below PROFILE_AUDIT_SCHEDULE_PERIOD (300 s)",
        ),
        (
            {"PROFILE_AUDIT_RUN_DEADLINE": "30000"},
            "PROFILE_AUDIT_RUN_DEADLINE",
            "below PROFILE_AUDIT_SCHEDULE_PERIOD (21600 s)",
        ),
        (
            {"PROFILE_AUDIT_SHARD_BUDGET": "600"},
            "PROFILE_AUDIT_SHARD_BUDGET",
            "below PROFILE_AUDIT_SOFT_TIME_LIMIT (540 s)",
        ),
        (
            {"PROFILE_AUDIT_GUARD_RATIO": "1.5"},
            "PROFILE_AUDIT_GUARD_RATIO",
            "above the maximum of 1",
        ),
        (
            {"PROFILE_AUDIT_ADMIN_BASE_URL": "audit.example.com"},
            "PROFILE_AUDIT_ADMIN_BASE_URL",
            "not an http(s) URL",
        ),
        (
            {"PROFILE_AUDIT_LOG_DIR": "/proc/no-such-dir"},
            "PROFILE_AUDIT_LOG_DIR",
            "cannot create '/proc/no-such-dir'",
        ),
        ({"PROFILE_AUDIT_LOG_DIR": "/etc/hostname"}, "PROFILE_AUDIT_LOG_DIR", "is not a directory"),
    ],
)
def test_values_that_parse_but_cannot_work_stop_with_one_line(env, variable, says):
    done = manage("check", DJANGO_DEBUG="true", **env)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"Invalid setting {variable}: "), lines[0]
    assert says in lines[0]


@pytest.mark.parametrize("key", ["x", "django-insecure-" + "abcdefgh" * 8, "a" * 60])
def test_a_weak_secret_key_is_refused_with_debug_off(key):
    done = manage("check", DJANGO_SECRET_KEY=key, DJANGO_DEBUG="false")
    assert done.returncode != 0
    assert done.stderr.strip() == (
        "Invalid setting DJANGO_SECRET_KEY: too weak with DJANGO_DEBUG off: use 50 or more "
        "random characters (python -c 'import secrets; print(secrets.token_urlsafe(50))')"
    )
    # The same key is fine for development.
    assert manage("check", DJANGO_SECRET_KEY=key, DJANGO_DEBUG="true").returncode == 0


def test_the_schedule_period_comes_from_the_environment_and_the_deadline_follows_it():
    twelve_hours = {"PROFILE_AUDIT_SCHEDULE_PERIOD": "43200", "DJANGO_DEBUG": "true"}
    assert printed_setting("PROFILE_AUDIT_SCHEDULE_PERIOD", **twelve_hours) == "43200"
    assert printed_setting("PROFILE_AUDIT_RUN_DEADLINE", **twelve_hours) == str(43200 * 11 // 12)
    assert printed_setting("PROFILE_AUDIT_SCHEDULE_PERIOD", DJANGO_DEBUG="true") == "21600"
