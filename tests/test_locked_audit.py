"""Fixing runs under the fixing-run lock, through the command and the service they share
(profiles.services.audit): held lock, lost lease, dead holder, unreachable Redis, and one
organization's failure contained."""

import json
import re
import uuid
from io import StringIO

import pytest
from django.conf import settings
from django.core.management import CommandError, call_command

from profiles.models import AuditFinding, AuditRun, AuditStatus, AuditTrigger, SocialProfile
from profiles.services.audit import AuditRequest, Budget, run_audit, start_run
from profiles.services.run_lock import RunLockUnavailable
from tests.factories import AssetFactory, OrganizationFactory, ProfileFactory
from tests.support import break_commits_of, redis_client, wait_for

UNREACHABLE = "redis://127.0.0.1:1/3"


def orphaned_profile(org_id=None):
    """An organization with one orphaned profile (no connection, key selected nowhere)."""
    org = OrganizationFactory(id=org_id) if org_id else OrganizationFactory()
    return ProfileFactory(organization=org)


def alive(profile) -> bool:
    profile.refresh_from_db()
    return profile.deleted_at is None


def fix_command(*args: str) -> tuple[int, str, str]:
    out, err = StringIO(), StringIO()
    try:
        call_command("profiles_audit_sync", "--fix", *args, stdout=out, stderr=err)
    except CommandError as exc:
        return exc.returncode, out.getvalue(), err.getvalue() + str(exc)
    return 0, out.getvalue(), err.getvalue()


@pytest.fixture
def lock_held_by_another_run():
    client = redis_client()
    client.set(settings.PROFILE_AUDIT_LOCK_KEY, "other-host:4242:token", ex=600)
    yield client
    client.delete(settings.PROFILE_AUDIT_LOCK_KEY)
    client.close()


@pytest.mark.django_db
def test_fix_takes_the_lock_and_gives_it_back():
    profile = orphaned_profile()
    code, _, _ = fix_command()
    assert code == 0
    assert not alive(profile)
    assert redis_client().exists(settings.PROFILE_AUDIT_LOCK_KEY) == 0


@pytest.mark.django_db
def test_fix_with_the_lock_held_is_skipped_with_exit_75(lock_held_by_another_run):
    profile = orphaned_profile()
    code, _, err = fix_command()
    assert code == 75
    assert alive(profile)
    run = AuditRun.objects.get()
    assert run.status == AuditStatus.SKIPPED
    assert run.fix and run.trigger == AuditTrigger.COMMAND
    assert "other-host:4242" in run.error
    assert err.strip().startswith("skipped: another fixing run holds the lock")
    assert str(run.id) in err
    # The other run's lock is left alone.
    assert lock_held_by_another_run.get(settings.PROFILE_AUDIT_LOCK_KEY) == b"other-host:4242:token"


@pytest.mark.django_db
def test_skipped_fix_still_prints_its_json(lock_held_by_another_run):
    orphaned_profile()
    code, out, _ = fix_command("--format", "json")
    assert code == 75
    report = json.loads(out)
    assert report["status"] == "skipped"
    assert report["fix"] is True
    assert report["totals"] == {"found": 0, "fixed": 0, "sync_sent": 0}
    assert "holds the lock" in report["error"]


@pytest.mark.django_db
def test_dry_run_takes_no_lock(lock_held_by_another_run, settings):
    orphaned_profile()
    out = StringIO()
    call_command("profiles_audit_sync", "--format", "json", stdout=out)
    assert json.loads(out.getvalue())["totals"]["found"] == 1
    settings.PROFILE_AUDIT_LOCK_REDIS_URL = UNREACHABLE
    call_command("profiles_audit_sync", stdout=StringIO())


@pytest.mark.django_db
def test_unreachable_redis_fails_the_command_and_fixes_nothing(settings):
    settings.PROFILE_AUDIT_LOCK_REDIS_URL = UNREACHABLE
    profile = orphaned_profile()
    with pytest.raises(
        CommandError, match=re.escape(f"cannot reach Redis at {UNREACHABLE}")
    ) as caught:
        call_command("profiles_audit_sync", "--fix", stdout=StringIO())
    assert caught.value.returncode != 0
    assert "nothing was fixed" in str(caught.value)
    assert "redis-server" in str(caught.value)
    assert alive(profile)
    run = AuditRun.objects.get()
    assert run.status == AuditStatus.FAILED
    assert "cannot reach Redis" in run.error
    assert not AuditFinding.objects.exists()


