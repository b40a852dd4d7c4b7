"""The ASGI handler takes each request's thread from a pool (requests one after another
share a thread, requests at the same time each have their own) and runs the middleware
chain and the view there in one synchronous call."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
from django.core.signals import request_started
from django.http import HttpResponse, StreamingHttpResponse
from django.urls import path
from django.utils.deprecation import MiddlewareMixin
from django.views.decorators.csrf import csrf_exempt

from agent.client import ControlPlaneClient
from controlplane.core.asgi import AGENT_BODY_MAX_BYTES, PooledThreadASGIHandler
from controlplane.core.metrics import PROCESS
from tests.controlplane.conftest import http_scope


async def test_requests_reuse_threads_and_still_run_side_by_side() -> None:
    handler = PooledThreadASGIHandler()
    served: list[threading.Thread] = []
    meeting: list[threading.Barrier] = []

    def started(**kwargs: Any) -> None:  # runs on the request's thread
        served.append(threading.current_thread())
        if meeting:
            meeting[0].wait()

    request_started.connect(started, weak=False, dispatch_uid="test_asgi")
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=handler), base_url="http://testserver"
        ) as client:
            for _ in range(3):
                assert (await client.get("/api/v1/no-such-thing/")).status_code == 404
            assert len(served) == 3 and len(set(served)) == 1, served

            # Two at once: each waits on its thread for the other to arrive, which only
            # threads of their own allow (one shared thread would break the barrier).
            meeting.append(threading.Barrier(2, timeout=60))
            answers = await asyncio.gather(
                client.get("/api/v1/no-such-thing/"), client.get("/api/v1/no-such-thing/")
            )
            assert [a.status_code for a in answers] == [404, 404]
            assert len(set(served[3:])) == 2 and served[0] in served[3:], served
    finally:
        request_started.disconnect(dispatch_uid="test_asgi")


class Probe(MiddlewareMixin):
    """Records whether Django hands it an asynchronous next step."""

    built: list[bool] = []

    def __init__(self, get_response: Any) -> None:
        super().__init__(get_response)
        Probe.built.append(asyncio.iscoroutinefunction(get_response))


async def test_middleware_and_view_run_in_one_synchronous_call(settings: Any) -> None:
    """Each synchronous middleware hook of Django's async chain is a hop between the event
    loop and the request's thread; the handler runs the chain synchronously instead."""
    settings.MIDDLEWARE = [*settings.MIDDLEWARE, f"{__name__}.Probe"]
    Probe.built.clear()
    handler = PooledThreadASGIHandler()
    assert Probe.built == [False]
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=handler), base_url="http://testserver"
    ) as client:
        response = await client.get("/api/v1/no-such-thing/")
    assert response.status_code == 404 and response.json()


class AgentGate(MiddlewareMixin):
    """Holds agents' requests on their threads until released, counting how many it holds."""

    lock = threading.Lock()
    held = 0
    most = 0
    release = threading.Event()

    def process_request(self, request: Any) -> None:
        if not request.path.startswith("/api/v1/agent/"):
            return
        cls = AgentGate
        with cls.lock:
            cls.held += 1
            cls.most = max(cls.most, cls.held)
        try:
            assert cls.release.wait(timeout=60)
        finally:
            with cls.lock:
                cls.held -= 1


def _gated_handler(settings: Any, turns: int) -> PooledThreadASGIHandler:
    """A handler with `turns` for agents, whose agents' requests `AgentGate` holds."""
    settings.MIDDLEWARE = [f"{__name__}.AgentGate", *settings.MIDDLEWARE]
    settings.AGENT_REQUEST_THREADS = turns
    AgentGate.held = AgentGate.most = 0
    AgentGate.release.clear()
    return PooledThreadASGIHandler()


async def _until_held(count: int) -> None:
    for _ in range(600):
        if AgentGate.held == count:
            return
        await asyncio.sleep(0.05)


