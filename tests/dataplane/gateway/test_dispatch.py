"""The gateway in process, with its default in-process ledger: ASGI calls straight into
``GatewayApp``, replicas played by aiohttp servers in the same event loop (real HTTP on
ephemeral ports) whose streams the tests hold open, end or cut, and the ledger's clock
frozen, so nothing depends on the machine's speed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from dataplane.asgi import PEER_KEY_HEADER
from dataplane.gateway import server as gateway_server
from dataplane.gateway.config import GatewayConfig
from dataplane.gateway.ledger import (
    Finished,
    InProcessLedger,
    Renewal,
    Settlement,
    StartRequest,
)
from dataplane.gateway.routing import Replica, ReplicaState
from dataplane.gateway.server import (
    DISPATCH_POLL_S,
    Gateway,
    GatewayApp,
    _Deployment,
    _prompt_tokens,
    _Waiter,
)
from dataplane.inference.config import SloThreshold
from tests.dataplane.inference.procs import key_hash

KEY = "key-a"
MODEL = "m"


def state_message(free_slots: int = 4, **fields: Any) -> dict[str, Any]:
    return {
        "running": 0,
        "max_batch_size": 4,
        "free_slots": free_slots,
        "queued": [],
        "prefill_tokens": 0,
        "max_tokens_per_step": 256,
        "step_s": 0.01,
        "prefill_token_s": 0.0001,
        "mean_e2e_s": 1.0,
        "preempts": True,
        **fields,
    }


def state(free_slots: int = 4, **fields: Any) -> ReplicaState:
    return ReplicaState.from_message(state_message(free_slots, **fields))


def token_chunk(index: int) -> bytes:
    body = {"object": "text_completion", "choices": [{"index": 0, "text": f"t{index}"}]}
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


class FakeReplicas:
    """Answer forwarded requests, each replica on a server of its own: ``tokens`` token
    chunks, then [DONE] unless ``hang`` (the stream then stays open until the test ends)
    or ``broken`` (the connection is then cut without the stream's end)."""

    def __init__(self) -> None:
        self.bodies: list[tuple[str, dict[str, Any]]] = []  # (replica id, request body)
        self.peer_keys: list[tuple[str, str | None]] = []  # (replica id, its peer key header)
        self.tokens = 3
        self.hang = False  # after its tokens, until released
        self.stall = False  # before its response starts, until released
        self.broken = False
        self.release = asyncio.Event()
        self.servers: list[TestServer] = []

    async def start(self, replica_id: str) -> str:
        """Start ``replica_id``'s server on a free port; returns its base URL."""

        async def handle(request: web.Request) -> web.StreamResponse:
            return await self.handle(replica_id, request)

        app = web.Application()
        app.router.add_post("/v1/{path:.*}", handle)
        server = TestServer(app, host="127.0.0.1", port=0)
        await server.start_server()
        self.servers.append(server)
        return str(server.make_url("")).rstrip("/")

    async def handle(self, replica_id: str, request: web.Request) -> web.StreamResponse:
        self.bodies.append((replica_id, json.loads(await request.read())))
        self.peer_keys.append((replica_id, request.headers.get(PEER_KEY_HEADER)))
        if self.stall:
            await self.release.wait()
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        for index in range(self.tokens):
            await response.write(token_chunk(index))
        if self.hang:
            await self.release.wait()
        if self.broken:
            assert request.transport is not None
            request.transport.abort()
            return response
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def close(self) -> None:
        self.release.set()
        for server in self.servers:
            await server.close()


class Setup:
    """A gateway over ``replicas`` fake replicas; ``await Setup.started(...)`` makes one."""

    def __init__(self, config: GatewayConfig, fake: FakeReplicas) -> None:
        self.gateway = Gateway(config)
        self.gateway.ledger = self.ledger = InProcessLedger(60.0, 60.0, clock=lambda: 0.0)
        self.fake = fake
        self.dep = _Deployment(config.deployments[0])
        self.gateway.deployments["d1"] = self.dep
        for cfg in config.deployments[0].replicas:
            replica = self.dep.replicas[cfg.replica_id] = Replica(cfg)
            replica.update(state())
        self.app = GatewayApp(self.gateway)
        self.loop: asyncio.Task[None] | None = None

    @classmethod
    async def started(
        cls,
        tenant: dict[str, Any],
        replicas: int = 2,
        peer_key: str | None = None,
        **gateway: Any,
    ) -> Setup:
        """``peer_key``: the replicas are another node's, reached with it; ``gateway``:
        more of the gateway's config."""
        fake = FakeReplicas()
        urls = {f"r{i}": await fake.start(f"r{i}") for i in range(replicas)}
        config = GatewayConfig.model_validate(
            {
                "gateway_id": "g1",
                **gateway,
                "deployments": [
                    {
                        "deployment_id": "d1",
                        "served_model_name": MODEL,
                        "replicas": [
                            {"replica_id": rid, "base_url": url, "peer_key": peer_key}
                            for rid, url in urls.items()
                        ],
                        "tenants": {"a": {**tenant, "key_sha256": [key_hash(KEY)]}},
                    }
                ],
            }
        )
        return cls(config, fake)

    async def streaming(self, call: Call) -> asyncio.Task[None]:
        """Serve ``call`` in a task of its own; returns once it has streamed 3 tokens."""
        served = asyncio.create_task(self.app(call.scope, call.receive, call.send))
        await call.wait_for(lambda: call.text.count("choices") == 3)
        return served

    async def asked(self, call: Call) -> asyncio.Task[None]:
        """Serve ``call`` in a task of its own; returns once a replica has been asked."""
        served = asyncio.create_task(self.app(call.scope, call.receive, call.send))
        async with asyncio.timeout(60):
            while not self.fake.bodies:
                await asyncio.sleep(0.01)
        return served

    def dispatching(self) -> None:
        self.loop = asyncio.create_task(self.gateway._dispatch_loop(self.dep))

    async def close(self) -> None:
        if self.loop is not None:
            self.loop.cancel()
        await self.gateway.client.close()
        await self.fake.close()

    def totals(self) -> dict[str, Any]:
        (found,) = self.dep.stats.collect(0)["requests"]
        return dict(found)

    async def settled_bucket(self) -> float:
        """Tenant a's bucket once the gateway settled what it owes the ledger."""
        await self.gateway.settle(self.dep)
        return self.ledger._books["d1"].buckets["a"].level


class Call:
    """One ASGI request; ``disconnect_after`` body messages, the client leaves (after
    the last one, as uvicorn reports a complete response)."""

    def __init__(self, body: dict[str, Any], path: str = "/v1/completions") -> None:
        self.scope = {
            "type": "http",
            "method": "POST",
            "path": path,
            "headers": [(b"authorization", f"Bearer {KEY}".encode())],
            "client": ("127.0.0.1", 1),
        }
        self.body = json.dumps(body).encode()
        self.incoming: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.incoming.put_nowait({"type": "http.request", "body": self.body})
        self.messages: list[dict[str, Any]] = []
        self.disconnect_after: Callable[[list[dict[str, Any]]], bool] = lambda _: False
        self.changed = asyncio.Event()

    async def receive(self) -> dict[str, Any]:
        return await self.incoming.get()

    async def send(self, message: dict[str, Any]) -> None:
        self.messages.append(message)
        self.changed.set()
        if self.disconnect_after(self.messages):
            self.disconnect_after = lambda _: False
            self.incoming.put_nowait({"type": "http.disconnect"})
            for _ in range(5):  # let the server see it before carrying on
                await asyncio.sleep(0)

    def leave(self) -> None:
        self.incoming.put_nowait({"type": "http.disconnect"})

    @property
    def status(self) -> int:
        return int(self.messages[0]["status"])

    @property
    def text(self) -> str:
        return b"".join(m.get("body", b"") for m in self.messages[1:]).decode()

    async def wait_for(self, test: Callable[[], bool]) -> None:
        async with asyncio.timeout(60):
            while not test():
                self.changed.clear()
                await self.changed.wait()


def body(max_tokens: int | None = 10, stream: bool = True) -> dict[str, Any]:
    found: dict[str, Any] = {"model": MODEL, "prompt": "hello", "stream": stream}
    if max_tokens is not None:
        found["max_tokens"] = max_tokens
    return found


def last_message(messages: list[dict[str, Any]]) -> bool:
    last = messages[-1]
    return last["type"] == "http.response.body" and not last.get("more_body", False)


async def test_one_round_fills_each_replica_once() -> None:
    setup = await Setup.started({})
    try:
        for replica in setup.dep.replicas.values():
            replica.update(state(free_slots=1))
        waiters = [
            _Waiter("a", 0, 10, 10, time.perf_counter(), None, stream=True) for _ in range(6)
        ]
        setup.dep.waiting["a"] = deque(waiters)
        await setup.gateway._dispatch_round(setup.dep)
        chosen = [w.future.result().replica_id for w in waiters if w.future.done()]
        assert sorted(chosen) == ["r0", "r1"]
        assert setup.dep.waiting_count() == 4
    finally:
        await setup.close()


async def test_with_every_replica_full_a_tenant_under_its_share_goes_ahead() -> None:
    """Both replicas are full of b's rows (b is past its share of 2 of 4 slots): a goes
    ahead, to be given b's rows, up to its share on each; b itself waits here."""
    setup = await Setup.started({})
    try:
        for replica in setup.dep.replicas.values():
            replica.update(state(free_slots=0, running=4, rows={"b": 4}))
        waiters = [
            _Waiter("a", 0, 10, 10, time.perf_counter(), None, stream=True) for _ in range(6)
        ]
        setup.dep.waiting["a"] = deque(waiters)
        await setup.gateway._dispatch_round(setup.dep)
        chosen = [w.future.result().replica_id for w in waiters if w.future.done()]
        assert sorted(chosen) == ["r0", "r0", "r1", "r1"]
        assert setup.dep.waiting_count() == 2
        # Once a holds its share everywhere, nothing more goes ahead.
        for replica in setup.dep.replicas.values():
            replica.update(state(free_slots=0, running=4, rows={"a": 2, "b": 2}))
        await setup.gateway._dispatch_round(setup.dep)
        assert setup.dep.waiting_count() == 2
    finally:
        await setup.close()


async def test_a_tenant_refused_going_ahead_holds_back_only_its_own_requests(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With every replica full, the ledger refuses a's second request going ahead (its
    concurrency is 1): a's next try waits for the backoff, but c, next in line in the
    round after, goes ahead at once rather than waiting out a's backoff."""
    monkeypatch.setattr(gateway_server, "AHEAD_BACKOFF_S", 3600.0)
    setup = await Setup.started({"max_concurrency": 1})
    asked: list[str] = []
    try_start = setup.ledger.try_start

    async def recorded(deployment: str, gateway: str, request: Any, *args: Any) -> Any:
        asked.append(request.tenant)
        return await try_start(deployment, gateway, request, *args)

    setup.ledger.try_start = recorded  # type: ignore[method-assign]
    try:
        for replica in setup.dep.replicas.values():
            replica.update(state(free_slots=0, running=4, rows={"b": 4}))

        def waiter(tenant: str) -> _Waiter:
            return _Waiter(tenant, 0, 10, 10, time.perf_counter(), None, stream=True)

        first, second = waiter("a"), waiter("a")
        setup.dep.waiting["a"] = deque([first, second])
        await setup.gateway._dispatch_round(setup.dep)
        assert first.future.done() and not second.future.done()
        assert asked == ["a", "a"]
        other = waiter("c")
        setup.dep.waiting["c"] = deque([other])
        await setup.gateway._dispatch_round(setup.dep)
        assert other.future.done() and not second.future.done()
        assert asked == ["a", "a", "c"]  # a's backoff holds for a alone
    finally:
        await setup.close()


async def test_a_waiter_gone_during_a_round_is_skipped() -> None:
    setup = await Setup.started({})
    try:
        setup.dep.replicas["r0"].update(state(free_slots=0))
        setup.dep.replicas["r1"].update(state(free_slots=0))
        late = _Waiter("a", 0, 10, 10, time.perf_counter() - 1, 0.001, stream=True)
        setup.dep.waiting["a"] = deque([late])
        ledger_waiting = setup.ledger.waiting

        async def waiting(deployment: str) -> set[str]:  # the client leaves meanwhile
            late.future.cancel()
            setup.dep.unqueue(late)
            return await ledger_waiting(deployment)

        setup.ledger.waiting = waiting  # type: ignore[method-assign]
        await setup.gateway._dispatch_round(setup.dep)
        assert setup.dep.waiting_count() == 0
    finally:
        await setup.close()


async def test_a_request_carries_the_peer_key_to_a_replica_on_another_node() -> None:
    setup = await Setup.started({}, replicas=1, peer_key="pk-0123456789abcdef")
    setup.dispatching()
    try:
        call = Call(body(max_tokens=3))
        await setup.app(call.scope, call.receive, call.send)
        assert call.status == 200
        assert setup.fake.peer_keys == [("r0", "pk-0123456789abcdef")]
    finally:
        await setup.close()


async def test_a_completed_stream_is_not_cancelled_by_the_disconnect_after_it() -> None:
    setup = await Setup.started({"tokens_per_s": 1.0, "burst_tokens": 100})
    setup.dispatching()
    try:
        call = Call(body(max_tokens=10))
        call.disconnect_after = last_message
        await setup.app(call.scope, call.receive, call.send)
        assert call.status == 200 and call.text.endswith("data: [DONE]\n\n")
        totals = setup.totals()
        assert (totals["completed"], totals["cancelled"], totals["failed"]) == (1, 0, 0)
        assert await setup.settled_bucket() == pytest.approx(100 - 3)  # 10 reserved, 7 refunded
        assert not any(setup.dep.leases.values())
    finally:
        await setup.close()


def counting_settlements(setup: Setup) -> list[Settlement]:
    """What the gateway settles with the ledger on its own, as it is settled."""
    settled: list[Settlement] = []
    settle = setup.ledger.settle

    async def counted(deployment: str, owed: Sequence[Settlement]) -> None:
        settled.extend(owed)
        await settle(deployment, owed)

    setup.ledger.settle = counted  # type: ignore[method-assign]
    return settled


async def second_after_first(setup: Setup) -> Call:
    """With one lease allowed: a first request streams, held open, until a second one
    waits for its lease; then the first ends, and both are awaited. Returns the second."""
    setup.fake.hang = True
    first = Call(body(max_tokens=10))
    running = asyncio.create_task(setup.app(first.scope, first.receive, first.send))
    await first.wait_for(lambda: first.text.count("choices") == 3)
    second = Call(body(max_tokens=10))
    waiting = asyncio.create_task(setup.app(second.scope, second.receive, second.send))
    async with asyncio.timeout(60):
        while not setup.dep.waiting_count():
            await asyncio.sleep(0.01)
        setup.fake.release.set()
        await asyncio.gather(running, waiting)
    return second


async def test_a_requests_end_rides_on_the_admission_it_frees() -> None:
    """Ending a request costs no ledger call of its own: the second request starts
    only because its admission carried the first one's end."""
    setup = await Setup.started({"max_concurrency": 1})
    settled = counting_settlements(setup)
    setup.dispatching()
    try:
        second = await second_after_first(setup)
        # Two ends: the first rode on the second's admission, the second (with nothing
        # waiting after it) was settled on its own.
        assert second.status == 200 and [len(owed.finished) for owed in settled] == [1]
    finally:
        await setup.close()


async def test_an_end_with_nothing_waiting_is_settled_at_once() -> None:
    setup = await Setup.started({"tokens_per_s": 1.0, "burst_tokens": 100})
    settled = counting_settlements(setup)
    setup.dispatching()
    try:
        call = Call(body(max_tokens=10))
        await setup.app(call.scope, call.receive, call.send)
        book = setup.ledger._books["d1"]
        async with asyncio.timeout(60):
            while book.leases["a"] or setup.dep.owed:
                await asyncio.sleep(0.01)
        assert book.buckets["a"].level == pytest.approx(100 - 3)
        assert sum(len(owed.finished) for owed in settled) == 1
    finally:
        await setup.close()


async def test_tokens_no_call_takes_are_settled_on_their_own() -> None:
    setup = await Setup.started({})
    settled = counting_settlements(setup)
    setup.dispatching()
    settling = asyncio.create_task(setup.gateway._flush_loop())
    setup.fake.hang = True
    try:
        call = Call(body(max_tokens=10))
        served = await setup.streaming(call)
        weighted = 3 * setup.dep.route.output_token_weight
        async with asyncio.timeout(60):  # charged while the request still streams
            while sum(owed.charges.get("a", 0.0) for owed in settled) < weighted:
                await asyncio.sleep(0.01)
        assert not served.done()
        assert setup.ledger._books["d1"].counters["a"] == pytest.approx(setup.dep.counters["a"])
        setup.fake.release.set()
        await served
    finally:
        settling.cancel()
        await setup.close()


class GatedSettling:
    """The ledger's settle calls wait at a gate the test opens, then apply: a ledger
    whose calls take time, however long that is."""

    def __init__(self, setup: Setup) -> None:
        self.calls: list[Sequence[Settlement]] = []
        self.gate = asyncio.Event()
        settle = setup.ledger.settle

        async def gated(deployment: str, owed: Sequence[Settlement]) -> None:
            self.calls.append(owed)
            await self.gate.wait()
            await settle(deployment, owed)

        setup.ledger.settle = gated  # type: ignore[method-assign]

    async def called(self, times: int) -> None:
        async with asyncio.timeout(60):
            while len(self.calls) < times:
                await asyncio.sleep(0.01)


async def ended_while_settling_is_slow(setup: Setup) -> GatedSettling:
    """A first request streams, then ends with nothing waiting: its end is settled at
    once, in a call held at the gate. Later requests' streams hang until released."""
    setup.fake.hang = True
    first = Call(body(max_tokens=10))
    running = asyncio.create_task(setup.app(first.scope, first.receive, first.send))
    await first.wait_for(lambda: first.text.count("choices") == 3)
    gated = GatedSettling(setup)
    ending, setup.fake.release = setup.fake.release, asyncio.Event()
    ending.set()
    await running
    await gated.called(1)
    return gated


async def test_tokens_streamed_beside_slow_settling_wait_for_the_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Settling an idle end takes a while; a stream beside it owes tokens meanwhile.
    Those wait for the settling loop: a call for them at once would make every token
    of a stream a call while settling is slow."""
    monkeypatch.setattr(gateway_server, "SETTLE_TIMEOUT_S", 3600.0)  # slow, never too slow
    setup = await Setup.started({})
    setup.dispatching()
    try:
        gated = await ended_while_settling_is_slow(setup)
        beside = Call(body(max_tokens=10))
        streaming = asyncio.create_task(setup.app(beside.scope, beside.receive, beside.send))
        await beside.wait_for(lambda: beside.text.count("choices") == 3)
        gated.gate.set()
        async with asyncio.timeout(60):
            while setup.dep.settling is not None:
                await asyncio.sleep(0.01)
        assert len(gated.calls) == 1 and setup.dep.owed and not setup.dep.owed.ends
        setup.fake.release.set()
        await streaming
    finally:
        await setup.close()


async def test_a_slow_settle_that_frees_a_lease_wakes_the_dispatcher(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A request waits for the lease that a settle under way frees: it starts when that
    settle returns, not when the dispatcher next looks on its own (here: never)."""
    monkeypatch.setattr(gateway_server, "DISPATCH_POLL_S", 3600.0)
    monkeypatch.setattr(gateway_server, "SETTLE_TIMEOUT_S", 3600.0)
    setup = await Setup.started({"max_concurrency": 1})
    refused: list[str] = []
    try_start = setup.ledger.try_start

    async def recorded(*args: Any, **kwargs: Any) -> Any:
        decision = await try_start(*args, **kwargs)
        if not decision.ok:
            refused.append(decision.reason)
        return decision

    setup.ledger.try_start = recorded  # type: ignore[method-assign]
    setup.dispatching()
    try:
        gated = await ended_while_settling_is_slow(setup)
        setup.fake.release.set()
        second = Call(body(max_tokens=10))
        waiting = asyncio.create_task(setup.app(second.scope, second.receive, second.send))
        async with asyncio.timeout(60):
            while not refused:
                await asyncio.sleep(0.01)
        assert refused == ["concurrency"]  # the first's lease is held until the settle
        gated.gate.set()
        async with asyncio.timeout(60):
            await waiting
        assert second.status == 200
    finally:
        await setup.close()


@pytest.mark.parametrize("applied", [False, True], ids=["lost", "applied"])
async def test_what_a_failed_admission_carried_goes_with_the_next(applied: bool) -> None:
    """The second request starts only once the first one's end reaches the ledger; the
    admission that carried it first failed, either before the ledger applied it or
    after (its answer lost). Either way the end and the start count once."""
    setup = await Setup.started({"max_concurrency": 1, "tokens_per_s": 1.0, "burst_tokens": 100})
    try_start = setup.ledger.try_start
    failures = [ConnectionError("the ledger's server went away")]

    async def failing_once(*args: Any, **kwargs: Any) -> Any:
        owed = kwargs.get("owed", args[5] if len(args) > 5 else ())
        if failures and any(s.finished for s in owed):
            if applied:
                await try_start(*args, **kwargs)
            raise failures.pop()
        return await try_start(*args, **kwargs)

    setup.ledger.try_start = failing_once  # type: ignore[method-assign]
    setup.dispatching()
    try:
        second = await second_after_first(setup)
        assert second.status == 200 and not failures
        # 10 reserved and 7 refunded per request: a refund or a reservation counted
        # twice would show here.
        assert await setup.settled_bucket() == pytest.approx(100 - 3 - 3)
        started = 2 * _prompt_tokens(body()) * setup.dep.route.input_token_weight
        streamed = 6 * setup.dep.route.output_token_weight
        counters = setup.ledger._books["d1"].counters
        assert counters["a"] == pytest.approx(started + streamed)
    finally:
        await setup.close()


@pytest.mark.parametrize("leaves", ["after the call", "during the call", "after a reweighing"])
async def test_a_start_in_doubt_is_undone_when_its_client_leaves(leaves: str) -> None:
    """The ledger took the start but its answer was lost; the client leaves, after that
    call, while it was under way, or after the tenant's weight changed and the start was
    asked again: the lease, the reservation and the counter advance go back."""
    setup = await Setup.started({"max_concurrency": 1, "tokens_per_s": 1.0, "burst_tokens": 100})
    try_start = setup.ledger.try_start
    asked, answered = asyncio.Event(), asyncio.Event()
    if leaves != "during the call":
        answered.set()

    async def lost(*args: Any, **kwargs: Any) -> Any:
        await try_start(*args, **kwargs)
        asked.set()
        await answered.wait()
        raise ConnectionError("the ledger's answer was lost")

    setup.ledger.try_start = lost  # type: ignore[method-assign]
    setup.dispatching()
    try:
        call = Call(body(max_tokens=10))
        served = asyncio.create_task(setup.app(call.scope, call.receive, call.send))
        async with asyncio.timeout(60):
            await asked.wait()
            book = setup.ledger._books["d1"]
            assert len(book.leases["a"]) == 1 and book.buckets["a"].level == 90
            assert book.counters["a"] > 0
            if leaves == "after a reweighing":
                tenants = {"a": setup.dep.route.tenants["a"].model_copy(update={"weight": 4.0})}
                setup.dep.set_route(setup.dep.route.model_copy(update={"tenants": tenants}))
                asked.clear()
                await asked.wait()
            call.leave()
            await served
            answered.set()
            while not setup.dep.owed:
                await asyncio.sleep(0.01)
        assert await setup.settled_bucket() == 100 and not book.leases["a"]
        assert book.counters["a"] == pytest.approx(0.0)
    finally:
        await setup.close()


async def test_a_start_left_without_a_replica_is_undone_and_charged_once() -> None:
    """Every replica went down while the ledger decided: the start is undone (its
    counter advance with it) and asked again once a replica is back, so the request's
    prompt is charged once."""
    setup = await Setup.started({}, replicas=1)
    (replica,) = setup.dep.replicas.values()
    try_start = setup.ledger.try_start
    decided: list[bool] = []

    async def replica_lost_meanwhile(*args: Any, **kwargs: Any) -> Any:
        decision = await try_start(*args, **kwargs)
        decided.append(decision.ok)
        if len(decided) == 1:
            replica.mark_down()
        return decision

    setup.ledger.try_start = replica_lost_meanwhile  # type: ignore[method-assign]
    try:
        call = Call(body())
        served = asyncio.create_task(setup.app(call.scope, call.receive, call.send))
        async with asyncio.timeout(60):
            while setup.dep.waiting_count() == 0:
                await asyncio.sleep(0.01)
        await setup.gateway._dispatch_round(setup.dep)
        assert decided == [True] and setup.dep.waiting_count() == 1
        replica.update(state())
        await setup.gateway._dispatch_round(setup.dep)
        await served
        assert call.status == 200 and decided == [True, True]
        await setup.gateway.settle(setup.dep)
        route = setup.dep.route
        charged = _prompt_tokens(body()) * route.input_token_weight
        charged += setup.fake.tokens * route.output_token_weight
        assert setup.ledger._books["d1"].counters["a"] == pytest.approx(charged)
    finally:
        await setup.close()


async def test_a_stopping_gateway_settles_what_failed_calls_carried_and_the_rest() -> None:
    setup = await Setup.started({"tokens_per_s": 1.0, "burst_tokens": 100})
    limits = setup.dep.limits("a")
    try:
        for lease in ("l1", "l2"):
            request = StartRequest("a", lease, 0.0, 10, True)
            assert (await setup.ledger.try_start("d1", "g1", request, {"a": 10}, {"a": limits})).ok
        owed = setup.dep.owed
        owed.end(Finished("a", "l1", 10, limits))
        owed.restore(owed.take())  # carried by a call that failed
        owed.end(Finished("a", "l2", 10, limits))
        await setup.gateway.stop()
        book = setup.ledger._books["d1"]
        assert book.buckets["a"].level == 100 and not book.leases["a"]
    finally:
        await setup.close()


async def test_a_removed_deployments_requests_are_settled_as_they_end() -> None:
    setup = await Setup.started({"tokens_per_s": 1.0, "burst_tokens": 100})
    setup.dispatching()
    gateway = setup.gateway
    assert setup.loop is not None
    gateway._dispatchers["d1"] = setup.loop
    settling = asyncio.create_task(gateway._flush_loop())
    setup.fake.hang = True
    try:
        call = Call(body(max_tokens=10))
        served = await setup.streaming(call)
        gateway.apply(gateway.config.model_copy(update={"deployments": []}))
        setup.fake.release.set()  # the stream ends after its deployment went
        await served
        book = setup.ledger._books["d1"]
        async with asyncio.timeout(60):
            while book.leases["a"] or gateway._retired:
                await asyncio.sleep(0.01)
        assert book.buckets["a"].level == pytest.approx(100 - 3)
    finally:
        settling.cancel()
        await setup.close()


async def test_a_removed_deployments_running_requests_keep_their_leases() -> None:
    """Its requests run on after the deployment went: their leases are renewed, so the
    tenant's concurrency holds fleet-wide until they end."""
    setup = await Setup.started({"max_concurrency": 1})
    now = [0.0]
    setup.gateway.ledger = setup.ledger = InProcessLedger(60.0, 60.0, clock=lambda: now[0])
    setup.dispatching()
    gateway = setup.gateway
    assert setup.loop is not None
    gateway._dispatchers["d1"] = setup.loop
    gateway.beat_every = 0.0
    settling = asyncio.create_task(gateway._flush_loop())
    setup.fake.hang = True
    try:
        served = await setup.streaming(Call(body(max_tokens=10)))
        gateway.apply(gateway.config.model_copy(update={"deployments": []}))
        held = setup.ledger._books["d1"].leases["a"]
        now[0] = 50.0  # within the lease's TTL: a renewal moves its expiry on
        async with asyncio.timeout(60):
            while max(held.values()) < 110.0:
                await asyncio.sleep(0.01)
        now[0] = 100.0  # past the first expiry: another gateway's start is held back
        request = StartRequest("a", "elsewhere", 0.0, 10, True)
        limits = setup.dep.limits("a")
        decision = await setup.ledger.try_start("d1", "g2", request, {"a": 10}, {"a": limits})
        assert not decision.ok and decision.reason == "concurrency"
        setup.fake.release.set()
        await served
    finally:
        settling.cancel()
        await setup.close()


async def test_a_client_leaving_mid_stream_pays_for_what_it_was_sent() -> None:
    setup = await Setup.started({"tokens_per_s": 1.0, "burst_tokens": 100})
    setup.dispatching()
    setup.fake.hang = True
    try:
        call = Call(body(max_tokens=50))
        served = await setup.streaming(call)
        call.leave()
        await served
        totals = setup.totals()
        assert (totals["cancelled"], totals["failed"], totals["completed"]) == (1, 0, 0)
        assert await setup.settled_bucket() == pytest.approx(100 - 3)
    finally:
        await setup.close()


async def test_a_client_gone_as_its_replica_goes_down_is_not_sent_elsewhere() -> None:
    """The client's leaving and the replica's mark-down cancel the forward in one loop
    iteration, before the replica answered: the request ends, and no other replica is
    asked on behalf of a client who left."""
    setup = await Setup.started({})
    setup.dispatching()
    setup.fake.stall = True
    try:
        call = Call(body(max_tokens=5))
        served = await setup.asked(call)
        ((asked, _),) = setup.fake.bodies
        served.cancel()  # as the server does once the client is gone
        setup.dep.replica_down(setup.dep.replicas[asked])
        async with asyncio.timeout(60):  # sent elsewhere, it would stall there
            await served
        assert [replica for replica, _ in setup.fake.bodies] == [asked]
        assert setup.totals()["cancelled"] == 1
    finally:
        await setup.close()


async def test_output_beyond_the_reservation_is_capped_and_charged() -> None:
    setup = await Setup.started({"tokens_per_s": 1.0, "burst_tokens": 100})
    setup.dispatching()
    setup.fake.tokens = 6
    try:
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}
        call = Call(chat, path="/v1/chat/completions")
        await setup.app(call.scope, call.receive, call.send)
        assert setup.fake.bodies[0][1]["max_tokens"] == 256  # the worker stops there
        call = Call(body(max_tokens=4))
        await setup.app(call.scope, call.receive, call.send)
        # 6 of 256, then 6 of 4: the two over the reservation are charged too.
        assert await setup.settled_bucket() == pytest.approx(100 - 6 - 6)
    finally:
        await setup.close()


