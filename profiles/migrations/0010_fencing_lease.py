from django.db import migrations, models


class Migration(migrations.Migration):
    """The fencing lease (DESIGN "Fencing"), the epoch and process of a run, and a shard's
    heartbeat (a delivery that died is told apart from one that paused)."""

    dependencies = [
        ("profiles", "0009_findings_write_fewer_indexes"),
    ]

    operations = [
        migrations.CreateModel(
            name="FixingRunLease",
            fields=[
                ("name", models.CharField(max_length=255, primary_key=True, serialize=False)),
                ("epoch", models.BigIntegerField(default=0)),
                ("token", models.CharField(blank=True, help_text="The holder's lock token.", max_length=255)),
                ("lock_kind", models.CharField(blank=True, help_text="redis or file.", max_length=20)),
                ("where", models.CharField(blank=True, help_text="The lock's description.", max_length=255)),
                ("taken_at", models.DateTimeField(blank=True, null=True)),
                ("renewed_at", models.DateTimeField(blank=True, null=True)),
            ],
        ),
        migrations.AddField(
            model_name="auditrun",
            name="lock_epoch",
            field=models.BigIntegerField(
                blank=True,
                null=True,
                help_text="The fencing epoch of the lease this fixing run took: its transactions commit only while the lease still has it.",
            ),
        ),
        migrations.AddField(
            model_name="auditrun",
            name="process",
            field=models.CharField(
                blank=True,
                max_length=255,
                help_text="host:pid:start of the process working an in-process run (the command without --fan-out): the run is alive exactly as long as that process.",
            ),
        ),
        migrations.AddField(
            model_name="auditshard",
            name="heartbeat_at",
            field=models.DateTimeField(
                blank=True, null=True, help_text="When a delivery last claimed it or committed a chunk."
            ),
        ),
    ]