def _leaves_after_its_body(gone: asyncio.Event) -> Callable[[], Awaitable[dict[str, Any]]]:
    """An ASGI `receive` of a client that sends a body, then leaves once `gone` is set."""
    sent: list[bool] = []

    async def receive() -> dict[str, Any]:
        if not sent:
            sent.append(True)
            return {"type": "http.request", "body": b"{}", "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    return receive


async def test_agents_requests_take_turns_and_operators_never_wait_behind_them(
    settings: Any,
) -> None:
    """A burst of agents' requests runs at most AGENT_REQUEST_THREADS at a time; the
    rest wait on the event loop, and an operator's request is served meanwhile."""
    handler = _gated_handler(settings, turns=2)
    waited = _sample("tailguard_agent_request_wait_seconds_count")
    started: list[str] = []  # Django's first step for a request, on the request's thread
    request_started.connect(
        lambda **kwargs: started.append(kwargs["scope"]["path"]),
        weak=False,
        dispatch_uid="test_asgi_turns",
    )
    try:
        await _burst_beside_operator(handler, started)
    finally:
        request_started.disconnect(dispatch_uid="test_asgi_turns")
    assert AgentGate.most == 2
    assert _sample("tailguard_agent_request_wait_seconds_count") == waited + 5  # for /metrics


def _sample(name: str) -> float:
    return PROCESS.get_sample_value(name) or 0.0


async def _burst_beside_operator(handler: PooledThreadASGIHandler, started: list[str]) -> None:
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=handler), base_url="http://testserver"
    ) as client:
        burst = [
            asyncio.create_task(client.post("/api/v1/agent/status/", json={})) for _ in range(5)
        ]
        await _until_held(2)
        assert AgentGate.held == 2
        assert started == ["/api/v1/agent/status/"] * 2  # the others took no thread yet
        operator = await client.get("/api/v1/no-such-thing/")
        assert operator.status_code == 404  # served while the agents' turns are all taken
        assert AgentGate.held == 2 and not any(task.done() for task in burst)
        AgentGate.release.set()
        answers = await asyncio.gather(*burst)
    assert [a.status_code for a in answers] == [401] * 5  # no credential: refused, each
    assert len(started) == 6


released = asyncio.Event()


async def _held_open() -> Any:
    yield b"first part"
    await released.wait()
    yield b"the rest"


def _download(request: Any) -> StreamingHttpResponse:
    return StreamingHttpResponse(_held_open())


def _quick(request: Any) -> HttpResponse:
    return HttpResponse(b"ok")


@csrf_exempt
def _digest(request: Any) -> HttpResponse:
    return HttpResponse(hashlib.sha256(request.read()).hexdigest().encode())


urlpatterns = [
    path("api/v1/agent/download/", _download),
    path("api/v1/agent/quick/", _quick),
    path("api/v1/agent/digest/", _digest),
]


async def test_an_agents_body_past_djangos_memory_size_reaches_the_view_whole(
    settings: Any,
) -> None:
    """Spooled before its turn (on disk past FILE_UPLOAD_MAX_MEMORY_SIZE) and replayed."""
    settings.ROOT_URLCONF = __name__
    settings.FILE_UPLOAD_MAX_MEMORY_SIZE = 100_000
    body = bytes(range(256)) * 1200  # 307,200 bytes, sent in 3 parts

    async def parts() -> Any:
        for start in range(0, len(body), 102_400):
            yield body[start : start + 102_400]

    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=PooledThreadASGIHandler()), base_url="http://testserver"
    ) as client:
        answer = await client.post("/api/v1/agent/digest/", content=parts())
    assert answer.content.decode() == hashlib.sha256(body).hexdigest()


async def test_an_agents_turn_ends_once_its_response_is_ready(settings: Any) -> None:
    """A download that streams for minutes keeps no other agent's request waiting."""
    settings.ROOT_URLCONF = __name__
    settings.AGENT_REQUEST_THREADS = 1
    released.clear()
    handler = PooledThreadASGIHandler()
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=handler), base_url="http://testserver"
    ) as client:
        download = asyncio.create_task(client.get("/api/v1/agent/download/"))
        for _ in range(3):  # each while the download still streams, holding no turn
            quick = await asyncio.wait_for(client.get("/api/v1/agent/quick/"), 60)
            assert quick.content == b"ok" and not download.done()
        released.set()
        assert (await download).content == b"first partthe rest"


