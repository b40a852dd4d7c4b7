"""Telemetry ingest: store each batch exactly once as rollups, then fan out live deltas.

`store_batches` is the one write path (the WebSocket ingestor and the HTTP fallback both
use it): it authorizes, merges and stores a flush of already validated batches (see
`pipeline`) in one transaction. Flushes run side by side, in as many processes as serve
agents: each locks its nodes' stream rows (so one batch is claimed once, whichever
process got it) and owns one ingest shard while it lasts, whose rollup rows no other
flush writes meanwhile, so merging a sketch into a stored row cannot race. A batch whose
sequence number the node already stored is answered `duplicate` and changes nothing,
which is what makes resending after an outage safe; one the node may not send is
`rejected`, counted on the node, and changes nothing else.

The WebSocket ingestor passes its `GaugeBuffer`: a node's open 10 s gauge bucket is then
folded in memory and written once, after the bucket closed. Latency sketches, SLO counts
and counters are always written in the flush's own transaction.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from asgiref.sync import async_to_sync
from django.apps import apps
from django.db import connection, transaction

from agent.protocol import TelemetryAck, TelemetryBatch
from controlplane.inventory import services as inventory_services
from controlplane.telemetry.pipeline import store
from controlplane.telemetry.pipeline.authorize import Authorizer
from controlplane.telemetry.pipeline.gauges import DueGauges, GaugeBuffer
from controlplane.telemetry.pipeline.merge import Rollups
from controlplane.telemetry.pipeline.publish import deltas_of, publish, watched

log = logging.getLogger(__name__)

SHARDS = 16
"""Flushes that can write rollups at once; readers merge the shards' rows of a bucket."""
_SHARD_LOCKS = 0x7A11_6A4D
"""Any constant: the first key of the shards' advisory locks."""


@dataclass(frozen=True)
class Rejection:
    """A batch refused before it reached a flush (see pipeline.validate), to count on its node."""

    node_id: UUID
    reason: str


@dataclass
class Stored:
    """What one `store_batches` call did: acks in input order, and what to tell whom."""

    acks: list[TelemetryAck]
    deltas: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    slo_ids: set[str] = field(default_factory=set)
    newest: datetime | None = None


def ingest(
    batches: Sequence[TelemetryBatch], *, rejected: Sequence[Rejection] = ()
) -> list[TelemetryAck]:
    """Store, then publish the live deltas once the rollups are committed."""
    stored = store_batches(batches, rejected=rejected, watching=watched)
    transaction.on_commit(lambda: async_to_sync(publish)(stored.deltas))
    return stored.acks


def store_batches(
    batches: Sequence[TelemetryBatch],
    gauges: GaugeBuffer | None = None,
    *,
    rejected: Sequence[Rejection] = (),
    now: datetime | None = None,
    decoded: Mapping[str, Any] | None = None,
    watching: Callable[[Sequence[str]], set[str]] | None = None,
) -> Stored:
    """Merge every new batch into the rollups; duplicates and rejected batches change nothing
    but their node's counts. `rejected` are batches validation refused, counted here too.

    With `gauges`, the batches' gauges join that buffer once committed, and the buffer's
    closed buckets (by `now`, the clock by default) are written in this transaction;
    without, gauges are written at once. `decoded` holds the sketches validation
    already decoded (`pipeline.validate.Decoded`). Deltas are built once committed (not
    under the flush's locks), for the streams `watching` names watched (`publish.watched`;
    by default, every stream).
    """
    now = now or datetime.now(UTC)
    with _ingest_transaction(gauges, now) as due:
        streams = store.node_streams({b.node_id for b in batches} | {r.node_id for r in rejected})
        authorizer = Authorizer(batches, now)
        acks: list[TelemetryAck] = []
        accepted: list[TelemetryBatch] = []
        rejected_from: set[UUID] = set()
        for one in rejected:
            if one.node_id in streams:
                store.note_rejection(streams[one.node_id], one.reason, now)
                rejected_from.add(one.node_id)
        for batch in batches:
            stream = streams.get(batch.node_id)
            reason = "unknown node" if stream is None else authorizer.why_not(batch)
            if stream is not None and reason is None and not store.claim(stream, batch.seq):
                acks.append(TelemetryAck(seq=batch.seq, outcome="duplicate"))
                continue
            if reason is not None:
                if stream is not None:
                    store.note_rejection(stream, reason, now)
                    rejected_from.add(batch.node_id)
                acks.append(TelemetryAck(seq=batch.seq, outcome="rejected", reason=reason))
                continue
            accepted.append(batch)
            acks.append(TelemetryAck(seq=batch.seq, outcome="stored"))
        stored = Stored(acks=acks)
        rollups = Rollups.of(accepted, with_gauges=gauges is None, decoded=decoded)
        store.write_rollups(rollups, claim_shard())
        if gauges is None:
            store.write_gauges(rollups.gauges)
        elif accepted:
            transaction.on_commit(lambda: gauges.add_batches(accepted))
        store.advance_streams(streams, accepted, gauges=gauges is None, rejected_from=rejected_from)
        if accepted:
            heard = {b.node_id for b in accepted}
            transaction.on_commit(lambda: inventory_services.record_heard(heard))
            stored.newest = max(b.interval_end for b in accepted)
            stored.slo_ids = rollups.slo_ids
            if stored.slo_ids and apps.is_installed("controlplane.slo"):
                slo_ids = sorted(stored.slo_ids)
                transaction.on_commit(lambda: _evaluate_slos(slo_ids))
        store.write_due(due)
    if accepted:
        try:  # after the commit: the batches are stored whatever happens here
            stored.deltas = deltas_of(accepted, streams, rollups, watching)
        except Exception:
            log.exception("building live telemetry deltas failed; none sent for this flush")
    return stored


def store_gauges(gauges: GaugeBuffer, now: datetime | None = None) -> None:
    """Write the buffer's buckets due by `now`, for an ingestor with no batches to flush."""
    with _ingest_transaction(gauges, now or datetime.now(UTC)) as due:
        store.write_due(due)


def claim_shard() -> int:
    """A rollup shard for this transaction alone: the first free one from this process's
    own, so each process keeps to its own rows; when all are taken, wait for its own."""
    if connection.vendor != "postgresql":
        return 0  # one process (the embedded default)
    own = os.getpid() % SHARDS
    with connection.cursor() as cursor:
        for step in range(SHARDS):
            shard = (own + step) % SHARDS
            cursor.execute("SELECT pg_try_advisory_xact_lock(%s, %s)", [_SHARD_LOCKS, shard])
            if cursor.fetchone()[0]:
                return shard
        cursor.execute("SELECT pg_advisory_xact_lock(%s, %s)", [_SHARD_LOCKS, own])
    return own


def hold_shard(shard: int) -> None:
    """Wait for `shard`'s lock, held to the end of the transaction (flushes then write to
    another shard); for work on a shard's rows beside ingest, such as compaction."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s, %s)", [_SHARD_LOCKS, shard])


@contextmanager
def _ingest_transaction(gauges: GaugeBuffer | None, now: datetime) -> Iterator[DueGauges]:
    """A transaction; yields the gauge buckets of `gauges` that are due, which go back into
    it if the transaction fails (callers run in autocommit mode)."""
    due = DueGauges() if gauges is None else gauges.take(now)
    try:
        with transaction.atomic():
            yield due
    except BaseException:
        if gauges is not None:
            gauges.add(due)
        raise


def _evaluate_slos(slo_ids: list[str]) -> None:
    from controlplane.celery import app

    app.send_task("slo.evaluate", kwargs={"slo_ids": slo_ids})