async def test_a_replica_marked_down_ends_the_streams_it_hangs() -> None:
    setup = await Setup.started({})
    setup.dispatching()
    setup.fake.hang = True
    try:
        call = Call(body(max_tokens=50))
        served = await setup.streaming(call)
        replica_id = setup.fake.bodies[0][0]
        setup.dep.replica_down(setup.dep.replicas[replica_id])
        await served
        assert "replica_failed" in call.text and call.text.endswith("data: [DONE]\n\n")
        totals = setup.totals()
        assert (totals["failed"], totals["cancelled"]) == (1, 0)
    finally:
        await setup.close()


def lose_lease(setup: Setup) -> None:
    """A renewal finds the one running request's lease lapsed and taken."""
    ((lease, _),) = setup.dep.leases["a"].items()
    setup.dep.renewed({"a": [lease]}, Renewal(lost=frozenset({lease})))


@pytest.mark.parametrize("replica_down_too", [False, True])
async def test_a_stream_whose_lease_was_lost_ends_with_an_error_chunk_once(
    replica_down_too: bool,
) -> None:
    """A lost lease ends its stream with an error chunk and [DONE], counted failed; a
    mark-down of its replica in the same loop iteration does not end it a second time,
    nor as a client that left."""
    setup = await Setup.started({"max_concurrency": 1})
    setup.dispatching()
    setup.fake.hang = True
    try:
        call = Call(body(max_tokens=50))
        served = await setup.streaming(call)
        lose_lease(setup)
        if replica_down_too:
            setup.dep.replica_down(setup.dep.replicas[setup.fake.bodies[0][0]])
        await served
        assert call.text.count('"error"') == 1 and "lease_lost" in call.text
        assert call.text.endswith("data: [DONE]\n\n")
        totals = setup.totals()
        assert (totals["failed"], totals["cancelled"]) == (1, 0)
        assert not setup.dep.leases["a"]
    finally:
        await setup.close()


