"""The dashboards' WebSocket: subscribe to live streams the user may see, receive deltas.

A client sends ``{"subscribe": "<stream>"}`` (names from streams.py) and gets
``{"type": "subscribed", "stream": ...}`` or ``{"type": "error", "stream": ..., "detail":
...}``; then every delta ingest sends to that stream's group arrives as the delta itself
with ``"stream"`` added. Node deltas are cut down to the gauges the user may read.
"""

from __future__ import annotations

import json
from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from controlplane.telemetry import selectors, streams

UNAUTHENTICATED = 4401
SUBSCRIBE_HELP = 'Send {"subscribe": "<stream>"}: fleet, node:<id>, deployment:<id> or tenant:<id>.'


class DashboardConsumer(AsyncJsonWebsocketConsumer):
    async def connect(self) -> None:
        self.subscriptions: dict[str, selectors.StreamAccess] = {}
        user = self.scope.get("user")
        if not (user and user.is_authenticated and user.is_active):
            await self.close(code=UNAUTHENTICATED)
            return
        await self.accept()

    async def disconnect(self, code: int) -> None:
        for stream in getattr(self, "subscriptions", {}):
            await self.channel_layer.group_discard(streams.group_name(stream), self.channel_name)

    @classmethod
    async def decode_json(cls, text_data: str) -> Any:
        """Bad JSON is the client's mistake: answer it instead of dropping the connection."""
        try:
            return json.loads(text_data)
        except ValueError:
            return None

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        stream = content.get("subscribe") if isinstance(content, dict) else None
        if not isinstance(stream, str):
            await self.send_json({"type": "error", "stream": None, "detail": SUBSCRIBE_HELP})
            return
        access = await database_sync_to_async(selectors.stream_access)(self.scope["user"], stream)
        if access is None:
            await self.send_json(
                {"type": "error", "stream": stream, "detail": "No such stream among yours."}
            )
            return
        if stream not in self.subscriptions:
            await self.channel_layer.group_add(streams.group_name(stream), self.channel_name)
        self.subscriptions[stream] = access
        await self.send_json({"type": "subscribed", "stream": stream})

    async def live_delta(self, event: dict[str, Any]) -> None:
        """A delta from ingest (channel-layer type ``live.delta``), forwarded as it is."""
        stream = event["stream"]
        access = self.subscriptions.get(stream)
        if access is None:
            return
        payload = {**event["payload"], "stream": stream}
        if access.gauges is not None and isinstance(payload.get("point"), dict):
            point = payload["point"]
            payload["point"] = {**point, "gauges": access.gauges.filter(point.get("gauges", {}))}
        await self.send_json(payload)
