"""Webhook bodies in the shapes receivers already understand.

- Alertmanager webhook v4: what Alertmanager POSTs to its webhook receivers, so existing
  receivers work unchanged. Each message carries one group's alerts (see `group_labels`).
- Slack incoming webhook: `text` (notifications, fallbacks) plus Block Kit `blocks`.
- PagerDuty Events API v2: trigger and resolve, deduplicated by the alert's fingerprint
  (the group's, for a group of several).
  The routing key is added at send time, so it is never stored in a message or listed.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.conf import settings

from controlplane.alerts.choices import AlertState, Severity, WebhookFormat
from controlplane.alerts.models import Alert, WebhookEndpoint, fingerprint

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


def group_status(alerts: list[Alert]) -> str:
    """A group fires while any of its alerts does."""
    firing = any(a.state == AlertState.FIRING for a in alerts)
    return AlertState.FIRING if firing else AlertState.RESOLVED


def _common(mappings: list[dict[str, str]]) -> dict[str, str]:
    first, *rest = mappings
    return {k: v for k, v in first.items() if all(m.get(k) == v for m in rest)}


def alertmanager(
    endpoint: WebhookEndpoint, alerts: list[Alert], group: dict[str, str]
) -> dict[str, Any]:
    return {
        "version": "4",
        "groupKey": f"{{}}:{_label_set(group)}",
        "truncatedAlerts": 0,
        "status": group_status(alerts),
        "receiver": endpoint.name,
        "groupLabels": dict(group),
        "commonLabels": _common([a.labels for a in alerts]),
        "commonAnnotations": _common([a.annotations for a in alerts]),
        "externalURL": settings.PUBLIC_URL,
        "alerts": [
            {
                "status": alert.state,
                "labels": dict(alert.labels),
                "annotations": dict(alert.annotations),
                "startsAt": _time(alert.starts_at),
                "endsAt": _time(alert.ends_at),
                "generatorURL": alert_url(alert),
                "fingerprint": alert.fingerprint,
            }
            for alert in alerts
        ],
    }


def slack(endpoint: WebhookEndpoint, alerts: list[Alert], group: dict[str, str]) -> dict[str, Any]:
    status = "FIRING" if group_status(alerts) == AlertState.FIRING else "RESOLVED"
    if len(alerts) == 1:
        alert = alerts[0]
        headline = f"[{status}] {alert.name} ({alert.severity}): {_summary(alert)}"
    else:
        firing = sum(a.state == AlertState.FIRING for a in alerts)
        headline = f"[{status}:{firing}] {_label_set(group)}: {len(alerts)} alerts"
    blocks: list[dict[str, Any]] = [
        {"type": "section", "text": {"type": "mrkdwn", "text": f"*{headline}*"}}
    ]
    for alert in alerts:
        labels = ", ".join(f"`{k}={v}`" for k, v in sorted(alert.labels.items()))
        if len(alerts) > 1:
            labels = f"{alert.state}: {_summary(alert)}\n{labels}"
        blocks += [
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
        ]
    return {"text": headline, "blocks": blocks}


def pagerduty(
    endpoint: WebhookEndpoint, alerts: list[Alert], group: dict[str, str]
) -> dict[str, Any]:
    """One event per group, deduplicated by the group (Alertmanager's PagerDuty receiver
    does the same): triggered while any alert fires, resolved when none does. The key is
    the group's whatever it holds, so a resolve always closes the incident its trigger
    opened."""
    dedup_key = fingerprint(group)
    firing = [a for a in alerts if a.state == AlertState.FIRING]
    if not firing:
        return {"event_action": "resolve", "dedup_key": dedup_key}
    worst = min(firing, key=lambda a: list(Severity.values).index(a.severity))
    return {
        "event_action": "trigger",
        "dedup_key": dedup_key,
        "payload": {
            "summary": "; ".join(_summary(a) for a in firing)[:PAGERDUTY_SUMMARY_MAX],
            "source": str(worst.labels.get("instance") or worst.labels.get("node") or "tailguard"),
            "severity": PAGERDUTY_SEVERITY[Severity(worst.severity)],
            "timestamp": _time(min(a.starts_at for a in firing)),
            "custom_details": {
                "labels": worst.labels,
                "annotations": worst.annotations,
                "alerts": [{"labels": a.labels, "annotations": a.annotations} for a in alerts]
                if len(alerts) > 1
                else [],
            },
        },
        "links": [{"href": alert_url(a), "text": "Alert in Tailguard"} for a in firing],
    }


RENDERERS = {
    WebhookFormat.ALERTMANAGER: alertmanager,
    WebhookFormat.SLACK: slack,
    WebhookFormat.PAGERDUTY: pagerduty,
}


def render(endpoint: WebhookEndpoint, alert: Alert) -> dict[str, Any]:
    """The body for `endpoint` describing one alert as it is now (a group of its own)."""
    return render_group(endpoint, [alert], alert.labels)


def render_group(
    endpoint: WebhookEndpoint, alerts: list[Alert], group: dict[str, str]
) -> dict[str, Any]:
    """The body for `endpoint` describing a group's alerts as they are now."""
    return RENDERERS[WebhookFormat(endpoint.format)](endpoint, alerts, group)


def with_secrets(endpoint: WebhookEndpoint, payload: dict[str, Any]) -> dict[str, Any]:
    """The body as sent: PagerDuty's routing key joins it only now."""
    if endpoint.format == WebhookFormat.PAGERDUTY:
        return {"routing_key": endpoint.routing_key, **payload}
    return payload
