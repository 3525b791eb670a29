"""Settings. Everything the operator may change comes from the environment (see README).

Two settings decide where the services are, independently of each other:
``DATABASE_URL`` (unset: an SQLite file) and ``REDIS_URL`` (unset: Celery tasks run eagerly
in-process and fixing runs take a file lock instead of a Redis lock).
"""

from pathlib import Path

from celery.schedules import crontab

from audit_project.env import EnvReader, InvalidSetting, require
from audit_project.log_config import build_logging_config, configure_structlog

BASE_DIR = Path(__file__).resolve().parent.parent
env = EnvReader()

# --- Django and its deployment ----------------------------------------------------------------
DEBUG = env.bool("DJANGO_DEBUG", False)
# Development placeholders: fine with DEBUG on, refused with it off (a forged session is one
# known key away).
PLACEHOLDER_SECRET_KEYS = ("dev-only-insecure-key-change-me", "change-me-to-a-long-random-string")
SECRET_KEY = env.str("DJANGO_SECRET_KEY", PLACEHOLDER_SECRET_KEYS[0])
MAKE_A_SECRET_KEY = "python -c 'import secrets; print(secrets.token_urlsafe(50))'"
if not DEBUG and SECRET_KEY in PLACEHOLDER_SECRET_KEYS:
    raise InvalidSetting(
        "DJANGO_SECRET_KEY",
        f"set it to a long random string ({MAKE_A_SECRET_KEY}); "
        "the development placeholder is only accepted with DJANGO_DEBUG=true",
    )
# Django's own deployment check (security.W009): 50 characters or more, 5 different ones or
# more, not a generated "django-insecure-" key. Stopped here, not left to `check --deploy`.
require(
    DEBUG
    or (
        len(SECRET_KEY) >= 50
        and len(set(SECRET_KEY)) >= 5
        and not SECRET_KEY.startswith("django-insecure-")
    ),
    "DJANGO_SECRET_KEY",
    f"too weak with DJANGO_DEBUG off: use 50 or more random characters ({MAKE_A_SECRET_KEY})",
)
ALLOWED_HOSTS = env.list("DJANGO_ALLOWED_HOSTS", ["localhost", "127.0.0.1"])
# Origins (with scheme) whose POSTs are trusted behind a proxy, e.g. https://audit.example.com.
CSRF_TRUSTED_ORIGINS = env.origins("DJANGO_CSRF_TRUSTED_ORIGINS")
# Behind a TLS-terminating proxy: the header it sets and the value meaning HTTPS,
# e.g. HTTP_X_FORWARDED_PROTO,https. Only set it when the proxy always overwrites that header.
SECURE_PROXY_SSL_HEADER = env.proxy_ssl_header("DJANGO_SECURE_PROXY_SSL_HEADER")
# Served over HTTPS: redirect plain HTTP, send HSTS, secure cookies (each can be set alone).
HTTPS = env.bool("DJANGO_HTTPS", False)
SECURE_SSL_REDIRECT = env.bool("DJANGO_SECURE_SSL_REDIRECT", HTTPS)
# Probes from inside the network (the compose healthcheck, Prometheus) speak plain HTTP.
SECURE_REDIRECT_EXEMPT = [r"^health/(live/)?$", r"^metrics$"]
SECURE_HSTS_SECONDS = env.int("DJANGO_SECURE_HSTS_SECONDS", 31_536_000 if HTTPS else 0, minimum=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env.bool("DJANGO_SECURE_HSTS_INCLUDE_SUBDOMAINS", HTTPS)
SECURE_HSTS_PRELOAD = env.bool("DJANGO_SECURE_HSTS_PRELOAD", False)
SESSION_COOKIE_SECURE = env.bool("DJANGO_SESSION_COOKIE_SECURE", HTTPS)
CSRF_COOKIE_SECURE = env.bool("DJANGO_CSRF_COOKIE_SECURE", HTTPS)
# Joining the browsers' HSTS preload list is the domain owner's decision, not this app's:
# DJANGO_SECURE_HSTS_PRELOAD turns it on, and `check --deploy` need not nag without it.
SILENCED_SYSTEM_CHECKS = ["security.W021"]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_celery_beat",
    "health_check",
    "orgs",
    "connections",
    "profiles",
    "queues",
    "boosts",
]

