"""The audit's log: JSON lines in ``logs/profile-sync-audit.log`` through the ``profile-audit``
logger, rotated daily with 30 files kept, and a readable console at a terminal."""

import json
import logging
import logging.handlers
import os
import pty
import subprocess
import sys
import time
from datetime import date, timedelta
from io import StringIO
from pathlib import Path

import pytest
from django.conf import settings
from django.core.management import call_command

from audit_project.log_config import (
    AUDIT_LOGGER,
    LOG_FILE_NAME,
    SharedTimedRotatingFileHandler,
    build_logging_config,
)
from tests.factories import AssetFactory, OrganizationFactory, ProfileFactory

COMPLETION_FIELDS = {
    "run_id",
    "org_id",
    "fix_mode",
    "total_issues_found",
    "total_issues_fixed",
    "duration_seconds",
}


def audit_file_handler() -> logging.handlers.TimedRotatingFileHandler:
    handlers = logging.getLogger(AUDIT_LOGGER).handlers
    [handler] = [h for h in handlers if isinstance(h, logging.handlers.TimedRotatingFileHandler)]
    return handler


def events_of_run(run_id: str) -> list[dict]:
    path = Path(audit_file_handler().baseFilename)
    events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [e for e in events if e.get("run_id") == run_id]


@pytest.mark.django_db(transaction=True)
def test_completion_events_are_json_lines_with_their_fields():
    org = OrganizationFactory()
    ProfileFactory(organization=org)
    AssetFactory(connection__organization=org)
    out = StringIO()
    call_command("profiles_audit_sync", "--fix", "--format", "json", stdout=out)
    run_id = json.loads(out.getvalue())["run_id"]

    events = {e["event"]: e for e in events_of_run(run_id)}
    per_org, per_run = events["profile_audit.org_completed"], events["profile_audit.completed"]
    assert set(per_org) >= COMPLETION_FIELDS
    assert set(per_run) >= COMPLETION_FIELDS
    assert per_org["org_id"] == str(org.id)
    assert per_run["org_id"] is None  # every organization
    # The organization's event is written as its fix commits: its missing profile is sent to
    # the sync job then, not yet fixed; the run's, once the job (eager here) confirmed it.
    assert (per_org["total_issues_found"], per_org["total_issues_fixed"]) == (2, 1)
    assert (per_run["total_issues_found"], per_run["total_issues_fixed"]) == (2, 2)
    for event in (per_org, per_run):
        assert event["fix_mode"] is True
        assert isinstance(event["duration_seconds"], float)
        assert event["logger"] == AUDIT_LOGGER
        assert event["level"] == "info"


@pytest.mark.django_db
def test_a_dry_runs_per_organization_event_carries_a_duration_too():
    org = OrganizationFactory()
    ProfileFactory(organization=org)
    out = StringIO()
    call_command("profiles_audit_sync", "--format", "json", stdout=out)
    run_id = json.loads(out.getvalue())["run_id"]

    [per_org] = [e for e in events_of_run(run_id) if e["event"] == "profile_audit.org_completed"]
    assert set(per_org) >= COMPLETION_FIELDS
    assert per_org["fix_mode"] is False
    assert isinstance(per_org["duration_seconds"], float)


def test_the_file_is_profile_sync_audit_log_in_the_configured_directory():
    handler = audit_file_handler()
    assert Path(handler.baseFilename) == Path(settings.PROFILE_AUDIT_LOG_DIR) / LOG_FILE_NAME
    assert LOG_FILE_NAME == "profile-sync-audit.log"


