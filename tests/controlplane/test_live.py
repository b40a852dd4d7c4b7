"""The dashboard WebSocket through the real ASGI application (session auth, origin check):
who may subscribe to which stream, and which deltas reach whom."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer
from channels.testing import WebsocketCommunicator
from django.test import Client

from controlplane.asgi import application
from controlplane.fleet import services as fleet
from controlplane.storage.models import Volume
from controlplane.telemetry import services, streams
from tests.controlplane.conftest import World, make_node
from tests.controlplane.storage_helpers import make_pool
from tests.controlplane.telemetry_helpers import batch, place

pytestmark = pytest.mark.django_db(transaction=True)

Connect = Callable[[Any], Awaitable[WebsocketCommunicator]]


@pytest.fixture
async def connect() -> AsyncIterator[Connect]:
    """Open /ws/dashboard/ as a user signed in to the console (None: anonymous)."""
    opened: list[WebsocketCommunicator] = []

    async def open_as(user: Any) -> WebsocketCommunicator:
        headers = [(b"origin", b"http://testserver")]
        if user is not None:
            client = Client()
            await sync_to_async(client.force_login)(user)
            headers.append((b"cookie", f"sessionid={client.cookies['sessionid'].value}".encode()))
        communicator = WebsocketCommunicator(application, "/ws/dashboard/", headers=headers)
        opened.append(communicator)
        return communicator

    yield open_as
    for communicator in opened:
        await communicator.disconnect()


async def subscribed(connect: Connect, user: Any, *names: str) -> WebsocketCommunicator:
    ws = await connect(user)
    connected, _ = await ws.connect()
    assert connected
    for name in names:
        await ws.send_json_to({"subscribe": name})
        assert await ws.receive_json_from() == {"type": "subscribed", "stream": name}
    return ws


@pytest.fixture
def chats(world: World) -> tuple[Any, Any]:
    return tuple(  # type: ignore[return-value]
        fleet.create_deployment(
            tenant=tenant, name="chat", model_name="chat", artifact_uri="synthetic://chat"
        )
        for tenant in (world.tenant_a, world.tenant_b)
    )


async def send(stream: str, payload: dict[str, Any]) -> None:
    await get_channel_layer().group_send(
        streams.group_name(stream), {"type": "live.delta", "stream": stream, "payload": payload}
    )


async def test_anonymous_connections_are_refused(connect: Connect) -> None:
    connected, code = await (await connect(None)).connect()
    assert (connected, code) == (False, 4401)


async def test_tenant_users_subscribe_to_their_streams_only(
    connect: Connect, world: World, chats: tuple[Any, Any]
) -> None:
    chat_a, chat_b = chats
    node_a = await sync_to_async(make_node)("gpu-a", world.tenant_a)
    node_b = await sync_to_async(make_node)("gpu-b", world.tenant_b)
    ws = await subscribed(
        connect,
        world.viewer_a,
        streams.deployment(chat_a.pk),
        streams.tenant(world.tenant_a.pk),
        streams.node(node_a.pk),
    )
    for name in (
        streams.deployment(chat_b.pk),
        streams.tenant(world.tenant_b.pk),
        streams.node(node_b.pk),
        streams.FLEET,
        "deployment:not-a-uuid",
        "everything",
    ):
        await ws.send_json_to({"subscribe": name})
        answer = await ws.receive_json_from()
        assert answer["type"] == "error" and answer["stream"] == name, answer
    await ws.send_json_to({"subscribe": 42})
    assert (await ws.receive_json_from())["type"] == "error"
    await ws.send_to(text_data="{not json")
    assert "subscribe" in (await ws.receive_json_from())["detail"]

    # a refused subscription receives nothing from that stream
    await send(streams.deployment(chat_b.pk), {"type": "deployment.delta", "point": {}})
    assert await ws.receive_nothing(timeout=0.3)

    admin = await subscribed(connect, world.platform, streams.FLEET, streams.deployment(chat_b.pk))
    await admin.disconnect()


async def test_a_delta_reaches_only_the_subscribers_of_its_stream(
    connect: Connect, world: World, chats: tuple[Any, Any]
) -> None:
    chat_a, chat_b = chats
    viewer = await subscribed(connect, world.viewer_a, streams.deployment(chat_a.pk))
    other = await subscribed(connect, world.admin_b, streams.deployment(chat_b.pk))
    operator = await subscribed(connect, world.platform, streams.deployment(chat_a.pk))

    delta = {"type": "deployment.delta", "deployment_id": str(chat_a.pk), "point": {"t": 1.0}}
    await send(streams.deployment(chat_a.pk), delta)

    expected = {**delta, "stream": streams.deployment(chat_a.pk)}
    assert await viewer.receive_json_from() == expected
    assert await operator.receive_json_from() == expected
    assert await other.receive_nothing(timeout=0.3)


async def test_ingest_publishes_to_subscribers_with_gauges_cut_to_the_tenant(
    connect: Connect, world: World, chats: tuple[Any, Any]
) -> None:
    """On a shared node serving both tenants, tenant A sees the GPUs but not B's volume."""
    chat_a, chat_b = chats

    def shared_node() -> tuple[Any, str, str]:
        node = make_node("shared-1", gpus=1)
        pool = make_pool(node)
        mine = Volume.objects.create(tenant=world.tenant_a, name="v", size_bytes=1, pool=pool)
        theirs = Volume.objects.create(tenant=world.tenant_b, name="v", size_bytes=1, pool=pool)
        place(node, *chats)
        return node, mine.wire_name, theirs.wire_name

    node, mine, theirs = await sync_to_async(shared_node)()
    viewer = await subscribed(
        connect, world.viewer_a, streams.node(node.pk), streams.deployment(chat_a.pk)
    )
    gauges = {
        "gpu.0.utilization_pct": 75.0,
        f"storage.{mine}.read_iops": 10.0,
        f"storage.{theirs}.read_iops": 20.0,
        f"worker.{chat_b.pk}.queue_depth": 3.0,
    }
    sample = batch(
        node, 1, deployment=chat_a, ttft=[0.2, 0.4], gauges=gauges, end=datetime.now(UTC)
    )
    acks = await sync_to_async(services.ingest)([sample])
    assert [a.outcome for a in acks] == ["stored"]

    received = {}
    for _ in range(2):
        message = await viewer.receive_json_from(timeout=5)
        received[message["type"]] = message
    node_delta = received["node.delta"]
    assert node_delta["stream"] == streams.node(node.pk)
    assert node_delta["point"]["gauges"] == {
        "gpu.0.utilization_pct": 75.0,
        f"storage.{mine}.read_iops": 10.0,
    }
    point = received["deployment.delta"]["point"]
    assert point["latency"]["ttft"]["count"] == 2
    assert point["usage"]["completed"] == 2


