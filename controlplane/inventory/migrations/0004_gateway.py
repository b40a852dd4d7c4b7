"""Nodes run the OpenAI gateway (by default), and their agents report where it answers."""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("inventory", "0003_agentreport"),
    ]

    operations = [
        migrations.AddField(
            model_name="agentreport",
            name="gateway_url",
            field=models.CharField(
                blank=True,
                db_default="",
                default="",
                help_text="Where clients reach the node's gateway, as its agent last reported it answering; empty while it runs none.",
                max_length=2048,
            ),
        ),
        migrations.AddField(
            model_name="node",
            name="gateway",
            field=models.BooleanField(
                default=True,
                help_text="Runs the OpenAI gateway in front of the deployments placed on it, their clients' one address on this node.",
            ),
        ),
    ]
