"""Step 4: what a flush stores, exactly once, in the transaction `services.store_batches` holds.

Each node's `NodeStream` records which sequence numbers are stored (so a resent batch is a
duplicate that changes nothing) and how many of its batches were rejected, and why; the
flush holds its nodes' rows locked, so two processes never claim one batch. Rollup rows
are written to the flush's shard, which no other flush holds meanwhile: sketches merged
by bin, counts added in the INSERT .. ON CONFLICT itself.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from datetime import datetime
from typing import Any, TypeVar
from uuid import UUID

from django.db import connection, models
from django.db.models import F

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
    """The nodes' stream rows, locked until the flush commits (in key order, so two flushes
    never wait on each other crosswise); a node's first batch makes its row."""
    existing = _lock_streams(node_ids)
    missing = node_ids - existing.keys()
    if missing:
        NodeStream.objects.bulk_create(
            [
                NodeStream(node_id=pk)
                for pk in Node.objects.filter(pk__in=missing).values_list("pk", flat=True)
            ],
            ignore_conflicts=True,  # another process made it first: locking it waits for that
        )
        existing |= _lock_streams(missing)
    return existing


def _lock_streams(node_ids: set[UUID]) -> dict[UUID, NodeStream]:
    return {
        s.node_id: s
        for s in NodeStream.objects.select_for_update(of=("self",))
        .select_related("node")
        # not the gauges, which most flushes replace (advance_streams loads the few others)
        .only(*_STREAM_FIELDS, "node__hostname", "node__status")
        .filter(node_id__in=node_ids)
        .order_by("node_id")
    }


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


def write_rollups(rollups: Rollups, shard: int) -> None:
    """Merge a flush's latency, SLO and counter rows into `shard`'s rows, which the caller
    holds (see `services.claim_shard`)."""

    def merge_sketch(row: LatencyRollup, summed: SketchSum) -> None:
        summed.add_bytes(bytes(row.sketch))
        row.sketch, row.count = summed.to_bytes(), summed.count

    _upsert(
        LatencyRollup,
        rollups.latency,
        key=lambda r: (r.resolution, r.bucket, r.tenant_id, r.deployment_id, r.metric),
        narrow={"tenant_id__in": {k[2] for k in rollups.latency}, "shard": shard},
        build=lambda k, s: LatencyRollup(
            resolution=k[0],
            bucket=k[1],
            tenant_id=k[2],
            deployment_id=k[3],
            metric=k[4],
            shard=shard,
            sketch=s.to_bytes(),
            count=s.count,
        ),
        merge=merge_sketch,
        fields=["sketch", "count"],
        # PostgreSQL's key holds NULL deployments as equal, which ON CONFLICT needs (see `_add`)
        unique_fields=(
            ["resolution", "bucket", "tenant", "deployment", "metric", "shard"]
            if connection.vendor == "postgresql"
            else None
        ),
    )
    _add(
        SloRollup,
        [
            (k[0], k[1], k[2], k[3], i[2], shard, i[0], i[1], i[3], i[4])
            for k, i in rollups.slo.items()
        ],
        key=["resolution", "bucket", "slo_id", "deployment_id", "threshold_seconds", "shard"],
        fields=["tenant_id", "metric", "good", "total"],
        added=["good", "total"],
    )
    _add(
        CounterRollup,
        [(k[0], k[1], k[2], k[3], k[4], shard, v) for k, v in rollups.counters.items()],
        key=["resolution", "bucket", "tenant_id", "deployment_id", "name", "shard"],
        fields=["value"],
        added=["value"],
    )


def _add(
    model: type[models.Model],
    rows: list[tuple[Any, ...]],
    *,
    key: list[str],
    fields: list[str],
    added: list[str],
) -> None:
    """INSERT the rows (`key` columns, then `fields`); where a row exists, add the `added`
    columns to it: one statement, no read, and a retried flush cannot be half applied."""
    if not rows:
        return
    if connection.vendor != "postgresql":
        # SQLite (the embedded default, one process) keeps no unique key whose NULLs are
        # equal, which ON CONFLICT needs: add row by row instead.
        for row in rows:
            values = dict(zip(key + fields, row, strict=True))
            found = model._default_manager.filter(**{c: values[c] for c in key})  # type: ignore[attr-defined]
            if not found.update(**{c: F(c) + values[c] for c in added}):
                model._default_manager.create(**values)  # type: ignore[attr-defined]
        return
    table = connection.ops.quote_name(model._meta.db_table)
    quote = connection.ops.quote_name
    columns = ", ".join(quote(c) for c in key + fields)
    one = "(" + ", ".join(["%s"] * (len(key) + len(fields))) + ")"
    sums = ", ".join(f"{quote(c)} = {table}.{quote(c)} + EXCLUDED.{quote(c)}" for c in added)
    with connection.cursor() as cursor:
        for start in range(0, len(rows), 500):
            chunk = sorted(rows[start : start + 500], key=lambda r: str(r[: len(key)]))
            cursor.execute(
                f"INSERT INTO {table} ({columns}) VALUES {', '.join([one] * len(chunk))} "
                f"ON CONFLICT ({', '.join(quote(c) for c in key)}) DO UPDATE SET {sums}",
                [value for row in chunk for value in row],
            )


def write_due(due: DueGauges) -> None:
    """Write a GaugeBuffer's closed buckets, and the newest gauges of their nodes unless
    another process has stored newer ones since (the node reconnected there)."""
    write_gauges(due.buckets)
    if not due.latest:
        return
    stored_end = dict(
        # a row another flush holds is skipped: that flush is storing the node's newer gauges
        NodeStream.objects.select_for_update(skip_locked=True)
        .filter(node_id__in=due.latest)
        .order_by("node_id")
        .values_list("node_id", "last_interval_end")
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
    bucket of a node that reconnected there: existing rows are locked while folded)."""

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
        lock=True,
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
    lock: bool = False,
) -> None:
    """Merge `items` into existing rows or create them; the caller owns the rows (its shard),
    or they are locked while merged (`lock`).

    With `unique_fields` (a key whose NULLs are equal, if it has nullable columns) every
    row goes in one INSERT .. ON CONFLICT UPDATE statement instead of an INSERT and a
    CASE-per-row UPDATE, which costs far more to build.
    """
    if not items:
        return
    buckets = {k[1] for k in items}
    rows = model._default_manager.filter(bucket__in=buckets, **narrow)  # type: ignore[attr-defined]
    if lock:
        rows = rows.select_for_update().order_by("pk")
    existing = {key(row): row for row in rows}
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
