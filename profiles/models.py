"""Social profiles (the publishing targets) and the records of every audit run."""

import uuid

from django.db import models
from django.db.models import Case, F, OuterRef, Q, Subquery, When
from django.db.models.functions import Greatest
from django.utils import timezone

from audit_project.soft_delete import SoftDeleteModel


class SocialProfile(SoftDeleteModel):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    organization = models.ForeignKey(
        "orgs.Organization", on_delete=models.CASCADE, related_name="profiles"
    )
    connection = models.ForeignKey(
        "connections.PlatformConnection",
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="profiles",
    )
    platform = models.CharField(max_length=50)
    external_id = models.CharField(max_length=255)
    name = models.CharField(max_length=255, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["created_at", "id"]
        constraints = [
            models.UniqueConstraint(
                fields=["organization", "platform", "external_id"],
                condition=Q(deleted_at__isnull=True),
                name="one_alive_profile_per_key",
                violation_error_message="An alive profile for this platform account already exists.",
            )
        ]
        indexes = [
            models.Index(fields=["organization", "platform", "external_id"], name="profile_key_idx")
        ]

    def __str__(self) -> str:
        return f"{self.platform}:{self.external_id} ({self.name})"


class FindingType(models.TextChoices):
    ORPHANED = "orphaned", "Orphaned profile"
    DESELECTED = "deselected", "Deselected profile"
    RELINK = "relink", "Profile to relink"
    MISSING = "missing", "Missing profile"
    RESTORE = "restore", "Profile to restore"
    STALE_QUEUE_SETTING = "stale_queue_setting", "Stale queue setting"
    INVALID_BOOST_REF = "invalid_boost_ref", "Invalid boost rule reference"


class FindingAction(models.TextChoices):
    SOFT_DELETE = "soft_delete", "Soft delete"
    RELINK = "relink", "Point at backing connection"
    DISPATCH_SYNC = "dispatch_sync", "Dispatch profile sync"
    RESTORE = "restore", "Restore"
    REMOVE_REFS = "remove_refs", "Remove invalid references"
    REVERT = "revert", "Put back (revert)"


class FindingOutcome(models.TextChoices):
    PLANNED = "planned", "Planned (dry run)"
    FIXED = "fixed", "Fixed"
    STALE = "stale", "Not fixed: no longer held when re-checked"
    GUARDED = "guarded", "Not fixed: mass-deletion guard"
    FAILED = "failed", "Not fixed: the organization's fix failed"
    CONFLICT = "conflict", "Not put back: changed since the run"
    # A missing profile's sync job was sent; the finding counts as fixed once the profile exists
    # (the job confirms it, or a later fixing audit sees it), never before.
    SENT = "sent", "Sync sent: fixed once the profile exists"
    # Fighting another writer (DESIGN "Drift history and fights"): fixed too often lately, so
    # left alone until an operator resumes it or it stays resolved for one window.
    HELD = "held", "Not fixed: held, fighting another writer"


class AuditTrigger(models.TextChoices):
    COMMAND = "command", "Command"
    SCHEDULE = "schedule", "Schedule"
    ADMIN = "admin", "Admin"
    REVERT = "revert", "Revert"
    CHANGES = "changes", "Changes (change-driven run)"


class AuditStatus(models.TextChoices):
    RUNNING = "running", "Running"
    SUCCEEDED = "succeeded", "Succeeded"
    PARTIAL = "partial", "Partial"
    FAILED = "failed", "Failed"
    SKIPPED = "skipped", "Skipped (another run held the lock)"
    INTERRUPTED = "interrupted", "Interrupted (its process died)"


class AuditRun(models.Model):
    """One run of the audit, dry or fixing, over one organization or all of them."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    trigger = models.CharField(max_length=20, choices=AuditTrigger.choices)
    # Null means the run covered every organization. A run of one organization goes with it
    # (SET_NULL would turn it into what looks like an all-organization run).
    organization = models.ForeignKey(
        "orgs.Organization",
        on_delete=models.CASCADE,
        null=True,
        blank=True,
        related_name="audit_runs",
    )
    types = models.JSONField(default=list, help_text="Finding types the run looked for.")
    fix = models.BooleanField(default=False)
    forced = models.BooleanField(default=False, help_text="The mass-deletion guard was overridden.")
    status = models.CharField(
        max_length=20, choices=AuditStatus.choices, default=AuditStatus.RUNNING, db_index=True
    )
    started_at = models.DateTimeField(default=timezone.now, db_index=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    duration_seconds = models.FloatField(null=True, blank=True)
    organizations_audited = models.PositiveIntegerField(default=0)
    found = models.PositiveIntegerField(default=0)
    fixed = models.PositiveIntegerField(default=0)
    by_type = models.JSONField(default=dict, help_text='{type: {"found": n, "fixed": n}}')
    failed_organizations = models.JSONField(
        default=dict, blank=True, help_text="{organization id: error} for contained failures."
    )
    guarded_organizations = models.JSONField(
        default=list, blank=True, help_text="Organization ids the guard or the run budget held."
    )
    error = models.TextField(blank=True)
    # Progress, written as each chunk of organizations commits (the record never lags).
    organizations_total = models.PositiveIntegerField(
        null=True, blank=True, help_text="Organizations in scope when the run started."
    )
    findings_recorded = models.PositiveIntegerField(
        default=0, help_text="Findings written so far: the last finding's seq."
    )
    deletions_reserved = models.PositiveIntegerField(
        default=0, help_text="Soft deletions reserved from PROFILE_AUDIT_RUN_MAX_DELETIONS."
    )
    last_progress_at = models.DateTimeField(null=True, blank=True)
    deadline = models.DateTimeField(
        null=True, blank=True, help_text="Shards not finished by then are skipped."
    )
    # Who asked: a user (admin), an OS user (command) or nobody (schedule); where; which task.
    requested_by = models.CharField(max_length=150, blank=True)
    requested_host = models.CharField(max_length=255, blank=True)
    task_id = models.CharField(max_length=255, blank=True)
    lock_token = models.CharField(
        max_length=255, blank=True, help_text="The fixing-run lock's token while the run holds it."
    )
    lock_epoch = models.BigIntegerField(
        null=True,
        blank=True,
        help_text="The fencing epoch of the lease this fixing run took: its transactions commit "
        "only while the lease still has it.",
    )
    missed_by_changes = models.PositiveIntegerField(
        default=0,
        help_text="A sweep's findings in organizations that carried no change mark: drift the "
        "change-driven runs could not have seen. Should be 0.",
    )
    oldest_mark_at = models.DateTimeField(
        null=True, blank=True, help_text="A change-driven run: when its oldest mark was written."
    )
    process = models.CharField(
        max_length=255,
        blank=True,
        help_text="host:pid:start of the process working an in-process run (the command without "
        "--fan-out): the run is alive exactly as long as that process.",
    )
    # A revert run points at the run it put back; a run's reverts are ``run.reverts``.
    reverted_run = models.ForeignKey(
        "self",
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="reverts",
        help_text="For a revert: the run whose changes it put back.",
    )

    class Meta:
        ordering = ["-started_at"]
        permissions = [
            ("revert_auditrun", "Can revert an audit run"),
            ("run_auditrun", "Can start an audit run from the admin"),
            ("release_lock_auditrun", "Can release the fixing-run lock"),
        ]
        indexes = [
            # Retention keeps the latest run of each organization; the admin filters by it.
            models.Index(fields=["organization", "started_at"], name="run_org_started_idx"),
            # The last run of each trigger (metrics, health, dashboard) and the trigger filter.
            models.Index(fields=["trigger", "started_at"], name="run_trigger_started_idx"),
        ]

    def __str__(self) -> str:
        mode = "fix" if self.fix else "dry run"
        return f"Audit {self.id} ({mode}, {self.status})"


class ShardStatus(models.TextChoices):
    PENDING = "pending", "Pending"
    RUNNING = "running", "Running"
    DONE = "done", "Done"
    SKIPPED = "skipped", "Skipped (deadline, or the run was closed)"
    FAILED = "failed", "Failed"


OPEN_SHARD_STATUSES = (ShardStatus.PENDING, ShardStatus.RUNNING)


class AuditShard(models.Model):
    """One slice of a run: consecutive organizations by id, worked in chunks of 100 and resumed
    from ``cursor`` (the last organization committed) after a budget stop or a lost worker."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    run = models.ForeignKey(AuditRun, on_delete=models.CASCADE, related_name="shards")
    index = models.PositiveIntegerField()
    # [first, end): null first = from the smallest id, null end = to the largest.
    first_organization_id = models.UUIDField(null=True, blank=True)
    end_organization_id = models.UUIDField(null=True, blank=True)
    status = models.CharField(
        max_length=20, choices=ShardStatus.choices, default=ShardStatus.PENDING, db_index=True
    )
    cursor = models.UUIDField(null=True, blank=True, help_text="Last organization committed.")
    organizations_audited = models.PositiveIntegerField(default=0)
    found = models.PositiveIntegerField(default=0)
    fixed = models.PositiveIntegerField(default=0)
    failed_organizations = models.JSONField(default=dict, blank=True)
    error = models.TextField(blank=True)
    attempts = models.PositiveIntegerField(default=0)
    worker = models.CharField(max_length=255, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(
        null=True, blank=True, help_text="When a delivery last claimed it or committed a chunk."
    )
    # A change-driven run's shard: exactly these organizations (null: the id range above), and
    # the versions of their change marks it took; a fixing chunk clears those and only those.
    organization_ids = models.JSONField(null=True, blank=True)
    taken_marks = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["run", "index"]
        constraints = [
            models.UniqueConstraint(fields=["run", "index"], name="one_shard_per_run_index")
        ]

    def __str__(self) -> str:
        return f"Shard {self.index} of run {self.run_id} ({self.status})"


class AuditFinding(models.Model):
    """One inconsistency a run found, what it did about it, and what it changed."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    # Every index and constraint here is paid for by every finding a run writes (tens of
    # thousands per run): the run has no index of its own (the ones below lead with it), and
    # neither reference is checked by the database at each commit (Django applies their
    # on_delete; findings are written only with their run, of organizations just read).
    run = models.ForeignKey(
        AuditRun,
        on_delete=models.CASCADE,
        related_name="findings",
        db_index=False,
        db_constraint=False,
    )
    # Position in the run: fixes are applied, and undone, in this order.
    seq = models.PositiveIntegerField()
    organization = models.ForeignKey(
        "orgs.Organization",
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="audit_findings",
        db_constraint=False,
    )
    type = models.CharField(max_length=30, choices=FindingType.choices)
    action = models.CharField(max_length=30, choices=FindingAction.choices)
    model = models.CharField(max_length=100, help_text="app_label.ModelName of the object.")
    object_id = models.UUIDField(null=True, blank=True, help_text="Empty for a missing profile.")
    platform = models.CharField(max_length=50, blank=True)
    external_id = models.CharField(max_length=255, blank=True)
    before = models.JSONField(null=True, blank=True)
    after = models.JSONField(null=True, blank=True)
    outcome = models.CharField(max_length=20, choices=FindingOutcome.choices)
    detail = models.TextField(blank=True)
    # Its fingerprint's history (DESIGN "Drift history and fights"): not checked by the database
    # and not indexed (a record's findings are found by object id or external id, indexed
    # above); a record pruned after a long quiet period leaves the link dangling, shown as gone.
    drift = models.ForeignKey(
        "profiles.DriftRecord",
        on_delete=models.DO_NOTHING,
        null=True,
        blank=True,
        related_name="findings",
        db_index=False,
        db_constraint=False,
    )
    # A database default too: other programs (and the set-based bench floor) insert findings.
    recurring = models.BooleanField(
        default=False, db_default=False, help_text="Found again after it was fixed or resolved."
    )
    # Who changed the organization before it was found: [{"writer", "application_name", "at"}].
    writers = models.JSONField(null=True, blank=True)

    class Meta:
        ordering = ["run", "seq"]
        constraints = [
            models.UniqueConstraint(fields=["run", "seq"], name="one_finding_per_run_position")
        ]
        indexes = [
            models.Index(fields=["run", "type"], name="finding_run_type_idx"),
            # A run's counts are recounted from its findings when it closes (or is closed).
            models.Index(fields=["run", "outcome"], name="finding_run_outcome_idx"),
            # The findings list's search, by object id or external id, among millions; and
            # what the audit recorded of an object (an id names one object, whatever its model).
            models.Index(fields=["object_id"], name="finding_object_id_idx"),
            models.Index(fields=["external_id"], name="finding_external_id_idx"),
            # The few findings whose sync job has not confirmed yet, by organization: looked up by
            # every sync and every fixing chunk, and by the daily re-send.
            models.Index(
                fields=["organization"],
                condition=Q(outcome="sent"),
                name="finding_sync_sent_idx",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.get_type_display()} {self.object_id or self.external_id} ({self.outcome})"

    @property
    def fixed(self) -> bool:
        return self.outcome == FindingOutcome.FIXED


class StaleQueueSettingDeletion(models.Model):
    """A queue setting an audit soft-deleted because its profile was dead, kept apart from the
    ``stale_queue_setting`` finding that recorded it when retention prunes that finding's run.

    Restoring the profile (the audit's ``restore``, the sync unit, a revert) brings such a
    setting back however long ago it was deleted (DESIGN "Nothing is lost"); it recognises one
    by this record or by the finding, and only while the setting's ``deleted_at`` is still the
    one the audit left (anything else means someone touched it since).
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    # Looked up by setting: the unique constraint's index leads with it.
    queue_setting = models.ForeignKey(
        "queues.QueueSetting", on_delete=models.CASCADE, related_name="+", db_index=False
    )
    deleted_at = models.DateTimeField(help_text="The setting's deleted_at as the audit left it.")
    run_id = models.UUIDField(help_text="The run that deleted it (its record has been pruned).")
    recorded_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["queue_setting", "deleted_at"], name="one_record_per_setting_deletion"
            )
        ]

    def __str__(self) -> str:
        return f"Queue setting {self.queue_setting_id} deleted at {self.deleted_at} by run {self.run_id}"


class FixingRunLease(models.Model):
    """The fixing-run lease where the data lives (DESIGN "Fencing"): whoever takes the fixing-run
    lock raises ``epoch``, and every fixing transaction proves it still holds that epoch before
    it commits, so a holder that lost the lock (paused past its expiry, cut off from Redis)
    commits nothing after another run took it. One row per lock key."""

    name = models.CharField(max_length=255, primary_key=True)
    epoch = models.BigIntegerField(default=0)
    token = models.CharField(max_length=255, blank=True, help_text="The holder's lock token.")
    lock_kind = models.CharField(max_length=20, blank=True, help_text="redis or file.")
    where = models.CharField(max_length=255, blank=True, help_text="The lock's description.")
    taken_at = models.DateTimeField(null=True, blank=True)
    renewed_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"Fixing-run lease {self.name} (epoch {self.epoch})"


class ChangeMark(models.Model):
    """An organization written to since it was last audited: the work list of change-driven runs.

    Written only by database triggers (migration ``0012_change_marks``), in the writing
    transaction, on every insert, update and delete of the audited tables (connections, assets,
    profiles, queue settings, boost rules), never by Python. A run takes marks with their
    ``version`` and clears only those: ``DELETE ... WHERE organization_id = %s AND version = %s``
    leaves a mark written after the take, since every write raises its version.
    """

    # Not checked by the database: the triggers write a mark in the same transaction that may
    # go on to delete the organization (Django deletes its rows first, marking it, then the
    # organization), and a checked reference would fail that commit. A mark can so outlive its
    # organization; the run that takes it finds nothing to audit and clears it.
    organization = models.OneToOneField(
        "orgs.Organization",
        primary_key=True,
        on_delete=models.DO_NOTHING,
        db_constraint=False,
        related_name="change_mark",
    )
    first_marked_at = models.DateTimeField(help_text="The first write since the last audit.")
    last_marked_at = models.DateTimeField(help_text="The latest write.")
    writes = models.BigIntegerField(
        default=0, help_text="Rows written since the first mark (a row moved counts in both)."
    )
    # [{"application_name": ..., "writer": ... or null, "at": ISO time}, ...], oldest first:
    # the last CHANGE_MARK_WRITERS distinct (application_name, writer) pairs.
    writers = models.JSONField(default=list, blank=True)
    # Raised on every write from one counter that never goes back (a PostgreSQL sequence; a
    # one-row counter on SQLite), so a mark cleared and written again never repeats a version a
    # run may still hold. No index: the triggers update it on every write.
    version = models.BigIntegerField()

    class Meta:
        ordering = ["first_marked_at"]

    def __str__(self) -> str:
        return f"Change mark of {self.organization_id} (version {self.version})"


class UnsettledOrganization(models.Model):
    """An organization whose last fixing audit left something not done (a failed, guarded or
    stale finding, or a sync job not yet confirmed): change-driven runs audit it again, marked
    or not, until an audit settles it. Written by the audit, in each chunk's transaction."""

    organization_id = models.UUIDField(primary_key=True)
    since = models.DateTimeField(default=timezone.now)
    reason = models.CharField(max_length=20, help_text="The first outcome left not done.")

    def __str__(self) -> str:
        return f"Unsettled organization {self.organization_id} ({self.reason})"


class ChangeLoop(models.Model):
    """The change-driven loop's heartbeat, for /metrics and /health/: kept even when a check
    found nothing marked and so recorded no run."""

    name = models.CharField(max_length=50, primary_key=True, default="changes")
    last_checked_at = models.DateTimeField(null=True, blank=True)
    backlog = models.PositiveIntegerField(default=0, help_text="Organizations marked or unsettled.")
    oldest_mark_at = models.DateTimeField(null=True, blank=True)
    last_run = models.ForeignKey(
        AuditRun, null=True, blank=True, on_delete=models.SET_NULL, db_constraint=False
    )

    def __str__(self) -> str:
        return f"Change-driven loop (checked {self.last_checked_at})"


class DriftState(models.TextChoices):
    OPEN = "open", "Open"
    RESOLVED = "resolved", "Resolved"
    RECURRING = "recurring", "Recurring"
    FIGHTING = "fighting", "Fighting (fixing held)"


class OrganizationAudits(models.Model):
    """How many audits of all finding types found drift an organization already had recorded
    (``profiles.services.drift``): the records those audits found again with nothing new to
    say are not rewritten. While a record stays unresolved, each such audit since it was last
    written (``DriftRecord.audits_seen``) found it once more: its times found and last seen
    follow from these two columns (``DriftRecord.objects.with_sightings()``)."""

    organization_id = models.UUIDField(primary_key=True)
    audits = models.BigIntegerField(default=0)
    last_audit_at = models.DateTimeField()

    def __str__(self) -> str:
        return f"Audits of {self.organization_id}: {self.audits}"


class DriftRecordQuerySet(models.QuerySet["DriftRecord"]):
    def with_sightings(self) -> "DriftRecordQuerySet":
        """Annotated with ``found`` (times found) and ``seen_at`` (last seen): the stored
        columns as the record was last written, plus the audits of its organization since
        that found it again unchanged (``OrganizationAudits``) while it is unresolved."""
        audits = OrganizationAudits.objects.filter(organization_id=OuterRef("organization_id"))
        count = Subquery(audits.values("audits")[:1])
        later = ~Q(state=DriftState.RESOLVED) & Q(audits_seen__lt=count)
        return self.annotate(
            found=Case(
                When(later, then=F("times_found") + count - F("audits_seen")),
                default=F("times_found"),
                output_field=models.BigIntegerField(),
            ),
            seen_at=Case(
                When(
                    later,
                    then=Greatest(F("last_seen_at"), Subquery(audits.values("last_audit_at")[:1])),
                ),
                default=F("last_seen_at"),
            ),
        )


class DriftRecord(models.Model):
    """One finding fingerprint's history across runs (DESIGN "Drift history and fights").

    The fingerprint is (organization, type, ``key``): the object's id, or ``platform:external_id``
    for a missing profile (it has no object yet). Every run updates the records of the
    organizations it audits, in each chunk's transaction (``profiles.services.drift``); they
    outlive findings' retention and are pruned once unseen for PROFILE_AUDIT_DRIFT_RETENTION_DAYS.
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    organization = models.ForeignKey(
        "orgs.Organization",
        on_delete=models.CASCADE,
        related_name="drift_records",
        db_index=False,  # the fingerprint's unique index leads with it
        db_constraint=False,
    )
    type = models.CharField(max_length=30, choices=FindingType.choices)
    model = models.CharField(max_length=100)
    key = models.CharField(
        max_length=400, help_text="The object's id, or platform:external_id for a missing profile."
    )
    object_id = models.UUIDField(null=True, blank=True)
    platform = models.CharField(max_length=50, blank=True)
    external_id = models.CharField(max_length=255, blank=True)
    state = models.CharField(max_length=20, choices=DriftState.choices, default=DriftState.OPEN)
    first_seen_at = models.DateTimeField(default=timezone.now)
    # As last written: with_sightings() adds the audits that found it again since (``found``,
    # ``seen_at``), which is what to show and filter on.
    last_seen_at = models.DateTimeField(default=timezone.now)
    times_found = models.PositiveIntegerField(default=0)
    audits_seen = models.BigIntegerField(
        default=0, help_text="Its organization's OrganizationAudits.audits when last written."
    )
    times_fixed = models.PositiveIntegerField(default=0)
    last_fixed_at = models.DateTimeField(null=True, blank=True)
    resolved_at = models.DateTimeField(null=True, blank=True)
    # [{"at": ISO time, "run": run id}] of the last PROFILE_AUDIT_FIGHT_FIXES fixes: a fight is
    # judged on them; a revert of a run takes its fix out (the audit does not fight itself).
    recent_fixes = models.JSONField(default=list, blank=True)
    held_since = models.DateTimeField(
        null=True, blank=True, help_text="Fighting: fixing has been held since then."
    )
    # The writers of the organization's changes while this drift was open, newest last.
    last_writers = models.JSONField(default=list, blank=True)
    undone_by = models.CharField(
        max_length=255,
        blank=True,
        help_text="The last writer other than the audit before it came back.",
    )
    undone_at = models.DateTimeField(null=True, blank=True)
    resumed_by = models.CharField(max_length=150, blank=True)
    resumed_at = models.DateTimeField(null=True, blank=True)

    objects = DriftRecordQuerySet.as_manager()

    class Meta:
        ordering = ["-last_seen_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["organization", "type", "key"], name="one_drift_record_per_fingerprint"
            )
        ]
        indexes = [
            # No index on state or last_seen_at: every run rewrites both in the records it sees,
            # and such an index made those writes a third dearer and never HOT (the admin's,
            # /metrics' and the prune's scans of this small table are cheaper than that).
            # The fights (held): counted by the dashboard, /metrics and the admin.
            models.Index(
                fields=["held_since"], condition=Q(held_since__isnull=False), name="drift_held_idx"
            ),
        ]
        permissions = [("resume_fixing_driftrecord", "Can resume fixing a fighting drift record")]

    def __str__(self) -> str:
        return f"{self.get_type_display()} {self.key} ({self.state})"
