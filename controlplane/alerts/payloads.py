"""Webhook bodies in the shapes receivers already understand.

- Alertmanager webhook v4: what Alertmanager POSTs to its webhook receivers, so existing
  receivers work unchanged. Each message carries one alert, grouped by all of its labels.
- Slack incoming webhook: `text` (notifications, fallbacks) plus Block Kit `blocks`.
- PagerDuty Events API v2: trigger and resolve, deduplicated by the alert's fingerprint.
  The routing key is added at send time, so it is never stored in a message or listed.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.conf import settings

from controlplane.alerts.choices import AlertState, Severity, WebhookFormat
from controlplane.alerts.models import Alert, WebhookEndpoint

ZERO_TIME = "0001-01-01T00:00:00Z"  # Alertmanager's endsAt for alerts still firing
PAGERDUTY_SEVERITY = {
    Severity.PAGE: "critical",
    Severity.TICKET: "warning",
    Severity.INFO: "info",
}
PAGERDUTY_SUMMARY_MAX = 1024


def _time(value: datetime | None) -> str:
    return ZERO_TIME if value is None else value.isoformat().replace("+00:00", "Z")


def _label_set(labels: dict[str, str]) -> str:
    """Prometheus' text form of a label set, as in Alertmanager group keys."""
    return "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


def _summary(alert: Alert) -> str:
    text = alert.annotations.get("summary") or alert.annotations.get("description")
    return str(text or f"{alert.name} {_label_set(alert.labels)}")


def alert_url(alert: Alert) -> str:
    return f"{settings.PUBLIC_URL.rstrip('/')}/api/v1/alerts/{alert.pk}/"


def alertmanager(endpoint: WebhookEndpoint, alert: Alert) -> dict[str, Any]:
    labels = dict(alert.labels)
    return {
        "version": "4",
        "groupKey": f"{{}}:{_label_set(labels)}",
        "truncatedAlerts": 0,
        "status": alert.state,
        "receiver": endpoint.name,
        "groupLabels": labels,
        "commonLabels": labels,
        "commonAnnotations": dict(alert.annotations),
        "externalURL": settings.PUBLIC_URL,
        "alerts": [
            {
                "status": alert.state,
                "labels": labels,
                "annotations": dict(alert.annotations),
                "startsAt": _time(alert.starts_at),
                "endsAt": _time(alert.ends_at),
                "generatorURL": alert_url(alert),
                "fingerprint": alert.fingerprint,
            }
        ],
    }


def slack(endpoint: WebhookEndpoint, alert: Alert) -> dict[str, Any]:
    status = "FIRING" if alert.state == AlertState.FIRING else "RESOLVED"
    headline = f"[{status}] {alert.name} ({alert.severity}): {_summary(alert)}"
    labels = ", ".join(f"`{k}={v}`" for k, v in sorted(alert.labels.items()))
    return {
        "text": headline,
        "blocks": [
            {"type": "section", "text": {"type": "mrkdwn", "text": f"*{headline}*"}},
            {"type": "section", "text": {"type": "mrkdwn", "text": labels or "(no labels)"}},
            {
                "type": "context",
                "elements": [
                    {
                        "type": "mrkdwn",
                        "text": f"since {_time(alert.starts_at)} · <{alert_url(alert)}|details>",
                    }
                ],
            },
        ],
    }


def pagerduty(endpoint: WebhookEndpoint, alert: Alert) -> dict[str, Any]:
    if alert.state == AlertState.RESOLVED:
        return {"event_action": "resolve", "dedup_key": alert.fingerprint}
    return {
        "event_action": "trigger",
        "dedup_key": alert.fingerprint,
        "payload": {
            "summary": _summary(alert)[:PAGERDUTY_SUMMARY_MAX],
            "source": str(alert.labels.get("instance") or alert.labels.get("node") or "tailguard"),
            "severity": PAGERDUTY_SEVERITY[Severity(alert.severity)],
            "timestamp": _time(alert.starts_at),
            "custom_details": {"labels": alert.labels, "annotations": alert.annotations},
        },
        "links": [{"href": alert_url(alert), "text": "Alert in Tailguard"}],
    }


RENDERERS = {
    WebhookFormat.ALERTMANAGER: alertmanager,
    WebhookFormat.SLACK: slack,
    WebhookFormat.PAGERDUTY: pagerduty,
}


def render(endpoint: WebhookEndpoint, alert: Alert) -> dict[str, Any]:
    """The body for `endpoint` describing `alert` as it is now (firing or resolved)."""
    return RENDERERS[WebhookFormat(endpoint.format)](endpoint, alert)


def with_secrets(endpoint: WebhookEndpoint, payload: dict[str, Any]) -> dict[str, Any]:
    """The body as sent: PagerDuty's routing key joins it only now."""
    if endpoint.format == WebhookFormat.PAGERDUTY:
        return {"routing_key": endpoint.routing_key, **payload}
    return payload
