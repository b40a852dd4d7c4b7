"""Read-side queries for alerts and webhooks, as the API and SLO reports list them."""

from __future__ import annotations

from datetime import datetime
from typing import Any

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


def slo_alerts_in_period(tenant_id: Any, start: datetime, end: datetime) -> list[Alert]:
    """The tenant's SLO alert episodes that were firing at some point of [start, end)."""
    return list(
        Alert.objects.filter(tenant_id=tenant_id, labels__has_key="slo", starts_at__lt=end)
        .filter(Q(ends_at__isnull=True) | Q(ends_at__gte=start))
        .order_by("starts_at")
    )


def messages() -> QuerySet[OutboxMessage]:
    return OutboxMessage.objects.select_related("endpoint")


def attempts() -> QuerySet[DeliveryAttempt]:
    return DeliveryAttempt.objects.select_related("message")
