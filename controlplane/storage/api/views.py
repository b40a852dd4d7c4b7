"""Thin viewsets over storage services."""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest, HttpResponseBase
from drf_spectacular.utils import extend_schema
from rest_framework import mixins, viewsets
from rest_framework.decorators import action
from rest_framework.parsers import MultiPartParser
from rest_framework.permissions import SAFE_METHODS
from rest_framework.request import Request
from rest_framework.serializers import Serializer

from controlplane.core.api import DependentsConflictMixin, TenantScopedMixin, TenantScopedViewSet
from controlplane.core.permissions import IsPlatformAdmin, TenantRolePermission
from controlplane.storage import selectors, services
from controlplane.storage.api import serializers as s
from controlplane.storage.api.downloads import RANGE_PARAMETER, RESPONSES, file_response
from controlplane.storage.filtersets import (
    ArtifactFilterSet,
    ExportFilterSet,
    PoolFilterSet,
    QosPolicyFilterSet,
    VolumeFilterSet,
)
from controlplane.storage.models import Artifact, Export, QosPolicy, Volume
from controlplane.storage.uploads import HashingUploadHandler


class PoolViewSet(TenantScopedViewSet):
    """Storage pools per node. Tenants see those of their dedicated nodes; pools decide what
    the agent does to a node's disks, so only platform admins change them."""

    queryset = selectors.pools_with_allocation()
    serializer_class = s.PoolSerializer
    filterset_class = PoolFilterSet
    tenant_field = "node__tenant"
    search_fields = ["name", "node__hostname"]
    ordering_fields = ["name", "created_at", "reported_free_bytes"]

    def get_permissions(self) -> list[Any]:
        if self.request.method in SAFE_METHODS:
            return [TenantRolePermission()]
        return [IsPlatformAdmin()]

    def perform_create(self, serializer: Serializer) -> None:
        created = services.create_pool(**serializer.validated_data)
        serializer.instance = self.get_queryset().get(pk=created.pk)  # with allocated_bytes

    def perform_update(self, serializer: Serializer) -> None:
        services.update_pool(serializer.instance, **serializer.validated_data)
        serializer.instance = self.get_queryset().get(pk=serializer.instance.pk)

    def perform_destroy(self, instance: Any) -> None:
        services.delete_pool(instance)


class VolumeViewSet(TenantScopedViewSet):
    """Tenants' volumes; a new one is placed in the pool with the most room (or the one named)."""

    queryset = Volume.objects.select_related("pool")
    serializer_class = s.VolumeSerializer
    filterset_class = VolumeFilterSet
    search_fields = ["name"]
    ordering_fields = ["name", "size_bytes", "created_at"]

    def perform_create(self, serializer: Serializer) -> None:
        serializer.instance = services.create_volume(**serializer.validated_data)

    def perform_update(self, serializer: Serializer) -> None:
        serializer.instance = services.update_volume(
            serializer.instance, **serializer.validated_data
        )

    def perform_destroy(self, instance: Volume) -> None:
        services.delete_volume(instance)


class QosPolicyViewSet(TenantScopedViewSet):
    """Storage rate limits (IOPS, MiB/s) that tenants attach to their volumes."""

    queryset = QosPolicy.objects.all()
    serializer_class = s.QosPolicySerializer
    filterset_class = QosPolicyFilterSet
    search_fields = ["name"]
    ordering_fields = ["name", "created_at"]

    def perform_create(self, serializer: Serializer) -> None:
        serializer.instance = services.create_qos_policy(**serializer.validated_data)

    def perform_update(self, serializer: Serializer) -> None:
        serializer.instance = services.update_qos_policy(
            serializer.instance, **serializer.validated_data
        )

    def perform_destroy(self, instance: QosPolicy) -> None:
        services.delete_qos_policy(instance)


class ExportViewSet(TenantScopedViewSet):
    """A tenant's NVMe-oF subsystem: which hosts may connect, and where each node listens."""

    queryset = Export.objects.all()
    serializer_class = s.ExportSerializer
    filterset_class = ExportFilterSet
    ordering_fields = ["created_at"]

    def perform_create(self, serializer: Serializer) -> None:
        serializer.instance = services.create_export(**serializer.validated_data)

    def perform_update(self, serializer: Serializer) -> None:
        serializer.instance = services.update_export(
            serializer.instance, **serializer.validated_data
        )

    def perform_destroy(self, instance: Export) -> None:
        services.delete_export(instance)


class ArtifactViewSet(
    DependentsConflictMixin,
    TenantScopedMixin,
    mixins.CreateModelMixin,
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.DestroyModelMixin,
    viewsets.GenericViewSet,
):
    """Model archives: uploaded once (multipart), verified by sha256, fetched by agents."""

    queryset = Artifact.objects.all()
    serializer_class = s.ArtifactSerializer
    filterset_class = ArtifactFilterSet
    parser_classes = [MultiPartParser]
    search_fields = ["name", "sha256"]
    ordering_fields = ["name", "size_bytes", "created_at"]

    def initialize_request(self, request: HttpRequest, *args: Any, **kwargs: Any) -> Request:
        request.upload_handlers = [HashingUploadHandler(request)]
        return super().initialize_request(request, *args, **kwargs)

    def perform_create(self, serializer: Serializer) -> None:
        serializer.instance = services.create_artifact(**serializer.validated_data)

    def perform_destroy(self, instance: Artifact) -> None:
        services.delete_artifact(instance)

    @extend_schema(parameters=[RANGE_PARAMETER], responses=RESPONSES)
    @action(detail=True, methods=["get"])
    def download(self, request: Request, pk: str | None = None) -> HttpResponseBase:
        """The archive itself; send Range to fetch part of it."""
        artifact = self.get_object()
        return file_response(request, artifact)
