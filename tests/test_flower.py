"""Flower, as docs/operating.md runs it: its own start-up lines reach the console through the
logging config, and its API answers only with the credentials it was started with."""

import base64
import os
import subprocess
import sys
import urllib.error
import urllib.request

from django.conf import settings

from tests.support import wait_for

PORT = 9096  # this project's test range for monitoring tools


def get(path: str, *, auth: str | None = None) -> int:
    request = urllib.request.Request(f"http://127.0.0.1:{PORT}{path}")
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
                f"--port={PORT}",
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
        assert f'"Visit me at http://127.0.0.1:{PORT}"' in text
        assert '"logger": "flower.command"' in text
        assert "Registered tasks" in text and "profiles.audit_shard" in text
        wait_for(lambda: get("/healthcheck") == 200, timeout=30, what="Flower to answer")
        assert get("/api/workers") == 401
        assert get("/api/workers", auth="ops:wrong") == 401
        assert get("/api/workers", auth="ops:s3cret") == 200
    finally:
        flower.terminate()
        flower.wait(timeout=20)
