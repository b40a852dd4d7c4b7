"""All alert and webhook mutations: alert states, endpoints and their secrets, the outbox,
and delivery.

Alert changes and their outbox messages are written in one transaction; sending starts
only after commit. Messages are grouped as Alertmanager groups notifications (group wait,
group interval, repeat interval; see `NotificationGroup`), so one incident is one
delivery per endpoint carrying its alerts. A message is sent by whoever claims it: the
claim moves its `next_attempt_at` past the longest a send can take (a lease), so a worker
killed mid-send leaves it to be claimed again once the lease runs out; a beat task
re-enqueues every due message, so nothing depends on a broker keeping a task. Delivery is at least once;
`webhook-id` lets receivers drop duplicates.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.db.models import Exists, F, OuterRef, Q
from django.utils import timezone
from tenacity import RetryCallState, Retrying, wait_exponential, wait_random_exponential

from controlplane.alerts import payloads, signing, targets
from controlplane.alerts.choices import AlertState, Event, MessageStatus, Severity, WebhookFormat
from controlplane.alerts.models import (
    Alert,
    DeliveryAttempt,
    NotificationGroup,
    OutboxMessage,
    WebhookEndpoint,
    fingerprint,
    group_labels,
)
from controlplane.celery import app as celery_app
from controlplane.core import services as core
from controlplane.core.secrets import Issued

log = logging.getLogger(__name__)

DELIVER_TASK = "alerts.deliver_message"
USER_AGENT = "Tailguard-Webhooks/1"
EXCERPT_BYTES = 1000
RETRY_AFTER_STATUSES = {429, 503}
TEST_LABELS = {"alertname": "TailguardWebhookTest"}


def _lease() -> timedelta:
    """How long a claimed message is left alone: longer than any one send can take."""
    return timedelta(seconds=2 * settings.ALERTS_DELIVERY_TIMEOUT_S + 5)


def _send_after_commit(message_ids: Iterable[Any], eta: datetime | None = None) -> None:
    """Enqueue deliveries (to run at `eta`, when given) once committed; a broker that is
    down then only delays them (the beat task finds them in the database)."""
    ids = [str(pk) for pk in message_ids]

    def send() -> None:
        _enqueue(ids, eta)

    if ids:
        transaction.on_commit(send, robust=True)


def _enqueue(ids: list[str], eta: datetime | None = None) -> None:
    with celery_app.producer_or_acquire() as producer:  # one connection for the batch
        for pk in ids:
            celery_app.send_task(DELIVER_TASK, args=[pk], producer=producer, eta=eta)


def _new_webhook_id() -> str:
    return f"msg_{uuid.uuid4().hex}"


# --- Endpoints ----------------------------------------------------------------------------


def _check_target(url: str, allow_private: bool) -> None:
    try:
        targets.resolve(url, allow_private=allow_private)
    except targets.RefusedTarget as exc:
        raise ValidationError({"url": [str(exc)]}) from None


def create_endpoint(
    *,
    tenant: Any,
    name: str,
    url: str,
    format: str = WebhookFormat.ALERTMANAGER,
    routing_key: str = "",
    enabled: bool = True,
    allow_private_targets: bool = False,
) -> Issued:
    """A new endpoint with a fresh signing secret, which the caller shows once."""
    endpoint = WebhookEndpoint(
        tenant=tenant,
        name=name,
        url=url,
        format=format,
        routing_key=routing_key,
        enabled=enabled,
        allow_private_targets=allow_private_targets,
        secret=signing.new_secret(),
    )
    endpoint.full_clean()
    _check_target(url, allow_private_targets)
    endpoint.save()
    return Issued(endpoint, endpoint.secret)


@transaction.atomic
def update_endpoint(endpoint: WebhookEndpoint, **changes: Any) -> WebhookEndpoint:
    """Change an endpoint; a new URL is checked again, and disabling stops its pending
    messages."""
    enabled = changes.pop("enabled", endpoint.enabled)
    for name, value in changes.items():
        setattr(endpoint, name, value)
    endpoint.full_clean()
    if {"url", "allow_private_targets"} & changes.keys():
        _check_target(endpoint.url, endpoint.allow_private_targets)
    endpoint.save()
    if enabled and not endpoint.enabled:
        core.update(endpoint, enabled=True, disabled_reason="")
    elif not enabled and endpoint.enabled:
        disable_endpoint(endpoint, "Disabled through the API.")
    return endpoint


def delete_endpoint(endpoint: WebhookEndpoint) -> None:
    endpoint.delete()


@transaction.atomic
def disable_endpoint(endpoint: WebhookEndpoint, reason: str) -> None:
    """Stop sending to an endpoint: its pending messages fail with the reason, unsent."""
    endpoint.enabled = False
    endpoint.disabled_reason = reason[:300]
    endpoint.save(update_fields=["enabled", "disabled_reason", "updated_at"])
    _fail_pending(endpoint, reason)


def _fail_pending(endpoint: WebhookEndpoint, reason: str) -> None:
    OutboxMessage.objects.filter(endpoint=endpoint, status=MessageStatus.PENDING).update(
        status=MessageStatus.FAILED,
        last_error=f"Not sent: the endpoint was disabled. {reason}"[:500],
        updated_at=timezone.now(),
    )


def rotate_secret(endpoint: WebhookEndpoint, *, now: datetime | None = None) -> Issued:
    """A new current secret; the old one keeps signing for ALERTS_SECRET_GRACE_S.

    Only two secrets are ever valid: rotating again within the grace period drops the
    oldest one at once.
    """
    now = now or timezone.now()
    new = signing.new_secret()
    WebhookEndpoint.objects.filter(pk=endpoint.pk).update(
        previous_secret=F("secret"),
        previous_secret_expires_at=now + timedelta(seconds=settings.ALERTS_SECRET_GRACE_S),
        secret=new,
        secret_rotated_at=now,
        updated_at=now,
    )
    endpoint.refresh_from_db()
    return Issued(endpoint, new)


@transaction.atomic
def send_test(endpoint: WebhookEndpoint) -> OutboxMessage:
    """Queue a made-up firing alert (alertname TailguardWebhookTest, severity info) to the
    endpoint, through the same outbox, signing and retries as real alerts."""
    if not endpoint.enabled:
        raise ValidationError(
            f"Endpoint {endpoint.name} is disabled ({endpoint.disabled_reason}); enable it first."
        )
    now = timezone.now()
    sample = Alert(
        tenant_id=endpoint.tenant_id,
        labels=TEST_LABELS,
        annotations={"summary": f"Test delivery to webhook endpoint {endpoint.name}."},
        fingerprint=fingerprint(TEST_LABELS),
        severity=Severity.INFO,
        state=AlertState.FIRING,
        starts_at=now,
        last_evaluated_at=now,
    )
    message = OutboxMessage.objects.create(
        endpoint=endpoint,
        event=Event.TEST,
        payload=payloads.render(endpoint, sample),
        webhook_id=_new_webhook_id(),
        next_attempt_at=now,
    )
    _send_after_commit([message.pk])
    return message


# --- Alerts -------------------------------------------------------------------------------


def _notify(alert: Alert, now: datetime) -> None:
    """Tell every enabled endpoint of the alert's tenant (platform endpoints for fleet
    alerts) through the alert's group there: a group message still waiting to be sent
    takes the change along; otherwise a new one is due after the group wait (nothing of
    the group fires as last notified) or the group interval since the last notification."""
    labels = group_labels(alert.labels, alert.severity)
    key = fingerprint(labels)
    for endpoint in WebhookEndpoint.objects.filter(tenant=alert.tenant_id, enabled=True):
        group, _ = NotificationGroup.objects.select_for_update().get_or_create(
            endpoint=endpoint, key=key, defaults={"labels": labels}
        )
        if group.messages.filter(status=MessageStatus.PENDING, attempts=0).exists():
            continue
        if group.firing_notified and group.notified_at is not None:
            interval = timedelta(seconds=settings.ALERTS_GROUP_INTERVAL_S)
            due = max(now, group.notified_at + interval)
        else:
            due = now + timedelta(seconds=settings.ALERTS_GROUP_WAIT_S)
        _queue_group(group, alert, due)


def _queue_group(group: NotificationGroup, alert: Alert | None, due: datetime) -> None:
    message = OutboxMessage.objects.create(
        endpoint=group.endpoint,
        group=group,
        alert=alert,
        event=Event.FIRING if alert is None else alert.state,
        webhook_id=_new_webhook_id(),
        next_attempt_at=due,
    )
    _send_after_commit([message.pk], eta=due)


def _render_group(message: OutboxMessage, now: datetime) -> bool:
    """Render a group's message as its first send starts, with the annotations of its
    alerts as they are now: every alert firing now, every one last notified firing that has
    resolved since, and any that fired and resolved in between. False when there is
    nothing to tell (the message is dropped)."""
    with transaction.atomic():
        group = NotificationGroup.objects.select_for_update().get(pk=message.group_id)
        since = group.notified_at or message.created_at
        labels = dict(group.labels)
        severity = labels.pop("severity") if "slo" in labels else None  # a key, not a label
        candidates = Alert.objects.filter(
            tenant=message.endpoint.tenant_id,
            **{f"labels__{name}": value for name, value in labels.items()},
        )
        if severity is not None:  # an SLO's alerts of one severity, whatever else they carry
            candidates = candidates.filter(severity=severity)
        candidates = candidates.filter(
            Q(state=AlertState.FIRING) | Q(ends_at__gte=since) | Q(pk__in=group.notified)
        )
        alerts = [
            alert
            for alert in candidates.order_by("starts_at")
            # any other group is one alert's exact labels, not every alert carrying them
            if (severity is not None or alert.labels == labels)
            and (
                alert.state == AlertState.FIRING
                or group.notified.get(str(alert.pk), AlertState.FIRING) == AlertState.FIRING
            )
        ]
        if not alerts:
            message.delete()
            return False
        message.payload = payloads.render_group(message.endpoint, alerts, group.labels)
        message.event = payloads.group_status(alerts)
        message.save(update_fields=["payload", "event", "updated_at"])
        group.notified_at = now
        group.notified = {str(a.pk): a.state for a in alerts}
        group.save(update_fields=["notified_at", "notified", "updated_at"])
    return True


@transaction.atomic
def sync_alert(
    *,
    tenant: Any,
    labels: dict[str, str],
    annotations: dict[str, str],
    severity: str,
    firing: bool,
    now: datetime | None = None,
) -> Alert | None:
    """Make the alert with these labels firing or not; idempotent, so evaluators call it
    on every evaluation.

    Firing where nothing fires opens an episode and notifies every endpoint (grouped, see
    `_notify`); not firing where one fires resolves it and notifies them again; otherwise
    only the evaluation time and annotations are kept, so a notification sent later
    carries the values of its sending time. Returns the alert concerned, or None when
    nothing fires and nothing did. `tenant` None is a fleet alert: platform admins and
    platform endpoints only.
    """
    if not labels or not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise ValidationError({"labels": ["A non-empty mapping of strings to strings."]})
    if severity not in Severity.values:
        raise ValidationError({"severity": [f"One of {', '.join(Severity.values)}."]})
    now = now or timezone.now()
    key = fingerprint(labels)
    alert = (
        Alert.objects.select_for_update()
        .filter(tenant=tenant, fingerprint=key, state=AlertState.FIRING)
        .first()
    )
    if alert is not None:
        alert.annotations = annotations
        alert.last_evaluated_at = now
        if firing:
            alert.save(update_fields=["annotations", "last_evaluated_at", "updated_at"])
            return alert
        alert.state = AlertState.RESOLVED
        alert.ends_at = now
        alert.save()
        _notify(alert, now)
        return alert
    if not firing:
        return None
    try:
        with transaction.atomic():
            alert = Alert.objects.create(
                tenant=tenant,
                fingerprint=key,
                labels=labels,
                annotations=annotations,
                severity=severity,
                state=AlertState.FIRING,
                starts_at=now,
                last_evaluated_at=now,
            )
    except IntegrityError:  # another evaluator opened it a moment ago; it notified
        return Alert.objects.get(tenant=tenant, fingerprint=key, state=AlertState.FIRING)
    _notify(alert, now)
    return alert


# --- Delivery -----------------------------------------------------------------------------


def enqueue_due_messages(*, limit: int = 1000, now: datetime | None = None) -> int:
    """Send a delivery task for every pending message that is due (beat runs this), after
    queueing a repeat for every group still firing that was last notified a repeat
    interval ago.

    A message already queued may be queued again; the claim in `deliver` makes the extra
    task a no-op.
    """
    now = now or timezone.now()
    _queue_repeats(now)
    ids = [
        str(pk)
        for pk in OutboxMessage.objects.filter(
            status=MessageStatus.PENDING, next_attempt_at__lte=now
        )
        .order_by("next_attempt_at")
        .values_list("pk", flat=True)[:limit]
    ]
    if ids:
        _enqueue(ids)
    return len(ids)


@transaction.atomic
def _queue_repeats(now: datetime) -> None:
    waiting = OutboxMessage.objects.filter(group=OuterRef("pk"), status=MessageStatus.PENDING)
    stale = (
        NotificationGroup.objects.select_for_update(skip_locked=True)
        .filter(
            endpoint__enabled=True,
            notified_at__lte=now - timedelta(seconds=settings.ALERTS_REPEAT_INTERVAL_S),
        )
        .exclude(Exists(waiting))
        .select_related("endpoint")
    )
    for group in stale:
        if group.firing_notified:
            _queue_group(group, None, now)


def _claim(message_id: Any, now: datetime) -> bool:
    """Take a due message for one send, unless an older message of the same group to the
    same endpoint is still pending (a resolve must not overtake its trigger)."""
    older_pending = OutboxMessage.objects.filter(
        endpoint=OuterRef("endpoint"),
        group=OuterRef("group"),
        status=MessageStatus.PENDING,
        created_at__lt=OuterRef("created_at"),
    )
    return bool(
        OutboxMessage.objects.filter(
            pk=message_id, status=MessageStatus.PENDING, next_attempt_at__lte=now
        )
        .exclude(Exists(older_pending))
        .update(attempts=F("attempts") + 1, next_attempt_at=now + _lease(), updated_at=now)
    )


def _post(
    endpoint: WebhookEndpoint, message: OutboxMessage, started: datetime
) -> tuple[DeliveryAttempt, str | None]:
    """Send once: the attempt (what came back, or why nothing was sent) and Retry-After."""
    body = json.dumps(payloads.with_secrets(endpoint, message.payload), separators=(",", ":"))
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        **signing.signature_headers(
            webhook_id=message.webhook_id,
            timestamp=started,
            body=body,
            secrets=endpoint.signing_secrets(started),
        ),
    }
    attempt = DeliveryAttempt(message=message, started_at=started)
    retry_after = None
    clock = time.monotonic()
    try:
        address = targets.resolve(endpoint.url, allow_private=endpoint.allow_private_targets)[0]
        pinned = targets.pin(endpoint.url, address)
        timeout = settings.ALERTS_DELIVERY_TIMEOUT_S
        with (
            httpx.Client(timeout=timeout, follow_redirects=False) as client,
            client.stream(
                "POST",
                pinned.url,
                content=body.encode(),
                headers={**headers, **pinned.headers},
                extensions=pinned.extensions,
            ) as response,
        ):
            excerpt = b""
            for chunk in response.iter_bytes():
                excerpt += chunk
                if len(excerpt) >= EXCERPT_BYTES:
                    break
            attempt.status_code = response.status_code
            attempt.response_excerpt = excerpt[:EXCERPT_BYTES].decode(errors="replace")
            retry_after = response.headers.get("Retry-After")
    except targets.RefusedTarget as exc:
        attempt.error = f"Refused to send: {exc}"[:500]
    except httpx.HTTPError as exc:
        attempt.error = f"{type(exc).__name__}: {exc or 'no detail'}"[:500]
    attempt.duration = timedelta(seconds=time.monotonic() - clock)
    return attempt, retry_after


def retry_at(header: str | None, received: datetime) -> datetime | None:
    """When Retry-After (seconds or an HTTP date) asks to be called again, capped at
    ALERTS_RETRY_AFTER_MAX_S; None when absent or unreadable."""
    if not header:
        return None
    latest = received + timedelta(seconds=settings.ALERTS_RETRY_AFTER_MAX_S)
    value = header.strip()
    if value.isdigit():
        return min(received + timedelta(seconds=int(value)), latest)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return min(max(when, received), latest)


def backoff(attempts: int) -> timedelta:
    """Exponential from ALERTS_BACKOFF_BASE_S, capped at ALERTS_BACKOFF_MAX_S, with jitter
    (half to all of it) so receivers coming back are not hit by every sender at once.

    The next attempt is a later Celery run, so tenacity's wait strategies only compute the
    delay: a fixed half plus a random half of the exponential step."""
    half, cap = settings.ALERTS_BACKOFF_BASE_S / 2, settings.ALERTS_BACKOFF_MAX_S / 2
    wait = wait_exponential(multiplier=half, max=cap) + wait_random_exponential(
        multiplier=half, max=cap
    )
    state = RetryCallState(Retrying(), fn=None, args=(), kwargs={})
    state.attempt_number = attempts
    return timedelta(seconds=wait(state))


def deliver(message_id: Any) -> str:
    """Send one message if it is due and nobody else is sending it; record the attempt and
    what follows: delivered, retried later, endpoint disabled (410 Gone) or given up."""
    started = timezone.now()
    if not _claim(message_id, started):
        return "not due"
    message = OutboxMessage.objects.select_related("endpoint").get(pk=message_id)
    endpoint = message.endpoint
    if not endpoint.enabled:  # disabled after this message was claimed
        _fail_pending(endpoint, endpoint.disabled_reason)
        return MessageStatus.FAILED
    unrendered = message.group_id is not None and not message.payload
    if unrendered and not _render_group(message, started):
        return "nothing to send"
    attempt, retry_after = _post(endpoint, message, started)
    received = started + attempt.duration
    code = attempt.status_code
    with transaction.atomic():
        attempt.save()
        if code is not None and 200 <= code < 300:
            message.status = MessageStatus.DELIVERED
            message.delivered_at = received
            message.last_error = ""
        elif code == 410:
            disable_endpoint(
                endpoint,
                f"The receiver answered 410 Gone at {received:%Y-%m-%d %H:%M:%S} UTC.",
            )
            return MessageStatus.FAILED
        else:
            message.last_error = (attempt.error or f"HTTP {code}: {attempt.response_excerpt}")[:500]
            if message.attempts >= settings.ALERTS_MAX_ATTEMPTS:
                message.status = MessageStatus.DEAD
                log.warning("Webhook %s gave up after %d attempts", message, message.attempts)
            else:
                asked = retry_at(retry_after, received) if code in RETRY_AFTER_STATUSES else None
                message.next_attempt_at = asked or received + backoff(message.attempts)
        message.save(
            update_fields=["status", "delivered_at", "last_error", "next_attempt_at", "updated_at"]
        )
    return message.status
