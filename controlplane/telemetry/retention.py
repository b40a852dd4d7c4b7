"""Rollup retention, shard folding and gauge compaction, run by beat (see tasks.py)."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime, timedelta
from uuid import UUID

from django.db import transaction
from django.db.models import Q

from controlplane.telemetry.choices import RETENTION, Resolution
from controlplane.telemetry.models import CounterRollup, GaugeRollup, LatencyRollup, SloRollup
from controlplane.telemetry.pipeline import store
from controlplane.telemetry.pipeline.merge import GaugeStats, Rollups, bucket_of, fold_gauge
from controlplane.telemetry.services import SHARDS, hold_shard
from dataplane.sketch import SketchSum


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


FOLD_AFTER = timedelta(minutes=2)
"""A bucket's shard rows are folded this long after it closed; a batch arriving later (a
node's backfill) writes a row in its flush's shard again, folded on a later run."""


def fold_shards(now: datetime | None = None) -> int:
    """Fold the rows ingest shards wrote for closed buckets into shard 0; returns how many
    rows went.

    Concurrent flushes write a bucket into as many rows as there are shards, which every
    reader merges; once the bucket is closed one row is enough. Each shard is folded in its
    own transaction holding its lock and shard 0's (flushes meanwhile take other shards), by
    writing its rows into shard 0 the way a flush writes, so sketches merge and counts add
    exactly as at ingest.
    """
    now = now or datetime.now(UTC)
    closed = Q()
    for resolution in Resolution:
        ends_before = now - FOLD_AFTER - timedelta(seconds=int(resolution))
        closed |= Q(resolution=resolution, bucket__lt=ends_before)
    folded = 0
    for shard in range(1, SHARDS):
        with transaction.atomic():
            hold_shard(0)
            hold_shard(shard)
            folded += _fold(shard, closed)
    return folded


def _fold(shard: int, closed: Q) -> int:
    latency = LatencyRollup.objects.filter(closed, shard=shard)
    slo = SloRollup.objects.filter(closed, shard=shard)
    counters = CounterRollup.objects.filter(closed, shard=shard)
    rollups = Rollups(latency={}, slo={}, counters={}, gauges={})
    for row in latency:
        summed = SketchSum()
        summed.add_bytes(bytes(row.sketch))
        key = (row.resolution, row.bucket, row.tenant_id, row.deployment_id, row.metric)
        rollups.latency[key] = summed
    for s in slo:
        rollups.slo[(s.resolution, s.bucket, s.slo_id, s.deployment_id, s.threshold_seconds)] = [
            s.tenant_id,
            s.metric,
            s.threshold_seconds,
            s.good,
            s.total,
        ]
    for c in counters:
        rollups.counters[(c.resolution, c.bucket, c.tenant_id, c.deployment_id, c.name)] = c.value
    store.write_rollups(rollups, 0)
    return sum(rows.delete()[0] for rows in (latency, slo, counters))
