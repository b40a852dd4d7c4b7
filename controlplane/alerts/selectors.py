"""Read-side queries for alerts and webhooks, as the API lists them."""

from __future__ import annotations

from django.db.models import Count, Q, QuerySet

from controlplane.alerts.choices import MessageStatus
from controlplane.alerts.models import Alert, DeliveryAttempt, OutboxMessage, WebhookEndpoint


def endpoints() -> QuerySet[WebhookEndpoint]:
    """Endpoints with how many of their messages wait to be sent and how many died."""
    return WebhookEndpoint.objects.annotate(
        pending_messages=Count("messages", filter=Q(messages__status=MessageStatus.PENDING)),
        dead_messages=Count("messages", filter=Q(messages__status=MessageStatus.DEAD)),
    ).order_by("name")  # Meta.ordering does not apply to aggregating queries


def alerts() -> QuerySet[Alert]:
    return Alert.objects.all()


def messages() -> QuerySet[OutboxMessage]:
    return OutboxMessage.objects.select_related("endpoint")


def attempts() -> QuerySet[DeliveryAttempt]:
    return DeliveryAttempt.objects.select_related("message")
