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

Agents' requests (`/api/v1/agent/`) take turns: once its body has arrived, an agent's
request waits on the event loop, in order, until fewer than `AGENT_REQUEST_THREADS` of
them are having their responses made, and only then takes a thread; its turn ends when
its response is ready, so a download streaming for minutes holds none. A rollout to a
thousand nodes brings a thousand status reports within seconds; served all at once,
each would start a thread that fights the others for the interpreter lock and the
database pool, and an operator's request would get a thousandth of the process.
Operators' requests (API, console) never wait behind them.

It also runs the middleware chain and the view synchronously, in one call on that
thread. Django's async chain calls each synchronous middleware hook (all of ours are)
through its own hop between the event loop and the thread, a dozen per request; under
load every hop waits for the interpreter lock, so a busy process answered each agent
report a dozen lock hand-overs late.
"""

from __future__ import annotations

import asyncio
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from typing import Any

from asgiref.sync import ThreadSensitiveContext, sync_to_async
from django.conf import settings
from django.core.handlers.asgi import ASGIHandler
from django.http import HttpRequest, HttpResponseBase

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
        with it: sending the response (an artifact download streams for minutes) keeps
        no other agent waiting."""
        try:
            response: HttpResponseBase = await sync_to_async(
                self.get_response, thread_sensitive=True
            )(request)
        finally:
            turn = _TURN.get()
            if turn is not None:
                turn.end()
        return response

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            raise ValueError(f"Django can only handle ASGI/HTTP connections, not {scope['type']}.")
        if not scope["path"].removeprefix(scope.get("root_path", "")).startswith(AGENT_PATH):
            await self._serve(scope, receive, send)
            return
        # Its body first, while it holds nothing: a slow sender keeps no other agent waiting.
        arrived = await _body_messages(receive)
        turn = _Turn(self._agents)
        await turn.take()
        token = _TURN.set(turn)
        try:
            await self._serve(scope, _replayed(arrived, receive), send)
        finally:
            turn.end()
            _TURN.reset(token)

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


class _Turn:
    """An agent's request's turn to be served: taken before any of its work reaches a
    thread, ended once its response is ready (or the request ends without one)."""

    def __init__(self, turns: asyncio.Semaphore) -> None:
        self._turns = turns
        self._held = False

    async def take(self) -> None:
        await self._turns.acquire()
        self._held = True

    def end(self) -> None:
        if self._held:
            self._held = False
            self._turns.release()


_TURN: ContextVar[_Turn | None] = ContextVar("agent_turn", default=None)
"""The turn the current request holds; Django serves it in a task of its own, which sees
the same turn."""


async def _body_messages(receive: Any) -> list[dict[str, Any]]:
    """A request's messages up to the end of its body (or a disconnect); past Django's
    in-memory size the rest is left to stream in as Django reads it."""
    messages, size = [], 0
    while True:
        message = await receive()
        messages.append(message)
        size += len(message.get("body", b""))
        if not message.get("more_body") or size > settings.FILE_UPLOAD_MAX_MEMORY_SIZE:
            return messages


def _replayed(messages: list[dict[str, Any]], receive: Any) -> Any:
    """An ASGI `receive` that gives these messages first, then reads on."""
    pending = deque(messages)

    async def replay() -> dict[str, Any]:
        return pending.popleft() if pending else await receive()

    return replay


def get_asgi_application() -> PooledThreadASGIHandler:
    """`django.core.asgi.get_asgi_application`, with pooled request threads."""
    import django

    django.setup(set_prefix=False)
    return PooledThreadASGIHandler()