MIDDLEWARE = [
    # /health/ and /health/live/ answer whatever the Host header (a probe by IP).
    "profiles.health.HealthProbesAnyHost",
    "django.middleware.security.SecurityMiddleware",
    # Serves the admin's static files (collected into STATIC_ROOT) under gunicorn.
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # A changelist URL whose parameters no query can use gets "?e=1", not a server error.
    "audit_project.middleware.AdminLookupGuard",
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
SQLITE_PATH = Path(env.str("SQLITE_PATH", str(BASE_DIR / "var" / "profile_sync_audit.sqlite3")))

if env.is_set("DATABASE_URL"):
    DATABASES = {"default": env.db_url("DATABASE_URL", CONN_MAX_AGE=60)}
    DATABASES["default"].setdefault("OPTIONS", {}).setdefault(
        "application_name", "profile-sync-audit"
    )
else:
    SQLITE_PATH.parent.mkdir(parents=True, exist_ok=True)
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": SQLITE_PATH,
            # IMMEDIATE takes the write lock when a transaction starts, so a fix's re-check and
            # its writes are serialized with every other writer (DESIGN rule 4 on SQLite).
            # timeout: how long a writer waits for the write lock before "database is locked".
            "OPTIONS": {
                "transaction_mode": "IMMEDIATE",
                "timeout": env.float("SQLITE_BUSY_TIMEOUT", 30, minimum=0),
            },
            # A file, not Django's in-memory default: tests that run fixes from several threads
            # (or a worker process) need SQLite's real file locking.
            "TEST": {"NAME": SQLITE_PATH.with_name(f"test_{SQLITE_PATH.name}")},
        }
    }

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Celery ---------------------------------------------------------------------------------
REDIS_URL = env.redis_url("REDIS_URL")

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
    "profiles.audit_changes": {"queue": "maintenance"},
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
PROFILE_AUDIT_GUARD_MIN = env.int("PROFILE_AUDIT_GUARD_MIN", 5, minimum=0)
PROFILE_AUDIT_GUARD_RATIO = env.float("PROFILE_AUDIT_GUARD_RATIO", 0.5, minimum=0, maximum=1)
# Organizations read (and, with --fix, fixed in one transaction) per chunk (DESIGN rule 8).
PROFILE_AUDIT_CHUNK_SIZE = env.int("PROFILE_AUDIT_CHUNK_SIZE", 100, minimum=1)
# An all-organization run is cut into shards of this many consecutive organizations (by id),
# each a `profiles.audit_shard` task on `maintenance` (DESIGN "Runs at scale").
PROFILE_AUDIT_SHARD_SIZE = env.int("PROFILE_AUDIT_SHARD_SIZE", 1000, minimum=1)
# Seconds a shard task works before it sends its own continuation from its cursor: well under
# the shard task's soft time limit (PROFILE_AUDIT_SOFT_TIME_LIMIT), which stays a backstop.
PROFILE_AUDIT_SHARD_BUDGET = env.float("PROFILE_AUDIT_SHARD_BUDGET", 240, above=0)
# The scheduled audit's period: set it to match the crontab of the beat entry in the admin, so
# the deadline, /health/, the dashboard and the metrics judge lateness against it.
PROFILE_AUDIT_SCHEDULE_PERIOD = env.int("PROFILE_AUDIT_SCHEDULE_PERIOD", 6 * 3600, minimum=60)
# A scheduled run's shards not finished this long after it started are skipped (run partial):
# below the schedule's period (default 11/12 of it: 5 h 30 of six hours), so runs never pile up.
PROFILE_AUDIT_RUN_DEADLINE = env.int(
    "PROFILE_AUDIT_RUN_DEADLINE", PROFILE_AUDIT_SCHEDULE_PERIOD * 11 // 12, minimum=1
)
require(
    PROFILE_AUDIT_RUN_DEADLINE < PROFILE_AUDIT_SCHEDULE_PERIOD,
    "PROFILE_AUDIT_RUN_DEADLINE",
    f"{PROFILE_AUDIT_RUN_DEADLINE} s must be below PROFILE_AUDIT_SCHEDULE_PERIOD "
    f"({PROFILE_AUDIT_SCHEDULE_PERIOD} s), or scheduled runs pile up",
)
# A fixing run soft-deletes at most this many rows (profiles and queue settings) over all its
# organizations and shards; an organization that does not fit is guarded. --force lifts it.
PROFILE_AUDIT_RUN_MAX_DELETIONS = env.int("PROFILE_AUDIT_RUN_MAX_DELETIONS", 10000, minimum=0)
# Deliveries of one shard (re-delivery after a lost worker, time limits) before it is failed.
PROFILE_AUDIT_SHARD_MAX_ATTEMPTS = 5
# Retention: runs older than this many days (and their findings) are pruned daily, in batches
# of PROFILE_AUDIT_PRUNE_BATCH_SIZE rows; the latest run of each organization always stays.
PROFILE_AUDIT_RETENTION_DAYS = env.int("PROFILE_AUDIT_RETENTION_DAYS", 90, minimum=1)
PROFILE_AUDIT_PRUNE_BATCH_SIZE = 5000
# Drift history (DESIGN "Drift history and fights"): a fingerprint fixed this many times within
# this many seconds is fighting another writer, and later runs hold it (outcome ``held``) until
# an operator resumes it or it stays resolved for one window. Drift records outlive findings'
# retention; one not seen for this many days is pruned with them.
PROFILE_AUDIT_FIGHT_FIXES = env.int("PROFILE_AUDIT_FIGHT_FIXES", 3, minimum=2)
PROFILE_AUDIT_FIGHT_WINDOW = env.int("PROFILE_AUDIT_FIGHT_WINDOW", 24 * 3600, minimum=60)
PROFILE_AUDIT_DRIFT_RETENTION_DAYS = env.int("PROFILE_AUDIT_DRIFT_RETENTION_DAYS", 365, minimum=1)
require(
    PROFILE_AUDIT_DRIFT_RETENTION_DAYS >= PROFILE_AUDIT_RETENTION_DAYS,
    "PROFILE_AUDIT_DRIFT_RETENTION_DAYS",
    f"{PROFILE_AUDIT_DRIFT_RETENTION_DAYS} days must be at least PROFILE_AUDIT_RETENTION_DAYS "
    f"({PROFILE_AUDIT_RETENTION_DAYS}): drift records outlive the findings they link",
)

