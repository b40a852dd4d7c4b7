"""Step 4: what a flush stores, exactly once, in the transaction `services.store_batches` holds.

Each node's `NodeStream` records which sequence numbers are stored (so a resent batch is a
duplicate that changes nothing) and how many of its batches were rejected, and why.
Rollup rows are merged with what is stored: sketches by bin, counts by addition.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from datetime import datetime
from typing import Any, TypeVar
from uuid import UUID

from django.db import models

from agent.protocol import TelemetryBatch
from controlplane.inventory.models import Node
from controlplane.telemetry.choices import Resolution
from controlplane.telemetry.models import (
    CounterRollup,
    GaugeRollup,
    LatencyRollup,
    NodeStream,
    SloRollup,
)
from controlplane.telemetry.pipeline.gauges import DueGauges
from controlplane.telemetry.pipeline.merge import GaugeBuckets, GaugeStats, Rollups, fold_gauge
from controlplane.telemetry.pipeline.validate import MAX_REASON
from dataplane.sketch import SketchSum

MAX_SEEN_ABOVE = 1024
"""Out-of-order sequence numbers remembered per node; past this the oldest gap is given up
(its batch was dropped by the agent's full buffer and will never come)."""


_STREAM_FIELDS = [
    "last_seq",
    "seen_above",
    "batches",
    "last_interval_end",
    "rejected_batches",
    "last_rejection",
    "last_rejected_at",
]


def node_streams(node_ids: set[UUID]) -> dict[UUID, NodeStream]:
    existing = {
        s.node_id: s
        for s in NodeStream.objects.select_for_update(of=("self",))
        .select_related("node")
        # not the gauges, which most flushes replace (advance_streams loads the few others)
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


def claim(stream: NodeStream, seq: int) -> bool:
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


def note_rejection(stream: NodeStream, reason: str, now: datetime) -> None:
    """Count one rejected batch on its node, with the reason an operator reads there."""
    stream.rejected_batches += 1
    stream.last_rejection = reason[:MAX_REASON]
    stream.last_rejected_at = now


def advance_streams(
    node_streams: dict[UUID, NodeStream],
    accepted: list[TelemetryBatch],
    *,
    gauges: bool,
    rejected_from: set[UUID],
) -> None:
    """Record the claimed sequence numbers and rejections, and the newest gauges unless
    `gauges` is False (a GaugeBuffer writes those with the node's closed bucket; deltas
    still carry them)."""
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
        for node_id, gauges_of in NodeStream.objects.filter(
            node_id__in=[s.node_id for s in behind]
        ).values_list("node_id", "gauges"):
            node_streams[node_id].gauges = gauges_of
    _save_streams(changed, with_gauges=gauges)
    _save_streams([node_streams[n] for n in rejected_from - latest.keys()], with_gauges=False)


def _save_streams(streams: list[NodeStream], *, with_gauges: bool) -> None:
    """One INSERT .. ON CONFLICT UPDATE: far cheaper than bulk_update's CASE per row and field.
    Every row exists (node_streams made the missing ones), so without gauges the inserted
    values carry none: each JSON document costs psycopg dearly in that statement."""
    if not streams:
        return
    NodeStream.objects.bulk_create(
        [
            NodeStream(
                node_id=s.node_id,
                **{name: getattr(s, name) for name in _STREAM_FIELDS},
                gauges=s.gauges if with_gauges else {},
            )
            for s in streams
        ],
        update_conflicts=True,
        unique_fields=["node"],
        update_fields=_STREAM_FIELDS + (["gauges"] if with_gauges else []),
    )


def write_rollups(rollups: Rollups) -> None:
    """Merge a flush's latency, SLO and counter rows into the tables; callers hold the ingest lock."""

    def merge_sketch(row: LatencyRollup, summed: SketchSum) -> None:
        summed.add_bytes(bytes(row.sketch))
        row.sketch, row.count = summed.to_bytes(), summed.count

    _upsert(
        LatencyRollup,
        rollups.latency,
        key=lambda r: (r.resolution, r.bucket, r.tenant_id, r.deployment_id, r.metric),
        narrow={"tenant_id__in": {k[2] for k in rollups.latency}},
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
        rollups.slo,
        key=lambda r: (r.resolution, r.bucket, r.slo_id, r.deployment_id, r.threshold_seconds),
        narrow={"slo_id__in": {k[2] for k in rollups.slo}},
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
        rollups.counters,
        key=lambda r: (r.resolution, r.bucket, r.tenant_id, r.deployment_id, r.name),
        narrow={"tenant_id__in": {k[2] for k in rollups.counters}},
        build=lambda k, v: CounterRollup(
            resolution=k[0], bucket=k[1], tenant_id=k[2], deployment_id=k[3], name=k[4], value=v
        ),
        merge=add_value,
        fields=["value"],
    )


def write_due(due: DueGauges) -> None:
    """Write a GaugeBuffer's closed buckets, and the newest gauges of their nodes unless
    another process has stored newer ones since (the node reconnected there)."""
    write_gauges(due.buckets)
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


def write_gauges(buckets: GaugeBuckets) -> None:
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
