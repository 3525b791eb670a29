from django.db import migrations


def room_for_every_record(apps, schema_editor):
    # Every run rewrites each record it sees (times found, last seen, writers). At 70 % a page
    # had room for the new versions of fewer than half of its rows, so most updates left the
    # page: not HOT, each one an insert into every index. Below 50 % a whole page's rows fit
    # again on it, and the old versions are pruned on the next visit. The table is small.
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute("ALTER TABLE profiles_driftrecord SET (fillfactor = 45)")


def as_before(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute("ALTER TABLE profiles_driftrecord SET (fillfactor = 70)")


class Migration(migrations.Migration):
    dependencies = [("profiles", "0014_drift_history")]

    operations = [migrations.RunPython(room_for_every_record, as_before, elidable=False)]