# --- Fixing runs: the lock, the scheduled task and its beat entry ----------------------------
# Every fixing run (the task and `profiles_audit_sync --fix`) takes one lock: Redis when this URL
# is set (the default follows REDIS_URL), else a file lock on this machine.
PROFILE_AUDIT_LOCK_REDIS_URL = env.redis_url("PROFILE_AUDIT_LOCK_REDIS_URL", REDIS_URL)
PROFILE_AUDIT_LOCK_KEY = env.str("PROFILE_AUDIT_LOCK_KEY", "profile-sync-audit:fixing-run")
# 60 minutes, the original's withoutOverlapping(60); longer than the task's hard time limit.
# At most a week: longer is a lock that outlives any outage anyone would wait for.
PROFILE_AUDIT_LOCK_TTL = env.int("PROFILE_AUDIT_LOCK_TTL", 3600, minimum=1, maximum=7 * 86400)
# Redis unreachable: an error within this many seconds, not a hung run (0 would mean
# non-blocking sockets, which fail every call).
PROFILE_AUDIT_LOCK_SOCKET_TIMEOUT = env.float(
    "PROFILE_AUDIT_LOCK_SOCKET_TIMEOUT", 5, above=0, maximum=300
)
PROFILE_AUDIT_LOCK_FILE = Path(
    env.str("PROFILE_AUDIT_LOCK_FILE", str(BASE_DIR / "var" / "profile-sync-audit.lock"))
)
# Change-driven runs (DESIGN "Change-driven runs"): /health/ turns unready, and an alert fires,
# when a change mark is older than this (the minute loop has fallen behind or stopped).
PROFILE_AUDIT_CHANGES_MAX_BACKLOG_AGE = env.int(
    "PROFILE_AUDIT_CHANGES_MAX_BACKLOG_AGE", 15 * 60, minimum=60
)
# Fencing (DESIGN "Fencing"): how long taking the lease waits for a stopped transaction that
# holds its row, and how long a fix waits for organization locks that another transaction
# (a stopped holder, a slow real-time sync) holds before those organizations are recorded failed.
PROFILE_AUDIT_LEASE_WAIT = env.float("PROFILE_AUDIT_LEASE_WAIT", 30, minimum=0)
PROFILE_AUDIT_ORG_LOCK_WAIT = env.float("PROFILE_AUDIT_ORG_LOCK_WAIT", 30, minimum=0.001)
# A fanned-out run whose shards have not moved for this long has lost their messages (a broker
# restarted without persistence) or their workers: its open shards are sent again (by the
# waiting command and the daily maintenance). The waiting command gives up (exit 2) after it
# saw no progress for twice as long.
PROFILE_AUDIT_SHARD_STALE_AFTER = env.float("PROFILE_AUDIT_SHARD_STALE_AFTER", 600, minimum=0.001)
# The scheduled task: at the soft limit it stops after the organization in progress; the hard
# limit (10 minutes) kills it. soft < hard < lock TTL < the six-hour interval.
PROFILE_AUDIT_SOFT_TIME_LIMIT = env.int("PROFILE_AUDIT_SOFT_TIME_LIMIT", 540, minimum=1)
PROFILE_AUDIT_TIME_LIMIT = env.int("PROFILE_AUDIT_TIME_LIMIT", 600, minimum=1)
require(
    PROFILE_AUDIT_SOFT_TIME_LIMIT < PROFILE_AUDIT_TIME_LIMIT,
    "PROFILE_AUDIT_SOFT_TIME_LIMIT",
    f"{PROFILE_AUDIT_SOFT_TIME_LIMIT} s must be below PROFILE_AUDIT_TIME_LIMIT "
    f"({PROFILE_AUDIT_TIME_LIMIT} s): the soft limit stops a task cleanly before the hard one kills it",
)
require(
    PROFILE_AUDIT_TIME_LIMIT < PROFILE_AUDIT_SCHEDULE_PERIOD,
    "PROFILE_AUDIT_TIME_LIMIT",
    f"{PROFILE_AUDIT_TIME_LIMIT} s must be below PROFILE_AUDIT_SCHEDULE_PERIOD "
    f"({PROFILE_AUDIT_SCHEDULE_PERIOD} s)",
)
require(
    PROFILE_AUDIT_LOCK_TTL >= PROFILE_AUDIT_TIME_LIMIT,
    "PROFILE_AUDIT_LOCK_TTL",
    f"{PROFILE_AUDIT_LOCK_TTL} s must cover PROFILE_AUDIT_TIME_LIMIT ({PROFILE_AUDIT_TIME_LIMIT} s), "
    "or the lock expires under a task that is still running",
)
require(
    PROFILE_AUDIT_SHARD_BUDGET < PROFILE_AUDIT_SOFT_TIME_LIMIT,
    "PROFILE_AUDIT_SHARD_BUDGET",
    f"{PROFILE_AUDIT_SHARD_BUDGET:g} s must be below PROFILE_AUDIT_SOFT_TIME_LIMIT "
    f"({PROFILE_AUDIT_SOFT_TIME_LIMIT} s): the budget is the plan, the time limit the backstop",
)
# Two retries, a fixed two minutes apart, on transient errors only.
PROFILE_AUDIT_MAX_RETRIES = 2
PROFILE_AUDIT_RETRY_DELAY = 120
# The missing-profile sync job retries the same way (overridable: a test's worker retries fast).
PROFILE_AUDIT_SYNC_MAX_RETRIES = env.int(
    "PROFILE_AUDIT_SYNC_MAX_RETRIES", PROFILE_AUDIT_MAX_RETRIES, minimum=0
)
PROFILE_AUDIT_SYNC_RETRY_DELAY = env.int(
    "PROFILE_AUDIT_SYNC_RETRY_DELAY", PROFILE_AUDIT_RETRY_DELAY, minimum=0
)
# The daily maintenance sends the sync job again for findings still "sent" this long after
# their run went quiet (the job was lost with a broker that restarted, or gave up retrying).
PROFILE_AUDIT_SYNC_RESEND_AFTER = env.int("PROFILE_AUDIT_SYNC_RESEND_AFTER", 30 * 60, minimum=0)
# A scheduled message not started within 3 hours is dropped, so a worker outage leaves at most
# one run waiting, never a backlog. Retries inherit the message's absolute expiry, so this must
# also outlast the longest retry chain (2 x (600 s + 120 s)), which it does with room to queue.
PROFILE_AUDIT_SCHEDULE_EXPIRES = 3 * 3600

