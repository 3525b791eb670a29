"""Settings. Everything the operator may change comes from the environment (see README).

Two settings decide where the services are, independently of each other:
``DATABASE_URL`` (unset: an SQLite file) and ``REDIS_URL`` (unset: Celery tasks run eagerly
in-process and fixing runs take a file lock instead of a Redis lock).
"""

import os
from pathlib import Path

import dj_database_url
from celery.schedules import crontab

from audit_project.log_config import build_logging_config, configure_structlog

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "dev-only-insecure-key-change-me")
DEBUG = os.environ.get("DJANGO_DEBUG", "") == "1"
ALLOWED_HOSTS = [
    h for h in os.environ.get("DJANGO_ALLOWED_HOSTS", "localhost,127.0.0.1").split(",") if h
]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_celery_beat",
    "orgs",
    "connections",
    "profiles",
    "queues",
    "boosts",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    # Serves the admin's static files (collected into STATIC_ROOT) under gunicorn.
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "audit_project.urls"
WSGI_APPLICATION = "audit_project.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "audit_project" / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database -------------------------------------------------------------------------------
SQLITE_PATH = Path(os.environ.get("SQLITE_PATH", BASE_DIR / "var" / "profile_sync_audit.sqlite3"))

if os.environ.get("DATABASE_URL"):
    DATABASES = {"default": dj_database_url.parse(os.environ["DATABASE_URL"], conn_max_age=60)}
else:
    SQLITE_PATH.parent.mkdir(parents=True, exist_ok=True)
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": SQLITE_PATH,
            # IMMEDIATE takes the write lock when a transaction starts, so a fix's re-check and
            # its writes are serialized with every other writer (DESIGN rule 4 on SQLite).
            "OPTIONS": {"transaction_mode": "IMMEDIATE", "timeout": 30},
            # A file, not Django's in-memory default: tests that run fixes from several threads
            # (or a worker process) need SQLite's real file locking.
            "TEST": {"NAME": SQLITE_PATH.with_name(f"test_{SQLITE_PATH.name}")},
        }
    }

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Celery ---------------------------------------------------------------------------------
REDIS_URL = os.environ.get("REDIS_URL", "")

if REDIS_URL:
    CELERY_BROKER_URL = REDIS_URL
    CELERY_TASK_ALWAYS_EAGER = False
else:
    CELERY_BROKER_URL = "memory://localhost/"
    CELERY_TASK_ALWAYS_EAGER = True
CELERY_TASK_EAGER_PROPAGATES = True
# Fail fast when Redis is unreachable instead of hanging the caller.
CELERY_BROKER_CONNECTION_TIMEOUT = 5
CELERY_BROKER_TRANSPORT_OPTIONS = {"socket_timeout": 5, "socket_connect_timeout": 5}
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_TASK_DEFAULT_QUEUE = "celery"
# Queues are set here, not on the tasks: Celery 5.7 deprecates the ``queue`` task attribute
# (removal in 6.0), so routes are the one place that says where each task runs.
CELERY_TASK_ROUTES = {
    "profiles.audit_sync": {"queue": "maintenance"},
    "profiles.audit_shard": {"queue": "maintenance"},
    "profiles.revert_run": {"queue": "maintenance"},
    "profiles.prune_audit_runs": {"queue": "maintenance"},
    "profiles.sync_profile": {"queue": "celery"},
    "profiles.sync_profiles": {"queue": "celery"},
}
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_ACKS_LATE = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TIMEZONE = "UTC"
CELERY_BEAT_SCHEDULER = "django_celery_beat.schedulers:DatabaseScheduler"

# --- The audit ------------------------------------------------------------------------------
# Mass-deletion guard: an organization whose plan would soft-delete more than
# max(GUARD_MIN, GUARD_RATIO x its alive profiles) is not fixed (DESIGN "Nothing is lost").
PROFILE_AUDIT_GUARD_MIN = int(os.environ.get("PROFILE_AUDIT_GUARD_MIN", "5"))
PROFILE_AUDIT_GUARD_RATIO = float(os.environ.get("PROFILE_AUDIT_GUARD_RATIO", "0.5"))
# Organizations read (and, with --fix, fixed in one transaction) per chunk (DESIGN rule 8).
PROFILE_AUDIT_CHUNK_SIZE = int(os.environ.get("PROFILE_AUDIT_CHUNK_SIZE", "100"))
# An all-organization run is cut into shards of this many consecutive organizations (by id),
# each a `profiles.audit_shard` task on `maintenance` (DESIGN "Runs at scale").
PROFILE_AUDIT_SHARD_SIZE = int(os.environ.get("PROFILE_AUDIT_SHARD_SIZE", "1000"))
# Seconds a shard task works before it sends its own continuation from its cursor: well under
# the shard task's soft time limit (PROFILE_AUDIT_SOFT_TIME_LIMIT), which stays a backstop.
PROFILE_AUDIT_SHARD_BUDGET = float(os.environ.get("PROFILE_AUDIT_SHARD_BUDGET", "240"))
# A scheduled run's shards not finished this long after it started are skipped (run partial):
# below the six-hour schedule, so runs never pile up.
PROFILE_AUDIT_RUN_DEADLINE = int(os.environ.get("PROFILE_AUDIT_RUN_DEADLINE", str(5 * 3600 + 1800)))
# A fixing run soft-deletes at most this many rows (profiles and queue settings) over all its
# organizations and shards; an organization that does not fit is guarded. --force lifts it.
PROFILE_AUDIT_RUN_MAX_DELETIONS = int(os.environ.get("PROFILE_AUDIT_RUN_MAX_DELETIONS", "10000"))
# Deliveries of one shard (re-delivery after a lost worker, time limits) before it is failed.
PROFILE_AUDIT_SHARD_MAX_ATTEMPTS = 5
# Retention: runs older than this many days (and their findings) are pruned daily, in batches
# of PROFILE_AUDIT_PRUNE_BATCH_SIZE rows; the latest run of each organization always stays.
PROFILE_AUDIT_RETENTION_DAYS = int(os.environ.get("PROFILE_AUDIT_RETENTION_DAYS", "90"))
PROFILE_AUDIT_PRUNE_BATCH_SIZE = 5000