def test_the_default_directory_is_logs():
    env = {k: v for k, v in os.environ.items() if k != "PROFILE_AUDIT_LOG_DIR"}
    printed = subprocess.run(
        [
            sys.executable,
            "-c",
            "import django; django.setup(); from django.conf import settings; "
            "print(settings.LOGGING['handlers']['audit_file']['filename'])",
        ],
        cwd=settings.BASE_DIR,
        env={**env, "DJANGO_SETTINGS_MODULE": "audit_project.settings"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert printed == str(Path(settings.BASE_DIR) / "logs" / "profile-sync-audit.log")


def test_the_handler_rotates_daily():
    handler = audit_file_handler()
    assert isinstance(handler, logging.handlers.TimedRotatingFileHandler)
    assert (handler.when, handler.interval, handler.utc) == ("MIDNIGHT", 86400, True)
    assert handler.backupCount == 30


def test_a_rollover_keeps_the_newest_30_files(tmp_path):
    spec = dict(build_logging_config(log_dir=tmp_path)["handlers"]["audit_file"])
    assert spec.pop("class") == "audit_project.log_config.SharedTimedRotatingFileHandler"
    spec.pop("formatter"), spec.pop("level")
    handler = SharedTimedRotatingFileHandler(**spec)  # as configured, in tmp_path
    oldest = date(2020, 1, 1)
    for day in range(35):
        (tmp_path / f"{LOG_FILE_NAME}.{oldest + timedelta(days=day)}").write_text("old\n")
    record = logging.makeLogRecord({"msg": "today", "levelno": logging.INFO})
    handler.emit(record)
    handler.rolloverAt = int(time.time())  # midnight has passed
    handler.emit(logging.makeLogRecord({"msg": "after midnight", "levelno": logging.INFO}))
    handler.close()

    backups = sorted(p.name for p in tmp_path.glob(f"{LOG_FILE_NAME}.*"))
    assert len(backups) == 30
    assert f"{LOG_FILE_NAME}.{oldest}" not in backups  # the oldest went first
    assert (tmp_path / LOG_FILE_NAME).read_text().strip() == "after midnight"


def test_processes_sharing_the_file_lose_nothing_at_midnight(tmp_path):
    """The worker, beat and a command write one file; each rolls over at its first record
    after midnight. The second must not delete what the first rotated."""
    spec = dict(build_logging_config(log_dir=tmp_path)["handlers"]["audit_file"])
    for key in ("class", "formatter", "level"):
        spec.pop(key)
    worker, command = SharedTimedRotatingFileHandler(**spec), SharedTimedRotatingFileHandler(**spec)

    def log(handler, message):
        handler.emit(logging.makeLogRecord({"msg": message, "levelno": logging.INFO}))

    log(worker, "worker before midnight")
    log(command, "command before midnight")
    midnight = int(time.time())  # it has just passed, for both processes
    for handler in (worker, command):
        handler.rolloverAt = midnight
    yesterday = time.strftime("%Y-%m-%d", time.gmtime(midnight - 86400))
    log(worker, "worker after midnight")
    log(command, "command after midnight")
    for handler in (worker, command):
        handler.close()

    rotated = (tmp_path / f"{LOG_FILE_NAME}.{yesterday}").read_text().splitlines()
    current = (tmp_path / LOG_FILE_NAME).read_text().splitlines()
    assert rotated == ["worker before midnight", "command before midnight"]
    assert current == ["worker after midnight", "command after midnight"]


LOG_ONE_EVENT = (
    "import django; django.setup(); "
    "from audit_project.log_config import audit_logger; "
    "audit_logger().warning('profile_audit.console_check', org_id='o-1')"
)


def console_output(*, terminal: bool, tmp_path) -> str:
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "audit_project.settings",
        "PROFILE_AUDIT_LOG_DIR": str(tmp_path),
    }
    command = [sys.executable, "-c", LOG_ONE_EVENT]
    if not terminal:
        return subprocess.run(
            command, env=env, cwd=settings.BASE_DIR, capture_output=True, text=True, check=True
        ).stderr
    primary, secondary = pty.openpty()
    proc = subprocess.Popen(command, env=env, cwd=settings.BASE_DIR, stderr=secondary)
    os.close(secondary)
    chunks = []
    while True:
        try:
            chunk = os.read(primary, 4096)
        except OSError:  # EIO: the terminal's other end closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(primary)
    assert proc.wait(timeout=30) == 0
    return b"".join(chunks).decode(errors="replace")


def test_the_console_is_readable_at_a_terminal_and_json_elsewhere(tmp_path):
    piped = console_output(terminal=False, tmp_path=tmp_path).strip()
    assert json.loads(piped)["event"] == "profile_audit.console_check"

    at_terminal = console_output(terminal=True, tmp_path=tmp_path).strip()
    assert "profile_audit.console_check" in at_terminal
    assert "o-1" in at_terminal
    assert not at_terminal.startswith("{")
    # Both went to the file as JSON.
    lines = (tmp_path / LOG_FILE_NAME).read_text().splitlines()
    assert [json.loads(line)["event"] for line in lines] == ["profile_audit.console_check"] * 2
