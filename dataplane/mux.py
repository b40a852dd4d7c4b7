"""One WebSocket between a gateway and a worker that carries all of its requests.

Forwarded over HTTP, every token of every stream is one write at the worker and one
read at the gateway. Over this connection the worker answers with frames of records,
everything its requests produced since its last frame: a step's tokens for every stream
the gateway forwards leave in one frame.

A request travels as the HTTP request it stands for, with its own headers: the worker
hands it to its own ASGI app as one, from the connection's client address, so
authentication, validation, errors and streaming are those of HTTP, and a cancel is the
client disconnecting.

Frames are binary. Gateway to worker: a JSON line, then the body:
``{"id": n, "path": p, "headers": [[name, value], ...]}`` opens request ``n``, and
``{"id": n, "cancel": true}`` (no body) is its client leaving. Worker to gateway: records
of ``RECORD`` (request id, kind, payload length) then the payload: ``START`` (JSON
``{"status": s, "headers": [[name, value], ...]}``), ``BODY`` (response bytes), ``END``,
or ``ABORT`` (the response broke off, as a dropped HTTP connection would say).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import aiohttp
from multidict import CIMultiDict

from dataplane.asgi import Message, Receive, Scope, Send, send_json
from dataplane.inference.protocol import ApiError

MUX_PATH = "/v1/internal/mux"
MAX_FRAME = 16 << 20
"""The largest frame a worker takes (uvicorn's ``ws_max_size``): a larger one would close
the connection under every request on it."""
MAX_BODY = MAX_FRAME - (64 << 10)
"""The largest request body sent over the mux, its headers beside it; a larger one goes
over HTTP."""
RECORD = struct.Struct("!QBI")
START, BODY, END, ABORT = 0, 1, 2, 3

App = Callable[[Scope, Receive, Send], Awaitable[None]]

log = logging.getLogger(__name__)


def _record(request_id: int, kind: int, payload: bytes = b"") -> bytes:
    return RECORD.pack(request_id, kind, len(payload)) + payload


class _Session:
    """The worker's end of one connection: runs each request it opens on ``app`` and
    sends what they answer, gathered, one frame at a time."""

    def __init__(self, app: App, scope: Scope, send: Send) -> None:
        self._app = app
        self._scope = scope
        self._send = send
        self._left: dict[int, asyncio.Event] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._records: list[bytes] = []
        self._pending = asyncio.Event()
        self._writer = asyncio.create_task(self._write())

    def received(self, data: bytes) -> None:
        """Open or cancel a request; a frame that does neither is logged and dropped, and
        the requests beside it carry on."""
        line, _, body = data.partition(b"\n")
        try:
            head = json.loads(line)
            request_id = int(head["id"])
        except (ValueError, TypeError, KeyError) as exc:
            log.warning("a mux frame names no request: %s", exc)
            return
        if head.get("cancel"):
            if (left := self._left.get(request_id)) is not None:
                left.set()
            return
        if request_id in self._left:
            log.warning("a mux frame opens request %s, open already", request_id)
            return
        self._left[request_id] = asyncio.Event()
        task = asyncio.create_task(self._run(request_id, head, body))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def close(self) -> None:
        """The connection is gone: every request's client has left."""
        self._leave_all()
        self._writer.cancel()

    def _leave_all(self) -> None:
        for left in self._left.values():
            left.set()

    def _add(self, record: bytes) -> None:
        self._records.append(record)
        self._pending.set()

    async def _write(self) -> None:
        """Send what the requests answered, gathered: the records added while a frame
        was being sent, or while the streams woken with it ran, go in the next one."""
        try:
            while True:
                await self._pending.wait()
                self._pending.clear()
                records, self._records = self._records, []
                await self._send({"type": "websocket.send", "bytes": b"".join(records)})
        except Exception:
            # Nothing more can be sent: the requests stop, and the gateway sees the
            # connection close under them.
            log.exception("sending on a mux connection failed; closing it")
            self._leave_all()
            with contextlib.suppress(Exception):
                await self._send({"type": "websocket.close", "code": 1011})

    def _request_scope(self, head: dict[str, Any]) -> Scope:
        """The HTTP scope of the request ``head`` opens, from the connection's client."""
        path = str(head["path"])
        return {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": [
                (str(k).lower().encode("latin-1"), str(v).encode("latin-1"))
                for k, v in head["headers"]
            ],
            "client": self._scope.get("client"),
            "server": self._scope.get("server"),
        }

    async def _run(self, request_id: int, head: dict[str, Any], body: bytes) -> None:
        left = self._left[request_id]
        unread = True
        started = ended = False

        async def receive() -> Message:
            nonlocal unread
            if unread:
                unread = False
                return {"type": "http.request", "body": body, "more_body": False}
            await left.wait()
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            nonlocal started, ended
            if ended or left.is_set():
                return
            if message["type"] == "http.response.start":
                started = True
                pairs = [[k.decode("latin-1"), v.decode("latin-1")] for k, v in message["headers"]]
                meta = {"status": message["status"], "headers": pairs}
                self._add(_record(request_id, START, json.dumps(meta).encode()))
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    self._add(_record(request_id, BODY, bytes(message["body"])))
                if not message.get("more_body", False):
                    ended = True
                    self._add(_record(request_id, END))

        try:  # a frame that makes no request is answered 500, as HTTP answers a crash
            await self._app(self._request_scope(head), receive, send)
        except Exception:
            log.exception("request %s over the mux failed", head.get("path"))
        finally:
            del self._left[request_id]
            if not (ended or left.is_set()):
                # Where HTTP would answer 500, or drop a response under way.
                if started:
                    self._add(_record(request_id, ABORT))
                else:
                    error = ApiError(500, "Internal error.", type_="server_error")
                    await send_json(send, error.status, error.body())