async def test_a_request_whose_lease_was_lost_before_its_answer_gets_a_503() -> None:
    setup = await Setup.started({"max_concurrency": 1})
    setup.dispatching()
    setup.fake.stall = True
    try:
        call = Call(body(max_tokens=5))
        served = await setup.asked(call)
        lose_lease(setup)
        await served
        assert call.status == 503 and json.loads(call.text)["error"]["code"] == "lease_lost"
        assert len(setup.fake.bodies) == 1  # not sent to another replica
        assert setup.totals()["failed"] == 1
    finally:
        await setup.close()


async def test_a_lease_taken_back_after_its_request_ended_is_freed_again() -> None:
    """A renewal applied after the request's end (sent again after a Redis restart)
    took its lease back: it is owed to the ledger again, with nothing refunded twice."""
    setup = await Setup.started({"max_concurrency": 1})
    try:
        setup.dep.renewed({"a": ["ended"]}, Renewal(regained=frozenset({"ended"})))
        ((settlement,),) = [setup.dep.owed.take()]
        ((done,),) = [settlement.finished]
        assert (done.tenant, done.lease, done.refund, done.held_only) == ("a", "ended", 0, False)
    finally:
        await setup.close()


async def test_a_restarted_workers_failure_leaves_its_successors_streams_alone() -> None:
    """The replica's worker restarted (a new nonce) while a stream ran on it: a new
    replica took its id. The old one's failure ends the old stream, not the one the new
    replica serves."""
    setup = await Setup.started({}, replicas=1)
    setup.dispatching()
    setup.fake.hang = True
    try:
        first = Call(body(max_tokens=50))
        served_first = await setup.streaming(first)
        old = setup.dep.replicas["r0"]
        new = setup.dep.replicas["r0"] = Replica(old.config.model_copy(update={"nonce": "n2"}))
        new.update(state())
        second = Call(body(max_tokens=50))
        served_second = await setup.streaming(second)
        setup.dep.replica_down(old)
        await served_first
        assert "replica_failed" in first.text
        setup.fake.release.set()
        await served_second
        assert "error" not in second.text and second.text.endswith("data: [DONE]\n\n")
        assert not setup.dep.forwards  # nothing kept for ended streams
    finally:
        await setup.close()