@pytest.mark.django_db
def test_a_dead_holder_blocks_fixing_until_its_lock_expires():
    profile = orphaned_profile()
    client = redis_client()
    client.set(settings.PROFILE_AUDIT_LOCK_KEY, "dead-host:4242:token", px=1000)
    assert fix_command()[0] == 75
    assert alive(profile)
    wait_for(
        lambda: not client.exists(settings.PROFILE_AUDIT_LOCK_KEY),
        timeout=5,
        what="the dead holder's lock to expire",
    )
    assert fix_command()[0] == 0
    assert not alive(profile)
    assert list(AuditRun.objects.order_by("started_at").values_list("status", flat=True)) == [
        AuditStatus.SKIPPED,
        AuditStatus.SUCCEEDED,
    ]


@pytest.mark.django_db
def test_a_lost_lease_stops_the_run_before_the_next_chunk(settings):
    settings.PROFILE_AUDIT_CHUNK_SIZE = 1  # a chunk per organization, to stop between them
    profiles = [orphaned_profile(uuid.UUID(int=n)) for n in (1, 2, 3)]  # fixed in id order
    client = redis_client()
    checks = []

    def another_run_takes_over() -> None:
        # Checked after each chunk is read: once the first is fixed, the lease is lost.
        checks.append(1)
        if len(checks) == 2:
            client.set(settings.PROFILE_AUDIT_LOCK_KEY, "other-host:1:token", ex=600)
        return None

    report = run_audit(
        AuditRequest(fix=True, trigger=AuditTrigger.COMMAND),
        budget=Budget(check=another_run_takes_over),
    )
    assert [alive(p) for p in profiles] == [False, True, True]
    assert report.run.status == AuditStatus.PARTIAL
    assert "stopped: lost the fixing-run lock" in report.run.error
    assert report.run.fixed == 1
    assert client.get(settings.PROFILE_AUDIT_LOCK_KEY) == b"other-host:1:token"


@pytest.mark.django_db
def test_the_service_raises_lock_unavailable_and_records_the_failure(settings):
    settings.PROFILE_AUDIT_LOCK_REDIS_URL = UNREACHABLE
    with pytest.raises(RunLockUnavailable):
        start_run(AuditRequest(fix=True, trigger=AuditTrigger.SCHEDULE))
    run = AuditRun.objects.get()
    assert (run.status, run.trigger, run.fix) == (AuditStatus.FAILED, "schedule", True)


@pytest.mark.django_db
def test_file_lock_plays_the_same_part_without_redis(settings, tmp_path):
    from profiles.services.run_lock import FileRunLock

    settings.PROFILE_AUDIT_LOCK_REDIS_URL = ""
    settings.PROFILE_AUDIT_LOCK_FILE = tmp_path / "fix.lock"
    profile = orphaned_profile()
    other = FileRunLock(path=tmp_path / "fix.lock")
    assert other.acquire()
    assert fix_command()[0] == 75
    assert alive(profile)
    other.release()
    assert fix_command()[0] == 0
    assert not alive(profile)


@pytest.mark.django_db(transaction=True)
def test_an_error_in_one_organization_rolls_it_back_and_the_others_are_fixed():
    first, failing, last = (uuid.UUID(int=n) for n in (1, 2, 3))
    fixed_before = orphaned_profile(first)
    # Two findings in the failing organization: a write that happens, then a failure.
    doomed = orphaned_profile(failing)
    asset = AssetFactory(connection__organization=doomed.organization)
    fixed_after = orphaned_profile(last)
    with break_commits_of(failing):
        code, out, _ = fix_command("--format", "json")
    assert code == 0
    assert not alive(fixed_before) and not alive(fixed_after)
    assert alive(doomed)  # its soft delete was rolled back with the organization
    assert not SocialProfile.objects.filter(external_id=asset.external_id).exists()
    report = json.loads(out)
    assert report["status"] == "partial"
    assert report["totals"] == {"found": 4, "fixed": 2, "sync_sent": 0}
    run = AuditRun.objects.get(id=report["run_id"])
    assert list(run.failed_organizations) == [str(failing)]
    assert "IntegrityError" in run.failed_organizations[str(failing)]
    outcomes = set(
        AuditFinding.objects.filter(run=run, organization_id=failing).values_list(
            "outcome", flat=True
        )
    )
    assert outcomes == {"failed"}
