"""Django's ASGI handler, serving each request in one go on a thread taken from a pool.

Django runs a request's synchronous code (middleware, views, the ORM) on a thread of its
own: `ASGIHandler` opens a fresh `ThreadSensitiveContext` per request, which starts a
single-thread executor for it and, when the request ends, another thread to join that
one. With agents reporting many times a second, starting and joining those threads was
a fifth of the web process's time, and each start stalls the event loop until the new
thread runs. This handler hands each request a single-thread executor from a free list
and takes it back afterwards, as a threaded WSGI server reuses its threads: requests
still run side by side, each on its own thread, and a thread serves one request at a
time.

Agents' requests (`/api/v1/agent/`) take turns: once its body has arrived (spooled as
Django spools one, and handed to Django as it is), an agent's request waits on the
event loop, in order, until fewer than `AGENT_REQUEST_THREADS` of them are having their
responses made, and only then takes a thread; its turn ends when that thread's call
returns, so a download streaming for minutes holds none. A rollout to a thousand nodes
brings a thousand status reports within seconds; served all at once, each would start a
thread that fights the others for the interpreter lock and the database pool, and an
operator's request would get a thousandth of the process. Operators' requests (API,
console) never wait behind them. A request whose agent leaves while it waits is dropped
(the agent sends it again), and a body larger than any agent sends is refused before it
takes a turn.

It also runs the middleware chain and the view synchronously, in one call on that
thread. Django's async chain calls each synchronous middleware hook (all of ours are)
through its own hop between the event loop and the thread, a dozen per request; under
load every hop waits for the interpreter lock, so a busy process answered each agent
report a dozen lock hand-overs late.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import IO, Any

from asgiref.sync import ThreadSensitiveContext, sync_to_async
from django.conf import settings
from django.core.handlers.asgi import ASGIHandler
from django.http import HttpRequest, HttpResponseBase

from controlplane.core.metrics import AGENT_LEFT, AGENT_TURN_WAIT

TURN_KEY = "tailguard.agent_turn"
"""Where an agent's request's scope carries its turn to `get_response_async`."""

MAX_IDLE_THREADS = 64
"""Threads kept for later requests; those a burst needed beyond this end after it."""

AGENT_PATH = "/api/v1/agent/"


class PooledThreadASGIHandler(ASGIHandler):
    def __init__(self) -> None:
        super().__init__()
        self._idle: list[ThreadPoolExecutor] = []
        self._agents = asyncio.Semaphore(settings.AGENT_REQUEST_THREADS)

    def load_middleware(self, is_async: bool = False) -> None:
        """The synchronous chain, whatever the caller asks: see the module docstring."""
        super().load_middleware(is_async=False)

    async def get_response_async(self, request: HttpRequest) -> HttpResponseBase:
        """Middleware and view in one call on the request's thread. An agent's turn ends
        when that call returns: sending the response (an artifact download streams for
        minutes) keeps no other agent waiting."""
        turn = getattr(request, "scope", {}).get(TURN_KEY)
        respond = self.get_response if turn is None else turn.held_by(self.get_response)
        response: HttpResponseBase = await sync_to_async(respond, thread_sensitive=True)(request)
        return response

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            raise ValueError(f"Django can only handle ASGI/HTTP connections, not {scope['type']}.")
        if not scope["path"].removeprefix(scope.get("root_path", "")).startswith(AGENT_PATH):
            await self._serve(scope, receive, send)
            return
        # Its body first, while it holds nothing: a slow sender keeps no other agent waiting.
        try:
            arrived = await _body(scope, receive)
        except _BodyTooLarge:
            await _refuse_too_large(send)
            return
        if arrived is None:  # the client left
            return
        turn = _Turn(self._agents)
        left = asyncio.ensure_future(receive())  # after the body only a disconnect can come
        try:
            arrived_at = time.monotonic()
            taken = await turn.take_unless(left)
            AGENT_TURN_WAIT.observe(time.monotonic() - arrived_at)
            if not taken:
                AGENT_LEFT.inc()
                return
            await self._serve({**scope, TURN_KEY: turn}, _Arrived(arrived, left, receive), send)
        finally:
            turn.end_unless_called()
            left.cancel()  # no-op once Django has read it
            arrived.close()

    async def read_body(self, receive: Any) -> IO[bytes]:
        """Django's body file: for an agent's request, the one spooled before its turn."""
        if isinstance(receive, _Arrived):
            return receive.body
        body: IO[bytes] = await super().read_body(receive)
        return body

    async def _serve(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        executor = (
            self._idle.pop()
            if self._idle
            else ThreadPoolExecutor(max_workers=1, thread_name_prefix="request")
        )
        try:
            async with ThreadSensitiveContext(executor=executor):
                await self.handle(scope, receive, send)
        finally:
            # A call that outlived its request (the client went away) finishes first: the
            # executor runs its calls one by one, on its one thread.
            if len(self._idle) < MAX_IDLE_THREADS:
                self._idle.append(executor)
            else:
                executor.shutdown(wait=False)


AGENT_BODY_MAX_BYTES = 8 * 2**20
"""More than any agent sends (a telemetry batch is at most 4 MiB): a larger body is refused
before it takes a turn, so that holding a turn never waits for a body to arrive."""


class _Turn:
    """An agent's request's turn to be served: taken before any of its work reaches a
    thread, ended when its call on the thread returns. A call that outlives its request
    (the client left) keeps the turn until it returns, so no more than the limit of
    agents' calls ever run at once."""

    def __init__(self, turns: asyncio.Semaphore) -> None:
        self._turns = turns
        self._held = False
        self._called = False

    async def take_unless(self, left: asyncio.Future[Any]) -> bool:
        """Wait for the turn; False, holding none, if the client `left` first: a request
        its agent gave up on (and will send again) is not served late."""
        taking = asyncio.ensure_future(self._turns.acquire())
        try:
            await asyncio.wait({taking, left}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not taking.done():
                taking.cancel()
            elif not taking.cancelled() and taking.exception() is None:
                self._held = True
        if left.done():
            self.end()
            return False
        return True

    def held_by(self, call: Callable[[HttpRequest], Any]) -> Callable[[HttpRequest], Any]:
        """`call`, ending the turn as it returns (from the request's thread)."""
        loop = asyncio.get_running_loop()

        def holding(request: HttpRequest) -> Any:
            self._called = True
            try:
                return call(request)
            finally:
                with contextlib.suppress(RuntimeError):  # the loop closed: nothing waits
                    loop.call_soon_threadsafe(self.end)

        return holding

    def end(self) -> None:
        if self._held:
            self._held = False
            self._turns.release()

    def end_unless_called(self) -> None:
        """The request is over: its turn ends now unless its call still runs and ends it."""
        if not self._called:
            self.end()


class _BodyTooLarge(Exception):
    pass


async def _body(scope: dict[str, Any], receive: Any) -> IO[bytes] | None:
    """A request's body, spooled as Django spools one (on disk past its in-memory size);
    None if the client left first. Raises _BodyTooLarge past
    `AGENT_BODY_MAX_BYTES`, before reading a byte when the request declares its length."""
    declared = dict(scope["headers"]).get(b"content-length", b"0")
    if declared.isdigit() and int(declared) > AGENT_BODY_MAX_BYTES:
        raise _BodyTooLarge
    body = tempfile.SpooledTemporaryFile(max_size=settings.FILE_UPLOAD_MAX_MEMORY_SIZE)
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            body.close()
            return None
        size += len(message.get("body", b""))
        if size > AGENT_BODY_MAX_BYTES:
            body.close()
            raise _BodyTooLarge
        body.write(message.get("body", b""))
        if not message.get("more_body"):
            body.seek(0)
            return body


async def _refuse_too_large(send: Any) -> None:
    body = json.dumps(
        {"detail": f"Request body larger than {AGENT_BODY_MAX_BYTES} bytes; no agent sends one."}
    ).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _Arrived:
    """The `receive` Django gets for an agent's request whose body arrived before its
    turn: `read_body` takes that body as spooled, and reading on gives what `left` (the
    read begun while the request waited) reads first."""

    def __init__(self, body: IO[bytes], left: asyncio.Future[Any], receive: Any) -> None:
        self.body = body
        self._later = [left]
        self._receive = receive

    async def __call__(self) -> dict[str, Any]:
        message: dict[str, Any] = await (self._later.pop() if self._later else self._receive())
        return message


def get_asgi_application() -> PooledThreadASGIHandler:
    """`django.core.asgi.get_asgi_application`, with pooled request threads."""
    import django

    django.setup(set_prefix=False)
    return PooledThreadASGIHandler()
