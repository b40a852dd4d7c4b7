"""The per-process ingest loop between agent WebSockets and `services.store_batches`.

Frames from every connected agent queue here per node, as they came, and are parsed,
validated and stored together on the flush's thread, once per flush, so a second's worth
of 500 agents costs one transaction instead of 500 and the event loop, which also answers
every HTTP request of the process, spends next to nothing on a frame. Fairness:
each node may queue at most `MAX_QUEUED` batches (beyond that the agent is told to retry)
and each flush takes at most `TAKE_PER_NODE` from every node in turn, so an agent
backfilling an hour, or flooding, cannot delay anyone else's live batches by more than
one flush.

A frame that does not validate is answered `rejected` and counted on the connection's node
in its flush (so is a batch naming another node).

Heartbeats that agents send over the same WebSocket (`agent.protocol.heartbeat_frame`)
wait here too, the newest per node, and are recorded with the next flush: one statement
for all of them instead of an HTTP request each. Status reports (`status_frame`) are
recorded with the next flush too, each as the HTTP view records it, and answered once
it is stored: a rollout to a thousand nodes costs one thread hop per flush, not an HTTP
request per node.

Gauges wait here in a `GaugeBuffer` until their 10 s bucket closes; with no batches to
flush, the loop waits for the next bucket to fall due and writes it alone.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import weakref
from collections import Counter, OrderedDict, deque
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from uuid import UUID

from asgiref.sync import sync_to_async
from django.db import connection
from pydantic import ValidationError

from agent.protocol import (
    AppliedStatus,
    Heartbeat,
    HeartbeatFrame,
    StatusAck,
    StatusFrame,
    StatusOutcome,
    TelemetryAck,
    TelemetryBatch,
)
from controlplane.fleet import services as fleet_services
from controlplane.inventory import services as inventory_services
from controlplane.inventory.models import Node
from controlplane.telemetry import metrics, services
from controlplane.telemetry.pipeline import publish
from controlplane.telemetry.pipeline.gauges import GaugeBuffer
from controlplane.telemetry.pipeline.validate import (
    BatchRejected,
    Decoded,
    parse_batch,
    seq_of,
)

log = logging.getLogger(__name__)

MAX_QUEUED = 64
TAKE_PER_NODE = 32
MAX_PER_FLUSH = 4000
MIN_FLUSH_INTERVAL_S = 0.2
"""Lets a flush gather what arrives meanwhile; the floor of live-delta latency."""
RETRY_AFTER_S = 1.0
MAX_QUEUED_STATUSES = 4
"""Status reports waiting per node: an agent sends one at a time, and again on a timeout."""
MAX_STATUS_ID = 2**63 - 1
_NOT_STORED = "the control plane could not store it"


Reply = Callable[[TelemetryAck], Awaitable[None]]
StatusReply = Callable[[StatusAck], Awaitable[None]]


@dataclass
class _Pending:
    node_id: UUID
    """The node of the connection the frame came over."""
    frame: str | bytes
    ack: asyncio.Future[TelemetryAck]
    reply: Reply | None = None
    """Sends the ack to the agent, awaited by the flush once the ack is known."""
    seq: int = 0
    """Known once the frame is parsed (0 for one whose seq could not be read)."""


@dataclass
class _Status:
    node: Node
    """The node of the connection the report came over."""
    frame: str
    reply: StatusReply


class Ingestor:
    """One per event loop; started on first use, its task ends when it holds nothing."""

    def __init__(self) -> None:
        self._queues: OrderedDict[object, deque[_Pending]] = OrderedDict()
        self._task: asyncio.Task[None] | None = None
        self._gauges = GaugeBuffer()
        self._heartbeats: dict[UUID, str | bytes] = {}
        self._statuses: list[_Status] = []
        self._status_counts: Counter[UUID] = Counter()
        self._woken = asyncio.Event()

    def submit(
        self, node_id: UUID, frame: str | bytes, reply: Reply | None = None
    ) -> asyncio.Future[TelemetryAck]:
        """The ack of a frame from `node_id`'s connection, resolved after its flush committed
        (or at once if it must wait: then read from the frame's start, cheaply). An ack
        resolved by a flush is also passed to `reply`, which the flush awaits."""
        ack: asyncio.Future[TelemetryAck] = asyncio.get_running_loop().create_future()
        queue = self._queues.setdefault(node_id, deque())
        if len(queue) >= MAX_QUEUED:
            metrics.BATCHES.labels("retry").inc()
            ack.set_result(
                TelemetryAck(
                    seq=seq_of(frame),
                    outcome="retry",
                    reason="too many batches from this node are waiting",
                    retry_after_s=RETRY_AFTER_S,
                )
            )
            return ack
        queue.append(_Pending(node_id, frame, ack, reply))
        self._wake()
        return ack

    def heartbeat(self, node_id: UUID, frame: str | bytes) -> None:
        """Record a heartbeat frame from `node_id`'s connection with the next flush; a newer
        one from the same node before then replaces it. Heartbeats get no answer."""
        self._heartbeats[node_id] = frame
        self._wake()

    def status(self, node: Node, frame: str, reply: StatusReply) -> StatusAck | None:
        """Record a status report frame from `node`'s connection with the next flush, whose
        ack then goes to `reply`; or, with MAX_QUEUED_STATUSES of the node's waiting, the
        ack to send at once (retry)."""
        if self._status_counts[node.pk] >= MAX_QUEUED_STATUSES:
            return _status_retry(frame, "too many status reports from this node are waiting")
        self._status_counts[node.pk] += 1
        self._statuses.append(_Status(node, frame, reply))
        self._wake()
        return None

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

    def _due(self) -> bool:
        return bool(self._queues or self._heartbeats or self._statuses)

    async def _run(self) -> None:
        while self._due() or self._gauges:
            if not self._due():
                await self._idle()
                continue
            started = time.monotonic()
            heartbeats, self._heartbeats = self._heartbeats, {}
            statuses, self._statuses = self._statuses, []
            self._status_counts.clear()
            await self._flush(self._take(), heartbeats, statuses)
            if self._due():
                await asyncio.sleep(max(0.0, MIN_FLUSH_INTERVAL_S - (time.monotonic() - started)))

    async def _flush(
        self,
        pending: list[_Pending],
        heartbeats: dict[UUID, str | bytes],
        statuses: list[_Status],
    ) -> None:
        started = time.monotonic()
        try:
            stored, status_acks = await sync_to_async(_store, thread_sensitive=False)(
                pending, self._gauges, heartbeats, statuses
            )
        except Exception:
            log.exception("storing %d telemetry batches failed; agents will retry", len(pending))
            for status in statuses:
                await status.reply(_status_retry(status.frame, _NOT_STORED))
            await _answer(
                pending,
                [
                    TelemetryAck(
                        seq=p.seq,
                        outcome="retry",
                        reason=_NOT_STORED,
                        retry_after_s=RETRY_AFTER_S,
                    )
                    for p in pending
                ],
            )
            return
        metrics.FLUSH_SECONDS.observe(time.monotonic() - started)
        await _answer(pending, stored.acks)
        for status, ack in zip(statuses, status_acks, strict=True):
            if ack is not None:
                await status.reply(ack)
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
    pending: list[_Pending],
    gauges: GaugeBuffer,
    heartbeats: dict[UUID, str | bytes],
    statuses: list[_Status],
) -> tuple[services.Stored, list[StatusAck | None]]:
    """Runs on an executor thread: parses the frames, stores those that validate and answers
    every frame in order, then records the heartbeats and the status reports (each one's
    ack in order; None for a frame too broken to name its report). Its connection goes
    back (to the pool) after each flush."""
    batches: list[TelemetryBatch] = []
    rejected: list[services.Rejection] = []
    refused: dict[int, TelemetryAck] = {}
    decoded: Decoded = {}
    for index, p in enumerate(pending):
        try:
            batch = parse_batch(p.frame, decoded)
            if batch.node_id != p.node_id:
                raise BatchRejected(
                    f"node_id {batch.node_id} is not this connection's node", batch.seq
                )
        except BatchRejected as exc:
            p.seq = exc.seq
            log.warning("rejected a telemetry batch from node %s: %s", p.node_id, exc.reason)
            rejected.append(services.Rejection(p.node_id, exc.reason))
            refused[index] = TelemetryAck(seq=exc.seq, outcome="rejected", reason=exc.reason)
            continue
        p.seq = batch.seq
        batches.append(batch)
    try:
        stored = services.store_batches(
            batches, gauges, rejected=rejected, decoded=decoded, watching=publish.watched
        )
        if heartbeats:
            _record_heartbeats(heartbeats)
        status_acks = _record_statuses(statuses)
    finally:
        connection.close()
    if refused:
        acks = iter(stored.acks)
        stored.acks = [refused[i] if i in refused else next(acks) for i in range(len(pending))]
    return stored, status_acks


def _status_id(frame: str) -> int | None:
    """The id of a status frame that may not validate, if it names one."""
    try:
        found = json.loads(frame).get("id")
    except (ValueError, AttributeError, RecursionError):
        return None
    return found if type(found) is int and 0 <= found <= MAX_STATUS_ID else None


def _record_statuses(statuses: list[_Status]) -> list[StatusAck | None]:
    """Record the status reports as `POST /api/v1/agent/status/` would, all at once; acks
    in order. A failure fails them (their agents send them again), never the flush."""
    acks: list[StatusAck | None] = []
    valid: list[tuple[Node, AppliedStatus]] = []
    for status in statuses:
        try:
            report = StatusFrame.model_validate_json(status.frame)
        except ValidationError as exc:
            status_id = _status_id(status.frame)
            log.warning("rejected a status frame from node %s: %s", status.node.pk, exc)
            rejected = str(exc)[:4096]
            acks.append(None if status_id is None else _status_ack(status_id, "rejected", rejected))
            continue
        if report.status.node_id != status.node.pk:
            reason = f"node_id {report.status.node_id} is not this connection's node"
            acks.append(_status_ack(report.id, "rejected", reason))
            continue
        valid.append((status.node, report.status))
        acks.append(_status_ack(report.id, "recorded"))
    try:
        fleet_services.record_applied_statuses(valid)
    except Exception:
        log.exception("recording %d status reports failed; agents will retry", len(valid))
        acks = [
            _status_ack(a.status_id, "retry", _NOT_STORED) if a and a.outcome == "recorded" else a
            for a in acks
        ]
    return acks


def _status_ack(status_id: int, outcome: StatusOutcome, reason: str | None = None) -> StatusAck:
    return StatusAck(status_id=status_id, outcome=outcome, reason=reason)


def _status_retry(frame: str, reason: str) -> StatusAck:
    return _status_ack(_status_id(frame) or 0, "retry", reason)


def _record_heartbeats(frames: dict[UUID, str | bytes]) -> None:
    """Record the heartbeats that parse and name their connection's node. A failure loses
    them, never the flush's batches: their agents send the next one soon."""
    heartbeats: list[Heartbeat] = []
    for node_id, frame in frames.items():
        try:
            heartbeat = HeartbeatFrame.model_validate_json(frame).heartbeat
        except ValidationError as exc:
            log.warning("ignored a malformed heartbeat frame from node %s: %s", node_id, exc)
            continue
        if heartbeat.node_id != node_id:
            log.warning(
                "ignored a heartbeat naming node %s from node %s", heartbeat.node_id, node_id
            )
            continue
        heartbeats.append(heartbeat)
    try:
        inventory_services.record_heartbeats(heartbeats)
    except Exception:
        log.exception("recording %d heartbeats failed", len(heartbeats))


def _store_gauges(gauges: GaugeBuffer) -> None:
    try:
        services.store_gauges(gauges)
    finally:
        connection.close()


async def _answer(pending: list[_Pending], acks: list[TelemetryAck]) -> None:
    for outcome, count in Counter(ack.outcome for ack in acks).items():
        metrics.BATCHES.labels(outcome).inc(count)
    for p, ack in zip(pending, acks, strict=True):
        if not p.ack.done():
            p.ack.set_result(ack)
        if p.reply is not None:
            await p.reply(ack)


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
