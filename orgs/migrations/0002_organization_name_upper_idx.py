"""An index on UPPER(name): the admin's "organization name contains" filter, and the statistics
PostgreSQL needs to estimate it. Built CONCURRENTLY on PostgreSQL."""

from django.db import migrations, models
from django.db.models.functions import Upper


class AddIndexConcurrentlyOnPostgres(migrations.AddIndex):
    def database_forwards(self, app_label, schema_editor, from_state, to_state):
        model = to_state.apps.get_model(app_label, self.model_name)
        if not self.allow_migrate_model(schema_editor.connection.alias, model):
            return
        concurrently = schema_editor.connection.vendor == "postgresql"
        schema_editor.add_index(model, self.index, **({"concurrently": True} if concurrently else {}))
        if concurrently:
            # Statistics on the new expression now, not at the next autovacuum.
            schema_editor.execute(f"ANALYZE {model._meta.db_table}")

    def database_backwards(self, app_label, schema_editor, from_state, to_state):
        model = from_state.apps.get_model(app_label, self.model_name)
        if not self.allow_migrate_model(schema_editor.connection.alias, model):
            return
        concurrently = schema_editor.connection.vendor == "postgresql"
        schema_editor.remove_index(
            model, self.index, **({"concurrently": True} if concurrently else {})
        )


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("orgs", "0001_initial"),
    ]

    operations = [
        AddIndexConcurrentlyOnPostgres(
            model_name="organization",
            index=models.Index(Upper("name"), name="organization_name_upper_idx"),
        ),
    ]
