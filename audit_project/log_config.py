"""structlog set-up: JSON lines to ``logs/profile-sync-audit.log`` (rotated daily, 30 kept)
through the ``profile-audit`` logger, and a console handler on stderr."""

import sys
from pathlib import Path
from typing import Any

import structlog

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


def build_logging_config(*, log_dir: Path, console_level: str | None = None) -> dict[str, Any]:
    """The ``LOGGING`` dict. A terminal gets a readable console at WARNING (the command prints
    its own report); anything else (a worker, a container) gets JSON lines at INFO."""
    log_dir.mkdir(parents=True, exist_ok=True)
    interactive = sys.stderr.isatty()
    console_level = console_level or ("WARNING" if interactive else "INFO")
    json_formatter = {
        "()": structlog.stdlib.ProcessorFormatter,
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
                "class": "logging.handlers.TimedRotatingFileHandler",
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
        },
        "root": {"handlers": ["console"], "level": "WARNING"},
    }


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
