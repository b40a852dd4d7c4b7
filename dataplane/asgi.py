"""ASGI plumbing shared by the data plane's HTTP servers (the worker and the gateway):
the request wrapper, body reading, JSON and SSE bodies, bearer keys, the internal
endpoints' access check, the router with its lifespan and the routes both servers serve,
and how a server binds and announces its port."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from dataplane.inference.protocol import ApiError

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def is_loopback(host: str) -> bool:
    """127.0.0.0/8 and ::1, also as a dual-stack socket reports IPv4 (::ffff:127.0.0.1)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host == "localhost"
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


JSON_HEADERS = [(b"content-type", b"application/json")]
SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
MODEL_PREFIX = "/v1/models/"


def key_digest(key: str) -> str:
    """How keys are stored in the config: lowercase sha256 hex of the key's UTF-8."""
    return hashlib.sha256(key.encode()).hexdigest()


def digest_in(key: str, digests: Collection[str]) -> bool:
    """Whether ``key`` hashes to one of ``digests`` (compared in constant time)."""
    digest = key_digest(key)
    return any([hmac.compare_digest(d, digest) for d in digests])


@dataclass
class Call:
    """One HTTP request as the app sees it."""

    scope: Scope
    receive: Receive
    send: Send
    arrival: float
    # Set before the response's last message: a disconnect after that ends nothing.
    done: bool = False

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.scope["headers"]:
            if key == name:
                return bytes(value)
        return None

    def bearer(self) -> str | None:
        """The key of ``Authorization: Bearer <key>``, None without one."""
        value = self.header(b"authorization") or b""
        scheme, _, key = value.decode("latin-1").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return None
        return key.strip()

    def require_bearer(self) -> str:
        """The bearer key; 401 without one."""
        key = self.bearer()
        if key is None:
            raise ApiError(
                401,
                "You didn't provide an API key (Authorization: Bearer KEY).",
                code="invalid_api_key",
            )
        return key


async def send_json(
    send: Send, status: int, body: Any, headers: dict[str, str] | None = None
) -> None:
    payload = json.dumps(body).encode()
    extra = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send(
        {"type": "http.response.start", "status": status, "headers": [*JSON_HEADERS, *extra]}
    )
    await send({"type": "http.response.body", "body": payload})


def sse(body: Any) -> bytes:
    """One server-sent event carrying ``body`` as compact JSON."""
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


async def read_body(call: Call, limit: int) -> bytes:
    """The whole request body; 413 past ``limit`` bytes, 400 if the client leaves."""
    declared = call.header(b"content-length")
    too_big = ApiError(413, f"Request body exceeds {limit} bytes.", code="request_too_large")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await call.receive()
        if message["type"] == "http.disconnect":
            raise ApiError(400, "Client disconnected.", code="client_closed")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def wait_disconnect(call: Call) -> None:
    """Return once the client has disconnected (after the request body was read)."""
    while (await call.receive())["type"] != "http.disconnect":
        pass


PEER_KEY_HEADER = "x-tailguard-peer-key"
"""Carries a deployment's peer key from its gateways to its workers on other nodes."""


def _loopback(call: Call) -> bool:
    client = call.scope.get("client") or ("", 0)
    return is_loopback(client[0])


def _peer(call: Call, peer_keys: Collection[str]) -> bool:
    key = call.header(PEER_KEY_HEADER.encode())
    return bool(peer_keys) and key is not None and digest_in(key.decode("latin-1"), peer_keys)


def check_internal(
    call: Call, stats_keys: Collection[str], peer_keys: Collection[str] = ()
) -> None:
    """Internal endpoints take a stats key (one of ``stats_keys``' hashes), or a loopback
    client when none is configured; where ``peer_keys`` are given, a peer key too."""
    if _peer(call, peer_keys):
        return
    if stats_keys:
        key = call.bearer()
        if key is None or not digest_in(key, stats_keys):
            raise ApiError(401, "A stats key is required.", code="invalid_api_key")
    elif not _loopback(call):
        raise ApiError(403, "Stats are served to loopback clients only.", code="forbidden")


