"""Base pieces for the API that node agents call (`/api/v1/agent/...`).

Agents authenticate with their node credential (`Authorization: Node tgn_...`) and
speak the pydantic messages of `agent.protocol`; a malformed message is a 400 that
names each offending field by its path.
"""

from __future__ import annotations

from typing import Any, TypeVar

from django.contrib.auth.models import AnonymousUser
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from pydantic import BaseModel, ValidationError
from rest_framework import authentication, exceptions, permissions
from rest_framework.request import Request
from rest_framework.views import APIView

from controlplane.inventory.models import Node
from controlplane.inventory.services import authenticate_node

MessageT = TypeVar("MessageT", bound=BaseModel)


class NodeCredentialAuthentication(authentication.BaseAuthentication):
    keyword = "node"

    def authenticate(self, request: Request) -> tuple[AnonymousUser, Any] | None:
        parts = authentication.get_authorization_header(request).split()
        if not parts or parts[0].decode(errors="replace").lower() != self.keyword:
            return None
        node = authenticate_node(parts[1].decode(errors="replace")) if len(parts) == 2 else None
        if node is None:
            raise exceptions.AuthenticationFailed(
                "Invalid node credential; enroll the agent again."
            )
        return AnonymousUser(), node

    def authenticate_header(self, request: Request) -> str:
        return 'Node realm="agent"'


class NodeCredentialScheme(OpenApiAuthenticationExtension):
    target_class = "controlplane.inventory.agentapi.NodeCredentialAuthentication"
    name = "nodeCredential"

    def get_security_definition(self, auto_schema: Any) -> dict[str, str]:
        return {
            "type": "apiKey",
            "in": "header",
            "name": "Authorization",
            "description": "`Node <credential>` as granted at enrollment.",
        }


class IsNodeAgent(permissions.BasePermission):
    message = "This endpoint is for enrolled node agents."

    def has_permission(self, request: Request, view: Any) -> bool:
        return isinstance(request.auth, Node)


class AgentAPIView(APIView):
    authentication_classes = [NodeCredentialAuthentication]
    permission_classes = [IsNodeAgent]
    parser_classes: list[Any] = []  # bodies are parsed by pydantic, from the raw bytes


def parse_message(request: Request, model: type[MessageT]) -> MessageT:
    try:
        return model.model_validate_json(request.body)
    except ValidationError as exc:
        raise exceptions.ValidationError(
            {".".join(str(p) for p in err["loc"]) or "body": [err["msg"]] for err in exc.errors()}
        ) from None
