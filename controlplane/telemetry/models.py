"""Telemetry as the control plane keeps it: per-node stream state and rollups.

Rollups are keyed by (resolution, bucket start, tenant, deployment, ...) and merged at
ingest: sketches by DDSketch merge, counts by addition, so any window is answered by
merging rows (one per ingest shard that wrote the bucket). A batch lands in the bucket
holding the midpoint of its interval. `deployment` is null for node-level series (storage
reads). Gauges are per node, one row per bucket holding every gauge key as
[sum, count, min, max, last].
"""

from __future__ import annotations

from django.db import models

from controlplane.telemetry.choices import LatencyMetric, Resolution


class NodeStream(models.Model):
    """Which batches of one node are stored: every seq up to `last_seq`, and `seen_above`.

    Batches usually arrive in order, so `seen_above` stays short; a retried batch may land
    after a later one, and is still recognised as new (or, resent, as a duplicate).
    """

    node = models.OneToOneField(
        "inventory.Node", on_delete=models.CASCADE, primary_key=True, related_name="telemetry"
    )
    last_seq = models.BigIntegerField(default=0)
    seen_above = models.JSONField(default=list, blank=True)
    last_interval_end = models.DateTimeField(null=True, blank=True)
    batches = models.BigIntegerField(default=0, help_text="Batches stored since enrollment.")
    gauges = models.JSONField(default=dict, blank=True, help_text="The latest gauge values.")
    rejected_batches = models.BigIntegerField(
        default=0,
        help_text="Batches refused for good: malformed, or naming what the node does not serve.",
    )
    last_rejection = models.TextField(blank=True, help_text="Why the latest refused batch was.")
    last_rejected_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"telemetry of {self.node_id} up to {self.last_seq}"


class _Rollup(models.Model):
    id = models.BigAutoField(primary_key=True)
    resolution = models.PositiveIntegerField(choices=Resolution.choices)
    bucket = models.DateTimeField(help_text="Start of the bucket (UTC, aligned to resolution).")

    class Meta:
        abstract = True

    def __str__(self) -> str:
        return f"{type(self).__name__} {self.resolution} s at {self.bucket:%Y-%m-%d %H:%M:%S}"


class _ShardedRollup(_Rollup):
    shard = models.PositiveSmallIntegerField(
        default=0,
        help_text="The ingest shard that wrote the row: concurrent flushes write apart, "
        "readers merge every shard's rows as they merge buckets.",
    )

    class Meta:
        abstract = True


class LatencyRollup(_ShardedRollup):
    """A merged DDSketch (protobuf bytes) of one tenant, deployment and metric."""

    tenant = models.ForeignKey("tenancy.Tenant", on_delete=models.CASCADE, related_name="+")
    deployment = models.ForeignKey(
        "fleet.Deployment", on_delete=models.CASCADE, null=True, related_name="+"
    )
    metric = models.CharField(max_length=16, choices=LatencyMetric.choices)
    count = models.BigIntegerField(default=0)
    sketch = models.BinaryField()

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["resolution", "bucket", "tenant", "deployment", "metric", "shard"],
                name="latency_rollup_key",
                nulls_distinct=False,
            )
        ]
        indexes = [models.Index(fields=["deployment", "metric", "resolution", "bucket"])]


class SloRollup(_ShardedRollup):
    """Exact good/total against one SLO threshold, as the workers counted it: a row per
    threshold, so counts made under an SLO's old definition never merge into its new one."""

    tenant = models.ForeignKey("tenancy.Tenant", on_delete=models.CASCADE, related_name="+")
    deployment = models.ForeignKey(
        "fleet.Deployment", on_delete=models.CASCADE, null=True, related_name="+"
    )
    slo_id = models.UUIDField(db_index=False)
    metric = models.CharField(max_length=16)
    threshold_seconds = models.FloatField(null=True)
    good = models.BigIntegerField(default=0)
    total = models.BigIntegerField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=[
                    "resolution",
                    "bucket",
                    "slo_id",
                    "deployment",
                    "threshold_seconds",
                    "shard",
                ],
                name="slo_rollup_key",
                nulls_distinct=False,
            )
        ]
        indexes = [models.Index(fields=["slo_id", "resolution", "bucket"])]


class CounterRollup(_ShardedRollup):
    """Request, error and token counts of one tenant and deployment."""

    tenant = models.ForeignKey("tenancy.Tenant", on_delete=models.CASCADE, related_name="+")
    deployment = models.ForeignKey(
        "fleet.Deployment", on_delete=models.CASCADE, null=True, related_name="+"
    )
    name = models.CharField(max_length=32)
    value = models.BigIntegerField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["resolution", "bucket", "tenant", "deployment", "name", "shard"],
                name="counter_rollup_key",
                nulls_distinct=False,
            )
        ]
        indexes = [models.Index(fields=["deployment", "resolution", "bucket"])]


class GaugeRollup(_Rollup):
    """All of one node's gauges over a bucket: {key: [sum, count, min, max, last]}."""

    node = models.ForeignKey("inventory.Node", on_delete=models.CASCADE, related_name="+")
    values = models.JSONField(default=dict)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["resolution", "bucket", "node"], name="gauge_rollup_key"
            )
        ]
