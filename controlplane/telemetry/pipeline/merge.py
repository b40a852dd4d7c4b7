"""Step 3: a flush's authorized batches summed into rollup rows, nothing written yet.

A batch lands in the bucket holding the midpoint of its interval. Everything is summed at
10 s first (one sketch sum per series), then those sums are folded into 1 min and 1 h, so
a flush of many batches costs one merge per series and resolution.
"""

from __future__ import annotations

import base64
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from agent.protocol import TelemetryBatch
from controlplane.telemetry.choices import Resolution
from dataplane.sketch import CheckedSketch, SketchSum

USAGE_FIELDS = ("completed", "failed", "rejected", "cancelled", "input_tokens", "output_tokens")

GaugeStats = list[float]
"""[sum, count, min, max, last]"""

GaugeBuckets = dict[tuple[datetime, UUID], dict[str, GaugeStats]]
"""Gauges per (10 s bucket start, node)."""


def bucket_of(when: datetime, resolution: int) -> datetime:
    """The start of the bucket `when` falls in (UTC, aligned to the resolution)."""
    return datetime.fromtimestamp(math.floor(when.timestamp() / resolution) * resolution, UTC)


def midpoint(batch: TelemetryBatch) -> datetime:
    return batch.interval_start + (batch.interval_end - batch.interval_start) / 2


def fold_reading(into: dict[str, GaugeStats], gauges: dict[str, float]) -> None:
    """Fold one batch's gauge values in, each a bucket of one reading (`fold_gauge`,
    written out: this runs for every gauge of every batch)."""
    for key, value in gauges.items():
        have = into.get(key)
        if have is None:
            into[key] = [value, 1, value, value, value]
            continue
        have[0] += value
        have[1] += 1
        if value < have[2]:
            have[2] = value
        if value > have[3]:
            have[3] = value
        have[4] = value


def fold_gauge(into: dict[str, GaugeStats], key: str, stats: GaugeStats) -> None:
    have = into.get(key)
    if have is None:
        into[key] = list(stats)
        return
    have[0] += stats[0]
    have[1] += stats[1]
    have[2] = min(have[2], stats[2])
    have[3] = max(have[3], stats[3])
    have[4] = stats[4]


@dataclass
class Rollups:
    """One flush's worth of merged measurements, keyed as the rollup tables are."""

    latency: dict[tuple[int, datetime, UUID, UUID | None, str], SketchSum]
    slo: dict[tuple[int, datetime, UUID, UUID | None, float | None], list[Any]]
    counters: dict[tuple[int, datetime, UUID, UUID | None, str], int]
    gauges: GaugeBuckets

    @property
    def slo_ids(self) -> set[str]:
        return {str(key[2]) for key in self.slo}

    @classmethod
    def of(
        cls,
        batches: Sequence[TelemetryBatch],
        *,
        with_gauges: bool = True,
        decoded: Mapping[str, CheckedSketch] | None = None,
    ) -> Rollups:
        """Merge at 10 s first (one sum per series), then fold those into 1 min and 1 h;
        gauges too unless told not to (a GaugeBuffer will fold them). A sketch found in
        `decoded` (validation's, by base64 text) is not decoded again."""
        decoded = decoded or {}
        latency: dict[Any, SketchSum] = {}
        slo: dict[Any, list[Any]] = {}
        counters: dict[Any, int] = defaultdict(int)
        gauges: dict[Any, dict[str, GaugeStats]] = defaultdict(dict)
        ten = int(Resolution.TEN_SECONDS)
        for batch in batches:
            bucket = bucket_of(midpoint(batch), ten)
            for series in batch.series:
                key = (ten, bucket, series.tenant_id, series.deployment_id, series.metric)
                summed = latency.get(key)
                if summed is None:
                    summed = latency[key] = SketchSum()
                checked = decoded.get(series.sketch)
                if checked is None:
                    summed.add_bytes(base64.b64decode(series.sketch))
                else:
                    summed.add_checked(checked)
                for count in series.thresholds:
                    metric = "availability" if count.threshold_seconds is None else series.metric
                    row = slo.setdefault(
                        (ten, bucket, count.slo_id, series.deployment_id, count.threshold_seconds),
                        [series.tenant_id, metric, count.threshold_seconds, 0, 0],
                    )
                    row[3] += count.good
                    row[4] += count.total
            for usage in batch.usage:
                for name in USAGE_FIELDS:
                    counters[(ten, bucket, usage.tenant_id, usage.deployment_id, name)] += getattr(
                        usage, name
                    )
            if with_gauges:
                fold_reading(gauges[(bucket, batch.node_id)], batch.gauges)
        for resolution in (int(Resolution.ONE_MINUTE), int(Resolution.ONE_HOUR)):
            for key, summed in list(latency.items()):
                if key[0] == ten:
                    coarse = (resolution, bucket_of(key[1], resolution), *key[2:])
                    latency.setdefault(coarse, SketchSum()).add(summed)
            for key, row in list(slo.items()):
                if key[0] == ten:
                    coarse = (resolution, bucket_of(key[1], resolution), *key[2:])
                    into = slo.setdefault(coarse, [*row[:3], 0, 0])
                    into[3] += row[3]
                    into[4] += row[4]
            for key, value in list(counters.items()):
                if key[0] == ten:
                    counters[(resolution, bucket_of(key[1], resolution), *key[2:])] += value
        return cls(latency, slo, dict(counters), dict(gauges))
