"""`POST /api/v1/agent/telemetry/`: the HTTP fallback for agents whose WebSocket is down."""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.throttling import SimpleRateThrottle

from agent.protocol import TelemetryAck, TelemetryBatch
from controlplane.core.agentapi import AgentAPIView, parse_message
from controlplane.telemetry import metrics, services


class PerNodeThrottle(SimpleRateThrottle):
    """Backfill over HTTP is sequential; this only stops one node flooding the others out."""

    rate = "50/s"

    def get_cache_key(self, request: Request, view: Any) -> str:
        return f"telemetry-http:{request.auth.pk}"


class TelemetryView(AgentAPIView):
    throttle_classes = [PerNodeThrottle]

    @extend_schema(request=TelemetryBatch, responses={200: TelemetryAck})
    def post(self, request: Request) -> Response:
        batch = parse_message(request, TelemetryBatch)
        if batch.node_id != request.auth.pk:
            return Response({"node_id": ["Does not match the credential's node."]}, status=400)
        (ack,) = services.ingest([batch])
        metrics.BATCHES.labels(ack.outcome).inc()
        if ack.outcome == "rejected":
            return Response({"detail": ack.reason, "seq": ack.seq}, status=400)
        return Response(ack.model_dump(mode="json"))
