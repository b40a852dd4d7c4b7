"""`POST /api/v1/agent/telemetry/`: the HTTP fallback for agents whose WebSocket is down.

It takes the same batches as the WebSocket, within the same limits, and answers with the
same `TelemetryAck`: 200 stored or duplicate, 422 rejected for good (the agent drops it),
429 with Retry-After when the node sends too fast.
"""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.throttling import SimpleRateThrottle

from agent.protocol import TelemetryAck, TelemetryBatch
from controlplane.inventory.agentapi import AgentAPIView
from controlplane.inventory.models import Node
from controlplane.telemetry import metrics, services
from controlplane.telemetry.pipeline.validate import MAX_BATCH_BYTES, BatchRejected, parse_batch


class PerNodeThrottle(SimpleRateThrottle):
    """Backfill over HTTP is sequential; this only stops one node flooding the others out."""

    rate = "50/s"

    def get_cache_key(self, request: Request, view: Any) -> str:
        return f"telemetry-http:{request.auth.pk}"


class TelemetryView(AgentAPIView):
    throttle_classes = [PerNodeThrottle]

    @extend_schema(
        request=TelemetryBatch,
        responses={
            200: OpenApiResponse(
                TelemetryAck, description="Stored, or a duplicate of a stored batch."
            ),
            422: OpenApiResponse(TelemetryAck, description="Rejected for good, with the reason."),
        },
    )
    def post(self, request: Request) -> Response:
        node: Node = request.auth
        try:
            batch = _batch_of(request, node)
        except BatchRejected as exc:
            services.ingest([], rejected=[services.Rejection(node.pk, exc.reason)])
            return _answer(TelemetryAck(seq=exc.seq, outcome="rejected", reason=exc.reason))
        (ack,) = services.ingest([batch])
        return _answer(ack)


def _batch_of(request: Request, node: Node) -> TelemetryBatch:
    """The body, read no further than one byte past the limit, as a validated batch."""
    stream = request.stream
    batch = parse_batch(stream.read(MAX_BATCH_BYTES + 1) if stream is not None else b"")
    if batch.node_id != node.pk:
        raise BatchRejected(f"node_id {batch.node_id} is not this credential's node", batch.seq)
    return batch


def _answer(ack: TelemetryAck) -> Response:
    metrics.BATCHES.labels(ack.outcome).inc()
    return Response(ack.model_dump(mode="json"), status=422 if ack.outcome == "rejected" else 200)
