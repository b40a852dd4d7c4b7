"""Endpoints node agents call: fetch a model artifact, report the storage engine's state."""

from __future__ import annotations

from uuid import UUID

from django.http import HttpResponseBase
from drf_spectacular.utils import extend_schema
from rest_framework import status
from rest_framework.exceptions import NotFound
from rest_framework.request import Request
from rest_framework.response import Response

from agent.protocol import StorageReport
from controlplane.inventory.agentapi import AgentAPIView, parse_message
from controlplane.storage import selectors, services
from controlplane.storage.api.downloads import RANGE_PARAMETER, RESPONSES, file_response


class AgentArtifactView(AgentAPIView):
    """An artifact, for a node that runs a replica of a deployment using it (Range resumes)."""

    @extend_schema(parameters=[RANGE_PARAMETER], responses=RESPONSES)
    def get(self, request: Request, pk: UUID) -> HttpResponseBase:
        artifact = selectors.artifact_for_node(request.auth, pk)
        if artifact is None:
            raise NotFound("No such artifact for this node's replicas.")
        return file_response(request, artifact)


class StorageReportView(AgentAPIView):
    @extend_schema(request=StorageReport, responses={204: None})
    def post(self, request: Request) -> Response:
        report = parse_message(request, StorageReport)
        if report.node_id != request.auth.pk:
            return Response({"node_id": ["Does not match the credential's node."]}, status=400)
        services.record_storage_report(request.auth, report)
        return Response(status=status.HTTP_204_NO_CONTENT)
