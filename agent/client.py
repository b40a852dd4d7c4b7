"""The agent's authenticated REST client for the control plane's `/api/v1/agent/` endpoints."""

from __future__ import annotations

from typing import TypeVar

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
)

_M = TypeVar("_M", bound=BaseModel)


class ControlPlaneError(Exception):
    """The control plane answered with an error; `status` 0 means it could not be reached."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"control plane answered {status}: {detail}" if status else detail)
        self.status = status


class ControlPlaneClient:
    def __init__(
        self, http: httpx.AsyncClient, base_url: str, credential: str | None = None
    ) -> None:
        self._http = http
        self._base = base_url.rstrip("/") + "/api/v1/agent/"
        self._headers = {"Authorization": f"Node {credential}"} if credential else {}

    def with_credential(self, credential: str) -> ControlPlaneClient:
        return ControlPlaneClient(self._http, self._base.removesuffix("/api/v1/agent/"), credential)

    async def _call(self, method: str, path: str, body: BaseModel | None = None) -> httpx.Response:
        content = body.model_dump_json().encode() if body is not None else None
        headers = (
            {**self._headers, "Content-Type": "application/json"} if content else self._headers
        )
        try:
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

    async def desired_state(self) -> SignedDesiredState | None:
        response = await self._call("GET", "desired-state/")
        if response.status_code == 204:
            return None
        return SignedDesiredState.model_validate_json(response.content)

    async def post_status(self, status: AppliedStatus) -> None:
        await self._call("POST", "status/", status)

    async def post_storage(self, report: StorageReport) -> None:
        await self._call("POST", "storage/", report)