# --- Fixing runs: the lock, the scheduled task and its beat entry ----------------------------
# Every fixing run (the task and `profiles_audit_sync --fix`) takes one lock: Redis when this URL
# is set (the default follows REDIS_URL), else a file lock on this machine.
PROFILE_AUDIT_LOCK_REDIS_URL = os.environ.get("PROFILE_AUDIT_LOCK_REDIS_URL", REDIS_URL)
PROFILE_AUDIT_LOCK_KEY = os.environ.get("PROFILE_AUDIT_LOCK_KEY", "profile-sync-audit:fixing-run")
# 60 minutes, the original's withoutOverlapping(60); longer than the task's hard time limit.
PROFILE_AUDIT_LOCK_TTL = int(os.environ.get("PROFILE_AUDIT_LOCK_TTL", "3600"))
# Redis unreachable: an error within this many seconds, not a hung run.
PROFILE_AUDIT_LOCK_SOCKET_TIMEOUT = float(os.environ.get("PROFILE_AUDIT_LOCK_SOCKET_TIMEOUT", "5"))
PROFILE_AUDIT_LOCK_FILE = Path(
    os.environ.get("PROFILE_AUDIT_LOCK_FILE", BASE_DIR / "var" / "profile-sync-audit.lock")
)
# The scheduled task: at the soft limit it stops after the organization in progress; the hard
# limit (10 minutes) kills it. soft < hard < lock TTL < the six-hour interval.
PROFILE_AUDIT_SOFT_TIME_LIMIT = int(os.environ.get("PROFILE_AUDIT_SOFT_TIME_LIMIT", "540"))
PROFILE_AUDIT_TIME_LIMIT = int(os.environ.get("PROFILE_AUDIT_TIME_LIMIT", "600"))
# Two retries, a fixed two minutes apart, on transient errors only.
PROFILE_AUDIT_MAX_RETRIES = 2
PROFILE_AUDIT_RETRY_DELAY = 120
# A scheduled message not started within 3 hours is dropped, so a worker outage leaves at most
# one run waiting, never a backlog. Retries inherit the message's absolute expiry, so this must
# also outlast the longest retry chain (2 x (600 s + 120 s)), which it does with room to queue.
PROFILE_AUDIT_SCHEDULE_EXPIRES = 3 * 3600

# Upserted into django-celery-beat's PeriodicTask table by the DatabaseScheduler (the admin
# shows it). Its copy keeps only queue/exchange/routing_key/priority/headers/expire_seconds of
# "options": the expiry must be `expire_seconds` (an `expires` here is silently dropped).
CELERY_BEAT_SCHEDULE = {
    # Every six hours, on the hour: 00:00, 06:00, 12:00 and 18:00 UTC.
    "profile-connection-sync-audit": {
        "task": "profiles.audit_sync",
        "schedule": crontab(minute="0", hour="*/6"),
        "kwargs": {"fix": True, "trigger": "schedule"},
        "options": {"queue": "maintenance", "expire_seconds": PROFILE_AUDIT_SCHEDULE_EXPIRES},
    },
    # Retention, daily at 03:30 UTC: prune audit runs older than PROFILE_AUDIT_RETENTION_DAYS
    # (never the latest run of an organization). Expires long before the next day's entry.
    "prune-audit-runs": {
        "task": "profiles.prune_audit_runs",
        "schedule": crontab(minute=30, hour=3),
        "options": {"queue": "maintenance", "expire_seconds": 12 * 3600},
    },
}

# --- Internationalization -------------------------------------------------------------------
LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = Path(os.environ.get("STATIC_ROOT", BASE_DIR / "var" / "static"))
STATIC_ROOT.mkdir(parents=True, exist_ok=True)  # WhiteNoise warns on every start without it
# Serve the admin's files from the apps too, so it works before (or without) collectstatic.
WHITENOISE_USE_FINDERS = True

# --- Logging --------------------------------------------------------------------------------
PROFILE_AUDIT_LOG_DIR = Path(os.environ.get("PROFILE_AUDIT_LOG_DIR", BASE_DIR / "logs"))
LOGGING = build_logging_config(
    log_dir=PROFILE_AUDIT_LOG_DIR,
    console_level=os.environ.get("PROFILE_AUDIT_CONSOLE_LEVEL"),
)
configure_structlog()
