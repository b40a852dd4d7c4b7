"""The gateway-worker mux over a real uvicorn server: requests run as HTTP requests of the
app behind it, a step's chunks for many streams leave in one frame, a cancel reaches the
app as the client's disconnect, a response the app breaks off fails as a dropped HTTP
response would, and a lost connection fails what was open on it and is opened again for
the next request."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import aiohttp
import pytest

from dataplane.asgi import Message, Receive, Scope, Send
from dataplane.mux import END, RECORD, START, MuxClient, serve
from tests.serving import serving


class Stepped:
    """An app whose every stream sends one chunk per step, the steps driven by the test
    as an engine's are: one event wakes every stream at once."""

    def __init__(self) -> None:
        self.step = asyncio.Event()
        self.waiting = 0
        self.frames = 0  # mux frames sent
        self.disconnected: list[str] = []
        self.sockets: list[Send] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await receive()  # websocket.connect
            await send({"type": "websocket.accept"})

            async def counted(message: Message) -> None:
                self.frames += message["type"] == "websocket.send"
                await send(message)

            self.sockets.append(send)
            await serve(self, scope, receive, counted)
            return
        if scope["type"] != "http":
            return
        body = json.loads((await receive())["body"])
        if body.get("refuse"):
            # The request's headers, and none of the connection's, as the app saw them.
            seen = json.dumps(sorted(k.decode() for k, _ in scope["headers"])).encode()
            headers = [(b"retry-after", b"3")]
            await send({"type": "http.response.start", "status": 429, "headers": headers})
            await send({"type": "http.response.body", "body": seen})
            return
        if body.get("fail") == "before":
            raise RuntimeError("the app failed before answering")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        if body.get("fail") == "during":
            await send({"type": "http.response.body", "body": b"half", "more_body": True})
            raise RuntimeError("the app failed while answering")
        for index in range(body["steps"]):
            self.waiting += 1
            await self.step.wait()
            await send({"type": "http.response.body", "body": b"%d;" % index, "more_body": True})
        if body.get("hang"):
            assert (await receive())["type"] == "http.disconnect"
            self.disconnected.append(body["name"])
            return
        await send({"type": "http.response.body", "body": b""})

    async def run_steps(self, streams: int, steps: int) -> None:
        """``steps`` steps, each once all ``streams`` wait for it."""
        for _ in range(steps):
            async with asyncio.timeout(60):
                while self.waiting < streams:
                    await asyncio.sleep(0.001)
            self.waiting = 0
            self.step.set()
            self.step = asyncio.Event()


@contextlib.asynccontextmanager
async def served(app: Stepped) -> AsyncIterator[str]:
    """The app's mux URL, served as a worker serves it."""
    options = {"ws": "websockets-sansio", "ws_per_message_deflate": False}
    async with serving(app, **options) as url:
        yield f"{url}/mux"


@contextlib.asynccontextmanager
async def client(url: str) -> AsyncIterator[MuxClient]:
    async with aiohttp.ClientSession() as session:
        mux = MuxClient(session, url, {"x-connection": "yes"})
        try:
            yield mux
        finally:
            await mux.close()


async def test_a_steps_chunks_for_every_stream_leave_in_one_frame() -> None:
    app = Stepped()
    async with served(app) as url, client(url) as mux:
        streams, steps = 8, 5

        async def one(name: str) -> bytes:
            response = await mux.request("/v1/stream", {}, json.dumps({"steps": steps}).encode())
            assert response.status == 200
            return await response.read()

        reading = [asyncio.create_task(one(str(i))) for i in range(streams)]
        await app.run_steps(streams, steps)
        bodies = await asyncio.gather(*reading)
    assert bodies == [b"0;1;2;3;4;"] * streams
    # At most one frame per start (they come as the requests do), and per step one, or
    # two where a frame was under way as the step's chunks came: not one per chunk.
    assert app.frames <= streams + 2 * steps < streams * steps


async def test_statuses_and_headers_pass_as_over_http() -> None:
    app = Stepped()
    async with served(app) as url, client(url) as mux:
        response = await mux.request("/v1/stream", {"X-Request": "yes"}, b'{"refuse": true}')
        assert (response.status, json.loads(await response.read())) == (429, ["x-request"])
        assert response.headers["Retry-After"] == "3"


async def test_an_app_that_fails_answers_500_or_breaks_the_response_off() -> None:
    app = Stepped()
    async with served(app) as url, client(url) as mux:
        before = await mux.request("/v1/stream", {}, b'{"fail": "before"}')
        assert before.status == 500
        assert json.loads(await before.read())["error"]["type"] == "server_error"
        during = await mux.request("/v1/stream", {}, b'{"fail": "during"}')
        chunks = []
        with pytest.raises(aiohttp.ClientPayloadError):
            async for chunk in during.content.iter_any():
                chunks.append(chunk)
        assert (during.status, chunks) == (200, [b"half"])
        # The connection and the other requests on it carry on.
        again = await mux.request("/v1/stream", {}, b'{"steps": 0}')
        assert (again.status, await again.read()) == (200, b"")


async def test_a_released_stream_is_a_disconnect_for_the_app() -> None:
    app = Stepped()
    async with served(app) as url, client(url) as mux:
        body = json.dumps({"steps": 1, "hang": True, "name": "left"}).encode()
        response = await mux.request("/v1/stream", {}, body)
        await app.run_steps(1, 1)
        async for chunk in response.content.iter_any():
            assert chunk == b"0;"
            break
        response.release()
        async with asyncio.timeout(60):
            while not app.disconnected:
                await asyncio.sleep(0.01)
    assert app.disconnected == ["left"]


async def test_a_lost_connection_fails_its_requests_and_the_next_one_reconnects() -> None:
    app = Stepped()
    async with served(app) as url, client(url) as mux:
        response = await mux.request("/v1/stream", {}, b'{"steps": 3}')
        await app.run_steps(1, 1)
        await app.sockets[0]({"type": "websocket.close", "code": 1012})
        with pytest.raises(aiohttp.ClientConnectionError):
            await response.read()
        again = await mux.request("/v1/stream", {}, b'{"steps": 0}')
        assert (again.status, await again.read()) == (200, b"")
        await app.run_steps(1, 2)  # the first request's app ends, its client long gone
    assert len(app.sockets) == 2


async def test_a_malformed_frame_fails_alone() -> None:
    """A frame naming no request is dropped, one that makes no request is answered 500,
    and the connection carries the next request."""
    app = Stepped()
    async with served(app) as url, aiohttp.ClientSession() as session:
        async with session.ws_connect(url) as ws:
            await ws.send_bytes(b"not json\n")
            await ws.send_bytes(b'{"id": 1, "path": "/v1/stream"}\n{}')  # no headers
            await ws.send_bytes(b'{"id": 2, "path": "/v1/stream", "headers": []}\n{"steps": 0}')
            records: list[tuple[int, int, bytes]] = []
            async with asyncio.timeout(60):
                while sum(kind == END for _, kind, _ in records) < 2:
                    data = (await ws.receive()).data
                    at = 0
                    while at < len(data):
                        request_id, kind, length = RECORD.unpack_from(data, at)
                        at += RECORD.size
                        records.append((request_id, kind, data[at : at + length]))
                        at += length
    starts = {rid: json.loads(payload)["status"] for rid, kind, payload in records if kind == START}
    assert starts == {1: 500, 2: 200}
