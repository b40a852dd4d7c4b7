"""The dashboards' WebSocket: subscribe to live streams the user may see, receive deltas.

A client sends ``{"subscribe": "<stream>"}`` (names from streams.py) and gets
``{"type": "subscribed", "stream": ...}`` or ``{"type": "error", "stream": ..., "detail":
...}``; then every delta ingest sends to that stream's group arrives as the delta itself
with ``"stream"`` added. Node deltas are cut down to the gauges the user may read.

A channel layer that stops answering for a while (Redis slow, paused or restarted, or
this process's event loop too far behind to read its reply in time) costs the dashboard
the deltas sent meanwhile, never its WebSocket: the consumer joins its streams' groups
again (a restarted Redis forgot them) and reads on once the layer answers; the page's
periodic snapshot fills the gap. A subscribe the layer fails ends the connection, and
the page connects and subscribes again.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from redis.exceptions import AuthenticationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from controlplane.telemetry import selectors, streams

log = logging.getLogger(__name__)

UNAUTHENTICATED = 4401
SUBSCRIBE_HELP = 'Send {"subscribe": "<stream>"}: fleet, node:<id>, deployment:<id> or tenant:<id>.'

LAYER_ERRORS = (RedisTimeoutError, RedisConnectionError, TimeoutError, ConnectionError)
"""What a channel layer raises while Redis (or the way to it) is slow or away."""
RETRY_FIRST_S = 0.1
RETRY_MOST_S = 2.0


async def receive_through_outages(
    receive: Callable[[], Awaitable[dict[str, Any]]], rejoin: Callable[[], Awaitable[None]]
) -> Any:
    """The next channel-layer message, trying again (after a short, growing pause, having
    joined the groups again) for as long as the layer fails: a read that timed out is no
    reason to drop a browser. A refused password is: it will not heal."""
    pause = RETRY_FIRST_S
    failing = False
    while True:
        try:
            if failing:
                await rejoin()
            return await receive()
        except AuthenticationError:
            raise
        except LAYER_ERRORS as exc:
            if not failing:  # once per outage, not once per try
                log.warning("dashboard channel-layer read failed (%r); reading again", exc)
            failing = True
            await asyncio.sleep(pause)
            pause = min(pause * 2, RETRY_MOST_S)


class DashboardConsumer(AsyncJsonWebsocketConsumer):
    @property
    def channel_receive(self) -> Callable[[], Awaitable[Any]]:
        return self._channel_receive

    @channel_receive.setter
    def channel_receive(self, receive: Callable[[], Awaitable[Any]]) -> None:
        """Channels reads the layer through this and ends the consumer (closing the
        browser's socket) on any error; reading through outages keeps it open."""
        self._channel_receive = lambda: receive_through_outages(receive, self._rejoin)

    async def _rejoin(self) -> None:
        # A copy: a subscribe may be handled while a join waits for the layer.
        for stream in list(getattr(self, "subscriptions", {})):
            await self.channel_layer.group_add(streams.group_name(stream), self.channel_name)

    async def connect(self) -> None:
        self.subscriptions: dict[str, selectors.StreamAccess] = {}
        user = self.scope.get("user")
        if not (user and user.is_authenticated and user.is_active):
            await self.close(code=UNAUTHENTICATED)
            return
        await self.accept()

    async def disconnect(self, code: int) -> None:
        """Leave every group; one the layer cannot reach now keeps this channel until the
        layer's group expiry (a day), which costs only deltas sent to nobody."""
        for stream in getattr(self, "subscriptions", {}):
            try:
                await self.channel_layer.group_discard(
                    streams.group_name(stream), self.channel_name
                )
            except LAYER_ERRORS:
                log.warning("could not leave %s's group; it expires", stream, exc_info=True)

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
