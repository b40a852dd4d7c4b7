"""Rollup resolutions and how long each is kept."""

from __future__ import annotations

from datetime import timedelta

from django.db import models


class Resolution(models.IntegerChoices):
    """Bucket width in seconds; every batch is merged into all three at ingest."""

    TEN_SECONDS = 10, "10 s"
    ONE_MINUTE = 60, "1 min"
    ONE_HOUR = 3600, "1 h"


RETENTION: dict[int, timedelta] = {
    Resolution.TEN_SECONDS: timedelta(days=2),
    Resolution.ONE_MINUTE: timedelta(days=35),
    Resolution.ONE_HOUR: timedelta(days=400),
}


class LatencyMetric(models.TextChoices):
    TTFT = "ttft", "time to first token"
    TPOT = "tpot", "time per output token"
    ITL = "itl", "inter-token latency"
    E2E = "e2e", "end-to-end latency"
    QUEUE = "queue", "queue time"
    STORAGE_READ = "storage_read", "storage read latency"
