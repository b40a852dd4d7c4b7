"""Inventory serializers: discovered facts read-only, operator fields writable."""

from __future__ import annotations

from typing import Any

from rest_framework import serializers

from controlplane.core.api import StrictSerializer, WritableTenantField
from controlplane.inventory.models import Drive, Gpu, Nic, Node, NumaNode


class GpuSerializer(serializers.ModelSerializer):
    class Meta:
        model = Gpu
        fields = ["id", "node", "index", "uuid", "name", "memory_total_bytes", "mig_mode",
                  "pci_bus_id", "numa_node", "driver_version"]
        read_only_fields = fields


class NicSerializer(serializers.ModelSerializer):
    class Meta:
        model = Nic
        fields = ["id", "node", "device", "port", "state", "speed_gbps", "width", "link_layer",
                  "netdev", "pci_bus_id", "numa_node"]
        read_only_fields = fields


class DriveSerializer(serializers.ModelSerializer):
    class Meta:
        model = Drive
        fields = ["id", "node", "name", "model", "serial", "firmware", "capacity_bytes",
                  "logical_block_size", "pci_bus_id", "numa_node"]
        read_only_fields = fields


class NumaNodeSerializer(serializers.ModelSerializer):
    class Meta:
        model = NumaNode
        fields = ["index", "cpulist", "memory_total_bytes"]
        read_only_fields = fields


class NodeSerializer(StrictSerializer):
    tenant = WritableTenantField(allow_null=True, required=False)
    labels = serializers.DictField(child=serializers.CharField(allow_blank=True), required=False)
    gpus = GpuSerializer(many=True, read_only=True)
    nics = NicSerializer(many=True, read_only=True)
    drives = DriveSerializer(many=True, read_only=True)
    numa_nodes = NumaNodeSerializer(many=True, read_only=True)

    class Meta:
        model = Node
        fields = ["id", "hostname", "tenant", "labels", "status", "maintenance",
                  "maintenance_reason", "agent_version", "last_heartbeat_at", "kernel", "os",
                  "cpu_model", "cpu_count", "memory_total_bytes", "numa_nodes", "gpus", "nics",
                  "drives", "created_at", "updated_at"]
        read_only_fields = ["id", "hostname", "status", "agent_version", "last_heartbeat_at",
                            "kernel", "os", "cpu_model", "cpu_count", "memory_total_bytes",
                            "created_at", "updated_at"]

    def validate_labels(self, value: Any) -> Any:
        from django.core.exceptions import ValidationError as DjangoValidationError

        from controlplane.inventory.validators import validate_labels

        try:
            validate_labels(value)
        except DjangoValidationError as exc:
            raise serializers.ValidationError(exc.messages) from exc
        return value
