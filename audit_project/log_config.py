"""structlog set-up: JSON lines to ``logs/profile-sync-audit.log`` (rotated daily, 30 kept)
through the ``profile-audit`` logger, and a console handler on stderr."""

import logging
import os
import sys
import time
from contextlib import suppress
from logging.handlers import TimedRotatingFileHandler
from pathlib import Path
from typing import Any

import structlog

from audit_project.env import InvalidSetting

AUDIT_LOGGER = "profile-audit"
LOG_FILE_NAME = "profile-sync-audit.log"
LOG_BACKUP_DAYS = 30

# Shared by structlog events and plain stdlib records (Celery's, Django's).
_PRE_CHAIN: list[Any] = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]


class SharedTimedRotatingFileHandler(TimedRotatingFileHandler):
    """Daily rotation (UTC midnight) of one file that several processes write: the command,
    the worker, beat, the admin.

    The standard handler's rollover deletes an existing ``<file>.<date>`` before renaming, so the
    second process to roll over at midnight would delete what the first had just rotated. Here
    the first process to roll over links the file to its dated name (which fails if it exists)
    and unlinks it; the others find the dated file there and only reopen the new one.
    """

    def doRollover(self) -> None:
        if self.stream:
            self.stream.close()
            self.stream = None
        started = self.rolloverAt - self.interval
        dated = self.rotation_filename(
            f"{self.baseFilename}.{time.strftime(self.suffix, time.gmtime(started))}"
        )
        try:
            os.link(self.baseFilename, dated)
        except (FileExistsError, FileNotFoundError):
            pass  # another process rotated it already
        else:
            os.unlink(self.baseFilename)
        if self.backupCount > 0:
            for old in self.getFilesToDelete():
                with suppress(FileNotFoundError):
                    os.remove(old)
        if not self.delay:
            self.stream = self._open()
        now = int(time.time())
        rollover = self.computeRollover(now)
        while rollover <= now:
            rollover += self.interval
        self.rolloverAt = rollover

    def _open(self):
        # Between another process's link and unlink, the base name still points at the rotated
        # file: opening it then would append a whole day to yesterday's log.
        for _ in range(100):
            stream = super()._open()
            if not self._is_rotated(stream):
                return stream
            stream.close()
            time.sleep(0.001)  # the other process unlinks within microseconds
        return super()._open()

    def _is_rotated(self, stream) -> bool:
        opened = os.fstat(stream.fileno())
        return opened.st_nlink > 1


class JSONLinesFormatter(structlog.stdlib.ProcessorFormatter):
    """Renders a record as one JSON line once, however many handlers write it (the console and
    the file both write every audit event: rendering it twice was a third of its cost)."""

    def format(self, record: logging.LogRecord) -> str:
        line = record.__dict__.get("_json_line")
        if line is None:
            line = record.__dict__["_json_line"] = super().format(record)
        return line


def build_logging_config(*, log_dir: Path, console_level: str | None = None) -> dict[str, Any]:
    """The ``LOGGING`` dict. A terminal gets a readable console at WARNING (the command prints
    its own report); anything else (a worker, a container) gets JSON lines at INFO."""
    _usable_log_dir(log_dir)
    interactive = sys.stderr.isatty()
    console_level = console_level or ("WARNING" if interactive else "INFO")
    json_formatter = {
        "()": JSONLinesFormatter,
        "foreign_pre_chain": _PRE_CHAIN,
        "processors": [
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(sort_keys=False),
        ],
    }
    console_formatter = {
        "()": structlog.stdlib.ProcessorFormatter,
        "foreign_pre_chain": _PRE_CHAIN,
        "processors": [
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.dev.ConsoleRenderer(colors=interactive),
        ],
    }
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "json": json_formatter,
            "console": console_formatter if interactive else json_formatter,
        },
        "handlers": {
            "console": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
                "formatter": "console",
                "level": console_level,
            },
            "audit_file": {
                "class": "audit_project.log_config.SharedTimedRotatingFileHandler",
                "filename": str(log_dir / LOG_FILE_NAME),
                "when": "midnight",
                "backupCount": LOG_BACKUP_DAYS,
                "utc": True,
                "delay": True,
                "encoding": "utf-8",
                "formatter": "json",
                "level": "INFO",
            },
        },
        "loggers": {
            AUDIT_LOGGER: {
                "handlers": ["console", "audit_file"],
                "level": "INFO",
                "propagate": False,
            },
            "celery": {"handlers": ["console"], "level": "INFO", "propagate": False},
            # Flower's own start-up lines (where it listens, the broker, the tasks it knows) are
            # INFO records of "flower.*": under the root's WARNING they would be swallowed.
            "flower": {"handlers": ["console"], "level": "INFO", "propagate": False},
        },
        "root": {"handlers": ["console"], "level": "WARNING"},
    }


def _usable_log_dir(log_dir: Path) -> None:
    """Create the directory, or stop with one line saying why it cannot be used (not a
    traceback from deep inside logging's set-up)."""
    name = "PROFILE_AUDIT_LOG_DIR"
    if log_dir.exists() and not log_dir.is_dir():
        raise InvalidSetting(name, f"{str(log_dir)!r} is not a directory")
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InvalidSetting(
            name, f"cannot create {str(log_dir)!r} ({exc.strerror}); use a writable directory"
        ) from None
    log_file = log_dir / LOG_FILE_NAME
    target = log_file if log_file.exists() else log_dir
    if not os.access(target, os.W_OK):
        raise InvalidSetting(
            name, f"{str(target)!r} is not writable by this user (uid {os.getuid()})"
        )


def configure_structlog() -> None:
    structlog.configure(
        processors=[
            *_PRE_CHAIN,
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )


def audit_logger() -> structlog.stdlib.BoundLogger:
    """The ``profile-audit`` logger every audit event goes through."""
    return structlog.get_logger(AUDIT_LOGGER)
