"""Rollup retention and gauge compaction, run by beat (see tasks.py)."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime, timedelta
from uuid import UUID

from django.db import transaction

from controlplane.telemetry.choices import RETENTION, Resolution
from controlplane.telemetry.models import CounterRollup, GaugeRollup, LatencyRollup, SloRollup
from controlplane.telemetry.pipeline.merge import GaugeStats, bucket_of, fold_gauge


def prune_rollups(now: datetime | None = None) -> int:
    """Delete rollups past their resolution's retention; returns how many rows went."""
    now = now or datetime.now(UTC)
    deleted = 0
    for resolution, keep in RETENTION.items():
        for model in (LatencyRollup, SloRollup, CounterRollup, GaugeRollup):
            count, _ = model.objects.filter(resolution=resolution, bucket__lt=now - keep).delete()
            deleted += count
    return deleted


COMPACTION_LOOKBACK = {
    Resolution.ONE_MINUTE: timedelta(minutes=10),
    Resolution.ONE_HOUR: timedelta(hours=2),
}
"""How far back each run re-derives coarse gauge rows; beat runs it every minute."""


def compact_gauges(now: datetime | None = None) -> int:
    """Fold closed 10 s gauge rows into 1 min rows, and those into 1 h rows.

    Gauges are merged into 10 s rows only at ingest (one row per node per flush instead of
    three); the coarser rows are derived here and recomputed whole, so a rerun is harmless.
    """
    now = now or datetime.now(UTC)
    written = 0
    for fine, coarse in (
        (Resolution.TEN_SECONDS, Resolution.ONE_MINUTE),
        (Resolution.ONE_MINUTE, Resolution.ONE_HOUR),
    ):
        end = bucket_of(now, int(coarse))  # closed coarse buckets only
        start = bucket_of(end - COMPACTION_LOOKBACK[coarse], int(coarse))
        merged: dict[tuple[datetime, UUID], dict[str, GaugeStats]] = defaultdict(dict)
        for row in GaugeRollup.objects.filter(
            resolution=fine, bucket__gte=start, bucket__lt=end
        ).order_by("bucket"):
            target = merged[(bucket_of(row.bucket, int(coarse)), row.node_id)]
            for key, stats in row.values.items():
                fold_gauge(target, key, stats)
        with transaction.atomic():
            GaugeRollup.objects.filter(
                resolution=coarse, bucket__gte=start, bucket__lt=end
            ).delete()
            GaugeRollup.objects.bulk_create(
                [
                    GaugeRollup(resolution=coarse, bucket=b, node_id=n, values=v)
                    for (b, n), v in merged.items()
                ],
                batch_size=500,
            )
        written += len(merged)
    return written
