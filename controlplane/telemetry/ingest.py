"""The per-process ingest loop between agent WebSockets and `services.store_batches`.

Batches from every connected agent queue here per node and are stored together, once per
flush, so a second's worth of 500 agents costs one transaction instead of 500. Fairness:
each node may queue at most `MAX_QUEUED` batches (beyond that the agent is told to retry)
and each flush takes at most `TAKE_PER_NODE` from every node in turn, so an agent
backfilling an hour, or flooding, cannot delay anyone else's live batches by more than
one flush.

Gauges wait here in a `GaugeBuffer` until their 10 s bucket closes; with no batches to
flush, the loop waits for the next bucket to fall due and writes it alone. Batches the
connections refused before they got here are counted on their nodes with the next flush.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections import OrderedDict, deque
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime

from asgiref.sync import sync_to_async
from django.db import connection

from agent.protocol import TelemetryAck, TelemetryBatch
from controlplane.telemetry import metrics, services
from controlplane.telemetry.pipeline.gauges import GaugeBuffer

log = logging.getLogger(__name__)

MAX_QUEUED = 64
TAKE_PER_NODE = 32
MAX_PER_FLUSH = 4000
MIN_FLUSH_INTERVAL_S = 0.2
"""Lets a flush gather what arrives meanwhile; the floor of live-delta latency."""
RETRY_AFTER_S = 1.0


@dataclass
class _Pending:
    batch: TelemetryBatch
    ack: asyncio.Future[TelemetryAck]


class Ingestor:
    """One per event loop; started on first use, its task ends when it holds nothing."""

    def __init__(self) -> None:
        self._queues: OrderedDict[object, deque[_Pending]] = OrderedDict()
        self._task: asyncio.Task[None] | None = None
        self._gauges = GaugeBuffer()
        self._rejected: list[services.Rejection] = []
        self._woken = asyncio.Event()

    def submit(self, batch: TelemetryBatch) -> asyncio.Future[TelemetryAck]:
        """The batch's ack, resolved after its flush committed (or at once if it must wait)."""
        ack: asyncio.Future[TelemetryAck] = asyncio.get_running_loop().create_future()
        queue = self._queues.setdefault(batch.node_id, deque())
        if len(queue) >= MAX_QUEUED:
            metrics.BATCHES.labels("retry").inc()
            ack.set_result(
                TelemetryAck(
                    seq=batch.seq,
                    outcome="retry",
                    reason="too many batches from this node are waiting",
                    retry_after_s=RETRY_AFTER_S,
                )
            )
            return ack
        queue.append(_Pending(batch, ack))
        self._wake()
        return ack

    def count_rejection(self, rejection: services.Rejection) -> None:
        """Count a batch refused before submit on its node, with the next flush."""
        if len(self._rejected) < MAX_PER_FLUSH:  # past that, a flood: the reason is known
            self._rejected.append(rejection)
        self._wake()

    def _wake(self) -> None:
        self._woken.set()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="telemetry-ingest")

    def _take(self) -> list[_Pending]:
        """Round-robin over nodes, at most TAKE_PER_NODE each, in arrival order per node."""
        taken: list[_Pending] = []
        for node_id in list(self._queues):
            queue = self._queues[node_id]
            for _ in range(min(TAKE_PER_NODE, len(queue))):
                taken.append(queue.popleft())
            if not queue:
                del self._queues[node_id]
            else:
                self._queues.move_to_end(node_id)
            if len(taken) >= MAX_PER_FLUSH:
                break
        return taken

    async def _run(self) -> None:
        while self._queues or self._rejected or self._gauges:
            if not (self._queues or self._rejected):
                await self._idle()
                continue
            started = time.monotonic()
            await self._flush(self._take())
            if self._queues:
                await asyncio.sleep(max(0.0, MIN_FLUSH_INTERVAL_S - (time.monotonic() - started)))

    async def _flush(self, pending: list[_Pending]) -> None:
        batches = [p.batch for p in pending]
        rejected, self._rejected = self._rejected, []
        started = time.monotonic()
        try:
            stored = await sync_to_async(_store, thread_sensitive=False)(
                batches, self._gauges, rejected
            )
        except Exception:
            log.exception("storing %d telemetry batches failed; agents will retry", len(batches))
            for p in pending:
                _resolve(
                    p,
                    TelemetryAck(
                        seq=p.batch.seq,
                        outcome="retry",
                        reason="the control plane could not store it",
                        retry_after_s=RETRY_AFTER_S,
                    ),
                )
            return
        metrics.FLUSH_SECONDS.observe(time.monotonic() - started)
        for p, ack in zip(pending, stored.acks, strict=True):
            _resolve(p, ack)
        if stored.newest is not None:
            metrics.LAG_SECONDS.set(time.time() - stored.newest.timestamp())
        try:
            await services.publish(stored.deltas)
        except Exception:  # a live view missing a delta heals from its snapshot
            log.exception("publishing live telemetry deltas failed")

    async def _idle(self) -> None:
        """No batches: wait for one, or until a gauge bucket falls due and write that."""
        due = self._gauges.next_due()
        wait_s = 0.0 if due is None else (due - datetime.now(UTC)).total_seconds()
        if wait_s > 0:
            self._woken.clear()
            with suppress(TimeoutError):
                await asyncio.wait_for(self._woken.wait(), wait_s)
            return
        try:
            await sync_to_async(_store_gauges, thread_sensitive=False)(self._gauges)
        except Exception:  # gauges are the one part allowed to be lost; never spin on them
            dropped = self._gauges.take(datetime.now(UTC))
            log.exception("storing gauges failed; dropped %d buckets", len(dropped.buckets))


def _store(
    batches: list[TelemetryBatch], gauges: GaugeBuffer, rejected: list[services.Rejection]
) -> services.Stored:
    """Runs on an executor thread; its connection goes back (to the pool) after each flush."""
    try:
        return services.store_batches(batches, gauges, rejected=rejected)
    finally:
        connection.close()


def _store_gauges(gauges: GaugeBuffer) -> None:
    try:
        services.store_gauges(gauges)
    finally:
        connection.close()


def _resolve(pending: _Pending, ack: TelemetryAck) -> None:
    metrics.BATCHES.labels(ack.outcome).inc()
    if not pending.ack.done():
        pending.ack.set_result(ack)


_ingestors: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Ingestor] = (
    weakref.WeakKeyDictionary()
)


def ingestor() -> Ingestor:
    """This event loop's ingestor."""
    loop = asyncio.get_running_loop()
    found = _ingestors.get(loop)
    if found is None:
        found = _ingestors[loop] = Ingestor()
    return found