# The schedule belongs to the admin (django-celery-beat's *Periodic tasks*). These entries are
# written into its tables once, after `migrate` (profiles.schedule, on post_migrate), and never
# again: an entry that exists, whatever an operator changed in it, is left alone. A deleted
# entry comes back at the next `migrate`; to stop one, untick "enabled".
# Only queue/exchange/routing_key/priority/headers/expire_seconds of "options" are kept: the
# expiry must be `expire_seconds`.
PROFILE_AUDIT_BEAT_ENTRIES = {
    # Every six hours, on the hour: 00:00, 06:00, 12:00 and 18:00 UTC. The trigger is in the
    # entry, so a run sent by hand (`celery call profiles.audit_sync`) is not taken for it.
    "profile-connection-sync-audit": {
        "task": "profiles.audit_sync",
        "schedule": crontab(minute="0", hour="*/6"),
        "kwargs": {"fix": True, "trigger": "schedule"},
        "options": {"queue": "maintenance", "expire_seconds": PROFILE_AUDIT_SCHEDULE_EXPIRES},
        "description": "The scheduled audit of every organization, with fixes.",
    },
    # Change-driven runs, every minute: audit (and fix) what changed since the last audit; the
    # six-hourly sweep above stays as the resync. Expires before the next minute's message.
    "profile-connection-sync-audit-changes": {
        "task": "profiles.audit_changes",
        "schedule": crontab(minute="*"),
        "kwargs": {"fix": True},
        "options": {"queue": "maintenance", "expire_seconds": 55},
        "description": "Change-driven audit of the organizations written to since their last audit.",
    },
    # Retention, daily at 03:30 UTC: prune audit runs older than PROFILE_AUDIT_RETENTION_DAYS
    # (never the latest run of an organization). Expires long before the next day's entry.
    "prune-audit-runs": {
        "task": "profiles.prune_audit_runs",
        "schedule": crontab(minute=30, hour=3),
        "options": {"queue": "maintenance", "expire_seconds": 12 * 3600},
        "description": "Retention of audit runs and findings.",
    },
}
# Empty on purpose: beat's DatabaseScheduler upserts whatever is here at every start, which
# would overwrite the schedule an operator set in the admin.
CELERY_BEAT_SCHEDULE: dict = {}

