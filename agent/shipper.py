"""Telemetry batches: collect every interval, keep them on disk, ship them in order.

`TelemetryShipper` asks every collector (agent/gauges.py) for its reading once per
`telemetry_interval_s`, numbers the merged `TelemetryBatch` with the node's next sequence
number and appends it to `TelemetryBuffer`, a SQLite file in the state dir that also
keeps the next sequence number and the collectors' cursors, so a restarted agent goes on
where it stopped. The buffer holds at most `telemetry_buffer_batches`; beyond that the
oldest batches are dropped and counted (`telemetry.dropped_batches` in the next batch's
counters, and the agent's /metrics).

`TelemetrySender` ships the buffer's head over one WebSocket to `/ws/agent/`: up to
`WINDOW` batches unacknowledged, strictly in sequence order. `stored` and `duplicate`
acks delete a batch, `rejected` logs the reason and deletes it, `retry` goes back: after
`retry_after_s` every unacknowledged batch from that sequence number on is sent again, in
order. The agent's heartbeats go over the same WebSocket while it is open and the control
plane selected a subprotocol (`send_heartbeat`), and its status reports while it
selected `STATUS_SUBPROTOCOL` (`send_status`, which waits for the report's ack);
otherwise they are POSTed. When the WebSocket cannot be opened the same batches go by
HTTP POST until the next attempt, which comes after a capped, jittered backoff. The
control plane treats a sequence number at or under its high-watermark as a duplicate, so
resending is safe.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import random
import sqlite3
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from uuid import UUID

from pydantic import ValidationError
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type
from tenacity.wait import WaitBaseT
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI
from websockets.typing import Subprotocol

from agent.client import ControlPlaneClient, ControlPlaneError
from agent.gauges import Collector, Reading
from agent.protocol import (
    AGENT_SOCKET_SUBPROTOCOLS,
    STATUS_ACK_PREFIX,
    STATUS_SUBPROTOCOL,
    AppliedStatus,
    Heartbeat,
    SeriesSketch,
    StatusAck,
    TelemetryAck,
    TelemetryBatch,
    UsageCount,
    heartbeat_frame,
    status_frame,
)
from agent.retry import backoff

log = logging.getLogger(__name__)

BUFFER_FILE = "telemetry.sqlite3"
WINDOW = 32
"""Batches sent and not yet acknowledged, at most."""
CLOSE_BAD_CREDENTIAL = 4401
DROPPED_COUNTER = "telemetry.dropped_batches"


class TelemetryBuffer:
    """Batches waiting for an ack, oldest first, with the node's sequence and cursors.

    Appending a batch, advancing the sequence, dropping what exceeds the bound and
    replacing the collectors' cursors is one transaction. Write-ahead logging without a
    sync per commit survives an agent crash; a power cut may lose the last moments.
    `durable=False` (simulated nodes) syncs never: a power cut may then corrupt the file.
    """

    def __init__(self, path: Path, max_batches: int, *, durable: bool = True) -> None:
        if max_batches < 1:
            raise ValueError("telemetry_buffer_batches must be at least 1")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.max_batches = max_batches
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={'NORMAL' if durable else 'OFF'}")
        with self._db:
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS batch (seq INTEGER PRIMARY KEY, body TEXT NOT NULL)"
            )
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)"
            )
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS cursor (collector TEXT NOT NULL, key TEXT NOT NULL, "
                "value TEXT NOT NULL, PRIMARY KEY (collector, key))"
            )
        meta = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
        # Sequence numbers start at 1: the control plane's high-watermark starts at 0.
        self.next_seq: int = int(meta.get("next_seq", 1))
        self.dropped_total: int = int(meta.get("dropped", 0))
        self._reported: int = int(meta.get("dropped_reported", 0))
        self._dropping = False
        self._count: int = self._db.execute("SELECT count(*) FROM batch").fetchone()[0]

    def __len__(self) -> int:
        return self._count

    def cursors(self) -> dict[str, dict[str, str]]:
        out: dict[str, dict[str, str]] = {}
        for collector, key, value in self._db.execute("SELECT collector, key, value FROM cursor"):
            out.setdefault(collector, {})[key] = value
        return out

    def append(
        self,
        build: Callable[[int, int], str],
        cursors: Mapping[str, Mapping[str, str]] = {},
    ) -> int:
        """Store `build(seq, dropped)` under the next sequence number and return that number;
        `dropped` counts the batches dropped since the previous batch was built."""
        seq = self.next_seq
        body = build(seq, self.dropped_total - self._reported)
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("INSERT INTO batch (seq, body) VALUES (?, ?)", (seq, body))
            excess = self._count + 1 - self.max_batches
            if excess > 0:
                db.execute(
                    "DELETE FROM batch WHERE seq IN (SELECT seq FROM batch ORDER BY seq LIMIT ?)",
                    (excess,),
                )
            dropped = self.dropped_total + max(0, excess)
            db.executemany(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                [
                    ("next_seq", seq + 1),
                    ("dropped", dropped),
                    ("dropped_reported", self.dropped_total),
                ],
            )
            for collector, values in cursors.items():
                db.execute("DELETE FROM cursor WHERE collector = ?", (collector,))
                db.executemany(
                    "INSERT INTO cursor (collector, key, value) VALUES (?, ?, ?)",
                    [(collector, k, v) for k, v in values.items()],
                )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        if excess > 0 and not self._dropping:
            log.warning(
                "telemetry buffer full (%d batches): dropping the oldest until the control "
                "plane takes them",
                self.max_batches,
            )
        self._dropping = excess > 0
        self._reported = self.dropped_total
        self.next_seq = seq + 1
        self.dropped_total = dropped
        self._count += 1 - max(0, excess)
        return seq

    def read_from(self, seq: int, limit: int) -> list[tuple[int, str]]:
        """Up to `limit` batches with sequence numbers from `seq` on, in order."""
        return self._db.execute(
            "SELECT seq, body FROM batch WHERE seq >= ? ORDER BY seq LIMIT ?", (seq, limit)
        ).fetchall()

    def first_seq(self) -> int:
        """The oldest batch's sequence number (the next one when empty)."""
        row = self._db.execute("SELECT min(seq) FROM batch").fetchone()
        return int(row[0]) if row[0] is not None else self.next_seq

    def delete(self, seq: int) -> bool:
        deleted = self._db.execute("DELETE FROM batch WHERE seq = ?", (seq,)).rowcount > 0
        self._count -= int(deleted)
        return deleted

    def close(self) -> None:
        self._db.close()


