"""Thin viewsets over inventory selectors and services."""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema, extend_schema_view
from rest_framework import mixins, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.serializers import Serializer

from controlplane.core.api import DependentsConflictMixin, SecretViewSet, TenantScopedMixin
from controlplane.core.permissions import IsPlatformAdmin, TenantRolePermission
from controlplane.core.secrets import Issued
from controlplane.fleet import services as fleet_services
from controlplane.inventory import selectors, services
from controlplane.inventory.api import serializers as s
from controlplane.inventory.filtersets import (
    DriveFilterSet,
    GpuFilterSet,
    NicFilterSet,
    NodeFilterSet,
)
from controlplane.inventory.models import BootstrapToken, Drive, Gpu, Nic


class NodeViewSet(
    DependentsConflictMixin,
    TenantScopedMixin,
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.UpdateModelMixin,
    mixins.DestroyModelMixin,
    viewsets.GenericViewSet,
):
    """Nodes join by enrolling their agent; people edit labels, maintenance and dedication.

    Tenant users see the nodes dedicated to their tenant; the shared fleet is the
    platform admins'. Deleting (decommissioning) a node is for platform admins, once its
    storage pools are gone; its hardware, revisions and telemetry go with it.
    """

    queryset = selectors.nodes_with_hardware()
    serializer_class = s.NodeSerializer
    filterset_class = NodeFilterSet
    search_fields = ["hostname"]
    ordering_fields = ["hostname", "status", "last_heartbeat_at", "created_at"]
    delete_blocked_by = ("storage_pools",)

    def get_permissions(self) -> list[object]:
        if self.action == "destroy":
            return [IsPlatformAdmin()]
        return [TenantRolePermission()]

    def perform_update(self, serializer: Serializer) -> None:
        serializer.instance = services.update_node(serializer.instance, **serializer.validated_data)

    @extend_schema(request=None, responses={200: s.NodeSerializer})
    @action(detail=True, methods=["post"])
    def release(self, request: Request, pk: str | None = None) -> Response:
        """Release a node held at a rolled-back revision; it gets the current plan again."""
        node = self.get_object()
        fleet_services.release(node)
        return Response(self.get_serializer(self.get_queryset().get(pk=node.pk)).data)


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
