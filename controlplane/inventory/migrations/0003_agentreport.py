"""Heartbeat times and applied generations move from the node's row to their own table,
so that agents' frequent reports never wait behind planners' row locks on nodes."""

import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("inventory", "0002_pci_root"),
    ]

    operations = [
        migrations.CreateModel(
            name="AgentReport",
            fields=[
                (
                    "node",
                    models.OneToOneField(
                        on_delete=django.db.models.deletion.CASCADE,
                        primary_key=True,
                        related_name="report",
                        serialize=False,
                        to="inventory.node",
                    ),
                ),
                (
                    "last_heartbeat_at",
                    models.DateTimeField(blank=True, db_index=True, null=True),
                ),
                (
                    "applied_generation",
                    models.PositiveBigIntegerField(
                        default=0,
                        help_text="The newest desired-state generation the agent reports applied.",
                    ),
                ),
            ],
        ),
        migrations.RunSQL(
            "INSERT INTO inventory_agentreport (node_id, last_heartbeat_at, applied_generation) "
            "SELECT id, last_heartbeat_at, applied_generation FROM inventory_node",
            reverse_sql=migrations.RunSQL.noop,
        ),
        migrations.RemoveIndex(
            model_name="node",
            name="inventory_n_status_c05cad_idx",
        ),
        migrations.RemoveField(model_name="node", name="last_heartbeat_at"),
        migrations.RemoveField(model_name="node", name="applied_generation"),
    ]
