"""The telemetry shipper: bounded disk buffer, sequence across restarts, and the contract's
WebSocket window, go-back, rejection and HTTP fallback against an in-test control plane."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path

import httpx
import pytest

from agent.client import ControlPlaneClient, ControlPlaneError
from agent.gauges import Reading
from agent.protocol import AppliedStatus, Heartbeat, TelemetryBatch
from agent.shipper import (
    BUFFER_FILE,
    DROPPED_COUNTER,
    TelemetryBuffer,
    TelemetrySender,
    TelemetryShipper,
)
from tests.agent.fakes import TelemetryControlPlane
from tests.agent.samples import NODE, NOW
from tests.serving import serving

CREDENTIAL = "tgn_8f2d3c4b5a69788796a5b4c3d2e1f0"


class Counting:
    """A collector whose cursor counts the batches it contributed to."""

    name = "counting"

    def __init__(self) -> None:
        self.seen: list[Mapping[str, str]] = []

    async def collect(self, cursors: Mapping[str, str]) -> Reading:
        self.seen.append(dict(cursors))
        taken = int(cursors.get("taken", "0")) + 1
        return Reading(gauges={"host.load1": float(taken)}, cursors={"taken": str(taken)})


def shipper_at(path: Path, max_batches: int = 100, sender: bool = False) -> TelemetryShipper:
    buffer = TelemetryBuffer(path / BUFFER_FILE, max_batches)
    return TelemetryShipper(NODE, [Counting()], buffer, None, interval_s=1.0)


def seqs(buffer: TelemetryBuffer) -> list[int]:
    return [seq for seq, _ in buffer.read_from(0, 1_000_000)]


def batch(buffer: TelemetryBuffer, seq: int) -> TelemetryBatch:
    (row,) = buffer.read_from(seq, 1)
    return TelemetryBatch.model_validate_json(row[1])


async def test_buffer_keeps_the_newest_up_to_its_bound_and_counts_what_it_dropped(
    tmp_path: Path,
) -> None:
    shipper = shipper_at(tmp_path, max_batches=5)
    for _ in range(8):
        await shipper.tick()
    assert seqs(shipper.buffer) == [4, 5, 6, 7, 8]
    assert shipper.buffer.dropped_total == 3
    assert DROPPED_COUNTER not in batch(shipper.buffer, 6).counters  # nothing dropped before
    assert batch(shipper.buffer, 8).counters[DROPPED_COUNTER] == 1  # the one batch 7 pushed out
    shipper.close()

    reopened = shipper_at(tmp_path, max_batches=5)
    assert reopened.buffer.dropped_total == 3
    assert len(reopened.buffer) == 5
    assert await reopened.tick() == 9
    assert batch(reopened.buffer, 9).counters[DROPPED_COUNTER] == 1  # batch 8's, not yet told
    reopened.close()


async def test_sequence_and_cursors_continue_after_a_restart(tmp_path: Path) -> None:
    shipper = shipper_at(tmp_path)
    assert [await shipper.tick() for _ in range(3)] == [1, 2, 3]
    shipper.close()

    restarted = shipper_at(tmp_path)
    collector = restarted._collectors[0]
    assert await restarted.tick() == 4
    assert isinstance(collector, Counting)
    assert collector.seen == [{"taken": "3"}]  # resumes from what was stored with batch 3
    assert batch(restarted.buffer, 4).gauges["host.load1"] == 4.0
    assert seqs(restarted.buffer) == [1, 2, 3, 4]
    restarted.close()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=5) as client:
        yield client


async def ship(
    buffer: TelemetryBuffer,
    control_plane: TelemetryControlPlane,
    http: httpx.AsyncClient,
    done: Callable[[], bool],
    credential: str = CREDENTIAL,
) -> TelemetrySender:
    """Run a sender against the in-test control plane until `done()` (or 20 s)."""
    async with serving(control_plane) as url:
        client = ControlPlaneClient(http, url, credential)
        sender = TelemetrySender(buffer, client, backoff_initial_s=0.05, backoff_max_s=0.2)
        stop = asyncio.Event()
        task = asyncio.create_task(sender.run(stop))
        for _ in range(400):
            if done():
                break
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.wait_for(task, 10)
    return sender


async def filled(tmp_path: Path, count: int) -> TelemetryBuffer:
    shipper = shipper_at(tmp_path, max_batches=1000)
    for _ in range(count):
        await shipper.tick()
    return shipper.buffer


def increasing(values: list[int]) -> bool:
    return all(a < b for a, b in zip(values, values[1:], strict=False))


async def test_sends_in_order_within_the_window_and_goes_back_on_retry(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    buffer = await filled(tmp_path, 100)
    control_plane = TelemetryControlPlane(CREDENTIAL, hold_acks=True, retry_once=frozenset({40}))
    sender = await ship(buffer, control_plane, http, lambda: len(buffer) == 0)

    assert control_plane.stored == list(range(1, 101))
    assert len(buffer) == 0
    assert control_plane.max_outstanding == 32  # the window, filled but never exceeded
    sent = [seq for transport, seq in control_plane.received if transport == "ws"]
    again = sent.index(40, sent.index(40) + 1)  # the resend of 40
    assert increasing(sent[:again]) and increasing(sent[again:])
    assert all(seq > 40 for seq in sent[sent.index(40) + 1 : again])  # in flight, answered retry
    assert sender.outcomes["stored"] == 100 and sender.outcomes["retry"] >= 1


async def test_duplicates_are_deleted_like_stored_batches(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    buffer = await filled(tmp_path, 5)
    control_plane = TelemetryControlPlane(CREDENTIAL, last_seq=3)  # 1-3 arrived before an outage
    sender = await ship(buffer, control_plane, http, lambda: len(buffer) == 0)
    assert control_plane.stored == [4, 5]
    assert sender.outcomes == {"duplicate": 3, "stored": 2}


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def shipper_log() -> Iterator[Records]:
    handler = Records()
    logger = logging.getLogger("agent.shipper")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


async def test_rejected_batches_are_dropped_and_the_reason_logged(
    tmp_path: Path, http: httpx.AsyncClient, shipper_log: Records
) -> None:
    buffer = await filled(tmp_path, 5)
    control_plane = TelemetryControlPlane(CREDENTIAL, reject=frozenset({3}))
    await ship(buffer, control_plane, http, lambda: len(buffer) == 0)
    assert control_plane.stored == [1, 2, 4, 5]
    warnings = [r.getMessage() for r in shipper_log.records if r.levelno == logging.WARNING]
    assert any("batch 3" in m and "batch 3 is malformed" in m for m in warnings), warnings


async def test_posts_over_http_in_order_when_the_websocket_is_refused(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    buffer = await filled(tmp_path, 5)
    control_plane = TelemetryControlPlane(
        CREDENTIAL, websocket=False, reject=frozenset({2}), http_script=[429, 503]
    )
    sender = await ship(buffer, control_plane, http, lambda: len(buffer) == 0)
    assert control_plane.stored == [1, 3, 4, 5]
    assert {transport for transport, _ in control_plane.received} == {"http"}
    # 429 and 503 kept batch 1; it went again, and nothing was posted out of order.
    assert [seq for _, seq in control_plane.received] == [1, 1, 1, 2, 3, 4, 5]
    assert sender.outcomes["rejected"] == 1 and sender.outcomes["stored"] == 4


async def test_a_refused_credential_keeps_every_batch(
    tmp_path: Path, http: httpx.AsyncClient, shipper_log: Records
) -> None:
    buffer = await filled(tmp_path, 3)
    control_plane = TelemetryControlPlane("tgn_another_credential_entirely")
    await ship(
        buffer,
        control_plane,
        http,
        lambda: any(r.levelno == logging.ERROR for r in shipper_log.records),
    )
    assert control_plane.stored == [] and len(buffer) == 3
    assert any("credential" in r.getMessage() for r in shipper_log.records)


async def test_batches_collected_during_an_outage_arrive_after_it(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    """A control plane that is away for a while and an agent restart lose nothing."""
    shipper = shipper_at(tmp_path)
    client = ControlPlaneClient(http, "http://127.0.0.1:9", CREDENTIAL)  # nothing listens
    shipper.sender = TelemetrySender(shipper.buffer, client, backoff_initial_s=0.05)
    stop = asyncio.Event()
    task = asyncio.create_task(shipper.sender.run(stop))
    for _ in range(4):
        await shipper.tick()
    stop.set()
    await task
    shipper.close()

    restarted = shipper_at(tmp_path)
    await restarted.tick()
    control_plane = TelemetryControlPlane(CREDENTIAL)
    await ship(restarted.buffer, control_plane, http, lambda: len(control_plane.stored) == 5)
    assert control_plane.stored == [1, 2, 3, 4, 5]
    restarted.close()


async def until(done: Callable[[], bool]) -> None:
    while not done():
        await asyncio.sleep(0.01)


def applied_status() -> AppliedStatus:
    return AppliedStatus(
        node_id=NODE,
        generation=3,
        content_hash="a" * 64,
        state="applied",
        components=[],
        reported_at=NOW,
    )


@pytest.mark.parametrize("takes_heartbeats", [True, False], ids=["current", "older"])
async def test_heartbeats_ride_the_websocket_only_where_the_control_plane_takes_them(
    tmp_path: Path, http: httpx.AsyncClient, takes_heartbeats: bool
) -> None:
    """A control plane that selects the subprotocol gets heartbeats as frames; an older
    one never sees such a frame (it would read it as a batch), and the caller POSTs."""
    heartbeat = Heartbeat(
        node_id=NODE, sent_at=NOW, agent_version="1.2.3", applied_generation=4, uptime_s=9.0
    )
    buffer = await filled(tmp_path, 3)
    control_plane = TelemetryControlPlane(CREDENTIAL, heartbeats=takes_heartbeats)
    async with serving(control_plane) as url:
        client = ControlPlaneClient(http, url, CREDENTIAL)
        sender = TelemetrySender(buffer, client, backoff_initial_s=0.05, backoff_max_s=0.2)
        assert not await sender.send_heartbeat(heartbeat)  # no WebSocket yet
        stop = asyncio.Event()
        task = asyncio.create_task(sender.run(stop))

        await asyncio.wait_for(until(lambda: len(buffer) == 0), 20)  # connected, acked
        assert await sender.send_heartbeat(heartbeat) is takes_heartbeats
        if takes_heartbeats:
            await asyncio.wait_for(until(lambda: bool(control_plane.heartbeats)), 20)
        stop.set()
        await asyncio.wait_for(task, 10)
        assert not await sender.send_heartbeat(heartbeat)  # closed: POST it
    assert control_plane.heartbeats == ([heartbeat] if takes_heartbeats else [])
    assert control_plane.stored == [1, 2, 3]


@pytest.mark.parametrize("takes_statuses", [True, False], ids=["current", "older"])
async def test_status_reports_ride_the_websocket_only_where_the_control_plane_takes_them(
    tmp_path: Path, http: httpx.AsyncClient, takes_statuses: bool
) -> None:
    """A control plane that selects the status subprotocol gets each report as a frame and
    answers it by its id; with one that selects only the older subprotocol (heartbeats),
    no report goes over the WebSocket and the caller POSTs it."""
    status = applied_status()
    buffer = await filled(tmp_path, 1)
    control_plane = TelemetryControlPlane(
        CREDENTIAL, heartbeats=True, statuses=takes_statuses, status_script=["rejected"]
    )
    async with serving(control_plane) as url:
        sender = TelemetrySender(buffer, ControlPlaneClient(http, url, CREDENTIAL))
        assert await sender.send_status(status) is None  # no WebSocket yet
        stop = asyncio.Event()
        task = asyncio.create_task(sender.run(stop))
        await asyncio.wait_for(until(lambda: len(buffer) == 0), 20)  # connected, acked
        first, second = await sender.send_status(status), await sender.send_status(status)
        if takes_statuses:
            assert first is not None and second is not None
            assert (first.outcome, second.outcome) == ("rejected", "recorded")
        else:
            assert first is None and second is None
        stop.set()
        await asyncio.wait_for(task, 10)
    assert control_plane.statuses == ([status, status] if takes_statuses else [])


@pytest.mark.parametrize("answer", ["close", "silent"])
async def test_a_status_report_left_unanswered_is_sent_again(
    tmp_path: Path, http: httpx.AsyncClient, answer: str
) -> None:
    """The WebSocket closes before the report's ack: the caller POSTs it (the control plane
    stores a repeat once). No ack within the timeout: the control plane counts as
    unreachable, and the caller's retry sends it again."""
    status = applied_status()
    buffer = await filled(tmp_path, 1)
    control_plane = TelemetryControlPlane(CREDENTIAL, statuses=True, status_script=[answer])
    async with serving(control_plane) as url:
        client = ControlPlaneClient(http, url, CREDENTIAL)
        sender = TelemetrySender(buffer, client, status_timeout_s=0.2)
        stop = asyncio.Event()
        task = asyncio.create_task(sender.run(stop))
        await asyncio.wait_for(until(lambda: len(buffer) == 0), 20)
        if answer == "close":
            assert await sender.send_status(status) is None
        else:
            with pytest.raises(ControlPlaneError) as unanswered:
                await sender.send_status(status)
            assert unanswered.value.status == 0
        assert not sender._status_acks  # nothing left waiting
        stop.set()
        await asyncio.wait_for(task, 10)
    assert control_plane.statuses == [status]
