"""Inventory serializers: discovered hardware (read-only) and bootstrap tokens. Nodes
themselves are served by the fleet's API, which shows their rollout too."""

from __future__ import annotations

from rest_framework import serializers

from controlplane.core.api import SecretSerializer
from controlplane.inventory.models import BootstrapToken, Drive, Gpu, Nic, NumaNode
from controlplane.tenancy.api.fields import WritableTenantField


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
