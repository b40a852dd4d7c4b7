"""Endpoints node agents call for their desired state and to report how applying it went."""

from __future__ import annotations

from drf_spectacular.utils import extend_schema
from rest_framework import status
from rest_framework.request import Request
from rest_framework.response import Response

from agent.protocol import AppliedStatus, SignedDesiredState, state_tag
from controlplane.fleet import services
from controlplane.inventory.agentapi import AgentAPIView, parse_message


class DesiredStateView(AgentAPIView):
    """The node's newest signed desired state (agents pull it on start, on reconnect and
    once a minute). A pull whose `If-None-Match` names the newest state is answered 304
    without reading the document: a fleet's periodic pulls cost a row lookup each."""

    @extend_schema(responses={200: SignedDesiredState, 204: None, 304: None})
    def get(self, request: Request) -> Response:
        tag = services.latest_tag(request.auth)
        if tag is None:
            return Response(status=status.HTTP_204_NO_CONTENT)
        listed = _listed_tags(request.headers.get("If-None-Match", ""))
        if tag in listed or "*" in listed:
            return Response(status=status.HTTP_304_NOT_MODIFIED, headers={"ETag": tag})
        document = services.latest_document(request.auth)
        if document is None:  # the node was deleted in between
            return Response(status=status.HTTP_204_NO_CONTENT)
        state = document["state"]  # a newer revision may have landed since the tag was read
        tag = state_tag(state["generation"], state["content_hash"])
        return Response(document, headers={"ETag": tag})


def _listed_tags(header: str) -> list[str]:
    """The entity tags an `If-None-Match` header lists (weak ones compare as strong)."""
    return [t.strip().removeprefix("W/") for t in header.split(",") if t.strip()]


class AppliedStatusView(AgentAPIView):
    @extend_schema(request=AppliedStatus, responses={204: None})
    def post(self, request: Request) -> Response:
        report = parse_message(request, AppliedStatus)
        if report.node_id != request.auth.pk:
            return Response({"node_id": ["Does not match the credential's node."]}, status=400)
        services.record_applied_status(request.auth, report)
        return Response(status=status.HTTP_204_NO_CONTENT)
