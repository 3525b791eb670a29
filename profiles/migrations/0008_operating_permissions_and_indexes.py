"""Permissions for the dashboard's Run now and lock release; indexes that keep the admin's
lists fast with millions of findings. On PostgreSQL the indexes are built CONCURRENTLY, so a
large findings table keeps taking writes while they are built."""

from django.db import migrations, models


class AddIndexConcurrentlyOnPostgres(migrations.AddIndex):
    """AddIndex, built without locking out writes on PostgreSQL (plain elsewhere)."""

    def database_forwards(self, app_label, schema_editor, from_state, to_state):
        model = to_state.apps.get_model(app_label, self.model_name)
        if not self.allow_migrate_model(schema_editor.connection.alias, model):
            return
        if schema_editor.connection.vendor == "postgresql":
            schema_editor.add_index(model, self.index, concurrently=True)
        else:
            schema_editor.add_index(model, self.index)

    def database_backwards(self, app_label, schema_editor, from_state, to_state):
        model = from_state.apps.get_model(app_label, self.model_name)
        if not self.allow_migrate_model(schema_editor.connection.alias, model):
            return
        if schema_editor.connection.vendor == "postgresql":
            schema_editor.remove_index(model, self.index, concurrently=True)
        else:
            schema_editor.remove_index(model, self.index)


class Migration(migrations.Migration):
    # CREATE INDEX CONCURRENTLY cannot run inside a transaction.
    atomic = False

    dependencies = [
        ("profiles", "0007_run_deletion_budget"),
    ]

    operations = [
        migrations.AlterModelOptions(
            name="auditrun",
            options={
                "ordering": ["-started_at"],
                "permissions": [
                    ("revert_auditrun", "Can revert an audit run"),
                    ("run_auditrun", "Can start an audit run from the admin"),
                    ("release_lock_auditrun", "Can release the fixing-run lock"),
                ],
            },
        ),
        AddIndexConcurrentlyOnPostgres(
            model_name="auditrun",
            index=models.Index(fields=["trigger", "started_at"], name="run_trigger_started_idx"),
        ),
        AddIndexConcurrentlyOnPostgres(
            model_name="auditfinding",
            index=models.Index(fields=["object_id"], name="finding_object_id_idx"),
        ),
        AddIndexConcurrentlyOnPostgres(
            model_name="auditfinding",
            index=models.Index(fields=["external_id"], name="finding_external_id_idx"),
        ),
    ]
