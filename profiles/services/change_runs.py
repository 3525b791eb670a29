"""Change-driven runs (DESIGN "Change-driven runs"): what they take, and what they clear.

A change-driven run audits the organizations marked since they were last audited (the database
triggers' change marks) and those whose last fixing audit left something not done (unsettled).
It takes the marks first, with their versions, then audits in a snapshot taken after; each
fixing chunk clears, in its own transaction, only the marks it took: a mark written meanwhile has
a higher version and stays. A dry run reads marks and leaves them. A sweep takes the marks of the
organizations it audits as it reads them, and counts the findings of organizations that carried
none (``missed_by_changes``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from uuid import UUID

from django.utils import timezone

from profiles.models import AuditRun, ChangeLoop, ChangeMark, UnsettledOrganization
from profiles.selectors import change_marks, oldest_change_mark, unsettled_organizations


@dataclass(frozen=True)
class WorkList:
    """What a change-driven run takes when it starts."""

    marks: Mapping[UUID, int] = field(default_factory=dict)
    """{organization: version} of the marks taken."""
    unsettled: frozenset[UUID] = frozenset()
    oldest_mark_at: datetime | None = None

    @property
    def organizations(self) -> list[UUID]:
        return sorted({*self.marks, *self.unsettled})


def take_work_list() -> WorkList:
    """The marks (with their versions) and the unsettled organizations, read now: whatever is
    audited after this sees at least these writes."""
    return WorkList(
        marks=change_marks(),
        unsettled=frozenset(unsettled_organizations()),
        oldest_mark_at=oldest_change_mark(),
    )


def clear_marks(taken: Mapping[UUID, int]) -> int:
    """Inside a fixing chunk's transaction: delete exactly the marks taken, by version (one
    statement). A mark written after it was taken has another version and stays."""
    if not taken:
        return 0
    # Two IN lists, not one OR of (organization, version) pairs: building and compiling a
    # chunk's hundred-term OR cost 8-10 ms a chunk, these 1.6-1.9 ms. Exact all the same: every
    # write takes a new version from a counter that never goes back, so a version names one
    # write of one organization, and no other taken organization's mark can carry it.
    deleted, _ = ChangeMark.objects.filter(
        organization_id__in=list(taken), version__in=list(taken.values())
    ).delete()
    return deleted


def settle(*, organization_ids: Sequence[UUID], left_undone: Mapping[UUID, str]) -> None:
    """Inside a fixing chunk's transaction: the chunk's organizations are settled, except those
    whose audit left something not done (``left_undone``: organization -> the outcome)."""
    UnsettledOrganization.objects.filter(organization_id__in=list(organization_ids)).delete()
    if left_undone:
        now = timezone.now()
        UnsettledOrganization.objects.bulk_create(
            UnsettledOrganization(organization_id=org, since=now, reason=reason)
            for org, reason in left_undone.items()
        )


def beat(*, work: WorkList, run: AuditRun | None) -> None:
    """Record that the loop checked (a run or not), and its backlog then."""
    ChangeLoop.objects.update_or_create(
        name="changes",
        defaults={
            "last_checked_at": timezone.now(),
            "backlog": len(work.organizations),
            "oldest_mark_at": work.oldest_mark_at,
            **({"last_run": run} if run is not None else {}),
        },
    )


def shard_lists(work: WorkList, *, shard_size: int) -> Iterable[tuple[list[UUID], dict[str, int]]]:
    """The work list cut into shards: (organizations, {organization: version taken})."""
    organizations = work.organizations
    for start in range(0, len(organizations), shard_size):
        part = organizations[start : start + shard_size]
        yield part, {str(o): work.marks[o] for o in part if o in work.marks}
