"""Flower, as docs/operating.md runs it: its own start-up lines reach the console through the
logging config, and its API answers only with the credentials it was started with."""

import base64
import os
import subprocess
import sys
import urllib.error
import urllib.request

from django.conf import settings

from tests.support import free_port, wait_for


def get(port: int, path: str, *, auth: str | None = None) -> int:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def test_flower_logs_its_start_up_and_guards_its_api(tmp_path):
    port = free_port()  # not a fixed one: another suite may run this test at once
    log = tmp_path / "flower.log"
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "audit_project.settings",
        "PROFILE_AUDIT_LOG_DIR": str(tmp_path / "logs"),
        "PROFILE_AUDIT_CONSOLE_LEVEL": "INFO",
    }
    with log.open("w") as out:
        flower = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "audit_project",
                "flower",
                "--address=127.0.0.1",
                f"--port={port}",
                "--basic-auth=ops:s3cret",
            ],
            cwd=settings.BASE_DIR,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(
            lambda: "Registered tasks" in log.read_text(),
            timeout=60,
            what="Flower's start-up lines",
        )
        text = log.read_text()
        assert f'"Visit me at http://127.0.0.1:{port}"' in text
        assert '"logger": "flower.command"' in text
        assert "Registered tasks" in text and "profiles.audit_shard" in text
        wait_for(lambda: get(port, "/healthcheck") == 200, timeout=30, what="Flower to answer")
        assert get(port, "/api/workers") == 401
        assert get(port, "/api/workers", auth="ops:wrong") == 401
        assert get(port, "/api/workers", auth="ops:s3cret") == 200
    finally:
        flower.terminate()
        flower.wait(timeout=20)
