"""The admin console shows alerts, endpoints and deliveries; changes go through the API,
whose services check targets and keep the outbox consistent."""

from django.contrib import admin
from django.db import models

from controlplane.alerts.models import Alert, DeliveryAttempt, OutboxMessage, WebhookEndpoint
from controlplane.storage.admin import ViewOnlyAdmin


@admin.register(Alert)
class AlertAdmin(ViewOnlyAdmin):
    list_display = ["__str__", "tenant", "severity", "state", "starts_at", "ends_at"]
    list_filter = ["state", "severity", "tenant"]
    search_fields = ["fingerprint"]


@admin.register(WebhookEndpoint)
class WebhookEndpointAdmin(ViewOnlyAdmin):
    list_display = ["name", "tenant", "format", "url", "enabled", "disabled_reason"]
    list_filter = ["format", "enabled", "tenant"]
    search_fields = ["name", "url"]
    exclude = ["secret", "previous_secret", "routing_key"]
    formfield_overrides = {models.URLField: {"assume_scheme": "https"}}


@admin.register(OutboxMessage)
class OutboxMessageAdmin(ViewOnlyAdmin):
    list_display = [
        "webhook_id",
        "endpoint",
        "event",
        "status",
        "attempts",
        "next_attempt_at",
        "last_error",
    ]
    list_filter = ["status", "event"]
    list_select_related = ["endpoint"]
    search_fields = ["webhook_id", "endpoint__name"]


@admin.register(DeliveryAttempt)
class DeliveryAttemptAdmin(ViewOnlyAdmin):
    list_display = ["message", "started_at", "status_code", "error", "duration"]
    list_select_related = ["message"]
    search_fields = ["message__webhook_id"]