async def test_a_replica_whose_config_changed_around_the_same_worker_fails_as_one() -> None:
    """Only the replica's peer key changed: the same worker serves the streams begun
    before, and its failure ends them too."""
    setup = await Setup.started({}, replicas=1)
    setup.dispatching()
    setup.fake.hang = True
    try:
        first = Call(body(max_tokens=50))
        served_first = await setup.streaming(first)
        old = setup.dep.replicas["r0"]
        rotated = old.config.model_copy(update={"peer_key": "rotated"})
        new = setup.dep.replicas["r0"] = Replica(rotated)
        new.update(state())
        setup.dep.replica_down(new)
        async with asyncio.timeout(60):  # left running, it would hang until the test ends
            await served_first
        assert "replica_failed" in first.text
    finally:
        await setup.close()


async def test_a_replica_down_between_choice_and_forward_is_replaced() -> None:
    setup = await Setup.started({})
    try:
        call = Call(body(max_tokens=5, stream=False))
        setup.fake.tokens = 0
        served = asyncio.create_task(setup.app(call.scope, call.receive, call.send))
        async with asyncio.timeout(60):
            while setup.dep.waiting_count() == 0:
                await asyncio.sleep(0.01)
        await setup.gateway._dispatch_round(setup.dep)
        chosen = next(r for r in setup.dep.replicas.values() if r.sent)
        chosen.mark_down()
        await served
        assert call.status == 200
        assert [replica_id for replica_id, _ in setup.fake.bodies] != [chosen.replica_id]
    finally:
        await setup.close()


