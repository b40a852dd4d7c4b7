"""Thin viewsets over alert and webhook services.

Tenant admins manage their webhook endpoints, viewers read them; alerts, outbox messages
and delivery attempts are read-only. Fleet alerts and platform endpoints (no tenant) are
the platform admins' alone.
"""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema, extend_schema_view
from rest_framework import status, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.serializers import Serializer

from controlplane.alerts import selectors, services
from controlplane.alerts.api import serializers as s
from controlplane.alerts.filtersets import (
    AlertFilterSet,
    DeliveryAttemptFilterSet,
    OutboxMessageFilterSet,
    WebhookEndpointFilterSet,
)
from controlplane.alerts.models import WebhookEndpoint
from controlplane.core.api import IssueSecretMixin, TenantScopedMixin, TenantScopedViewSet
from controlplane.core.secrets import Issued


@extend_schema_view(create=extend_schema(responses={201: s.WebhookEndpointCreatedSerializer}))
class WebhookEndpointViewSet(IssueSecretMixin, TenantScopedViewSet):
    """Where alerts are POSTed, signed per Standard Webhooks; the secret is shown once."""

    queryset = selectors.endpoints()
    serializer_class = s.WebhookEndpointSerializer
    created_serializer_class = s.WebhookEndpointCreatedSerializer
    secret_field = "secret"
    filterset_class = WebhookEndpointFilterSet
    search_fields = ["name", "url"]
    ordering_fields = ["name", "created_at"]

    def issue(self, validated: dict[str, Any]) -> Issued:
        issued = services.create_endpoint(**validated)
        return Issued(self.get_queryset().get(pk=issued.obj.pk), issued.secret)

    def perform_update(self, serializer: Serializer) -> None:
        services.update_endpoint(serializer.instance, **serializer.validated_data)
        serializer.instance = self.get_queryset().get(pk=serializer.instance.pk)

    def perform_destroy(self, instance: WebhookEndpoint) -> None:
        services.delete_endpoint(instance)

    @extend_schema(request=None, responses=s.SecretRotatedSerializer)
    @action(detail=True, methods=["post"], url_path="rotate-secret")
    def rotate_secret(self, request: Request, pk: str | None = None) -> Response:
        """A new signing secret (shown once); the previous one also signs until
        `previous_secret_expires_at`."""
        issued = services.rotate_secret(self.get_object())
        body = {
            "secret": issued.secret,
            "previous_secret_expires_at": issued.obj.previous_secret_expires_at,
        }
        return Response(s.SecretRotatedSerializer(body).data)

    @extend_schema(request=None, responses={202: s.OutboxMessageSerializer})
    @action(detail=True, methods=["post"])
    def test(self, request: Request, pk: str | None = None) -> Response:
        """Queue a test alert (alertname TailguardWebhookTest) to this endpoint; follow it in
        webhook-messages and delivery-attempts."""
        message = services.send_test(self.get_object())
        return Response(s.OutboxMessageSerializer(message).data, status=status.HTTP_202_ACCEPTED)


class AlertViewSet(TenantScopedMixin, viewsets.ReadOnlyModelViewSet):
    """Alert episodes: each fires once and resolves once; firing again opens a new one."""

    queryset = selectors.alerts()
    serializer_class = s.AlertSerializer
    filterset_class = AlertFilterSet
    ordering_fields = ["starts_at", "ends_at", "severity", "state"]


class OutboxMessageViewSet(TenantScopedMixin, viewsets.ReadOnlyModelViewSet):
    """Every webhook written for an endpoint, and where its delivery stands."""

    queryset = selectors.messages()
    serializer_class = s.OutboxMessageSerializer
    filterset_class = OutboxMessageFilterSet
    tenant_field = "endpoint__tenant"
    ordering_fields = ["created_at", "next_attempt_at", "status"]


class DeliveryAttemptViewSet(TenantScopedMixin, viewsets.ReadOnlyModelViewSet):
    """Each try at sending a message: status code, error, the start of the response."""

    queryset = selectors.attempts()
    serializer_class = s.DeliveryAttemptSerializer
    filterset_class = DeliveryAttemptFilterSet
    tenant_field = "message__endpoint__tenant"
    ordering_fields = ["started_at", "status_code"]
