"""Each node's open 10 s gauge bucket, held by the ingesting process between flushes.

Gauges are the bulk of a batch and the least precious part of it: folding a node's open
bucket in memory and writing it once closed costs one row write per node per 10 s instead
of a read, fold and rewrite every flush. A crash loses at most those open buckets.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from uuid import UUID

from agent.protocol import TelemetryBatch
from controlplane.telemetry.choices import Resolution
from controlplane.telemetry.pipeline.merge import (
    GaugeBuckets,
    bucket_of,
    fold_gauge,
    fold_reading,
    midpoint,
)

GAUGE_GRACE = timedelta(seconds=2)
"""How long after a bucket's end its gauges are kept open for batches still on the way."""


@dataclass
class DueGauges:
    """What a GaugeBuffer hands over for writing: closed buckets, and the newest gauges
    (with their interval_end) of the nodes those belong to, for `NodeStream.gauges`."""

    buckets: GaugeBuckets = field(default_factory=dict)
    latest: dict[UUID, tuple[datetime, dict[str, float]]] = field(default_factory=dict)


class GaugeBuffer:
    """The open 10 s gauge buckets of the nodes one ingesting process serves.

    Each bucket is written once it closed (after `GAUGE_GRACE`, plus a per-node offset of
    up to one bucket so the fleet's rows spread over the flushes instead of all landing in
    one); a batch arriving later for a written bucket opens it again, and the next write
    folds into the row, as one from another process would. The node's newest gauges go to
    `NodeStream.gauges` with it, so that copy is at most a bucket old (live deltas carry
    every batch's). Not thread-safe: one ingestor's flushes use it one at a time.
    """

    def __init__(self) -> None:
        self._held = DueGauges()

    def __len__(self) -> int:
        return len(self._held.buckets)

    def add(self, due: DueGauges) -> None:
        """Take back what a failed write could not store; the buffer may keep its dicts."""
        for key, values in due.buckets.items():
            into = self._held.buckets.get(key)
            if into is None:
                self._held.buckets[key] = values
                continue
            for name, stats in values.items():
                fold_gauge(into, name, stats)
        for node_id, (end, gauges) in due.latest.items():
            self._note_latest(node_id, end, gauges)

    def add_batches(self, batches: Iterable[TelemetryBatch]) -> None:
        for batch in batches:
            key = (bucket_of(midpoint(batch), int(Resolution.TEN_SECONDS)), batch.node_id)
            fold_reading(self._held.buckets.setdefault(key, {}), batch.gauges)
            self._note_latest(batch.node_id, batch.interval_end, batch.gauges)

    def _note_latest(self, node_id: UUID, end: datetime, gauges: dict[str, float]) -> None:
        seen = self._held.latest.get(node_id)
        if seen is None or end >= seen[0]:
            self._held.latest[node_id] = (end, gauges)

    def next_due(self) -> datetime | None:
        """When the first bucket held falls due; None when none is."""
        return min((self._due_at(*key) for key in self._held.buckets), default=None)

    def take(self, now: datetime) -> DueGauges:
        """Remove and return the buckets due by `now`."""
        buckets = self._held.buckets
        due = DueGauges({key: buckets[key] for key in buckets if now >= self._due_at(*key)})
        for key in due.buckets:
            del buckets[key]
        for _, node_id in due.buckets:
            if node_id in self._held.latest:
                due.latest[node_id] = self._held.latest.pop(node_id)
        return due

    @staticmethod
    def _due_at(bucket: datetime, node_id: UUID) -> datetime:
        width = int(Resolution.TEN_SECONDS)
        spread = timedelta(seconds=width * (node_id.int % 1000) / 1000)
        return bucket + timedelta(seconds=width) + GAUGE_GRACE + spread
