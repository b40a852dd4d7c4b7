"""Serializers for pools, volumes, storage QoS policies, exports and model artifacts."""

from __future__ import annotations

from typing import Any

from django.urls import reverse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from controlplane.core.api import StrictCharField, StrictSerializer, WritableTenantObjectField
from controlplane.inventory.models import Node
from controlplane.storage.models import Artifact, Export, Pool, QosPolicy, Volume
from controlplane.tenancy.api.fields import WritableTenantField


class CreateOnlyMixin:
    """Fields that name where an object lives are set once; a change is refused by name."""

    create_only: tuple[str, ...] = ("tenant",)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        instance = getattr(self, "instance", None)
        if instance is not None:
            changed = {
                f: ["Set when created; create a new object instead."]
                for f in self.create_only
                if f in attrs and attrs[f] != getattr(instance, f)
            }
            if changed:
                raise serializers.ValidationError(changed)
        return attrs


class PoolSerializer(StrictSerializer):
    node = serializers.PrimaryKeyRelatedField(queryset=Node.objects.all())
    allocated_bytes = serializers.IntegerField(
        read_only=True, help_text="Bytes placed here: tenants' volumes and replicas' model volumes."
    )
    volume_io = serializers.DictField(
        read_only=True, help_text="The latest per-volume I/O rates the agent reported, by volume."
    )

    class Meta:
        model = Pool
        fields = [
            "id",
            "node",
            "name",
            "kind",
            "directory",
            "device",
            "aio_path",
            "capacity_bytes",
            "allocated_bytes",
            "reported_capacity_bytes",
            "reported_free_bytes",
            "volume_io",
            "reported_at",
            "created_at",
            "updated_at",
        ]
        read_only_fields = [
            "id",
            "reported_capacity_bytes",
            "reported_free_bytes",
            "reported_at",
            "created_at",
            "updated_at",
        ]


class QosPolicySerializer(CreateOnlyMixin, StrictSerializer):
    tenant = WritableTenantField()

    class Meta:
        model = QosPolicy
        fields = [
            "id",
            "tenant",
            "name",
            "rw_ios_per_sec",
            "rw_mbytes_per_sec",
            "r_mbytes_per_sec",
            "w_mbytes_per_sec",
            "created_at",
            "updated_at",
        ]
        read_only_fields = ["id", "created_at", "updated_at"]


class VolumeSerializer(CreateOnlyMixin, StrictSerializer):
    create_only = ("tenant", "pool")
    tenant = WritableTenantField()
    pool = WritableTenantObjectField(
        queryset=Pool.objects.select_related("node"),
        tenant_field="node__tenant",
        required=False,
        help_text="Leave out to let placement choose the pool with the most room.",
    )
    qos_policy = WritableTenantObjectField(
        queryset=QosPolicy.objects.all(), allow_null=True, required=False
    )
    node = serializers.UUIDField(source="pool.node_id", read_only=True)
    device = serializers.CharField(
        source="wire_name", read_only=True, help_text="The volume's name on its node."
    )
    io = serializers.SerializerMethodField(help_text="The latest I/O rates its node reported.")

    class Meta:
        model = Volume
        fields = [
            "id",
            "tenant",
            "name",
            "size_bytes",
            "pool",
            "node",
            "device",
            "qos_policy",
            "read_probe_per_s",
            "io",
            "created_at",
            "updated_at",
        ]
        read_only_fields = ["id", "created_at", "updated_at"]

    @extend_schema_field(OpenApiTypes.OBJECT)
    def get_io(self, volume: Volume) -> dict[str, float] | None:
        return volume.pool.volume_io.get(volume.wire_name)


class ExportSerializer(CreateOnlyMixin, StrictSerializer):
    tenant = WritableTenantField()
    hosts = serializers.ListField(
        child=StrictCharField(max_length=223),
        min_length=1,
        max_length=64,
        help_text="Host NQNs (nqn.yyyy-mm.domain:...) allowed to connect.",
    )
    nqn = serializers.CharField(read_only=True, help_text="The tenant's subsystem NQN.")
    endpoints = serializers.ListField(
        child=serializers.DictField(),
        read_only=True,
        help_text="Where each node listens: node, hostname, nqn, transport, address, port.",
    )

    class Meta:
        model = Export
        fields = ["id", "tenant", "hosts", "nqn", "endpoints", "created_at", "updated_at"]
        read_only_fields = ["id", "created_at", "updated_at"]


class ArtifactSerializer(StrictSerializer):
    """Upload as multipart/form-data: `tenant`, `name`, `file` (a tar archive), maybe `sha256`."""

    tenant = WritableTenantField()
    file = serializers.FileField(
        write_only=True,
        help_text="A tar archive (plain or compressed) of model.onnx, config.json "
        "and tokenizer.json.",
    )
    sha256 = serializers.RegexField(
        r"^[0-9a-f]{64}$",
        required=False,
        help_text="On upload, optional: the sha256 you computed; the server computes its own while "
        "receiving, and a mismatch is refused (400).",
    )
    download_url = serializers.SerializerMethodField()

    class Meta:
        model = Artifact
        fields = [
            "id",
            "tenant",
            "name",
            "file",
            "sha256",
            "size_bytes",
            "unpacked_bytes",
            "files",
            "download_url",
            "created_at",
            "updated_at",
        ]
        read_only_fields = [
            "id",
            "size_bytes",
            "unpacked_bytes",
            "files",
            "created_at",
            "updated_at",
        ]

    def get_download_url(self, artifact: Artifact) -> str:
        return reverse("artifact-download", args=[artifact.pk])
