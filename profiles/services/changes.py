"""Applying findings: the writes each finding type stands for, and the before/after each records.

Callers hold the organization's lock inside a transaction and pass only findings they have
re-checked; these functions write set-wise (one statement per kind of change) and never decide.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from boosts.models import BoostRule
from profiles.models import FindingType, SocialProfile
from profiles.plan import Finding
from profiles.services.bulk import update_rows
from profiles.services.soft_delete import ProfileSoftDeleteService, to_json
from queues.models import QueueSetting


@dataclass(frozen=True)
class Change:
    """What one finding changed (or, in a dry run, would change)."""

    finding: Finding
    before: dict[str, Any] | None
    after: dict[str, Any] | None


def planned_change(
    finding: Finding, *, now: datetime, queue_settings: dict[str, str] | None = None
) -> Change:
    """The change a finding stands for, as recorded: ``now`` is when the fix deletes;
    ``queue_settings`` ({id: deleted_at}) are those a restore brings back with the profile."""
    match finding.type:
        case FindingType.ORPHANED | FindingType.DESELECTED | FindingType.STALE_QUEUE_SETTING:
            return Change(finding, {"deleted_at": None}, {"deleted_at": to_json(now)})
        case FindingType.RELINK:
            return Change(
                finding,
                {"connection_id": to_json(finding.connection_id)},
                {"connection_id": to_json(finding.target_connection_id)},
            )
        case FindingType.RESTORE:
            before = {
                "deleted_at": to_json(finding.deleted_at),
                "connection_id": to_json(finding.connection_id),
            }
            after = {"deleted_at": None, "connection_id": to_json(finding.target_connection_id)}
            if queue_settings:
                before["queue_settings"] = queue_settings
                after["queue_settings"] = dict.fromkeys(queue_settings)
            return Change(finding, before, after)
        case FindingType.MISSING:
            assert finding.key is not None  # a missing profile is known by its key only
            platform, external_id = finding.key
            return Change(
                finding,
                None,
                {
                    "platform": platform,
                    "external_id": external_id,
                    "connection_id": to_json(finding.target_connection_id),
                    "name": finding.name,
                },
            )
        case FindingType.INVALID_BOOST_REF:
            return Change(
                finding,
                {"profile_ids": _json_value(finding.profile_ids)},
                {"profile_ids": list(finding.kept_profile_ids)},
            )
    raise ValueError(f"unknown finding type {finding.type!r}")


def _json_value(text: str | None) -> Any:
    return json.loads(text) if text is not None else None


def apply_profile_findings(
    findings: Sequence[Finding],
    *,
    now: datetime,
    on_missing: Callable[[Finding], Change],
) -> list[Change]:
    """Soft delete, relink, restore (with the queue settings an audit took from the profile),
    then hand each missing key to ``on_missing``. Returns the changes in ``findings`` order.

    The findings may span many organizations (a chunk): each kind of change is one statement
    whatever their number, and the caller holds every organization's lock.
    """
    soft_deleter = ProfileSoftDeleteService()
    changes: dict[int, Change] = {}

    deletions = [f for f in findings if f.soft_deletes_profile]
    # Every profile finding but "missing" names its profile.
    soft_deleter.soft_delete_profiles(
        profile_ids=[f.object_id for f in deletions if f.object_id is not None], now=now
    )

    update_rows(
        SocialProfile,
        ["connection_id"],
        [(f.object_id, f.target_connection_id) for f in findings if f.type == FindingType.RELINK],
    )

    restores = [f for f in findings if f.type == FindingType.RESTORE]
    restored_settings = soft_deleter.restore_profiles(
        connection_by_profile={
            f.object_id: f.target_connection_id for f in restores if f.object_id is not None
        }
    )
    for f in restores:
        assert f.object_id is not None
        changes[id(f)] = planned_change(
            f, now=now, queue_settings=restored_settings.get(f.object_id)
        )

    for f in findings:
        if f.type == FindingType.MISSING:
            changes[id(f)] = on_missing(f)
    return [changes.get(id(f)) or planned_change(f, now=now) for f in findings]


def apply_cleanup_findings(findings: Sequence[Finding], *, now: datetime) -> list[Change]:
    """Soft delete stale queue settings; strip invalid entries from boost rules."""
    QueueSetting.objects.alive().filter(
        id__in=[f.object_id for f in findings if f.type == FindingType.STALE_QUEUE_SETTING]
    ).update(deleted_at=now)
    update_rows(
        BoostRule,
        ["profile_ids"],
        [
            (f.object_id, list(f.kept_profile_ids))
            for f in findings
            if f.type == FindingType.INVALID_BOOST_REF
        ],
    )
    return [planned_change(f, now=now) for f in findings]
