from django.db import models


class Severity(models.TextChoices):
    PAGE = "page", "Page (wake someone up)"
    TICKET = "ticket", "Ticket (look at it in working hours)"
    INFO = "info", "Info"


class AlertState(models.TextChoices):
    FIRING = "firing", "Firing"
    RESOLVED = "resolved", "Resolved"


class WebhookFormat(models.TextChoices):
    ALERTMANAGER = "alertmanager", "Alertmanager webhook (v4 JSON)"
    SLACK = "slack", "Slack incoming webhook"
    PAGERDUTY = "pagerduty", "PagerDuty Events API v2"


class Event(models.TextChoices):
    FIRING = "firing", "Firing"
    RESOLVED = "resolved", "Resolved"
    TEST = "test", "Test (sent on request)"


class MessageStatus(models.TextChoices):
    PENDING = "pending", "Pending (waiting for its next attempt)"
    DELIVERED = "delivered", "Delivered"
    FAILED = "failed", "Failed (its endpoint was disabled; not sent)"
    DEAD = "dead", "Dead (gave up after the last attempt)"