def _agent_scope() -> dict[str, Any]:
    return http_scope("POST", "/api/v1/agent/status/", [(b"content-type", b"application/json")])


async def test_a_request_whose_agent_left_while_it_waited_is_not_served(settings: Any) -> None:
    """An agent that gave up (and will send again) is not answered late, and its request
    never holds a turn."""
    handler = _gated_handler(settings, turns=1)
    dropped = _sample("tailguard_agent_requests_left_total")
    gone = asyncio.Event()
    leaving = _leaves_after_its_body(gone)

    answered: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        answered.append(message)

    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=handler), base_url="http://testserver"
    ) as client:
        first = asyncio.create_task(client.post("/api/v1/agent/status/", json={}))
        await _until_held(1)
        second = asyncio.create_task(handler(_agent_scope(), leaving, send))
        await asyncio.sleep(0.1)  # it waits for the one turn
        assert not second.done() and AgentGate.held == 1
        gone.set()
        await asyncio.wait_for(second, 60)  # ends at once: no turn, no thread
        assert answered == [] and AgentGate.held == 1
        assert _sample("tailguard_agent_requests_left_total") == dropped + 1
        AgentGate.release.set()
        assert (await first).status_code == 401
        # The one turn is free again: the dropped request kept none.
        again = await asyncio.wait_for(client.post("/api/v1/agent/status/", json={}), 60)
        assert again.status_code == 401
    assert AgentGate.most == 1


async def test_a_body_larger_than_any_agent_sends_is_refused_before_it_takes_a_turn(
    settings: Any,
) -> None:
    settings.AGENT_REQUEST_THREADS = 1
    handler = PooledThreadASGIHandler()
    chunk = b"x" * (1 << 20)
    received = 0

    async def receive() -> dict[str, Any]:
        nonlocal received
        received += 1
        return {"type": "http.request", "body": chunk, "more_body": True}  # never ends

    answered: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        answered.append(message)

    await asyncio.wait_for(handler(_agent_scope(), receive, send), 60)
    assert answered[0]["status"] == 413
    assert b"larger than" in answered[1]["body"]
    assert received == AGENT_BODY_MAX_BYTES // len(chunk) + 1  # read no further

    # One that says how large it is is refused before a byte of it is read.
    declared = _agent_scope()
    declared["headers"].append((b"content-length", b"%d" % (AGENT_BODY_MAX_BYTES + 1)))
    answered.clear()
    await asyncio.wait_for(handler(declared, receive, send), 60)
    assert answered[0]["status"] == 413 and received == AGENT_BODY_MAX_BYTES // len(chunk) + 1


async def test_an_agent_drops_a_batch_answered_413() -> None:
    """The agent's client takes the refusal as final, as it takes a 422."""
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=PooledThreadASGIHandler()), base_url="http://testserver"
    ) as http:
        client = ControlPlaneClient(http, "http://testserver", "tgn_unchecked")
        ack = await client.post_telemetry(7, b"x" * (AGENT_BODY_MAX_BYTES + 1))
    assert ack.outcome == "rejected" and ack.seq == 7 and "larger than" in (ack.reason or "")


async def test_a_call_that_outlives_its_request_keeps_the_turn_until_it_returns(
    settings: Any,
) -> None:
    """A client that leaves while its view runs: the view still runs on its thread, and
    the next agent's request starts only once it has returned."""
    handler = _gated_handler(settings, turns=1)
    gone = asyncio.Event()
    leaving = _leaves_after_its_body(gone)

    async def send(message: dict[str, Any]) -> None:
        pass

    first = asyncio.create_task(handler(_agent_scope(), leaving, send))
    await _until_held(1)
    gone.set()  # Django gives the response up; the view goes on
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=handler), base_url="http://testserver"
    ) as client:
        second = asyncio.create_task(client.post("/api/v1/agent/status/", json={}))
        await asyncio.sleep(0.2)  # time enough to start, were the turn free
        assert AgentGate.held == 1 and not second.done()
        AgentGate.release.set()
        assert (await asyncio.wait_for(second, 60)).status_code == 401
    await asyncio.wait_for(first, 60)
    assert AgentGate.most == 1