async def test_flushes_from_the_agent_websocket_publish_in_order(
    connect: Connect, world: World, chats: tuple[Any, Any]
) -> None:
    """A stream sees the deltas of successive flushes in their order."""
    from agent.protocol import TelemetryAck
    from tests.controlplane.telemetry_helpers import with_credential

    def placed_node() -> tuple[Any, str]:
        node = make_node("ordered-1", gpus=1)
        place(node, chats[0])
        return node, with_credential(node)

    node, credential = await sync_to_async(placed_node)()
    viewer = await subscribed(connect, world.viewer_a, streams.node(node.pk))
    agent = WebsocketCommunicator(
        application, "/ws/agent/", headers=[(b"authorization", f"Node {credential}".encode())]
    )
    assert (await agent.connect())[0]
    for seq in range(1, 6):
        sample = batch(node, seq, gauges={"gpu.0.utilization_pct": float(seq)})
        await agent.send_to(text_data=sample.model_dump_json())
        ack = TelemetryAck.model_validate_json(await agent.receive_from(timeout=10))
        assert (ack.seq, ack.outcome) == (seq, "stored")  # one flush each
    seen = [
        (await viewer.receive_json_from(timeout=10))["point"]["gauges"]["gpu.0.utilization_pct"]
        for _ in range(5)
    ]
    assert seen == [1.0, 2.0, 3.0, 4.0, 5.0]
    await agent.disconnect()


