"""Thin viewsets over fleet services."""

from __future__ import annotations

from django.db.models import Count, Q, QuerySet
from drf_spectacular.utils import extend_schema
from rest_framework import status, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.serializers import Serializer

from controlplane.core.api import TenantScopedMixin, TenantScopedViewSet
from controlplane.fleet import services
from controlplane.fleet.api import serializers as s
from controlplane.fleet.filtersets import DeploymentFilterSet, ReplicaFilterSet, RevisionFilterSet
from controlplane.fleet.models import Deployment, Replica, Revision


class DeploymentViewSet(TenantScopedViewSet):
    """Model deployments; every change re-plans placement and rolls out to the nodes."""

    queryset = Deployment.objects.annotate(
        placed_replicas=Count("instances", filter=Q(instances__node__isnull=False))
    ).order_by("tenant__slug", "name")
    serializer_class = s.DeploymentSerializer
    filterset_class = DeploymentFilterSet
    search_fields = ["name", "model_name"]
    ordering_fields = ["name", "created_at", "replicas"]

    def perform_create(self, serializer: Serializer) -> None:
        created = services.create_deployment(**serializer.validated_data)
        serializer.instance = self.get_queryset().get(pk=created.pk)  # with placed_replicas

    def perform_update(self, serializer: Serializer) -> None:
        services.update_deployment(serializer.instance, **serializer.validated_data)
        serializer.instance = self.get_queryset().get(pk=serializer.instance.pk)

    def perform_destroy(self, instance: Deployment) -> None:
        services.delete_deployment(instance)


class ReplicaViewSet(TenantScopedMixin, viewsets.ReadOnlyModelViewSet):
    """Where each replica runs, and why, or why it could not be placed."""

    queryset = Replica.objects.select_related("node")
    serializer_class = s.ReplicaSerializer
    filterset_class = ReplicaFilterSet
    tenant_field = "deployment__tenant"
    ordering_fields = ["index", "updated_at"]


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
        return Response(s.RevisionSerializer(issued).data, status=status.HTTP_201_CREATED)
