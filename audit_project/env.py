"""Reading the settings from the environment (django-environ), strictly: a value that does not
parse stops the process with one line naming the variable and what it should be, never a
traceback and never a silent fallback to a default."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

import environ

TRUE = frozenset({"1", "true", "yes", "on"})
FALSE = frozenset({"0", "false", "no", "off"})
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class InvalidSetting(SystemExit):
    """A setting that cannot be used. A ``SystemExit``: whichever program is loading the
    settings (manage.py, celery, gunicorn) stops with this one line on stderr and status 1."""

    def __init__(self, name: str, problem: str) -> None:
        self.name = name
        super().__init__(f"Invalid setting {name}: {problem}")


class EnvReader:
    """Typed reads of environment variables. Unset or empty means the default."""

    def __init__(self, environ_: Mapping[str, str] | None = None) -> None:
        self._environ = os.environ if environ_ is None else environ_
        self._env = environ.Env()
        self._env.ENVIRON = self._environ

    def raw(self, name: str) -> str | None:
        value = self._environ.get(name)
        return None if value is None or value.strip() == "" else value.strip()

    def is_set(self, name: str) -> bool:
        return self.raw(name) is not None

    def str(self, name: str, default: str = "") -> str:
        value = self.raw(name)
        return default if value is None else value

    def int(
        self, name: str, default: int, *, minimum: int | None = None, maximum: int | None = None
    ) -> int:
        value = self.raw(name)
        if value is None:
            return default
        try:
            parsed = self._env.int(name)
        except ValueError:
            raise InvalidSetting(
                name, f"{value!r} is not a whole number (e.g. {default})"
            ) from None
        return self._within(name, parsed, minimum, maximum)

    def float(
        self,
        name: str,
        default: float,
        *,
        minimum: float | None = None,
        maximum: float | None = None,
        above: float | None = None,
    ) -> float:
        value = self.raw(name)
        if value is None:
            return default
        try:
            parsed = self._env.float(name)
        except ValueError:
            raise InvalidSetting(name, f"{value!r} is not a number (e.g. {default:g})") from None
        if parsed != parsed or parsed in (float("inf"), float("-inf")):
            raise InvalidSetting(name, f"{value!r} is not a finite number (e.g. {default:g})")
        if above is not None and parsed <= above:
            raise InvalidSetting(name, f"{parsed:g} must be above {above:g}")
        return self._within(name, parsed, minimum, maximum)

    def bool(self, name: str, default: bool) -> bool:
        value = self.raw(name)
        if value is None:
            return default
        if value.lower() in TRUE:
            return True
        if value.lower() in FALSE:
            return False
        raise InvalidSetting(name, f"{value!r} is not true or false (use 1/0, true/false, yes/no)")

    def list(self, name: str, default: Iterable[str] = ()) -> list[str]:
        value = self.raw(name)
        if value is None:
            return list(default)
        return [item for item in self._env.list(name) if item.strip()]

    def choice(self, name: str, default: str | None, choices: Iterable[str]) -> str | None:
        value = self.raw(name)
        if value is None:
            return default
        allowed = list(choices)
        if value.upper() not in allowed:
            raise InvalidSetting(name, f"{value!r} is not one of {', '.join(allowed)}")
        return value.upper()

    def log_level(self, name: str, default: str | None = None) -> str | None:
        return self.choice(name, default, LOG_LEVELS)

    def db_url(self, name: str, **extra: Any) -> dict[str, Any]:
        value = self.raw(name)
        scheme = (value or "").split("://", 1)[0]
        if scheme not in environ.Env.DB_SCHEMES:
            raise InvalidSetting(
                name,
                f"{_redacted(value)!r} is not a database URL (e.g. postgres://user@host:5432/name)",
            )
        try:
            config = environ.Env.db_url_config(value)
        except Exception as exc:  # django-environ raises several kinds for a bad URL
            raise InvalidSetting(
                name, f"{_redacted(value)!r} is not a database URL ({exc})"
            ) from None
        _check_port(name, value)
        config.update(extra)
        return config

    def redis_url(self, name: str, default: str = "") -> str:
        value = self.str(name, default)
        if not value:
            return value
        example = "(e.g. redis://127.0.0.1:6379/0)"
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise InvalidSetting(name, f"{_redacted(value)!r} is not a Redis URL {example}")
        if value.startswith("unix://"):
            return value
        if not urlsplit(value).hostname:
            raise InvalidSetting(name, f"{_redacted(value)!r} names no host {example}")
        _check_port(name, value)
        db = urlsplit(value).path.strip("/")
        if db and not (db.isdigit() and int(db) <= 15):
            raise InvalidSetting(
                name, f"{_redacted(value)!r}: the database {db!r} is not a number 0-15 {example}"
            )
        return value

    def http_url(self, name: str, default: str = "") -> str:
        """An http(s) URL without a trailing slash, e.g. a public base URL."""
        value = self.str(name, default)
        if not value:
            return value
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InvalidSetting(
                name, f"{value!r} is not an http(s) URL (e.g. https://audit.example.com)"
            )
        _check_port(name, value)
        if parts.query or parts.fragment:
            raise InvalidSetting(name, f"{value!r} must have no query or fragment")
        return value.rstrip("/")

    def proxy_ssl_header(self, name: str) -> tuple[str, str] | None:
        value = self.raw(name)
        if value is None:
            return None
        header, _, expected = (part.strip() for part in value.partition(","))
        if not header or not expected:
            raise InvalidSetting(
                name, f"{value!r} must be HEADER,VALUE (e.g. HTTP_X_FORWARDED_PROTO,https)"
            )
        return header, expected

    def origins(self, name: str) -> list[str]:
        origins = self.list(name)
        for origin in origins:
            if "://" not in origin:
                raise InvalidSetting(
                    name, f"{origin!r} needs its scheme (e.g. https://audit.example.com)"
                )
        return origins

    @staticmethod
    def _within(name: str, value, minimum, maximum):
        if minimum is not None and value < minimum:
            raise InvalidSetting(name, f"{value!r} is below the minimum of {minimum}")
        if maximum is not None and value > maximum:
            raise InvalidSetting(name, f"{value!r} is above the maximum of {maximum}")
        return value


def require(condition: bool, name: str, problem: str) -> None:
    """A relation between settings that must hold (e.g. soft time limit < hard time limit):
    stops the process with one line naming ``name`` and what would work."""
    if not condition:
        raise InvalidSetting(name, problem)


def _check_port(name: str, url: str) -> None:
    try:
        urlsplit(url).port  # noqa: B018 - raises ValueError for a port that is not 0-65535
    except ValueError:
        raise InvalidSetting(
            name, f"{_redacted(url)!r} has a port that is not a number from 1 to 65535"
        ) from None


def _redacted(url: str | None) -> str:
    if not url or "@" not in url or "://" not in url:
        return url or ""
    scheme, rest = url.split("://", 1)
    credentials, _, host = rest.rpartition("@")
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in credentials else url
