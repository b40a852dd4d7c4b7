"""Shapes of the telemetry snapshot API; points match streams.py's deltas field for field."""

from __future__ import annotations

from rest_framework import serializers

from controlplane.inventory.choices import NodeStatus
from controlplane.telemetry import selectors


class WindowQuerySerializer(serializers.Serializer):
    window = serializers.IntegerField(
        required=False,
        default=selectors.WINDOW_DEFAULT_S,
        min_value=selectors.WINDOW_MIN_S,
        max_value=selectors.WINDOW_MAX_S,
        help_text="How far back, in seconds; the resolution of the points follows from it "
        "(10 s buckets up to about 4 h, 1 min up to about a day, then 1 h).",
    )


def _gauges() -> serializers.DictField:
    return serializers.DictField(
        child=serializers.FloatField(), help_text="Gauge key (see the telemetry contract) to value."
    )


class NodeFactsSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    hostname = serializers.CharField()
    status = serializers.ChoiceField(choices=NodeStatus.choices)
    tenant = serializers.UUIDField(allow_null=True, help_text="Set when dedicated to a tenant.")
    maintenance = serializers.BooleanField()
    gpu_count = serializers.IntegerField()
    last_batch_t = serializers.FloatField(
        allow_null=True, help_text="End of the newest telemetry batch stored (Unix seconds)."
    )
    gauges = _gauges()


class FleetSerializer(serializers.Serializer):
    t = serializers.FloatField(help_text="When the snapshot was taken (Unix seconds).")
    nodes = NodeFactsSerializer(many=True)


class GpuFactsSerializer(serializers.Serializer):
    index = serializers.IntegerField()
    name = serializers.CharField()
    memory_total_bytes = serializers.IntegerField()


class NodeDetailFactsSerializer(NodeFactsSerializer):
    gpus = GpuFactsSerializer(many=True)


class GaugePointSerializer(serializers.Serializer):
    t = serializers.FloatField(help_text="Bucket start (Unix seconds).")
    gauges = _gauges()


class IngestSerializer(serializers.Serializer):
    batches = serializers.IntegerField(help_text="Batches stored since enrollment.")
    rejected_batches = serializers.IntegerField(
        help_text="Batches refused for good: malformed, or naming what the node does not serve."
    )
    last_rejection = serializers.CharField(
        help_text="Why the latest refused batch was; empty if none."
    )
    last_rejected_t = serializers.FloatField(allow_null=True, help_text="When (Unix seconds).")


class NodeSnapshotSerializer(serializers.Serializer):
    node = NodeDetailFactsSerializer()
    ingest = IngestSerializer(
        allow_null=True, help_text="The node's telemetry as ingested; platform admins only."
    )
    window_s = serializers.IntegerField()
    resolution = serializers.IntegerField(help_text="Seconds per point.")
    points = GaugePointSerializer(many=True, help_text="Bucket means of each gauge.")


class PercentilesSerializer(serializers.Serializer):
    p50 = serializers.FloatField(allow_null=True, help_text="Seconds; null without samples.")
    p90 = serializers.FloatField(allow_null=True)
    p99 = serializers.FloatField(allow_null=True)
    count = serializers.IntegerField()


class LatencySerializer(serializers.Serializer):
    ttft = PercentilesSerializer()
    tpot = PercentilesSerializer()
    itl = PercentilesSerializer()
    queue = PercentilesSerializer()
    e2e = PercentilesSerializer()


class UsageSerializer(serializers.Serializer):
    completed = serializers.IntegerField()
    failed = serializers.IntegerField()
    rejected = serializers.IntegerField()
    cancelled = serializers.IntegerField()
    input_tokens = serializers.IntegerField()
    output_tokens = serializers.IntegerField()


class DeploymentPointSerializer(serializers.Serializer):
    t = serializers.FloatField(allow_null=True, help_text="Bucket start (Unix seconds).")
    window_s = serializers.IntegerField(help_text="Seconds the point covers.")
    latency = LatencySerializer(help_text="Percentiles from the merged DDSketches (1% error).")
    usage = UsageSerializer()
    tokens_per_s = serializers.FloatField(help_text="Output tokens per second.")
    queue_depth = serializers.FloatField(
        allow_null=True, help_text="Requests waiting, summed over the replicas' nodes."
    )


class DeploymentFactsSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    name = serializers.CharField()
    tenant = serializers.UUIDField()
    model_name = serializers.CharField()
    replicas = serializers.IntegerField()


class RoutedReplicaSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    index = serializers.IntegerField()
    hostname = serializers.CharField()
    routed_per_s = serializers.FloatField(
        allow_null=True,
        help_text="Requests its node's gateway sent it per second, over the window.",
    )
    predicted_ttft_s = serializers.FloatField(
        allow_null=True,
        help_text="The TTFT the gateway last predicted for a request sent to it now.",
    )
    up = serializers.BooleanField(
        allow_null=True, help_text="Whether it streamed its state to the gateway, last reported."
    )


class RoutingPointSerializer(serializers.Serializer):
    t = serializers.FloatField(allow_null=True, help_text="Bucket start (Unix seconds).")
    routed = serializers.DictField(
        child=serializers.FloatField(), help_text="Requests routed per second, by replica id."
    )


class RoutingSerializer(serializers.Serializer):
    replicas = RoutedReplicaSerializer(many=True)
    points = RoutingPointSerializer(many=True)


class DeploymentSnapshotSerializer(serializers.Serializer):
    deployment = DeploymentFactsSerializer()
    routing = RoutingSerializer(help_text="Where the gateways sent its requests, and why.")
    window_s = serializers.IntegerField()
    resolution = serializers.IntegerField(help_text="Seconds per point.")
    points = DeploymentPointSerializer(many=True)
    summary = DeploymentPointSerializer(help_text="The whole window as one point.")


class VolumeFactsSerializer(serializers.Serializer):
    key = serializers.CharField(help_text="The volume's name on the node, as in storage.<key>.*.")
    name = serializers.CharField()
    tenant = serializers.UUIDField(allow_null=True)


class StorageNodeSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    hostname = serializers.CharField()
    volumes = VolumeFactsSerializer(many=True)
    points = GaugePointSerializer(many=True, help_text="Bucket means of the storage.* gauges.")


class StorageSnapshotSerializer(serializers.Serializer):
    window_s = serializers.IntegerField()
    resolution = serializers.IntegerField(help_text="Seconds per point.")
    nodes = StorageNodeSerializer(many=True)


class TenantFactsSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    slug = serializers.CharField()
    name = serializers.CharField()


class TenantDeploymentSerializer(DeploymentFactsSerializer):
    summary = DeploymentPointSerializer(help_text="The whole window as one point.")


class TenantSnapshotSerializer(serializers.Serializer):
    tenant = TenantFactsSerializer()
    window_s = serializers.IntegerField()
    resolution = serializers.IntegerField(help_text="Seconds per point.")
    deployments = TenantDeploymentSerializer(many=True)