async def serve(app: App, scope: Scope, receive: Receive, send: Send) -> None:
    """Serve an accepted mux connection until it closes: each request it opens runs on
    ``app`` as an HTTP request."""
    session = _Session(app, scope, send)
    try:
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
            data = message.get("bytes")
            if message["type"] == "websocket.receive" and data:
                session.received(data)
    finally:
        session.close()


class MuxResponse:
    """One request's answer over the mux: the part of aiohttp's ``ClientResponse`` that
    forwarding reads (``status``, ``headers``, ``content.iter_any()``, ``read()``,
    ``release()``)."""

    status: int
    headers: CIMultiDict[str]

    def __init__(self, connection: _Connection, request_id: int) -> None:
        self._connection = connection
        self._id = request_id
        self._started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._chunks: list[bytes] = []
        self._changed = asyncio.Event()
        self._ended = False
        self._error: BaseException | None = None

    @property
    def content(self) -> MuxResponse:
        return self

    def record(self, kind: int, payload: bytes) -> None:
        if kind == START:
            meta = json.loads(payload)
            self.status = int(meta["status"])
            self.headers = CIMultiDict((str(k), str(v)) for k, v in meta["headers"])
            if not self._started.done():
                self._started.set_result(None)
        elif kind == BODY:
            self._chunks.append(payload)
        elif kind == END and self._started.done():
            self._ended = True
        else:
            self.fail(aiohttp.ClientPayloadError("the worker broke off the response"))
            return
        self._changed.set()

    @property
    def finished(self) -> bool:
        return self._ended or self._error is not None

    def fail(self, error: BaseException) -> None:
        self._error = error
        if not self._started.done():
            self._started.set_exception(error)
        self._changed.set()

    async def started(self) -> None:
        await self._started

    async def iter_any(self) -> AsyncIterator[bytes]:
        """Everything that arrived since the last chunk, as one chunk."""
        while True:
            if self._chunks:
                chunk = b"".join(self._chunks)
                self._chunks.clear()
                yield chunk
            elif self._ended:
                return
            elif self._error is not None:
                raise self._error
            else:
                self._changed.clear()
                await self._changed.wait()

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.iter_any()])

    def release(self) -> None:
        """Done with it: a request not answered to its end is cancelled at the worker."""
        if not self.finished:
            self._connection.cancel(self._id)


