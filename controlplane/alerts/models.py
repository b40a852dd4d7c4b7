"""Alert states, the webhook endpoints that hear about them, and a durable outbox.

An alert episode is one row: it fires, then resolves; firing again opens a new row, so
history stays. Each change writes one `OutboxMessage` per endpoint in the same transaction,
and messages stay in the database until delivered (or given up), whatever happens to
workers and brokers in between.

Alerts and endpoints with no tenant belong to the platform (fleet health): only platform
admins see them, and fleet alerts go to platform endpoints only.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime

from django.core.exceptions import ValidationError
from django.core.validators import URLValidator
from django.db import models
from django.db.models import Q

from controlplane.alerts.choices import AlertState, Event, MessageStatus, Severity, WebhookFormat
from controlplane.core.models import BaseModel


def fingerprint(labels: dict[str, str]) -> str:
    """A stable hash of the sorted labels: 16 hex digits, the shape Alertmanager uses."""
    canonical = json.dumps(labels, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


class Alert(BaseModel):
    tenant = models.ForeignKey(
        "tenancy.Tenant",
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="+",
        help_text="Empty for fleet alerts, which only platform admins see.",
    )
    fingerprint = models.CharField(max_length=16, editable=False)
    labels = models.JSONField(default=dict)
    annotations = models.JSONField(default=dict, blank=True)
    severity = models.CharField(max_length=8, choices=Severity.choices)
    state = models.CharField(max_length=8, choices=AlertState.choices, default=AlertState.FIRING)
    starts_at = models.DateTimeField()
    ends_at = models.DateTimeField(null=True, blank=True)
    last_evaluated_at = models.DateTimeField()

    class Meta:
        ordering = ["-starts_at"]
        indexes = [models.Index(fields=["fingerprint", "state"])]
        constraints = [
            # one open episode per fingerprint, per tenant and among fleet alerts
            models.UniqueConstraint(
                fields=["tenant", "fingerprint"],
                condition=Q(state=AlertState.FIRING, tenant__isnull=False),
                name="one_firing_alert_per_fingerprint",
            ),
            models.UniqueConstraint(
                fields=["fingerprint"],
                condition=Q(state=AlertState.FIRING, tenant__isnull=True),
                name="one_firing_fleet_alert_per_fingerprint",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.labels.get('alertname', self.fingerprint)} ({self.state})"

    @property
    def name(self) -> str:
        return str(self.labels.get("alertname", self.fingerprint))


class WebhookEndpoint(BaseModel):
    """Where a tenant's (or, without a tenant, the platform's) alerts are POSTed, signed.

    Secrets follow Standard Webhooks (`whsec_` + base64). They are kept in plain text because
    signing needs them; the API shows a secret once, when created or rotated. After a
    rotation the previous secret still signs until `previous_secret_expires_at`, so receivers
    can switch over without missing a delivery.
    """

    tenant = models.ForeignKey(
        "tenancy.Tenant",
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="+",
        help_text="Empty: a platform endpoint, which receives fleet alerts.",
    )
    name = models.CharField(max_length=100)
    url = models.URLField(
        max_length=2000,
        validators=[URLValidator(schemes=["http", "https"])],
        help_text="The http(s) URL webhooks are POSTed to.",
    )
    format = models.CharField(
        max_length=16, choices=WebhookFormat.choices, default=WebhookFormat.ALERTMANAGER
    )
    routing_key = models.CharField(
        max_length=64, blank=True, help_text="pagerduty: the integration's routing key."
    )
    enabled = models.BooleanField(default=True)
    disabled_reason = models.CharField(max_length=300, blank=True)
    allow_private_targets = models.BooleanField(
        default=False,
        help_text="Allow private, loopback and link-local addresses (platform admins only).",
    )
    secret = models.CharField(max_length=100, editable=False)
    previous_secret = models.CharField(max_length=100, blank=True, editable=False)
    previous_secret_expires_at = models.DateTimeField(null=True, blank=True, editable=False)
    secret_rotated_at = models.DateTimeField(null=True, blank=True, editable=False)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.UniqueConstraint(fields=["tenant", "name"], name="webhook_name_per_tenant")
        ]

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        if self.format == WebhookFormat.PAGERDUTY and not self.routing_key:
            raise ValidationError(
                {"routing_key": ["PagerDuty endpoints need the integration's routing key."]}
            )
        if self.format != WebhookFormat.PAGERDUTY and self.routing_key:
            raise ValidationError({"routing_key": ["Only PagerDuty endpoints take a routing key."]})

    def signing_secrets(self, now: datetime) -> list[str]:
        """The secrets that sign a delivery now: the current one, and the previous one
        during its grace period."""
        expires = self.previous_secret_expires_at
        if self.previous_secret and expires is not None and expires > now:
            return [self.secret, self.previous_secret]
        return [self.secret]


def group_labels(labels: dict[str, str], severity: str) -> dict[str, str]:
    """What alerts are grouped by (Alertmanager's `group_by`): an SLO's alerts by tenant,
    SLO and severity, so one incident is one page (and one ticket) however many of its
    alerts fire; any other alert is a group of its own."""
    if "slo" in labels:
        return {**{k: labels[k] for k in ("tenant", "slo") if k in labels}, "severity": severity}
    return dict(labels)


class NotificationGroup(BaseModel):
    """Alertmanager's aggregation group, per endpoint: the alerts sharing `labels` are
    notified together, the first time after the group wait, then at most every group
    interval while they change, and every repeat interval while any still fires.
    `notified` maps the alerts (ids) last sent to the state they were sent in."""

    endpoint = models.ForeignKey(
        WebhookEndpoint, on_delete=models.CASCADE, related_name="notification_groups"
    )
    key = models.CharField(max_length=16, editable=False)
    labels = models.JSONField(default=dict)
    notified_at = models.DateTimeField(null=True, blank=True)
    notified = models.JSONField(default=dict, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["endpoint", "key"], name="one_group_per_endpoint")
        ]

    def __str__(self) -> str:
        return f"{self.endpoint_id} {self.labels}"

    @property
    def firing_notified(self) -> bool:
        return any(state == AlertState.FIRING for state in self.notified.values())


class OutboxMessage(BaseModel):
    """One webhook for one endpoint, kept until sent. A group's message is rendered when it
    is first sent, with its group's alerts as they are then (`payload` stays empty until
    then); a test message is rendered at once.

    `webhook_id` stays the same across retries so receivers can drop duplicates: delivery
    is at least once.
    """

    endpoint = models.ForeignKey(WebhookEndpoint, on_delete=models.CASCADE, related_name="messages")
    alert = models.ForeignKey(
        Alert, on_delete=models.SET_NULL, null=True, blank=True, related_name="messages"
    )
    group = models.ForeignKey(
        NotificationGroup,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="messages",
    )
    event = models.CharField(max_length=8, choices=Event.choices)
    payload = models.JSONField(default=dict, blank=True)
    webhook_id = models.CharField(max_length=40, unique=True, editable=False)
    status = models.CharField(
        max_length=12, choices=MessageStatus.choices, default=MessageStatus.PENDING
    )
    attempts = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField(
        help_text="When it may be sent (again); while in flight, when its claim runs out."
    )
    delivered_at = models.DateTimeField(null=True, blank=True)
    last_error = models.CharField(max_length=500, blank=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["status", "next_attempt_at"])]

    def __str__(self) -> str:
        return self.webhook_id


class DeliveryAttempt(BaseModel):
    """One try at sending a message: what the receiver answered, or why nothing was sent."""

    message = models.ForeignKey(OutboxMessage, on_delete=models.CASCADE, related_name="deliveries")
    started_at = models.DateTimeField()
    status_code = models.PositiveIntegerField(null=True, blank=True)
    error = models.CharField(max_length=500, blank=True)
    response_excerpt = models.CharField(max_length=1000, blank=True)
    duration = models.DurationField()

    class Meta:
        ordering = ["-started_at"]

    @property
    def duration_s(self) -> float:
        return self.duration.total_seconds()

    def __str__(self) -> str:
        return f"{self.message_id} @ {self.started_at:%Y-%m-%d %H:%M:%S}: {self.status_code or self.error}"