def check_peer(call: Call, peer_keys: Collection[str]) -> None:
    """Other hosts reach a worker only through its deployment's gateways: a client not on
    loopback must carry a peer key (none while ``peer_keys`` is empty), so no tenant
    bypasses the gateways' fleet-wide limits and shares by calling a worker directly."""
    if not _loopback(call) and not _peer(call, peer_keys):
        raise ApiError(
            403,
            "This worker serves other hosts through its deployment's gateways only.",
            code="forbidden",
        )


Handler = Callable[[Call], Awaitable[None]]


class Router:
    """An ASGI app: ``routes`` maps paths to (method, handler), ``GET /v1/models/{id}``
    goes to ``model_route``; an ``ApiError`` becomes its JSON answer. Lifespan calls
    ``startup`` and ``shutdown``."""

    routes: dict[str, tuple[str, Handler]]
    model_route: Handler | None = None

    async def startup(self) -> None:
        """Called once the server starts."""

    async def shutdown(self) -> None:
        """Called as the server stops."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        call = Call(scope, receive, send, time.perf_counter())
        try:
            path = scope["path"]
            route = self.routes.get(path)
            if route is None and path.startswith(MODEL_PREFIX) and self.model_route is not None:
                route = ("GET", self.model_route)
            if route is None:
                raise ApiError(404, f"Unknown path {path}", code="not_found")
            method, handler = route
            if scope["method"] != method:
                raise ApiError(
                    405,
                    f"{path} takes {method}",
                    code="method_not_allowed",
                    headers={"allow": method},
                )
            await handler(call)
        except ApiError as exc:
            await send_json(send, exc.status, exc.body(), exc.headers)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self.startup()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return


class ModelServer(Router):
    """The routes the worker and the gateway both serve: the OpenAI surface, ``/health``,
    ``/metrics`` and ``/v1/internal/stats``; ``extra`` adds a server's own."""

    _completions: Handler
    _chat: Handler
    _models: Handler
    _model: Handler
    _health: Handler
    _metrics: Handler
    _stats: Handler

    def __init__(self, extra: dict[str, tuple[str, Handler]] | None = None) -> None:
        self.model_route = self._model
        self.routes = {
            "/v1/completions": ("POST", self._completions),
            "/v1/chat/completions": ("POST", self._chat),
            "/v1/models": ("GET", self._models),
            "/health": ("GET", self._health),
            "/metrics": ("GET", self._metrics),
            "/v1/internal/stats": ("GET", self._stats),
            **(extra or {}),
        }


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (port 0: any free one), for uvicorn to serve."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


def announce(path: Path, port: int, nonce: str | None) -> None:
    """Write the bound port, the nonce and the pid, atomically, so a reader never sees
    half of it."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"port": port, "nonce": nonce, "pid": os.getpid()}))
    tmp.replace(path)


CONFIG_POLL_SECONDS = 1.0
_C = TypeVar("_C")
_log = logging.getLogger(__name__)


class ConfigFile(Generic[_C]):
    """A process's JSON config, applied again whenever the file is rewritten (its mtime is
    polled) or on `reload` (SIGHUP); a broken file is logged and the running config kept,
    so a bad write never takes a serving process down."""

    def __init__(
        self, path: Path | None, load: Callable[[Path], _C], apply: Callable[[_C], None]
    ) -> None:
        self.path = path
        self._load = load
        self._apply = apply
        self._mtime = path.stat().st_mtime_ns if path else None

    def reload(self) -> None:
        if self.path is None:
            return
        try:
            self._mtime = self.path.stat().st_mtime_ns
            new = self._load(self.path)
        except (OSError, ValueError) as exc:
            _log.error("config reload failed, keeping the running config: %s", exc)
            return
        self._apply(new)

    async def watch(self) -> None:
        while self.path is not None:
            await asyncio.sleep(CONFIG_POLL_SECONDS)
            try:
                mtime = self.path.stat().st_mtime_ns
            except OSError:
                continue
            if mtime != self._mtime:
                self.reload()
