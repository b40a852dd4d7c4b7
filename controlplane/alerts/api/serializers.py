"""Serializers for alerts, webhook endpoints (secrets shown once), outbox messages and
delivery attempts."""

from __future__ import annotations

from typing import Any

from rest_framework import serializers

from controlplane.alerts.models import Alert, DeliveryAttempt, OutboxMessage, WebhookEndpoint
from controlplane.core.api import StrictCharField, StrictSerializer
from controlplane.core.scoping import is_platform_admin
from controlplane.tenancy.api.fields import WritableTenantField


class AlertSerializer(serializers.ModelSerializer):
    class Meta:
        model = Alert
        fields = [
            "id",
            "tenant",
            "fingerprint",
            "labels",
            "annotations",
            "severity",
            "state",
            "starts_at",
            "ends_at",
            "last_evaluated_at",
            "created_at",
            "updated_at",
        ]
        read_only_fields = fields


class WebhookEndpointSerializer(StrictSerializer):
    tenant = WritableTenantField(
        allow_null=True,
        help_text="Empty (platform admins only): a platform endpoint, which gets fleet alerts.",
    )
    routing_key = StrictCharField(
        write_only=True,
        required=False,
        max_length=64,
        help_text="pagerduty: the integration's routing key (never shown again).",
    )
    pending_messages = serializers.IntegerField(read_only=True)
    dead_messages = serializers.IntegerField(read_only=True)

    class Meta:
        model = WebhookEndpoint
        fields = [
            "id",
            "tenant",
            "name",
            "url",
            "format",
            "routing_key",
            "enabled",
            "disabled_reason",
            "allow_private_targets",
            "secret_rotated_at",
            "previous_secret_expires_at",
            "pending_messages",
            "dead_messages",
            "created_at",
            "updated_at",
        ]
        read_only_fields = [
            "id",
            "disabled_reason",
            "secret_rotated_at",
            "previous_secret_expires_at",
            "created_at",
            "updated_at",
        ]

    def _is_platform_admin(self) -> bool:
        request = self.context.get("request")
        return is_platform_admin(request.user if request else None)

    def validate_tenant(self, tenant: Any) -> Any:
        if tenant is None and not self._is_platform_admin():
            raise serializers.ValidationError(
                "Name your tenant; platform endpoints are for admins."
            )
        if self.instance is not None and tenant != self.instance.tenant:
            raise serializers.ValidationError("Set when created; create a new endpoint instead.")
        return tenant

    def validate_allow_private_targets(self, allow: bool) -> bool:
        if allow and not self._is_platform_admin():
            raise serializers.ValidationError(
                "Only platform admins may let an endpoint reach private addresses."
            )
        return allow


class WebhookEndpointCreatedSerializer(WebhookEndpointSerializer):
    secret = serializers.CharField(
        read_only=True, help_text="The signing secret (whsec_...): shown once; store it now."
    )

    class Meta(WebhookEndpointSerializer.Meta):
        fields = [*WebhookEndpointSerializer.Meta.fields, "secret"]


class SecretRotatedSerializer(serializers.Serializer):
    secret = serializers.CharField(help_text="The new signing secret: shown once; store it now.")
    previous_secret_expires_at = serializers.DateTimeField(
        help_text="Until then deliveries are signed with both the new and the previous secret."
    )


class OutboxMessageSerializer(serializers.ModelSerializer):
    class Meta:
        model = OutboxMessage
        fields = [
            "id",
            "endpoint",
            "alert",
            "event",
            "webhook_id",
            "payload",
            "status",
            "attempts",
            "next_attempt_at",
            "delivered_at",
            "last_error",
            "created_at",
            "updated_at",
        ]
        read_only_fields = fields


class DeliveryAttemptSerializer(serializers.ModelSerializer):
    endpoint = serializers.UUIDField(source="message.endpoint_id", read_only=True)
    duration_s = serializers.FloatField(read_only=True)

    class Meta:
        model = DeliveryAttempt
        fields = [
            "id",
            "endpoint",
            "message",
            "started_at",
            "status_code",
            "error",
            "response_excerpt",
            "duration_s",
        ]
        read_only_fields = fields