class _Connection:
    """One open mux connection, the requests open on it, and the task that reads it."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self._open: dict[int, MuxResponse] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.reader = self._spawn(self._read())

    def add(self, request_id: int) -> MuxResponse:
        response = self._open[request_id] = MuxResponse(self, request_id)
        self._idle.clear()
        return response

    def remove(self, request_id: int) -> MuxResponse | None:
        response = self._open.pop(request_id, None)
        if not self._open:
            self._idle.set()
        return response

    async def drained(self) -> None:
        """Return once no request is open on it."""
        await self._idle.wait()

    def _spawn(self, work: Awaitable[Any]) -> asyncio.Future[Any]:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("mux connection: %s", task.exception())

    def cancel(self, request_id: int) -> None:
        """The client of ``request_id`` left: the worker stops its work."""
        if self.remove(request_id) is not None and not self.ws.closed:
            line = json.dumps({"id": request_id, "cancel": True}).encode() + b"\n"
            self._spawn(self.ws.send_bytes(line))

    async def _read(self) -> None:
        try:
            async for message in self.ws:
                if message.type != aiohttp.WSMsgType.BINARY:
                    break
                data: bytes = message.data
                at = 0
                while at < len(data):
                    request_id, kind, length = RECORD.unpack_from(data, at)
                    at += RECORD.size
                    response = self._open.get(request_id)
                    if response is not None:
                        response.record(kind, data[at : at + length])
                        if response.finished:
                            self.remove(request_id)
                    at += length
        finally:
            with contextlib.suppress(Exception):
                await self.ws.close()
            lost = aiohttp.ClientConnectionError("the worker closed the mux connection")
            for request_id, response in list(self._open.items()):
                response.fail(lost)
                self.remove(request_id)


class MuxClient:
    """The gateway's end of one worker's mux connection: opened on first use, shared by
    every request forwarded to that worker. A broken connection fails the requests on
    it with ``aiohttp.ClientConnectionError``, as a broken HTTP connection would, and
    the next request opens a new one; a closed client sends none."""

    def __init__(
        self, session: aiohttp.ClientSession, url: str, headers: Mapping[str, str]
    ) -> None:
        self._session = session
        self.url = url
        self.headers = dict(headers)
        self._connection: _Connection | None = None
        self._connecting = asyncio.Lock()
        self._ids = itertools.count(1)
        self._closed = False

    async def request(self, path: str, headers: Mapping[str, str], body: bytes) -> MuxResponse:
        """Send a request; returns once its status and headers are in."""
        connection = await self._connected()
        request_id = next(self._ids)
        response = connection.add(request_id)
        head = json.dumps({"id": request_id, "path": path, "headers": list(headers.items())})
        try:
            await connection.ws.send_bytes(head.encode() + b"\n" + body)
            await response.started()
        except (ConnectionError, RuntimeError) as exc:
            connection.remove(request_id)
            raise aiohttp.ClientConnectionError(f"the mux connection broke: {exc}") from exc
        except BaseException:
            connection.cancel(request_id)
            raise
        return response

    async def disconnect(self) -> None:
        """Close the connection, failing the requests open on it; the next request opens
        a new one."""
        if (connection := self._connection) is not None:
            await connection.ws.close()
            await asyncio.wait([connection.reader])

    async def close(self, *, drain: bool = False) -> None:
        """Send no more requests; close the connection, with ``drain`` once the requests
        open on it end."""
        async with self._connecting:
            self._closed = True
        if drain and self._connection is not None:
            await self._connection.drained()
        await self.disconnect()

    async def _connected(self) -> _Connection:
        async with self._connecting:
            if self._closed:
                raise aiohttp.ClientConnectionError("this mux client is closed")
            if self._connection is None or self._connection.ws.closed:
                ws = await self._session.ws_connect(
                    self.url, headers=self.headers, autoclose=True, max_msg_size=0
                )
                self._connection = _Connection(ws)
            return self._connection
