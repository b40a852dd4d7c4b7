"""Inventory serializers: discovered facts read-only, operator fields writable."""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from controlplane.core.api import SecretSerializer, StrictSerializer, WritableTenantField
from controlplane.fleet.choices import RolloutState
from controlplane.fleet.services import rollout_state
from controlplane.inventory.models import BootstrapToken, Drive, Gpu, Nic, Node, NumaNode


class GpuSerializer(serializers.ModelSerializer):
    class Meta:
        model = Gpu
        fields = [
            "id",
            "node",
            "index",
            "uuid",
            "name",
            "memory_total_bytes",
            "mig_mode",
            "pci_bus_id",
            "pci_root",
            "numa_node",
            "driver_version",
        ]
        read_only_fields = fields


class NicSerializer(serializers.ModelSerializer):
    class Meta:
        model = Nic
        fields = [
            "id",
            "node",
            "device",
            "port",
            "state",
            "speed_gbps",
            "width",
            "link_layer",
            "netdev",
            "pci_bus_id",
            "pci_root",
            "numa_node",
        ]
        read_only_fields = fields


class DriveSerializer(serializers.ModelSerializer):
    class Meta:
        model = Drive
        fields = [
            "id",
            "node",
            "name",
            "model",
            "serial",
            "firmware",
            "capacity_bytes",
            "logical_block_size",
            "pci_bus_id",
            "pci_root",
            "numa_node",
        ]
        read_only_fields = fields


class NumaNodeSerializer(serializers.ModelSerializer):
    class Meta:
        model = NumaNode
        fields = ["index", "cpulist", "memory_total_bytes"]
        read_only_fields = fields


class RolloutSerializer(serializers.Serializer):
    desired_generation = serializers.IntegerField(allow_null=True)
    applied_generation = serializers.IntegerField()
    state = serializers.ChoiceField(choices=RolloutState.choices)
    pinned = serializers.BooleanField(help_text="Held at a rolled-back revision.")
    last_rejection_reason = serializers.CharField()
    last_rejection_detail = serializers.CharField()
    last_rejection_at = serializers.DateTimeField(allow_null=True)


class NodeSerializer(StrictSerializer):
    tenant = WritableTenantField(allow_null=True, required=False)
    labels = serializers.DictField(child=serializers.CharField(allow_blank=True), required=False)
    gpus = GpuSerializer(many=True, read_only=True)
    nics = NicSerializer(many=True, read_only=True)
    drives = DriveSerializer(many=True, read_only=True)
    numa_nodes = NumaNodeSerializer(many=True, read_only=True)
    rollout = serializers.SerializerMethodField()

    class Meta:
        model = Node
        fields = [
            "id",
            "hostname",
            "tenant",
            "labels",
            "status",
            "maintenance",
            "maintenance_reason",
            "agent_version",
            "last_heartbeat_at",
            "kernel",
            "os",
            "cpu_model",
            "cpu_count",
            "memory_total_bytes",
            "numa_nodes",
            "gpus",
            "nics",
            "drives",
            "rollout",
            "created_at",
            "updated_at",
        ]
        read_only_fields = [
            "id",
            "hostname",
            "status",
            "agent_version",
            "last_heartbeat_at",
            "kernel",
            "os",
            "cpu_model",
            "cpu_count",
            "memory_total_bytes",
            "created_at",
            "updated_at",
        ]

    @extend_schema_field(RolloutSerializer)
    def get_rollout(self, node: Node) -> dict[str, Any]:
        desired = getattr(node, "desired_generation", None)
        return {
            "desired_generation": desired,
            "applied_generation": node.applied_generation,
            "state": rollout_state(
                desired, node.applied_generation, getattr(node, "head_status", None)
            ),
            "pinned": node.pinned,
            "last_rejection_reason": node.last_rejection_reason,
            "last_rejection_detail": node.last_rejection_detail,
            "last_rejection_at": node.last_rejection_at,
        }

    def validate_labels(self, value: Any) -> Any:
        from django.core.exceptions import ValidationError as DjangoValidationError

        from controlplane.inventory.validators import validate_labels

        try:
            validate_labels(value)
        except DjangoValidationError as exc:
            raise serializers.ValidationError(exc.messages) from exc
        return value


class BootstrapTokenSerializer(SecretSerializer):
    tenant = WritableTenantField(allow_null=True, required=False)
    uses = serializers.IntegerField(min_value=1, max_value=10000, default=1, write_only=True)
    ttl_s = serializers.IntegerField(
        min_value=60, max_value=30 * 86400, required=False, write_only=True
    )

    class Meta:
        model = BootstrapToken
        fields = [
            "id",
            "name",
            "prefix",
            "tenant",
            "uses",
            "ttl_s",
            "uses_left",
            "expires_at",
            "used_at",
            "node",
            "revoked",
            "created_at",
        ]
        read_only_fields = [
            "id",
            "prefix",
            "uses_left",
            "expires_at",
            "used_at",
            "node",
            "created_at",
        ]


class BootstrapTokenCreatedSerializer(BootstrapTokenSerializer):
    token = serializers.CharField(read_only=True, help_text="Shown once; give it to the agent.")

    class Meta(BootstrapTokenSerializer.Meta):
        fields = [*BootstrapTokenSerializer.Meta.fields, "token"]
