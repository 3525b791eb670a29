"""Health probes (django-health-check), two of them so that orchestrators can tell a process to
restart from a node to take out of rotation:

* ``/health/live/`` (liveness): the process answers and reaches its database. A late batch job
  or a Redis outage never makes it fail, so the admin stays up to investigate them.
* ``/health/`` (readiness of the audit): the database, Redis (broker and lock) and the schedule
  (the last scheduled run completed within its period plus a grace).

Both answer 200 when every check passes and 503 naming the failing one otherwise; ``?format=json``
for probes. They answer whatever the Host header (a load balancer probing by IP), and name no
internal host or port: the reports are read by anonymous callers."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

from asgiref.sync import sync_to_async
from django.conf import settings
from django.http import HttpRequest, HttpResponse
from health_check.base import HealthCheck
from health_check.checks import Database
from health_check.contrib.redis import Redis
from health_check.exceptions import ServiceUnavailable
from health_check.views import HealthCheckView
from redis.asyncio import Redis as AsyncRedis

from profiles.schedule import change_backlog_problem, scheduled_audit_problem

HEALTH_PATHS = ("/health/", "/health/live/")


@dataclasses.dataclass
class ScheduledAuditRecent(HealthCheck):
    """The last scheduled run completed (succeeded or partial) no longer ago than the schedule's
    period plus the grace. Before the first one, the clock starts when the schedule entry was
    created or last changed; a schedule switched off in the admin is the operator's choice and
    not a failure."""

    def __repr__(self) -> str:
        return "ScheduledAudit"

    async def run(self) -> None:
        # On the request's own thread and connection (the ORM is synchronous).
        problem = await sync_to_async(scheduled_audit_problem, thread_sensitive=True)()
        if problem:
            raise ServiceUnavailable(problem)


@dataclasses.dataclass
class ChangeBacklogFresh(HealthCheck):
    """No change mark is older than PROFILE_AUDIT_CHANGES_MAX_BACKLOG_AGE: the change-driven
    runs keep up (GitLab's loose-foreign-key cleanup fell silently behind for want of this)."""

    def __repr__(self) -> str:
        return "ChangeBacklog"

    async def run(self) -> None:
        problem = await sync_to_async(change_backlog_problem, thread_sensitive=True)()
        if problem:
            raise ServiceUnavailable(problem)


@dataclasses.dataclass
class NamedDatabase(Database):
    def __repr__(self) -> str:
        return "Database"


@dataclasses.dataclass
class NamedRedis(Redis):
    """django-health-check's Redis ping, reported by role ("Redis (broker)") instead of by
    host and port, which are nobody's business outside."""

    role: str = dataclasses.field(default="broker")

    def __repr__(self) -> str:
        return f"Redis ({self.role})"

    @property
    def labels(self) -> dict[str, str]:
        return {"check": "Redis", "role": self.role}


class ProbeView(HealthCheckView):
    """503 (Service Unavailable), not the library's 500, when a check fails: the node is not
    broken, it is not ready, and load balancers and probes read 503 that way."""

    async def get(self, request, *args, **kwargs):
        response = await super().get(request, *args, **kwargs)
        if response.status_code == 500:
            response.status_code = 503
        return response


class LivenessView(ProbeView):
    def get_checks(self) -> Iterator[HealthCheck]:
        yield NamedDatabase()


class AuditHealthView(ProbeView):
    """The checks are built per request from the settings, so they follow REDIS_URL and the
    lock's Redis as configured (and as tests change them)."""

    def get_checks(self) -> Iterator[HealthCheck]:
        yield NamedDatabase()
        broker, lock = settings.REDIS_URL, settings.PROFILE_AUDIT_LOCK_REDIS_URL
        if broker and broker == lock:
            yield NamedRedis(client_factory=_redis_factory(broker), role="broker and lock")
        else:
            if broker:
                yield NamedRedis(client_factory=_redis_factory(broker), role="broker")
            if lock:
                yield NamedRedis(client_factory=_redis_factory(lock), role="lock")
        yield ScheduledAuditRecent()
        yield ChangeBacklogFresh()


def _redis_factory(url: str):
    def client() -> AsyncRedis:
        return AsyncRedis.from_url(url, socket_connect_timeout=3, socket_timeout=3)

    return client


class HealthProbesAnyHost:
    """Health probes answer whatever Host they are sent: a load balancer or kubelet probing a
    node by its IP is not a browser to protect from Host-header attacks, and the probes build no
    URL from the host. Every other path keeps ALLOWED_HOSTS. First in MIDDLEWARE, before
    anything asks for the host."""

    def __init__(self, get_response) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if request.path_info in HEALTH_PATHS:
            raw_host = request.META.get("HTTP_HOST") or request.META.get("SERVER_NAME", "")
            request.get_host = lambda: raw_host  # type: ignore[method-assign]
        return self.get_response(request)
