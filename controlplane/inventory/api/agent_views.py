"""Endpoints node agents call: enroll, report inventory, heartbeat."""

from __future__ import annotations

from django.conf import settings
from drf_spectacular.utils import extend_schema
from rest_framework import status
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response

from agent.protocol import (
    Enrollment,
    EnrollmentGrant,
    Heartbeat,
    Inventory,
    encode_public_key,
    queue_name,
)
from controlplane.core.signing import public_key
from controlplane.inventory import services
from controlplane.inventory.agentapi import AgentAPIView, parse_message


class EnrollView(AgentAPIView):
    """Trade a one-time bootstrap token for the node's identity and credential."""

    authentication_classes = []
    permission_classes = [AllowAny]

    @extend_schema(request=Enrollment, responses={201: EnrollmentGrant})
    def post(self, request: Request) -> Response:
        message = parse_message(request, Enrollment)
        # Everything the grant needs is read before the token is spent: an enrollment that
        # fails after its commit would cost a batch token a use its agent retries with.
        key = encode_public_key(public_key())
        try:
            node, credential = services.enroll(message)
        except services.EnrollmentRefused as exc:
            return Response({"detail": str(exc)}, status=status.HTTP_403_FORBIDDEN)
        grant = EnrollmentGrant(
            node_id=node.pk,
            node_credential=credential,
            control_plane_public_key=key,
            queue=queue_name(node.pk),
            broker_url=settings.AGENT_BROKER_URL,
            heartbeat_interval_s=settings.HEARTBEAT_INTERVAL_S,
        )
        return Response(grant.model_dump(mode="json"), status=status.HTTP_201_CREATED)


class InventoryView(AgentAPIView):
    @extend_schema(request=Inventory, responses={204: None})
    def post(self, request: Request) -> Response:
        services.record_inventory(request.auth, parse_message(request, Inventory))
        return Response(status=status.HTTP_204_NO_CONTENT)


class HeartbeatView(AgentAPIView):
    @extend_schema(request=Heartbeat, responses={204: None})
    def post(self, request: Request) -> Response:
        heartbeat = parse_message(request, Heartbeat)
        if heartbeat.node_id != request.auth.pk:
            return Response({"node_id": ["Does not match the credential's node."]}, status=400)
        services.record_heartbeat(request.auth, heartbeat)
        return Response(status=status.HTTP_204_NO_CONTENT)