# --- Operating it: metrics, health, dashboard -------------------------------------------------
# How late the scheduled run may finish, beyond PROFILE_AUDIT_SCHEDULE_PERIOD, before /health/
# turns red and the alert rules fire (docs/operating.md).
PROFILE_AUDIT_SCHEDULE_GRACE = env.int("PROFILE_AUDIT_SCHEDULE_GRACE", 1800, minimum=0)
# Where operators open the admin (e.g. https://audit.example.com): /metrics exports each last
# run's admin link with it, so an alert links to the run. Empty: links are paths (/admin/...).
PROFILE_AUDIT_ADMIN_BASE_URL = env.http_url("PROFILE_AUDIT_ADMIN_BASE_URL")
# /metrics asks for `Authorization: Bearer <token>` when this is set (empty: open, for a
# scraper on a private network).
PROFILE_AUDIT_METRICS_TOKEN = env.str("PROFILE_AUDIT_METRICS_TOKEN")
# Dry runs change nothing, so their findings (the bulk of the table) go sooner than those of
# fixing runs, which a revert needs; the run record and its counts stay for the full period.
PROFILE_AUDIT_DRY_RUN_RETENTION_DAYS = env.int(
    "PROFILE_AUDIT_DRY_RUN_RETENTION_DAYS", 14, minimum=1
)
# Runs drawn in the admin's found/fixed chart.
PROFILE_AUDIT_DASHBOARD_RUNS = 30

# --- Internationalization -------------------------------------------------------------------
LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = Path(env.str("STATIC_ROOT", str(BASE_DIR / "var" / "static")))
STATIC_ROOT.mkdir(parents=True, exist_ok=True)  # WhiteNoise warns on every start without it
# Serve the admin's files from the apps too, so it works before (or without) collectstatic.
WHITENOISE_USE_FINDERS = True

# --- Logging --------------------------------------------------------------------------------
PROFILE_AUDIT_LOG_DIR = Path(env.str("PROFILE_AUDIT_LOG_DIR", str(BASE_DIR / "logs")))
LOGGING = build_logging_config(
    log_dir=PROFILE_AUDIT_LOG_DIR,
    console_level=env.log_level("PROFILE_AUDIT_CONSOLE_LEVEL"),
)
configure_structlog()
