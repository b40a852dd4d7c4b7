"""Thin snapshot views over telemetry selectors: what a dashboard shows before deltas arrive.

Objects the caller may not see answer 404, exactly like objects that do not exist.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from django.http import Http404
from django.shortcuts import get_object_or_404
from drf_spectacular.utils import extend_schema
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.serializers import Serializer
from rest_framework.views import APIView

from controlplane.telemetry import selectors
from controlplane.telemetry.api import serializers as s


class SnapshotView(APIView):
    """A GET-only snapshot; `window` (seconds) picks the span and the resolution."""

    response_serializer: type[Serializer]

    def window(self, request: Request) -> int:
        query = s.WindowQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        return int(query.validated_data["window"])

    def respond(self, snapshot: dict[str, Any]) -> Response:
        return Response(self.response_serializer(snapshot).data)


WINDOWED = {"parameters": [s.WindowQuerySerializer]}


class FleetView(SnapshotView):
    response_serializer = s.FleetSerializer

    @extend_schema(responses={200: s.FleetSerializer})
    def get(self, request: Request) -> Response:
        """Every visible node with its status, GPU count and latest gauges."""
        return self.respond(selectors.fleet_snapshot(request.user))


class NodeView(SnapshotView):
    response_serializer = s.NodeSnapshotSerializer

    @extend_schema(responses={200: s.NodeSnapshotSerializer}, **WINDOWED)
    def get(self, request: Request, pk: UUID) -> Response:
        """A node's GPUs and gauge history over the window."""
        window = self.window(request)
        node = selectors.node_with_stream(request.user, pk)
        if node is None:
            raise Http404
        return self.respond(selectors.node_snapshot(request.user, node, window))


class DeploymentView(SnapshotView):
    response_serializer = s.DeploymentSnapshotSerializer

    @extend_schema(responses={200: s.DeploymentSnapshotSerializer}, **WINDOWED)
    def get(self, request: Request, pk: UUID) -> Response:
        """Latency percentiles, usage, tokens/s and queue depth of a deployment over the window."""
        window = self.window(request)
        deployment = get_object_or_404(selectors.visible_deployments(request.user), pk=pk)
        return self.respond(selectors.deployment_snapshot(deployment, window))


class StorageView(SnapshotView):
    response_serializer = s.StorageSnapshotSerializer

    @extend_schema(responses={200: s.StorageSnapshotSerializer}, **WINDOWED)
    def get(self, request: Request) -> Response:
        """Per node, the visible volumes' IOPS, MB/s and latency over the window."""
        return self.respond(selectors.storage_snapshot(request.user, self.window(request)))


class TenantView(SnapshotView):
    response_serializer = s.TenantSnapshotSerializer

    @extend_schema(responses={200: s.TenantSnapshotSerializer}, **WINDOWED)
    def get(self, request: Request, pk: UUID) -> Response:
        """A tenant's deployments, each summarised over the window."""
        window = self.window(request)
        tenant = get_object_or_404(selectors.visible_tenants(request.user), pk=pk)
        return self.respond(selectors.tenant_snapshot(tenant, window))
