"""``/health/`` (django-health-check): PostgreSQL, Redis when configured, and whether the
scheduled audit has completed within its period plus a grace. 200 when all pass, 500 with the
failing check named otherwise; ``?format=json`` for probes."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

from asgiref.sync import sync_to_async
from django.conf import settings
from health_check.base import HealthCheck
from health_check.checks import Database
from health_check.contrib.redis import Redis
from health_check.exceptions import ServiceUnavailable
from health_check.views import HealthCheckView
from redis.asyncio import Redis as AsyncRedis

from profiles.schedule import scheduled_audit_problem


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


class AuditHealthView(HealthCheckView):
    """The checks are built per request from the settings, so they follow REDIS_URL and the
    lock's Redis as configured (and as tests change them)."""

    def get_checks(self) -> Iterator[HealthCheck]:
        yield Database()
        for url in dict.fromkeys(
            u for u in (settings.REDIS_URL, settings.PROFILE_AUDIT_LOCK_REDIS_URL) if u
        ):
            yield Redis(client_factory=_redis_factory(url))
        yield ScheduledAuditRecent()


def _redis_factory(url: str):
    def client() -> AsyncRedis:
        return AsyncRedis.from_url(url, socket_connect_timeout=3, socket_timeout=3)

    return client
