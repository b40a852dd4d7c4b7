"""Thin viewsets over inventory services: discovered hardware and bootstrap tokens. Nodes
themselves are served by the fleet's API, which shows their rollout too."""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema, extend_schema_view
from rest_framework import viewsets

from controlplane.core.api import SecretViewSet, TenantScopedMixin
from controlplane.core.permissions import IsPlatformAdmin
from controlplane.core.secrets import Issued
from controlplane.inventory import services
from controlplane.inventory.api import serializers as s
from controlplane.inventory.filtersets import DriveFilterSet, GpuFilterSet, NicFilterSet
from controlplane.inventory.models import BootstrapToken, Drive, Gpu, Nic


@extend_schema_view(create=extend_schema(responses={201: s.BootstrapTokenCreatedSerializer}))
class BootstrapTokenViewSet(SecretViewSet):
    """One-time (or N-time) tokens agents trade for a node identity. Platform admins only."""

    queryset = BootstrapToken.objects.all()
    serializer_class = s.BootstrapTokenSerializer
    created_serializer_class = s.BootstrapTokenCreatedSerializer
    secret_field = "token"
    permission_classes = [IsPlatformAdmin]
    ordering_fields = ["created_at", "expires_at"]

    def issue(self, validated: dict[str, Any]) -> Issued:
        return services.create_bootstrap_token(
            name=validated["name"],
            tenant=validated.get("tenant"),
            uses=validated["uses"],
            ttl_s=validated.get("ttl_s"),
            created_by=self.request.user,
        )

    def revoke(self, instance: BootstrapToken) -> None:
        services.revoke_bootstrap_token(instance)


class HardwareViewSet(TenantScopedMixin, viewsets.ReadOnlyModelViewSet):
    """Discovered hardware, read-only; scoped through the node's tenant."""

    tenant_field = "node__tenant"


class GpuViewSet(HardwareViewSet):
    queryset = Gpu.objects.all()
    serializer_class = s.GpuSerializer
    filterset_class = GpuFilterSet
    search_fields = ["name", "uuid", "pci_bus_id"]
    ordering_fields = ["node", "index", "memory_total_bytes"]


class NicViewSet(HardwareViewSet):
    queryset = Nic.objects.all()
    serializer_class = s.NicSerializer
    filterset_class = NicFilterSet
    search_fields = ["device", "netdev"]
    ordering_fields = ["node", "device", "speed_gbps"]


class DriveViewSet(HardwareViewSet):
    queryset = Drive.objects.all()
    serializer_class = s.DriveSerializer
    filterset_class = DriveFilterSet
    search_fields = ["name", "model", "serial"]
    ordering_fields = ["node", "name", "capacity_bytes"]
