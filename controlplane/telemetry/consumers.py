"""`/ws/agent/`: the WebSocket each agent streams its telemetry batches over.

One text frame in is one `TelemetryBatch`; one `TelemetryAck` frame goes back for each,
once the batch is durable or rejected (or at once when it must be retried). Acks may
overtake each other; the agent matches them by `seq`. The frame is parsed and validated
on the ingestor's thread (see `ingest`), not on the event loop.

An agent that offers the `AGENT_SOCKET_SUBPROTOCOL` subprotocol (and gets it) also sends
its heartbeats here (`{"heartbeat": ...}` frames, unanswered) instead of POSTing them;
one that offers `STATUS_SUBPROTOCOL` (and gets it) sends its status reports here too
(`{"status": ...}` frames, each answered by a `StatusAck` once recorded). An older agent
offers neither and POSTs both as before.
"""

from __future__ import annotations

import logging
from typing import Any

from channels.consumer import get_handler_name
from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer

from agent.protocol import (
    AGENT_SOCKET_SUBPROTOCOLS,
    HEARTBEAT_FRAME_PREFIX,
    STATUS_FRAME_PREFIX,
    STATUS_SUBPROTOCOL,
    StatusAck,
    TelemetryAck,
)
from controlplane.inventory.models import Node
from controlplane.inventory.services import authenticate_node
from controlplane.telemetry.ingest import ingestor

log = logging.getLogger(__name__)

CLOSE_UNAUTHENTICATED = 4401


def node_credential(scope: dict[str, Any]) -> str | None:
    """The credential of an `Authorization: Node <credential>` handshake header."""
    for name, value in scope.get("headers", []):
        if name.lower() == b"authorization":
            parts = value.decode(errors="replace").split()
            if len(parts) == 2 and parts[0].lower() == "node":
                return parts[1]
    return None


class AgentTelemetryConsumer(AsyncWebsocketConsumer):
    node: Node | None = None
    heartbeats = False
    """The agent offered a subprotocol: it sends its heartbeats here too."""
    statuses = False
    """The agent offered STATUS_SUBPROTOCOL: it sends its status reports here too."""
    # No channel layer: acks come from the in-process ingestor, so a channel per agent
    # would only add a Redis poll per connection (hundreds of agents, hundreds of polls).
    channel_layer_alias = "none"

    async def dispatch(self, message: dict[str, Any]) -> None:
        """As Channels' own, minus closing stale DB connections before every frame: after
        connect this consumer never touches the database (the ingestor does, on its own
        thread), and a thread hop per frame is most of its cost at 1 Hz per agent."""
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"no handler for message type {message['type']}")
        await handler(message)

    async def connect(self) -> None:
        credential = node_credential(self.scope)
        self.node = (
            await database_sync_to_async(authenticate_node)(credential) if credential else None
        )
        offered = self.scope.get("subprotocols", ())
        selected = next((p for p in AGENT_SOCKET_SUBPROTOCOLS if p in offered), None)
        self.heartbeats = selected is not None
        self.statuses = selected == STATUS_SUBPROTOCOL
        await self.accept(selected)
        if self.node is None:
            await self.close(code=CLOSE_UNAUTHENTICATED, reason="invalid node credential")

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        """Hand the frame to this process's ingestor as it came: parsing and validating it
        happen on the ingestor's thread, with the rest of its flush."""
        if self.node is None:
            return
        frame = text_data if text_data is not None else (bytes_data or b"")
        if self.heartbeats and text_data is not None:
            if text_data.startswith(HEARTBEAT_FRAME_PREFIX):
                ingestor().heartbeat(self.node.pk, text_data)
                return
            if self.statuses and text_data.startswith(STATUS_FRAME_PREFIX):
                at_once = ingestor().status(self.node, text_data, reply=self._reply)
                if at_once is not None:
                    await self._reply(at_once)
                return
        ack = ingestor().submit(self.node.pk, frame, reply=self._reply)
        if ack.done():  # answered at once (retry later): the ingestor sends nothing
            await self._reply(ack.result())

    async def _reply(self, ack: TelemetryAck | StatusAck) -> None:
        """Send one ack; the ingestor awaits this for every frame of a flush in turn (a send
        never waits for the network), instead of a task per ack."""
        try:
            await self.send(text_data=ack.model_dump_json())
        except Exception:  # the agent went away; it resends what it has no ack for
            log.debug("could not deliver a telemetry ack", exc_info=True)