@contextlib.contextmanager
def unanswered_address() -> Iterator[str]:
    """A base URL whose connects wait until they time out: a listener whose backlog is
    full and that accepts nothing (Linux then drops the SYNs)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        address = listener.getsockname()
        fillers = [socket.socket() for _ in range(2)]
        try:
            for filler in fillers:
                filler.setblocking(False)
                filler.connect_ex(address)
            yield f"http://{address[0]}:{address[1]}"
        finally:
            for filler in fillers:
                filler.close()


async def test_a_connect_timed_out_by_a_stall_of_the_gateway_leaves_its_replica_up() -> None:
    """A forward was connecting when the gateway's own loop stalled, so its connect
    timed out long after it was due. That says nothing of the replica: it stays up (its
    health watch decides) and the request goes to the other replica. One that times out
    when due marks the replica down."""
    setup = await Setup.started({}, health_interval_s=1.0)
    try:
        with unanswered_address() as url:
            hung = setup.dep.replicas["r0"]
            hung.config = hung.config.model_copy(update={"base_url": url})
            setup.dep.replicas["r1"].update(state(step_s=0.05))  # r0 is predicted sooner
            setup.dispatching()
            call = Call(body(max_tokens=5))
            served = asyncio.create_task(setup.app(call.scope, call.receive, call.send))
            async with asyncio.timeout(60):
                while not hung.inflight:
                    await asyncio.sleep(0.01)
            time.sleep(2.0)  # the stall: twice the connect timeout, the loop held
            await served
            assert call.status == 200 and "[DONE]" in call.text
            assert [replica_id for replica_id, _ in setup.fake.bodies] == ["r1"]
            assert hung.up
            # Timed out when due, the connect is the replica's failure (a busy machine
            # may stall this gateway again: each request tries r0 while it is up).
            for _ in range(5):
                again = Call(body(max_tokens=5))
                await setup.app(again.scope, again.receive, again.send)
                assert again.status == 200
                if not hung.up:
                    break
            assert not hung.up
    finally:
        await setup.close()


async def test_the_tightest_ttft_threshold_is_the_objective() -> None:
    setup = await Setup.started({})
    try:
        setup.dep.stats.set_thresholds(
            SloThreshold.model_validate({"tenant": "a", "metric": "ttft", "threshold_seconds": s})
            for s in (0.5, 0.2)
        )
        assert setup.dep.stats.tightest("a", "ttft") == 0.2
        assert setup.dep.stats.tightest("b", "ttft") is None
    finally:
        await setup.close()


async def test_a_stream_its_replica_cuts_ends_failed_with_an_error_chunk() -> None:
    setup = await Setup.started({})
    setup.dispatching()
    setup.fake.broken = True
    try:
        call = Call(body(max_tokens=50))
        await setup.app(call.scope, call.receive, call.send)
        assert "replica_failed" in call.text and call.text.endswith("data: [DONE]\n\n")
        totals = setup.totals()
        assert (totals["failed"], totals["cancelled"]) == (1, 0)
    finally:
        await setup.close()


class FakeWorker:
    """A replica's ``/health`` (answering ``nonce``) and state stream: each stream sends
    the messages ``send`` gives it, one line each, and is otherwise silent."""

    def __init__(self, nonce: str) -> None:
        self.nonce = nonce
        self.health_body: Any = None  # what /health answers instead, if set
        self.health_calls = 0
        self.checked = asyncio.Event()  # set on every /health
        self.state_auth: list[str | None] = []  # one per state stream opened
        self.state_peer: list[str | None] = []  # its peer key header, one per stream
        self.streams: list[asyncio.Queue[dict[str, Any]]] = []
        self.opened = asyncio.Event()  # set on every state stream opened
        self.server: TestServer | None = None

    async def start(self) -> str:
        app = web.Application()
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/internal/state", self.state)
        self.server = TestServer(app, host="127.0.0.1", port=0)
        await self.server.start_server()
        return str(self.server.make_url("")).rstrip("/")

    async def health(self, request: web.Request) -> web.Response:
        self.health_calls += 1
        self.checked.set()
        if self.health_body is not None:
            return web.json_response(self.health_body)
        return web.json_response({"status": "ok", "nonce": self.nonce, "replica_id": "r0"})

    async def state(self, request: web.Request) -> web.StreamResponse:
        self.state_auth.append(request.headers.get("authorization"))
        self.state_peer.append(request.headers.get(PEER_KEY_HEADER))
        messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.streams.append(messages)
        self.opened.set()
        response = web.StreamResponse(headers={"content-type": "application/x-ndjson"})
        await response.prepare(request)
        while True:
            message = await messages.get()
            await response.write(json.dumps(message).encode() + b"\n")

    async def send(self, stream: int, message: dict[str, Any]) -> None:
        """Send ``message`` on the ``stream``-th state stream (from 1), once it opens."""
        async with asyncio.timeout(60):
            while len(self.streams) < stream:
                self.opened.clear()
                await self.opened.wait()
        self.streams[stream - 1].put_nowait(message)

    async def close(self) -> None:
        if self.server is not None:
            await self.server.close()


async def watched(
    worker: FakeWorker, nonce: str | None, peer_key: str | None = None
) -> tuple[Gateway, _Deployment, Replica, asyncio.Task[None]]:
    """A gateway watching ``worker`` as replica r0 that must answer ``nonce`` (another
    node's, with ``peer_key``)."""
    assert worker.server is not None
    base_url = str(worker.server.make_url("")).rstrip("/")
    config = GatewayConfig.model_validate(
        {
            "gateway_id": "g1",
            "worker_key": "worker-key",
            # Longer than a stall of a busy machine: silence this long means down.
            "health_interval_s": 2.0,
            "deployments": [
                {
                    "deployment_id": "d1",
                    "served_model_name": MODEL,
                    "replicas": [
                        {
                            "replica_id": "r0",
                            "base_url": base_url,
                            "nonce": nonce,
                            "peer_key": peer_key,
                        }
                    ],
                }
            ],
        }
    )
    gateway = Gateway(config)
    dep = gateway.deployments["d1"] = _Deployment(config.deployments[0])
    replica = dep.replicas["r0"] = Replica(config.deployments[0].replicas[0])
    task = dep.watchers["r0"] = asyncio.create_task(gateway._watch_replica(dep, replica))
    return gateway, dep, replica, task  # the gateway's stop() ends the task


async def until(dep: _Deployment, test: Callable[[], bool]) -> None:
    """Wait for ``test`` to hold, looking again whenever the deployment is woken (a state
    message wakes it only while requests wait) or a poll's interval passed."""
    async with asyncio.timeout(60):
        while not test():
            dep.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(dep.wake.wait(), DISPATCH_POLL_S)


@pytest.fixture
async def worker() -> AsyncIterator[FakeWorker]:
    fake = FakeWorker("n1")
    await fake.start()
    try:
        yield fake
    finally:
        await fake.close()


async def test_a_replica_is_up_while_its_state_flows_and_down_once_it_falls_silent(
    worker: FakeWorker,
) -> None:
    gateway, dep, replica, watcher = await watched(worker, "n1")
    try:
        await worker.send(1, state_message(free_slots=3))
        await until(dep, lambda: replica.up)
        assert replica.state is not None and replica.state.free_slots == 3
        assert worker.state_auth == ["Bearer worker-key"]
        # No message for a health interval: down, however long the machine takes.
        await until(dep, lambda: not replica.up)
        # It comes back with its stream.
        await worker.send(2, state_message(free_slots=2))
        await until(dep, lambda: replica.up)
        assert replica.state is not None and replica.state.free_slots == 2
    finally:
        watcher.cancel()
        await gateway.stop()


@pytest.mark.parametrize("health", [None, ["not", "an", "object"]])
async def test_a_replica_answering_another_nonce_stays_down(
    worker: FakeWorker, health: Any
) -> None:
    worker.health_body = health
    gateway, dep, replica, watcher = await watched(worker, "someone-else")
    try:
        async with asyncio.timeout(60):
            while worker.health_calls < 2:  # checked, then checked again an interval on
                worker.checked.clear()
                await worker.checked.wait()
        assert not replica.up and worker.state_auth == []
    finally:
        watcher.cancel()
        await gateway.stop()


@pytest.mark.parametrize("answers_as", ["r0", "r9"])
async def test_a_replica_on_another_node_is_read_with_its_peer_key_and_must_answer_as_itself(
    worker: FakeWorker, answers_as: str
) -> None:
    worker.health_body = {"status": "ok", "nonce": "any", "replica_id": answers_as}
    gateway, dep, replica, watcher = await watched(worker, None, peer_key="pk-0123456789abcdef")
    try:
        if answers_as == "r0":
            await worker.send(1, state_message(free_slots=3))
            await until(dep, lambda: replica.up)
            assert worker.state_peer == ["pk-0123456789abcdef"]
        else:  # its address now serves another replica: never up
            async with asyncio.timeout(60):
                while worker.health_calls < 2:
                    worker.checked.clear()
                    await worker.checked.wait()
            assert not replica.up and worker.state_peer == []
    finally:
        watcher.cancel()
        await gateway.stop()
