"""docker-compose.yml as it runs (no Docker engine here): each application service is started with
its own command and environment, as a process on loopback, with this machine's PostgreSQL (a
database of this test's own) and a redis-server of this test's own instead of the containers:
`migrate`, then `web` (gunicorn), `worker` and `beat`. The audit's beat entry is made due; the
scheduled run must complete through beat and the worker, the web service's own healthcheck
command must pass, and /metrics (read by promtool) must report that run."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
import redis
import yaml
from django.conf import settings
from prometheus_client.parser import text_string_to_metric_families

from tests.support import free_port, wait_for

ROOT = Path(settings.BASE_DIR)
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
BIN = Path(sys.executable).parent


def env_file(path: Path) -> dict[str, str]:
    pairs = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value.strip()
    return pairs


def on_loopback(command: list[str], port: int) -> list[str]:
    """The container's command with its listening address moved to this test's port."""
    return [
        arg.replace("0.0.0.0:8000", f"127.0.0.1:{port}").replace(
            "127.0.0.1:8000", f"127.0.0.1:{port}"
        )
        for arg in command
    ]


def executable(command: list[str]) -> list[str]:
    """python/gunicorn/celery of this environment (the image has them on PATH)."""
    first = sys.executable if command[0] == "python" else str(BIN / command[0])
    return [first, *command[1:]]


def http(port: int, path: str, **headers: str) -> tuple[int, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


@pytest.fixture
def stack_services(tmp_path):
    """A PostgreSQL database and a Redis of the stack's own, dropped and stopped afterwards.
    Redis (and, in the test, gunicorn) listen on free ports: another suite may run this test
    on the same machine at the same time."""
    redis_port = free_port()
    server = shutil.which("redis-server")
    assert server, "redis-server is needed (apt-get install redis-server)"
    redis_proc = subprocess.Popen(
        [
            server,
            "--port",
            str(redis_port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        stdout=subprocess.DEVNULL,
    )

    def answers() -> bool:
        try:
            return redis.Redis(port=redis_port, socket_connect_timeout=0.2).ping()
        except redis.RedisError:
            return False

    wait_for(answers, timeout=10, what="the stack's redis-server to answer")
    base = urlsplit(os.environ.get("DATABASE_URL") or "postgres://postgres@127.0.0.1:5432/postgres")
    name = f"psa_stack_{os.getpid()}"
    admin_url = urlunsplit(base._replace(path="/postgres"))
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    database_url = urlunsplit(base._replace(path=f"/{name}"))
    yield database_url, f"redis://127.0.0.1:{redis_port}/0"
    redis_proc.terminate()
    redis_proc.wait(timeout=10)
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_the_compose_stack_runs_a_scheduled_audit_end_to_end(tmp_path, stack_services):
    database_url, redis_url = stack_services
    web_port = free_port()
    # The environment compose gives every service: .env.example, then .env's overrides (here: a
    # real secret, and this machine's services in place of the containers'), then the service's
    # own `environment`.
    base_env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "PROFILE_AUDIT_"))},
        **env_file(ROOT / ".env.example"),
        "DJANGO_SECRET_KEY": "stack-test-" + "s3cr3t-k3y-" * 6,
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "HOSTNAME": socket.gethostname(),
    }
    base_env.pop("DJANGO_SETTINGS_MODULE", None)  # manage.py, celery and wsgi set their own

    def service_env(name: str) -> dict[str, str]:
        env = dict(base_env)
        for key, value in (SERVICES[name].get("environment") or {}).items():
            # /app/logs/<service> in the container: a directory of this test's.
            env[key] = str(value).replace("/app/logs", str(tmp_path / "logs"))
        return env

    def start(name: str) -> subprocess.Popen:
        log = (tmp_path / f"{name}.log").open("w")
        return subprocess.Popen(
            executable(on_loopback(SERVICES[name]["command"], web_port)),
            cwd=ROOT,
            env=service_env(name),
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def log_of(name: str) -> str:
        return (tmp_path / f"{name}.log").read_text()

    migrate = start("migrate")
    assert migrate.wait(timeout=300) == 0, log_of("migrate")
    seeded = subprocess.run(
        [sys.executable, "manage.py", "seed_demo"],
        cwd=ROOT,
        env=service_env("migrate"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert seeded.returncode == 0, seeded.stderr
    with psycopg.connect(database_url, autocommit=True) as conn:
        # Due now: beat's last send of the six-hourly entry was before the last six-hour mark.
        updated = conn.execute(
            "UPDATE django_celery_beat_periodictask SET last_run_at = now() - interval '7 hours'"
            " WHERE name = 'profile-connection-sync-audit' AND enabled"
        ).rowcount
        assert updated == 1
        # The minute's change-driven entry is switched off, as an operator may: seed_demo's
        # writes marked every organization, and a change-driven run due in the same minute
        # would fix them before the sweep looks (change-driven runs: tests/test_change_runs).
        switched_off = conn.execute(
            "UPDATE django_celery_beat_periodictask SET enabled = false"
            " WHERE name = 'profile-connection-sync-audit-changes'"
        ).rowcount
        assert switched_off == 1

    processes = {name: start(name) for name in ("web", "worker", "beat")}
    try:

        def scheduled_run():
            for name, proc in processes.items():
                assert proc.poll() is None, f"{name} exited:\n{log_of(name)}"
            with psycopg.connect(database_url) as conn:
                return conn.execute(
                    "SELECT id, status FROM profiles_auditrun WHERE trigger = 'schedule'"
                    " AND status IN ('succeeded', 'partial', 'failed', 'interrupted')"
                ).fetchone()

        run_id, status = wait_for(
            scheduled_run, timeout=240, what="beat's scheduled run to finish on the worker"
        )
        assert status in ("succeeded", "partial"), (status, log_of("worker"))
        assert "profile-connection-sync-audit" in log_of("beat")

        wait_for(
            lambda: http(web_port, "/health/live/")[0] == 200, timeout=60, what="gunicorn to answer"
        )
        # The web service's own healthcheck command, as compose runs it.
        probe = SERVICES["web"]["healthcheck"]["test"]
        assert probe[0] == "CMD"
        done = subprocess.run(
            executable(on_loopback(probe[1:], web_port)),
            env=service_env("web"),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 0, done.stderr
        # Readiness is green now the scheduled run completed; a probe by IP gets an answer.
        assert http(web_port, "/health/?format=json", Host="10.0.3.7:8000")[0] == 200
        assert http(web_port, "/health/live/?format=json", Host="10.0.3.7")[0] == 200
        assert (
            http(web_port, "/metrics", Host="10.0.3.7")[0] == 400
        )  # only the probes skip ALLOWED_HOSTS

        code, exposition = http(web_port, "/metrics")
        assert code == 200
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(exposition)
            for s in family.samples
        }
        assert (
            samples[
                ("profile_audit_last_run_status", (("status", status), ("trigger", "schedule")))
            ]
            == 1
        )
        info = [
            dict(labels)
            for (name, labels), value in samples.items()
            if name == "profile_audit_last_finished_scheduled_run_info" and value == 1
        ]
        assert [i["run_id"] for i in info] == [str(run_id)]
        assert info[0]["admin_url"] == f"/admin/profiles/auditrun/{run_id}/change/"
        assert (
            samples[("profile_audit_last_finished_scheduled_run_found", (("type", "orphaned"),))]
            > 0
        )
        promtool = shutil.which("promtool")
        assert promtool, "promtool is needed: apt-get install prometheus"
        checked = subprocess.run(
            [promtool, "check", "metrics"], input=exposition, capture_output=True, text=True
        )
        assert checked.returncode == 0 and not (checked.stdout + checked.stderr).strip(), (
            checked.stdout + checked.stderr
        )
        # The worker's healthcheck, as compose runs it (a shell, $$ being compose's $).
        worker_probe = SERVICES["worker"]["healthcheck"]["test"]
        assert worker_probe[0] == "CMD-SHELL"
        done = subprocess.run(
            worker_probe[1].replace("$$", "$"),
            shell=True,
            env={
                **service_env("worker"),
                "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
            },
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        # Every service wrote its audit log where its environment said.
        assert (tmp_path / "logs" / "worker" / "profile-sync-audit.log").exists()
    finally:
        for proc in processes.values():
            proc.terminate()
        for proc in processes.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
