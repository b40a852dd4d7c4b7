"""SLOs say where their requests are counted: at the worker (as before) or the gateway."""

from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('slo', '0002_revisions'),
    ]

    operations = [
        migrations.AddField(
            model_name='slo',
            name='measured_at',
            field=models.CharField(choices=[('worker', 'at the worker'), ('gateway', 'at the gateway')], default='worker', help_text='Where requests are counted: at the worker that served them, or at the gateway clients reached (its queueing included); storage reads, at the node.', max_length=16),
        ),
    ]
