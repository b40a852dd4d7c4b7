"""What an SLO measures, over what it is scoped, and the time windows it is judged over."""

from __future__ import annotations

from django.db import models


class Sli(models.TextChoices):
    """The indicator: a latency bound per request, or availability (the non-error ratio)."""

    TTFT = "ttft", "time to first token"
    TPOT = "tpot", "time per output token"
    ITL = "itl", "inter-token latency"
    E2E = "e2e", "end-to-end latency"
    AVAILABILITY = "availability", "availability (non-error ratio)"
    STORAGE_READ = "storage_read", "storage read latency"


class MeasuredAt(models.TextChoices):
    """Where an SLO's requests are counted: as the worker served them, or as clients saw
    them through their node's gateway (its queueing included)."""

    WORKER = "worker", "at the worker"
    GATEWAY = "gateway", "at the gateway"


class Scope(models.TextChoices):
    DEPLOYMENT = "deployment", "one deployment"
    MODEL = "model", "every deployment serving a model name"
    TENANT = "tenant", "all of the tenant's deployments"


class Window(models.TextChoices):
    ROLLING_7D = "rolling_7d", "rolling 7 days"
    ROLLING_28D = "rolling_28d", "rolling 28 days"
    ROLLING_30D = "rolling_30d", "rolling 30 days"
    CALENDAR_MONTH = "calendar_month", "calendar month"


ROLLING_DAYS = {Window.ROLLING_7D: 7, Window.ROLLING_28D: 28, Window.ROLLING_30D: 30}


class AlertName(models.TextChoices):
    """The `alertname` label of the alerts SLO evaluation fires."""

    BURN_RATE_PAGE = "SLOBurnRatePage", "burning error budget fast"
    BURN_RATE_TICKET = "SLOBurnRateTicket", "burning error budget slowly"
    BUDGET_EXHAUSTED = "SLOErrorBudgetExhausted", "error budget exhausted"
    NO_DATA = "SLONoData", "no events although the deployment has replicas"
