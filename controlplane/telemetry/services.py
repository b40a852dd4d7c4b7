"""Telemetry ingest: store each batch exactly once as rollups, then fan out live deltas.

`store_batches` is the one write path (the WebSocket ingestor and the HTTP fallback both
use it). It runs in one transaction under a lock shared by every ingesting process, so
merging a sketch into an existing rollup row cannot race; a batch whose sequence number
the node already stored is answered `duplicate` and changes nothing, which is what makes
resending after an outage safe.

Gauges are the bulk of a batch and the least precious part of it. The WebSocket ingestor
passes its `GaugeBuffer`: a node's open 10 s gauge bucket is then folded in memory and
written once, after the bucket closed, instead of being read, folded and rewritten every
flush. A crash loses at most those open buckets; latency sketches, SLO counts and counters
are always written in the flush's own transaction.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar
from uuid import UUID

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.apps import apps
from django.db import connection, models, transaction

from agent.protocol import SeriesSketch, TelemetryAck, TelemetryBatch
from controlplane.fleet.models import Deployment
from controlplane.inventory.models import Node
from controlplane.telemetry import streams
from controlplane.telemetry.choices import RETENTION, Resolution
from controlplane.telemetry.models import (
    CounterRollup,
    GaugeRollup,
    LatencyRollup,
    NodeStream,
    SloRollup,
)
from dataplane.sketch import LatencySketch, SketchSum

log = logging.getLogger(__name__)

MAX_SEEN_ABOVE = 1024
"""Out-of-order sequence numbers remembered per node; past this the oldest gap is given up
(its batch was dropped by the agent's full buffer and will never come)."""
MAX_CLOCK_AHEAD = timedelta(minutes=5)
QUANTILES = {"p50": 0.5, "p90": 0.9, "p99": 0.99}
USAGE_FIELDS = ("completed", "failed", "rejected", "cancelled", "input_tokens", "output_tokens")
# Any constant: one advisory lock serialises ingest across processes on PostgreSQL.
_INGEST_LOCK = 0x7A11_6A4D


@dataclass
class Stored:
    """What one `store_batches` call did: acks in input order, and what to tell whom."""

    acks: list[TelemetryAck]
    deltas: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    slo_ids: set[str] = field(default_factory=set)
    newest: datetime | None = None


def ingest(batches: Sequence[TelemetryBatch]) -> list[TelemetryAck]:
    """Store, then publish the live deltas once the rollups are committed."""
    stored = store_batches(batches)
    transaction.on_commit(lambda: async_to_sync(publish)(stored.deltas))
    return stored.acks


PUBLISH_CONCURRENCY = 16
"""Deltas in flight to the channel layer at once: each costs a few Redis round trips, and
one flush has one per node."""


async def publish(deltas: Iterable[tuple[str, dict[str, Any]]]) -> None:
    """Send each delta to its stream's group, in order but several at a time; the channel
    layer may drop some (by design)."""
    layer = get_channel_layer()
    if layer is None:
        return
    slots = asyncio.Semaphore(PUBLISH_CONCURRENCY)

    async def send(stream: str, payload: dict[str, Any]) -> None:
        async with slots:
            await layer.group_send(
                streams.group_name(stream),
                {"type": "live.delta", "stream": stream, "payload": payload},
            )

    await asyncio.gather(*(send(stream, payload) for stream, payload in deltas))


def store_batches(batches: Sequence[TelemetryBatch], gauges: GaugeBuffer | None = None) -> Stored:
    """Merge every new batch into the rollups; duplicates and invalid batches change nothing.

    With `gauges`, the batches' gauges join that buffer once committed, and the buffer's
    closed buckets are written in this transaction; without, gauges are written at once.
    """
    with _ingest_transaction(gauges) as due:
        node_streams = _node_streams({b.node_id for b in batches})
        served = _deployment_tenants(batches)
        known_tenants = _known_tenants(batches, served)
        now = datetime.now(UTC)
        acks: list[TelemetryAck] = []
        accepted: list[TelemetryBatch] = []
        for batch in batches:
            stream = node_streams.get(batch.node_id)
            reason = (
                "unknown node" if stream is None else _invalid(batch, served, known_tenants, now)
            )
            if stream is not None and reason is None and not _claim(stream, batch.seq):
                acks.append(TelemetryAck(seq=batch.seq, outcome="duplicate"))
                continue
            if reason is not None:
                acks.append(TelemetryAck(seq=batch.seq, outcome="rejected", reason=reason))
                continue
            accepted.append(batch)
            acks.append(TelemetryAck(seq=batch.seq, outcome="stored"))
        stored = Stored(acks=acks)
        if accepted:
            rollups = _Rollups.of(accepted, with_gauges=gauges is None)
            rollups.write()
            if gauges is None:
                _write_gauges(rollups.gauges)
            else:
                transaction.on_commit(lambda: gauges.add_batches(accepted))
            _advance_streams(node_streams, accepted, gauges=gauges is None)
            stored.deltas = _deltas(accepted, node_streams, rollups)
            stored.slo_ids = rollups.slo_ids
            stored.newest = max(b.interval_end for b in accepted)
            if stored.slo_ids and apps.is_installed("controlplane.slo"):
                slo_ids = sorted(stored.slo_ids)
                transaction.on_commit(lambda: _evaluate_slos(slo_ids))
        _write_due(due)
    return stored


def store_gauges(gauges: GaugeBuffer, now: datetime | None = None) -> None:
    """Write the buffer's buckets due by `now`, for an ingestor with no batches to flush."""
    with _ingest_transaction(gauges, now) as due:
        _write_due(due)


@contextmanager
def _ingest_transaction(
    gauges: GaugeBuffer | None, now: datetime | None = None
) -> Iterator[DueGauges]:
    """A transaction holding the ingest lock; yields the gauge buckets of `gauges` that are
    due, which go back into it if the transaction fails (callers run in autocommit mode)."""
    due = DueGauges() if gauges is None else gauges.take(now or datetime.now(UTC))
    try:
        with transaction.atomic():
            if connection.vendor == "postgresql":
                with connection.cursor() as cursor:
                    cursor.execute("SELECT pg_advisory_xact_lock(%s)", [_INGEST_LOCK])
            yield due
    except BaseException:
        if gauges is not None:
            gauges.add(due)
        raise


def _evaluate_slos(slo_ids: list[str]) -> None:
    from controlplane.celery import app

    app.send_task("slo.evaluate", kwargs={"slo_ids": slo_ids})


# --- validation and sequence numbers ---------------------------------------------------------


_STREAM_FIELDS = ["last_seq", "seen_above", "batches", "last_interval_end"]


def _node_streams(node_ids: set[UUID]) -> dict[UUID, NodeStream]:
    existing = {
        s.node_id: s
        for s in NodeStream.objects.select_for_update(of=("self",))
        .select_related("node")
        # not the gauges, which most flushes replace (_advance_streams loads the few others)
        .only(*_STREAM_FIELDS, "node__hostname", "node__status")
        .filter(node_id__in=node_ids)
    }
    missing = Node.objects.filter(pk__in=node_ids - existing.keys())
    for node in missing:
        existing[node.pk] = NodeStream(node=node)
    NodeStream.objects.bulk_create(
        [existing[n.pk] for n in missing], ignore_conflicts=True
    )  # a racing process's row wins; the lock makes that moot on PostgreSQL
    return existing


def _claim(stream: NodeStream, seq: int) -> bool:
    """Record `seq` as stored; False if it already was."""
    seen = set(stream.seen_above)
    if seq <= stream.last_seq or seq in seen:
        return False
    seen.add(seq)
    while stream.last_seq + 1 in seen:
        stream.last_seq += 1
        seen.remove(stream.last_seq)
    if len(seen) > MAX_SEEN_ABOVE:
        stream.last_seq = min(seen)
        seen.remove(stream.last_seq)
        while stream.last_seq + 1 in seen:
            stream.last_seq += 1
            seen.remove(stream.last_seq)
    stream.seen_above = sorted(seen)
    stream.batches += 1
    return True


def _deployment_tenants(batches: Sequence[TelemetryBatch]) -> dict[UUID, set[UUID]]:
    """The tenants each deployment the batches name serves: its owner and those it is
    shared with, in one query for the whole flush (a row per share, or one with none)."""
    ids = {s.deployment_id for b in batches for s in b.series if s.deployment_id is not None}
    ids |= {u.deployment_id for b in batches for u in b.usage}
    served: dict[UUID, set[UUID]] = defaultdict(set)
    rows = Deployment.objects.filter(pk__in=ids).order_by()  # no join for the default order
    for pk, owner, sharer in rows.values_list("pk", "tenant_id", "shared_with"):
        served[pk].add(owner)
        if sharer is not None:
            served[pk].add(sharer)
    return dict(served)


def _known_tenants(batches: Sequence[TelemetryBatch], served: dict[UUID, set[UUID]]) -> set[UUID]:
    from controlplane.tenancy.models import Tenant

    wanted = {s.tenant_id for b in batches for s in b.series if s.deployment_id is None}
    return set(Tenant.objects.filter(pk__in=wanted).values_list("pk", flat=True)).union(
        *served.values()
    )


def _invalid(
    batch: TelemetryBatch, served: dict[UUID, set[UUID]], tenants: set[UUID], now: datetime
) -> str | None:
    """Why this batch can never be stored, in words the agent logs; None if it can."""
    if batch.interval_end > now + MAX_CLOCK_AHEAD:
        return (
            f"interval_end {batch.interval_end.isoformat()} is ahead of the control plane's clock"
        )
    if batch.interval_end < now - RETENTION[Resolution.TEN_SECONDS]:
        return f"interval_end {batch.interval_end.isoformat()} is older than the 10 s retention"
    pairs = [(s.tenant_id, s.deployment_id) for s in batch.series]
    pairs += [(u.tenant_id, u.deployment_id) for u in batch.usage]
    for tenant_id, deployment_id in pairs:
        if deployment_id is None:
            if tenant_id not in tenants:
                return f"unknown tenant {tenant_id}"
        elif tenant_id not in served.get(deployment_id, ()):
            return f"no deployment {deployment_id} of tenant {tenant_id}"
    return None


def _advance_streams(
    node_streams: dict[UUID, NodeStream], accepted: list[TelemetryBatch], *, gauges: bool
) -> None:
    """Record the claimed sequence numbers, and the newest gauges unless `gauges` is False
    (a GaugeBuffer writes those with the node's closed bucket; deltas still carry them)."""
    latest: dict[UUID, TelemetryBatch] = {}
    for batch in accepted:
        seen = latest.get(batch.node_id)
        if seen is None or batch.interval_end >= seen.interval_end:
            latest[batch.node_id] = batch
    changed = [node_streams[node_id] for node_id in latest]
    behind: list[NodeStream] = []  # only older batches (a backfill): keep the stored gauges
    for stream in changed:
        newest = latest[stream.node_id]
        if stream.last_interval_end is None or newest.interval_end >= stream.last_interval_end:
            stream.last_interval_end = newest.interval_end
            stream.gauges = newest.gauges
        elif "gauges" in stream.get_deferred_fields():
            behind.append(stream)
    if behind:
        for node_id, gauges in NodeStream.objects.filter(
            node_id__in=[s.node_id for s in behind]
        ).values_list("node_id", "gauges"):
            node_streams[node_id].gauges = gauges
    # One INSERT .. ON CONFLICT UPDATE: far cheaper than bulk_update's CASE per row and field.
    # Every row exists (_node_streams made the missing ones), so without `gauges` the
    # inserted values carry none: each JSON document costs psycopg dearly in that statement.
    NodeStream.objects.bulk_create(
        [
            NodeStream(
                node_id=s.node_id,
                **{name: getattr(s, name) for name in _STREAM_FIELDS},
                gauges=s.gauges if gauges else {},
            )
            for s in changed
        ],
        update_conflicts=True,
        unique_fields=["node"],
        update_fields=_STREAM_FIELDS + (["gauges"] if gauges else []),
    )


# --- rollups -----------------------------------------------------------------------------


def bucket_of(when: datetime, resolution: int) -> datetime:
    """The start of the bucket `when` falls in (UTC, aligned to the resolution)."""
    return datetime.fromtimestamp(math.floor(when.timestamp() / resolution) * resolution, UTC)


def _sketch_of(series: SeriesSketch) -> SketchSum:
    summed = SketchSum()
    summed.add_bytes(base64.b64decode(series.sketch))
    return summed


def _midpoint(batch: TelemetryBatch) -> datetime:
    return batch.interval_start + (batch.interval_end - batch.interval_start) / 2


GaugeStats = list[float]
"""[sum, count, min, max, last]"""


def fold_reading(into: dict[str, GaugeStats], gauges: dict[str, float]) -> None:
    """Fold one batch's gauge values in, each a bucket of one reading."""
    for key, value in gauges.items():
        fold_gauge(into, key, [value, 1, value, value, value])


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


GaugeBuckets = dict[tuple[datetime, UUID], dict[str, GaugeStats]]
"""Gauges per (10 s bucket start, node)."""

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
            key = (bucket_of(_midpoint(batch), int(Resolution.TEN_SECONDS)), batch.node_id)
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


@dataclass
class _Rollups:
    """One flush's worth of merged measurements, keyed as the rollup tables are."""

    latency: dict[tuple[int, datetime, UUID, UUID | None, str], SketchSum]
    slo: dict[tuple[int, datetime, UUID, UUID | None], list[Any]]
    counters: dict[tuple[int, datetime, UUID, UUID | None, str], int]
    gauges: GaugeBuckets

    @property
    def slo_ids(self) -> set[str]:
        return {str(key[2]) for key in self.slo}

    @classmethod
    def of(cls, batches: Sequence[TelemetryBatch], *, with_gauges: bool = True) -> _Rollups:
        """Merge at 10 s first (one sum per series), then fold those into 1 min and 1 h;
        gauges too unless told not to (a GaugeBuffer will fold them)."""
        latency: dict[Any, SketchSum] = {}
        slo: dict[Any, list[Any]] = {}
        counters: dict[Any, int] = defaultdict(int)
        gauges: dict[Any, dict[str, GaugeStats]] = defaultdict(dict)
        ten = int(Resolution.TEN_SECONDS)
        for batch in batches:
            at = _midpoint(batch)
            bucket = bucket_of(at, ten)
            for series in batch.series:
                key = (ten, bucket, series.tenant_id, series.deployment_id, series.metric)
                latency.setdefault(key, SketchSum()).add(_sketch_of(series))
                for count in series.thresholds:
                    metric = "availability" if count.threshold_seconds is None else series.metric
                    row = slo.setdefault(
                        (ten, bucket, count.slo_id, series.deployment_id),
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

    def write(self) -> None:
        def merge_sketch(row: LatencyRollup, summed: SketchSum) -> None:
            summed.add_bytes(bytes(row.sketch))
            row.sketch, row.count = summed.to_bytes(), summed.count

        _upsert(
            LatencyRollup,
            self.latency,
            key=lambda r: (r.resolution, r.bucket, r.tenant_id, r.deployment_id, r.metric),
            narrow={"tenant_id__in": {k[2] for k in self.latency}},
            build=lambda k, s: LatencyRollup(
                resolution=k[0],
                bucket=k[1],
                tenant_id=k[2],
                deployment_id=k[3],
                metric=k[4],
                sketch=s.to_bytes(),
                count=s.count,
            ),
            merge=merge_sketch,
            fields=["sketch", "count"],
        )

        def add_counts(row: SloRollup, item: list[Any]) -> None:
            row.good += item[3]
            row.total += item[4]

        _upsert(
            SloRollup,
            self.slo,
            key=lambda r: (r.resolution, r.bucket, r.slo_id, r.deployment_id),
            narrow={"slo_id__in": {k[2] for k in self.slo}},
            build=lambda k, i: SloRollup(
                resolution=k[0],
                bucket=k[1],
                slo_id=k[2],
                deployment_id=k[3],
                tenant_id=i[0],
                metric=i[1],
                threshold_seconds=i[2],
                good=i[3],
                total=i[4],
            ),
            merge=add_counts,
            fields=["good", "total"],
        )

        def add_value(row: CounterRollup, value: int) -> None:
            row.value += value

        _upsert(
            CounterRollup,
            self.counters,
            key=lambda r: (r.resolution, r.bucket, r.tenant_id, r.deployment_id, r.name),
            narrow={"tenant_id__in": {k[2] for k in self.counters}},
            build=lambda k, v: CounterRollup(
                resolution=k[0], bucket=k[1], tenant_id=k[2], deployment_id=k[3], name=k[4], value=v
            ),
            merge=add_value,
            fields=["value"],
        )


def _write_due(due: DueGauges) -> None:
    """Write a GaugeBuffer's closed buckets, and the newest gauges of their nodes unless
    another process has stored newer ones since (the node reconnected there)."""
    _write_gauges(due.buckets)
    if not due.latest:
        return
    stored_end = dict(
        NodeStream.objects.filter(node_id__in=due.latest).values_list(
            "node_id", "last_interval_end"
        )
    )
    NodeStream.objects.bulk_update(
        [
            NodeStream(node_id=node_id, gauges=gauges)
            for node_id, (end, gauges) in due.latest.items()
            if node_id in stored_end and (stored_end[node_id] is None or end >= stored_end[node_id])
        ],
        ["gauges"],
        batch_size=500,
    )


def _write_gauges(buckets: GaugeBuckets) -> None:
    """Fold 10 s gauge buckets into their rows (another process may have written the same
    bucket of a node that reconnected there); callers hold the ingest lock."""

    def fold_values(row: GaugeRollup, values: dict[str, GaugeStats]) -> None:
        for key, stats in values.items():
            fold_gauge(row.values, key, stats)

    _upsert(
        GaugeRollup,
        {(int(Resolution.TEN_SECONDS), *k): v for k, v in buckets.items()},
        key=lambda r: (r.resolution, r.bucket, r.node_id),
        narrow={"node_id__in": {k[1] for k in buckets}},
        build=lambda k, v: GaugeRollup(resolution=k[0], bucket=k[1], node_id=k[2], values=v),
        merge=fold_values,
        fields=["values"],
        unique_fields=["resolution", "bucket", "node"],
    )


_Row = TypeVar("_Row", bound=models.Model)
_Item = TypeVar("_Item")


def _upsert(
    model: type[_Row],
    items: dict[Any, _Item],
    *,
    key: Callable[[_Row], Hashable],
    narrow: dict[str, Any],
    build: Callable[[Any, _Item], _Row],
    merge: Callable[[_Row, _Item], None],
    fields: list[str],
    unique_fields: list[str] | None = None,
) -> None:
    """Merge `items` into existing rows or create them; callers hold the ingest lock.

    With `unique_fields` (a key without nullable columns) every row goes in one
    INSERT .. ON CONFLICT UPDATE statement instead of an INSERT and a CASE-per-row UPDATE.
    """
    if not items:
        return
    buckets = {k[1] for k in items}
    existing = {
        key(row): row
        for row in model._default_manager.filter(bucket__in=buckets, **narrow)  # type: ignore[attr-defined]
    }
    created, changed = [], []
    for k, item in items.items():
        row = existing.get(k)
        if row is None:
            created.append(build(k, item))
        else:
            merge(row, item)
            changed.append(row)
    manager = model._default_manager  # type: ignore[attr-defined]
    if unique_fields:
        manager.bulk_create(
            created + changed,
            batch_size=500,
            update_conflicts=True,
            unique_fields=unique_fields,
            update_fields=fields,
        )
        return
    manager.bulk_create(created, batch_size=500)
    manager.bulk_update(changed, fields, batch_size=500)


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


# --- live deltas --------------------------------------------------------------------------


def latency_summary(sketch: LatencySketch) -> dict[str, float | int | None]:
    """p50/p90/p99 and count of one sketch, as points on dashboards show them."""
    summary: dict[str, float | int | None] = {
        name: sketch.quantile(q) for name, q in QUANTILES.items()
    }
    summary["count"] = sketch.count
    return summary


def _deltas(
    accepted: list[TelemetryBatch],
    node_streams: dict[UUID, NodeStream],
    rollups: _Rollups,
) -> list[tuple[str, dict[str, Any]]]:
    """Every stream's delta, the fleet's first: one message every node's row waits for,
    where each node's own stream has at most a page or two watching."""
    nodes: list[tuple[str, dict[str, Any]]] = []
    fleet = []
    for node_id in sorted({b.node_id for b in accepted}, key=str):
        stream = node_streams[node_id]
        t = stream.last_interval_end.timestamp() if stream.last_interval_end else time.time()
        point = {"t": t, "gauges": stream.gauges}
        nodes.append(
            (streams.node(node_id), {"type": "node.delta", "node_id": str(node_id), "point": point})
        )
        fleet.append(
            {
                "id": str(node_id),
                "hostname": stream.node.hostname,
                "status": stream.node.status,
                **point,
            }
        )
    deltas: list[tuple[str, dict[str, Any]]] = [
        (streams.FLEET, {"type": "fleet.delta", "nodes": fleet})
    ]
    for deployment_id, point in _points(accepted, rollups, lambda _, d: d).items():
        deltas.append(
            (
                streams.deployment(deployment_id),
                {"type": "deployment.delta", "deployment_id": str(deployment_id), "point": point},
            )
        )
    per_tenant: dict[UUID, dict[str, Any]] = defaultdict(dict)
    for (tenant_id, deployment_id), point in _points(
        accepted, rollups, lambda t, d: (t, d)
    ).items():
        per_tenant[tenant_id][str(deployment_id)] = point
    for tenant_id, points in per_tenant.items():
        deltas.append(
            (
                streams.tenant(tenant_id),
                {"type": "tenant.delta", "tenant_id": str(tenant_id), "deployments": points},
            )
        )
    return deltas + nodes


_Key = TypeVar("_Key", bound=Hashable)


def _points(
    accepted: list[TelemetryBatch],
    rollups: _Rollups,
    key: Callable[[UUID, UUID], _Key],
) -> dict[_Key, dict[str, Any]]:
    """One point per key from this flush's batches, merging every (tenant, deployment)
    series that `key` maps alike: per deployment, its tenants together; per tenant and
    deployment, that tenant's own. Queue depth is the worker's, whoever's requests wait."""
    sketches: dict[_Key, dict[str, SketchSum]] = defaultdict(dict)
    for (resolution, _, tenant_id, deployment_id, metric), summed in rollups.latency.items():
        if resolution == Resolution.TEN_SECONDS and deployment_id is not None:
            sketches[key(tenant_id, deployment_id)].setdefault(metric, SketchSum()).add(summed)
    usage: dict[_Key, dict[str, int]] = defaultdict(lambda: dict.fromkeys(USAGE_FIELDS, 0))
    spans: dict[_Key, list[datetime]] = {}
    queue: dict[_Key, float] = defaultdict(float)
    for batch in accepted:
        touched: dict[_Key, UUID] = {}
        for series in batch.series:
            if series.deployment_id is not None:
                touched[key(series.tenant_id, series.deployment_id)] = series.deployment_id
        for u in batch.usage:
            k = key(u.tenant_id, u.deployment_id)
            touched[k] = u.deployment_id
            for name in USAGE_FIELDS:
                usage[k][name] += getattr(u, name)
        for k, deployment_id in touched.items():
            span = spans.setdefault(k, [batch.interval_start, batch.interval_end])
            span[0] = min(span[0], batch.interval_start)
            span[1] = max(span[1], batch.interval_end)
            queue[k] += batch.gauges.get(f"worker.{deployment_id}.queue_depth", 0.0)
    points = {}
    for k, (start, end) in spans.items():
        window_s = max((end - start).total_seconds(), 1e-3)
        counts = usage[k]
        points[k] = {
            "t": end.timestamp(),
            "window_s": window_s,
            "latency": {m: latency_summary(s.sketch()) for m, s in sorted(sketches[k].items())},
            "usage": counts,
            "tokens_per_s": counts["output_tokens"] / window_s,
            "queue_depth": queue[k],
        }
    return points
