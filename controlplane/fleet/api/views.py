"""Thin viewsets over fleet services, and the nodes API: nodes as the fleet sees them, with
their rollout."""

from __future__ import annotations

from typing import Any

from django.db.models import Count, Q, QuerySet
from drf_spectacular.utils import extend_schema
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import PermissionDenied
from rest_framework.permissions import SAFE_METHODS
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.serializers import Serializer

from controlplane.core.api import DependentsConflictMixin, TenantScopedMixin
from controlplane.core.permissions import IsPlatformAdmin, TenantRolePermission
from controlplane.core.scoping import can_write, readable_tenant_ids
from controlplane.fleet import selectors, services
from controlplane.fleet.api import serializers as s
from controlplane.fleet.filtersets import DeploymentFilterSet, ReplicaFilterSet, RevisionFilterSet
from controlplane.fleet.models import Deployment, Replica, Revision
from controlplane.inventory import services as inventory_services
from controlplane.inventory.filtersets import NodeFilterSet
from controlplane.inventory.models import Node


class DeploymentViewSet(viewsets.ModelViewSet):
    """Model deployments; every change re-plans placement and rolls out to the nodes.

    Tenants also read the deployments shared with them; only the owner changes one.
    """

    queryset = (
        Deployment.objects.annotate(
            placed_replicas=Count("instances", filter=Q(instances__node__isnull=False))
        )
        .prefetch_related("shared_with")
        .order_by("tenant__slug", "name")
    )
    serializer_class = s.DeploymentSerializer
    filterset_class = DeploymentFilterSet
    search_fields = ["name", "model_name"]
    ordering_fields = ["name", "created_at", "replicas"]

    def get_queryset(self) -> QuerySet[Deployment]:
        return selectors.visible(super().get_queryset(), self.request.user)

    def check_object_permissions(self, request: Request, obj: Any) -> None:
        if (
            request.method not in SAFE_METHODS
            and not can_write(request.user, obj)
            and obj.tenant_id not in (readable_tenant_ids(request.user) or ())
        ):
            raise PermissionDenied(
                "This deployment is shared with your tenant; only its owner's admins change it."
            )
        super().check_object_permissions(request, obj)

    def perform_create(self, serializer: Serializer) -> None:
        created = services.create_deployment(**serializer.validated_data)
        serializer.instance = self.get_queryset().get(pk=created.pk)  # with placed_replicas

    def perform_update(self, serializer: Serializer) -> None:
        services.update_deployment(serializer.instance, **serializer.validated_data)
        serializer.instance = self.get_queryset().get(pk=serializer.instance.pk)

    def perform_destroy(self, instance: Deployment) -> None:
        services.delete_deployment(instance)


class ReplicaViewSet(viewsets.ReadOnlyModelViewSet):
    """Where each replica runs, and why, or why it could not be placed (for deployments
    shared with the caller's tenant too: that is where its requests go)."""

    queryset = Replica.objects.select_related("node")
    serializer_class = s.ReplicaSerializer
    filterset_class = ReplicaFilterSet
    ordering_fields = ["index", "updated_at"]

    def get_queryset(self) -> QuerySet[Replica]:
        return selectors.visible(super().get_queryset(), self.request.user, "deployment")


class RevisionViewSet(TenantScopedMixin, viewsets.ReadOnlyModelViewSet):
    """Desired-state revisions per node (tenants see their dedicated nodes' only)."""

    queryset = Revision.objects.all()
    serializer_class = s.RevisionSerializer
    filterset_class = RevisionFilterSet
    tenant_field = "node__tenant"
    ordering_fields = ["generation", "created_at"]

    def get_queryset(self) -> QuerySet[Revision]:
        queryset = super().get_queryset()
        return queryset.defer("document") if self.action == "list" else queryset

    def get_serializer_class(self) -> type[Serializer]:
        return s.RevisionSummarySerializer if self.action == "list" else s.RevisionSerializer

    @extend_schema(request=None, responses={201: s.RevisionSerializer})
    @action(detail=True, methods=["post"])
    def rollback(self, request: Request, pk: str | None = None) -> Response:
        """Issue this revision's content again as a new generation and hold the node there."""
        revision = self.get_object()
        issued = services.rollback(revision)
        shown = s.RevisionSerializer(issued, context=self.get_serializer_context())
        return Response(shown.data, status=status.HTTP_201_CREATED)


# Served by the fleet, which builds on inventory, because a node shows its rollout and is
# released from a rollback here; its own fields still change through inventory's services.
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

    queryset = selectors.nodes_with_rollout()
    serializer_class = s.NodeSerializer
    filterset_class = NodeFilterSet
    search_fields = ["hostname"]
    ordering_fields = ["hostname", "status", "last_heartbeat_at", "created_at"]
    delete_blocked_by = ("storage_pools",)

    def get_permissions(self) -> list[object]:
        if self.action == "destroy":
            return [IsPlatformAdmin()]
        return [TenantRolePermission()]

    def perform_destroy(self, instance: Node) -> None:
        services.delete_node(instance)

    def perform_update(self, serializer: Serializer) -> None:
        serializer.instance = inventory_services.update_node(
            serializer.instance, **serializer.validated_data
        )

    @extend_schema(request=None, responses={200: s.NodeSerializer})
    @action(detail=True, methods=["post"])
    def release(self, request: Request, pk: str | None = None) -> Response:
        """Release a node held at a rolled-back revision; it gets the current plan again."""
        node = self.get_object()
        services.release(node)
        return Response(self.get_serializer(self.get_queryset().get(pk=node.pk)).data)
