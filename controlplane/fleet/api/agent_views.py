"""Endpoints node agents call for their desired state and to report how applying it went."""

from __future__ import annotations

from drf_spectacular.utils import extend_schema
from rest_framework import status
from rest_framework.request import Request
from rest_framework.response import Response

from agent.protocol import AppliedStatus, SignedDesiredState
from controlplane.fleet import services
from controlplane.inventory.agentapi import AgentAPIView, parse_message


class DesiredStateView(AgentAPIView):
    """The node's newest signed desired state (agents pull it on start and reconnect)."""

    @extend_schema(responses={200: SignedDesiredState, 204: None})
    def get(self, request: Request) -> Response:
        document = services.latest_document(request.auth)
        if document is None:
            return Response(status=status.HTTP_204_NO_CONTENT)
        return Response(document)


class AppliedStatusView(AgentAPIView):
    @extend_schema(request=AppliedStatus, responses={204: None})
    def post(self, request: Request) -> Response:
        report = parse_message(request, AppliedStatus)
        if report.node_id != request.auth.pk:
            return Response({"node_id": ["Does not match the credential's node."]}, status=400)
        services.record_applied_status(request.auth, report)
        return Response(status=status.HTTP_204_NO_CONTENT)