async def test_a_dashboard_outlives_redis_timeouts(
    connect: Connect, world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis forgets the dashboard's group (as a restart does) and then stalls past the
    layer's read timeout: the dashboard's socket stays open, it joins again, and the deltas
    sent once Redis answers still reach it."""
    from channels.layers import channel_layers
    from channels_redis.core import RedisChannelLayer
    from django.conf import settings
    from redis.asyncio import Redis

    impatient = RedisChannelLayer(hosts=[{"address": settings.REDIS_URL, "socket_timeout": 0.3}])
    impatient.brpop_timeout = 0.1
    previous = channel_layers.set("default", impatient)
    redis = Redis.from_url(settings.REDIS_URL)
    try:
        viewer = await subscribed(connect, world.platform, streams.FLEET)
        # Redis forgets the group, as a restart does.
        await redis.delete(impatient._group_key(streams.group_name(streams.FLEET)))
        caplog.set_level("WARNING", logger="controlplane.telemetry.live")
        for _ in range(20):  # a busy machine may miss one pause's window
            await redis.execute_command("CLIENT", "PAUSE", 2000, "ALL")
            await redis.ping()  # answered when the pause ends
            if any("reading again" in r.getMessage() for r in caplog.records):
                break
        else:
            pytest.fail("the dashboard's read never timed out")
        group = impatient._group_key(streams.group_name(streams.FLEET))
        async with asyncio.timeout(60):  # it joins again once Redis answers
            while not await redis.zcard(group):
                await asyncio.sleep(0.05)
        patient = RedisChannelLayer(hosts=[settings.REDIS_URL])
        delta = {"type": "fleet.delta", "nodes": []}
        await patient.group_send(
            streams.group_name(streams.FLEET),
            {"type": "live.delta", "stream": streams.FLEET, "payload": delta},
        )
        assert await viewer.receive_json_from(timeout=10) == {**delta, "stream": streams.FLEET}
    finally:
        channel_layers.set("default", previous)
        await redis.aclose()


async def test_streams_nobody_watches_get_no_deltas_and_a_later_snapshot_has_it_all(
    connect: Connect, world: World, chats: tuple[Any, Any]
) -> None:
    """Ingest builds deltas only for subscribed streams; a dashboard subscribing later
    starts from a snapshot that holds what was ingested while nobody watched."""
    from controlplane.telemetry import selectors
    from controlplane.telemetry.pipeline.publish import watched

    def placed_node() -> Any:
        node = make_node("unwatched-1", gpus=1)
        place(node, chats[0])
        return node

    def store(seq: int, utilization: float) -> list[str]:
        sample = batch(
            node,
            seq,
            deployment=chats[0],
            ttft=[0.2],
            gauges={"gpu.0.utilization_pct": utilization},
        )
        return [name for name, _ in services.store_batches([sample], watching=watched).deltas]

    await get_channel_layer().flush()  # no member left behind by anything before
    node = await sync_to_async(placed_node)()
    assert await sync_to_async(store)(1, 10.0) == []

    await subscribed(connect, world.viewer_a, streams.node(node.pk))
    snapshot = await sync_to_async(selectors.fleet_snapshot)(world.viewer_a)
    (facts,) = [n for n in snapshot["nodes"] if n["id"] == node.pk]
    assert facts["gauges"]["gpu.0.utilization_pct"] == 10.0

    assert await sync_to_async(store)(2, 20.0) == [streams.node(node.pk)]
    await subscribed(connect, world.platform, streams.FLEET, streams.tenant(chats[0].tenant_id))
    assert set(await sync_to_async(store)(3, 30.0)) == {
        streams.FLEET,
        streams.node(node.pk),
        streams.tenant(chats[0].tenant_id),
    }
