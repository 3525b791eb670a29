"""Template filters for the audit's admin pages: one way to write a moment on every page."""

from __future__ import annotations

from datetime import datetime

from django import template
from django.utils.safestring import SafeString

from profiles.dashboard import moment, moment_html

register = template.Library()


@register.filter
def utc(value: datetime | None) -> str:
    """``2026-12-01 20:04 UTC`` (plain text)."""
    return moment(value)


@register.filter
def utc_html(value: datetime | None) -> SafeString:
    """The same in a ``<time>`` element, the exact instant on hover."""
    return moment_html(value)