class TelemetrySender:
    """Ships the buffer over the WebSocket, or by HTTP POST while that cannot connect."""

    def __init__(
        self,
        buffer: TelemetryBuffer,
        client: ControlPlaneClient,
        *,
        window: int = WINDOW,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
        open_timeout_s: float = 10.0,
        status_timeout_s: float = 30.0,
    ) -> None:
        self.buffer = buffer
        self.client = client
        self.outcomes: Counter[str] = Counter()
        """Acks by outcome since start (stored, duplicate, rejected, retry)."""
        self.connected = False
        self._window = window
        self._backoff_max_s = backoff_max_s
        self._after_close = backoff(backoff_initial_s, backoff_initial_s)
        self._after_drop = backoff(backoff_initial_s, backoff_max_s)
        self._outage = False
        """The WebSocket cannot be opened: batches go by HTTP POST meanwhile."""
        self._open_timeout_s = open_timeout_s
        self._wake = asyncio.Event()
        self._inflight: dict[int, int] = {}
        """Sequence number -> acks still expected for it (0: to be sent again)."""
        self._cursor = 0
        self._pause_until = 0.0
        self._socket: ClientConnection | None = None
        """The open WebSocket, while the control plane takes heartbeats over it."""
        self._status_timeout_s = status_timeout_s
        self._status_ids = itertools.count(1)
        self._status_acks: dict[int, asyncio.Future[StatusAck | None]] = {}
        """Status reports sent on the open WebSocket and not yet answered, by id."""

    def wake(self) -> None:
        """A batch was appended (or something else changed): look at the buffer again."""
        self._wake.set()

    async def send_heartbeat(self, heartbeat: Heartbeat) -> bool:
        """Send `heartbeat` over the WebSocket; False when it is not open or the control
        plane did not select AGENT_SOCKET_SUBPROTOCOL (older ones take heartbeats by HTTP
        only), and the caller should POST it."""
        ws = self._socket
        if ws is None:
            return False
        try:
            await ws.send(heartbeat_frame(heartbeat))
        except ConnectionClosed:
            return False
        return True

    async def send_status(self, status: AppliedStatus) -> StatusAck | None:
        """Send `status` over the WebSocket and wait for its ack; None when the control
        plane does not take reports there (no WebSocket open, or an older control plane)
        or the WebSocket closed before the ack came, and the caller should POST it.
        Raises ControlPlaneError (unreachable) when no ack comes within the timeout."""
        ws = self._socket
        if ws is None or ws.subprotocol != STATUS_SUBPROTOCOL:
            return None
        status_id = next(self._status_ids)
        answered: asyncio.Future[StatusAck | None] = asyncio.get_running_loop().create_future()
        self._status_acks[status_id] = answered
        try:
            async with asyncio.timeout(self._status_timeout_s):
                await ws.send(status_frame(status, status_id))
                return await answered
        except ConnectionClosed:
            return None
        except TimeoutError:
            raise ControlPlaneError(0, "no answer to a status report on the WebSocket") from None
        finally:
            self._status_acks.pop(status_id, None)

    async def run(self, stop: asyncio.Event) -> None:
        """Ship over the WebSocket until `stop`, reconnecting after a capped, jittered
        backoff that grows while connections fail or drop and starts over after one that
        closed cleanly; a refused credential waits the longest."""
        async for clean in self._reconnects(stop, _Closed, self._after_close):
            with clean:
                async for dropped in self._reconnects(stop, _Dropped, self._after_failure):
                    with dropped:
                        await self._connect_and_ship(stop)

    def _reconnects(
        self, stop: asyncio.Event, after: type[Exception], wait: WaitBaseT
    ) -> AsyncRetrying:
        return AsyncRetrying(
            retry=retry_if_exception_type(after),
            wait=wait,
            stop=lambda _: stop.is_set(),
            sleep=lambda seconds: self._until_next_attempt(stop, seconds),
            retry_error_callback=lambda _: None,  # stopped
        )

    def _after_failure(self, state: RetryCallState) -> float:
        failure = state.outcome.exception() if state.outcome else None
        return self._backoff_max_s if isinstance(failure, _Refused) else self._after_drop(state)

    async def _until_next_attempt(self, stop: asyncio.Event, seconds: float) -> None:
        """Post over HTTP while the WebSocket cannot be opened; otherwise just wait."""
        if self._outage:
            await self._post_until(stop, asyncio.get_running_loop().time() + seconds)
        else:
            await _sleep(stop, seconds)

    async def _connect_and_ship(self, stop: asyncio.Event) -> None:
        """Open the WebSocket and ship until it closes; raises what the next attempt waits for."""
        if stop.is_set():
            return
        try:
            ws = await connect(
                self.client.telemetry_socket_url,
                additional_headers=self.client.auth_headers,
                open_timeout=self._open_timeout_s,
                compression=None,
                max_size=1 << 20,
                subprotocols=[Subprotocol(p) for p in AGENT_SOCKET_SUBPROTOCOLS],
            )
        except (OSError, TimeoutError, InvalidHandshake, InvalidURI) as exc:
            if not self._outage:
                log.warning("telemetry WebSocket unavailable (%s); posting batches over HTTP", exc)
            self._outage = True
            raise _Dropped() from exc
        if self._outage:
            log.info("telemetry WebSocket connected again")
        self._outage = False
        self.connected = True
        if ws.subprotocol in AGENT_SOCKET_SUBPROTOCOLS:
            self._socket = ws
        dropped = False
        try:
            await self._session(ws, stop)
        except ConnectionClosed:
            dropped = True
        finally:
            self.connected = False
            self._socket = None
            for unanswered in self._status_acks.values():  # to be POSTed
                if not unanswered.done():
                    unanswered.set_result(None)
            await ws.close()
        if ws.close_code == CLOSE_BAD_CREDENTIAL:
            log.error("the control plane refused this node's credential on /ws/agent/")
            raise _Refused()
        if stop.is_set():
            return
        log.info("telemetry WebSocket closed (%s); reconnecting", ws.close_code)
        raise _Dropped() if dropped else _Closed()

    # -- WebSocket ---------------------------------------------------------------------

    async def _session(self, ws: ClientConnection, stop: asyncio.Event) -> None:
        """Send and take acks until the connection closes or `stop`."""
        self._inflight.clear()
        self._cursor = 0
        self._pause_until = 0.0
        loop = asyncio.get_running_loop()
        reader = asyncio.create_task(self._read_acks(ws))
        stopped = asyncio.create_task(stop.wait())
        try:
            while not stop.is_set() and not reader.done():
                self._wake.clear()
                now = loop.time()
                if now >= self._pause_until:
                    await self._send_ready(ws)
                timeout = self._pause_until - now if self._pause_until > now else None
                woken = asyncio.create_task(self._wake.wait())
                await asyncio.wait(
                    {woken, reader, stopped}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
                woken.cancel()
            if reader.done():
                reader.result()
        finally:
            reader.cancel()
            stopped.cancel()

    async def _send_ready(self, ws: ClientConnection) -> None:
        while True:
            rows = self.buffer.read_from(self._cursor, self._window)
            for seq, body in rows:
                if seq not in self._inflight and len(self._inflight) >= self._window:
                    return
                await ws.send(body)
                self._inflight[seq] = self._inflight.get(seq, 0) + 1
                self._cursor = seq + 1
            if len(rows) < self._window:
                return

    async def _read_acks(self, ws: ClientConnection) -> None:
        async for message in ws:
            if isinstance(message, str) and message.startswith(STATUS_ACK_PREFIX):
                self._take_status_ack(message)
                continue
            try:
                ack = TelemetryAck.model_validate_json(message)
            except ValidationError as exc:
                log.warning("ignored a malformed telemetry ack: %s", exc)
                continue
            self._take_ack(ack, asyncio.get_running_loop().time())
            self._wake.set()

    def _take_status_ack(self, message: str) -> None:
        try:
            ack = StatusAck.model_validate_json(message)
        except ValidationError as exc:
            log.warning("ignored a malformed status ack: %s", exc)
            return
        answered = self._status_acks.get(ack.status_id)
        if answered is not None and not answered.done():
            answered.set_result(ack)

    def _take_ack(self, ack: TelemetryAck, now: float) -> None:
        self.outcomes[ack.outcome] += 1
        if ack.outcome != "retry":
            if ack.outcome == "rejected":
                log.warning("control plane rejected telemetry batch %d: %s", ack.seq, ack.reason)
            self.buffer.delete(ack.seq)
            self._inflight.pop(ack.seq, None)
            return
        expected = self._inflight.get(ack.seq)
        if not expected:
            return  # not sent on this connection, or already due again
        self._inflight[ack.seq] = expected - 1
        if expected > 1:
            return  # an answer to an earlier send; the latest one is still to come
        self._cursor = min(self._cursor, ack.seq)
        wait = ack.retry_after_s if ack.retry_after_s is not None else 1.0
        self._pause_until = max(self._pause_until, now + wait)

    def forget_below(self, seq: int) -> None:
        """Batches under `seq` were dropped from the buffer: stop waiting for them."""
        for stale in [s for s in self._inflight if s < seq]:
            del self._inflight[stale]

    # -- HTTP fallback -----------------------------------------------------------------

    async def _post_until(self, stop: asyncio.Event, deadline: float) -> None:
        """POST the buffer's head, in order, until `deadline` (the next WebSocket try)."""
        loop = asyncio.get_running_loop()
        self._pause_until = 0.0
        while not stop.is_set() and loop.time() < deadline:
            self._wake.clear()
            await self._post_ready(deadline)
            # Sleep until a new batch, the end of a 429's pause, or the deadline.
            until = self._pause_until if loop.time() < self._pause_until < deadline else deadline
            woken = asyncio.create_task(self._wake.wait())
            stopped = asyncio.create_task(stop.wait())
            await asyncio.wait(
                {woken, stopped},
                timeout=max(0.0, until - loop.time()),
                return_when=asyncio.FIRST_COMPLETED,
            )
            woken.cancel()
            stopped.cancel()

    async def _post_ready(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        while loop.time() >= self._pause_until:
            rows = self.buffer.read_from(0, 1)
            if not rows:
                return
            seq, body = rows[0]
            try:
                ack = await self.client.post_telemetry(seq, body.encode())
            except ControlPlaneError as exc:
                log.debug("telemetry POST of batch %d failed: %s", seq, exc)
                self._pause_until = deadline  # keep it; try again with the WebSocket
                return
            if ack.seq != seq:
                log.warning("telemetry POST of batch %d answered for %d", seq, ack.seq)
                self._pause_until = deadline
                return
            self._inflight[seq] = 1
            self._take_ack(ack, loop.time())
            self._inflight.pop(seq, None)


class _Dropped(Exception):
    """The WebSocket could not be opened or broke: back off further before the next try."""


class _Refused(_Dropped):
    """The control plane refused the node's credential: wait the longest before the next try."""


class _Closed(Exception):
    """The WebSocket closed cleanly: reconnect soon, the backoff starting over."""


class TelemetryShipper:
    """Collects a batch every interval into the buffer; the sender (if any) ships it."""

    def __init__(
        self,
        node_id: UUID,
        collectors: Sequence[Collector],
        buffer: TelemetryBuffer,
        sender: TelemetrySender | None,
        *,
        interval_s: float,
    ) -> None:
        if interval_s <= 0:
            raise ValueError("telemetry_interval_s must be positive")
        self.node_id = node_id
        self.buffer = buffer
        self.sender = sender
        self.interval_s = interval_s
        self.latest_gauges: Mapping[str, float] = {}
        """The last batch's gauges, for the agent's /metrics."""
        self._collectors = list(collectors)
        self._cursors = buffer.cursors()
        self._last_end: datetime | None = None
        self._failing: set[str] = set()

    @property
    def outcomes(self) -> Mapping[str, int]:
        return self.sender.outcomes if self.sender is not None else {}

    async def run(self, stop: asyncio.Event) -> None:
        """Collect until `stop`, sending alongside; the first batch comes at a random phase
        of the interval so many agents started together do not tick together."""
        tasks = [asyncio.create_task(self._collect_forever(stop), name="telemetry-collect")]
        if self.sender is not None:
            tasks.append(asyncio.create_task(self.sender.run(stop), name="telemetry-send"))
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.close()

    async def _collect_forever(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        await _sleep(stop, random.uniform(0, self.interval_s))
        next_at = loop.time()
        while not stop.is_set():
            next_at += self.interval_s
            await self.tick()
            delay = next_at - loop.time()
            if delay < 0:  # fell behind: skip the missed ticks rather than burst
                next_at = loop.time()
                delay = 0.0
            await _sleep(stop, delay)

    async def tick(self) -> int | None:
        """Collect one interval into the buffer; returns its sequence number (None if the
        batch could not be built)."""
        end = datetime.now(UTC)
        start = self._last_end or end - timedelta(seconds=self.interval_s)
        start = min(start, end)
        readings = await asyncio.gather(*(self._collect(c) for c in self._collectors))
        gauges: dict[str, float] = {}
        series: list[SeriesSketch] = []
        usage: list[UsageCount] = []
        counters: dict[str, int] = {}
        cursors: dict[str, dict[str, str]] = {}
        for collector, reading in zip(self._collectors, readings, strict=True):
            if reading is None:
                continue
            gauges.update((k, v) for k, v in reading.gauges.items() if math.isfinite(v))
            series.extend(reading.series)
            usage.extend(reading.usage)
            for key, value in reading.counters.items():
                counters[key] = counters.get(key, 0) + value
            if reading.cursors is not None:
                cursors[collector.name] = reading.cursors

        def build(seq: int, dropped: int) -> str:
            if dropped:
                counters[DROPPED_COUNTER] = counters.get(DROPPED_COUNTER, 0) + dropped
            return TelemetryBatch(
                node_id=self.node_id,
                seq=seq,
                interval_start=start,
                interval_end=end,
                gauges=gauges,
                series=series,
                counters=counters,
                usage=usage,
            ).model_dump_json()

        dropped_before = self.buffer.dropped_total
        try:
            seq = self.buffer.append(build, cursors)
        except ValidationError as exc:
            log.error("telemetry batch could not be built, skipped: %s", exc)
            return None
        self._cursors.update(cursors)
        self._last_end = end
        self.latest_gauges = gauges
        if self.sender is not None:
            if self.buffer.dropped_total > dropped_before:
                self.sender.forget_below(self.buffer.first_seq())
            self.sender.wake()
        return seq

    async def _collect(self, collector: Collector) -> Reading | None:
        try:
            reading = await asyncio.wait_for(
                collector.collect(self._cursors.get(collector.name, {})),
                timeout=max(2.0, 2 * self.interval_s),
            )
        except Exception as exc:  # one broken collector must not stop the others
            if collector.name not in self._failing:
                log.warning("telemetry collector %s failed: %r", collector.name, exc)
            self._failing.add(collector.name)
            return None
        self._failing.discard(collector.name)
        return reading

    def close(self) -> None:
        for collector in self._collectors:
            close = getattr(collector, "close", None)
            if callable(close):
                close()
        self.buffer.close()


def open_shipper(
    node_id: UUID,
    state_dir: Path,
    client: ControlPlaneClient | None,
    collectors: Sequence[Collector],
    *,
    interval_s: float = 1.0,
    buffer_batches: int = 21600,
    durable: bool = True,
) -> TelemetryShipper:
    """A shipper with its buffer in `state_dir`; `client` None collects without sending."""
    buffer = TelemetryBuffer(state_dir / BUFFER_FILE, buffer_batches, durable=durable)
    sender = TelemetrySender(buffer, client) if client is not None else None
    return TelemetryShipper(node_id, collectors, buffer, sender, interval_s=interval_s)


async def _sleep(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), timeout=max(0.0, seconds))
    except TimeoutError:
        pass
