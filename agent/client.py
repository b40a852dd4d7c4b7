"""The agent's authenticated REST client for the control plane's `/api/v1/agent/` endpoints,
and where its telemetry WebSocket (`/ws/agent/`) is."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

import httpx
from pydantic import BaseModel

from agent.protocol import (
    AppliedStatus,
    Enrollment,
    EnrollmentGrant,
    Heartbeat,
    Inventory,
    SignedDesiredState,
    StorageReport,
    TelemetryAck,
)

_M = TypeVar("_M", bound=BaseModel)

KEEPALIVE_EXPIRY_S = 2.0
"""How long an idle connection to the control plane is kept: well under uvicorn's 5 s (and
common proxies' keep-alive), so the agent never sends on a connection the server is closing
at that moment, which loses the request (httpx's own default is also 5 s)."""


def http_client(connections: int = 100) -> httpx.AsyncClient:
    """The agent's HTTP client for the control plane: at most `connections` at once."""
    limits = httpx.Limits(
        max_connections=connections,
        max_keepalive_connections=connections,
        keepalive_expiry=KEEPALIVE_EXPIRY_S,
    )
    return httpx.AsyncClient(timeout=30, limits=limits)


class ControlPlaneError(Exception):
    """The control plane answered with an error; `status` 0 means it could not be reached."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"control plane answered {status}: {detail}" if status else detail)
        self.status = status


class ControlPlaneClient:
    """`limit`, shared by clients that share `http` (the simulator's many agents), caps the
    requests in flight: the rest wait their turn here, in order, rather than in httpx's
    connection pool, whose pool timeout would fail them and whose bookkeeping grows with
    every request waiting for a connection."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        base_url: str,
        credential: str | None = None,
        limit: asyncio.Semaphore | None = None,
    ) -> None:
        self._http = http
        self._base = base_url.rstrip("/") + "/api/v1/agent/"
        self._headers = {"Authorization": f"Node {credential}"} if credential else {}
        self._limit = limit

    @property
    def auth_headers(self) -> dict[str, str]:
        """`Authorization: Node <credential>`, for the telemetry WebSocket handshake."""
        return dict(self._headers)

    @property
    def telemetry_socket_url(self) -> str:
        """`ws://` (or `wss://` behind https) `<control plane>/ws/agent/`."""
        parts = urlsplit(self._base)
        scheme = "wss" if parts.scheme == "https" else "ws"
        path = parts.path.removesuffix("api/v1/agent/") + "ws/agent/"
        return urlunsplit((scheme, parts.netloc, path, "", ""))

    def with_credential(self, credential: str) -> ControlPlaneClient:
        return ControlPlaneClient(
            self._http, self._base.removesuffix("/api/v1/agent/"), credential, self._limit
        )

    def _turn(self) -> contextlib.AbstractAsyncContextManager[object]:
        return self._limit if self._limit is not None else contextlib.nullcontext()

    async def _call(
        self,
        method: str,
        path: str,
        body: BaseModel | None = None,
        extra_headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        content = body.model_dump_json().encode() if body is not None else None
        headers = {**self._headers, **(extra_headers or {})}
        if content:
            headers["Content-Type"] = "application/json"
        try:
            async with self._turn():
                response = await self._http.request(
                    method, self._base + path, content=content, headers=headers
                )
        except httpx.TransportError as exc:
            raise ControlPlaneError(0, f"control plane unreachable: {exc!r}") from exc
        if response.status_code >= 400:
            raise ControlPlaneError(response.status_code, response.text[:2000])
        return response

    async def enroll(self, message: Enrollment) -> EnrollmentGrant:
        response = await self._call("POST", "enroll/", message)
        return EnrollmentGrant.model_validate_json(response.content)

    async def post_inventory(self, inventory: Inventory) -> None:
        await self._call("POST", "inventory/", inventory)

    async def post_heartbeat(self, heartbeat: Heartbeat) -> None:
        await self._call("POST", "heartbeat/", heartbeat)

    async def desired_state(self, applied_tag: str | None = None) -> SignedDesiredState | None:
        """The node's newest signed state; None when there is none, or when it is still the
        one `applied_tag` (see `state_tag`) names."""
        conditional = {"If-None-Match": applied_tag} if applied_tag else None
        response = await self._call("GET", "desired-state/", extra_headers=conditional)
        if response.status_code in (204, 304):
            return None
        return SignedDesiredState.model_validate_json(response.content)

    async def post_status(self, status: AppliedStatus) -> None:
        await self._call("POST", "status/", status)

    async def post_storage(self, report: StorageReport) -> None:
        await self._call("POST", "storage/", report)

    async def post_telemetry(self, seq: int, batch_json: bytes) -> TelemetryAck:
        """POST one serialised TelemetryBatch (the WebSocket's fallback), answered as an ack.

        200 and 422 (rejected for good) carry the ack, as the WebSocket would send it; any
        other 400, and 413 (larger than any agent may send), is a batch the control plane
        will never take, rejected too; 429 means retry after Retry-After. Anything else
        (5xx, unreachable) raises ControlPlaneError: keep it.
        """
        headers = {**self._headers, "Content-Type": "application/json"}
        try:
            async with self._turn():
                response = await self._http.post(
                    self._base + "telemetry/", content=batch_json, headers=headers
                )
        except httpx.TransportError as exc:
            raise ControlPlaneError(0, f"control plane unreachable: {exc!r}") from exc
        if response.status_code in (200, 422):
            return TelemetryAck.model_validate_json(response.content)
        if response.status_code in (400, 413):
            return TelemetryAck(seq=seq, outcome="rejected", reason=_detail(response))
        if response.status_code == 429:
            return TelemetryAck(
                seq=seq, outcome="retry", retry_after_s=_retry_after(response), reason="429"
            )
        raise ControlPlaneError(response.status_code, response.text[:2000])


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:4000]
    detail = body.get("detail", body) if isinstance(body, dict) else body
    return str(detail)[:4000]


def _retry_after(response: httpx.Response) -> float:
    """Retry-After in seconds (an HTTP date is rare from our server; then one second)."""
    try:
        return max(0.0, float(response.headers.get("retry-after", "1")))
    except ValueError:
        return 1.0
