"""Nobody can forge or poison what SLOs are computed from: a node's telemetry is accepted
only for what its revisions placed on it, each batch is validated whole before it joins a
flush, and both transports refuse the same batches in the same words."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from rest_framework.test import APIClient

from agent.protocol import SeriesSketch, TelemetryAck, TelemetryBatch
from controlplane.asgi import application
from controlplane.fleet import services as fleet
from controlplane.fleet.services import issue_revisions
from controlplane.inventory.models import Node
from controlplane.slo import services as slo_services
from controlplane.storage.models import Volume
from controlplane.telemetry import services
from controlplane.telemetry.models import CounterRollup, LatencyRollup, NodeStream, SloRollup
from controlplane.telemetry.pipeline.authorize import GRACE
from controlplane.telemetry.pipeline.validate import MAX_BATCH_BYTES, MAX_GAUGE_KEYS
from tests.controlplane.conftest import World, make_node
from tests.controlplane.storage_helpers import make_pool
from tests.controlplane.telemetry_helpers import (
    batch,
    one_second,
    place,
    sketch_of,
    ttft_slo,
    usage_count,
    with_credential,
)


@dataclass
class Placed:
    """Tenant A's chat with a TTFT SLO, served by `serving`; `idle` serves nothing."""

    serving: Node
    idle: Node
    chat: Any
    slo: Any


@pytest.fixture
def placed(world: World) -> Placed:
    chat = fleet.create_deployment(
        tenant=world.tenant_a, name="chat", model_name="chat", artifact_uri="synthetic://chat"
    )
    slo = ttft_slo(world.tenant_a, threshold=0.5)
    serving, idle = make_node("gpu-serving", gpus=1), make_node("gpu-idle", gpus=1)
    place(serving, chat)
    place(idle)
    return Placed(serving, idle, chat, slo)


def agent_client(node: Node) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Node {with_credential(node)}")
    return client


def post(client: APIClient, body: str | bytes) -> Any:
    return client.post("/api/v1/agent/telemetry/", body, content_type="application/json")


def forged(node: Node, seq: int, placed: Placed, *, good: int = 0, total: int = 2000) -> str:
    """What the attack sent: a page's worth of bad requests against the chat's TTFT SLO."""
    honest = batch(node, seq, deployment=placed.chat, ttft=[0.9], slo_id=placed.slo.pk)
    counts = honest.series[0].thresholds[0].model_copy(update={"good": good, "total": total})
    series = honest.series[0].model_copy(update={"thresholds": [counts]})
    return honest.model_copy(update={"series": [series]}).model_dump_json()


def test_a_node_serving_nothing_cannot_forge_slo_counts_usage_or_series(
    world: World, placed: Placed, client_for: Any
) -> None:
    client = agent_client(placed.idle)
    slo_counts = post(client, forged(placed.idle, 1, placed))
    usage_only = batch(placed.idle, 2, deployment=placed.chat, ttft=[0.1]).model_copy(
        update={"series": []}
    )
    usage = post(
        client,
        usage_only.model_copy(
            update={"usage": [usage_count(world.tenant_a.pk, placed.chat.pk, completed=10**12)]}
        ).model_dump_json(),
    )

    for response, seq in ((slo_counts, 1), (usage, 2)):
        assert response.status_code == 422, response.content
        ack = TelemetryAck.model_validate(response.json())
        assert (ack.seq, ack.outcome) == (seq, "rejected")
        assert f"deployment {placed.chat.pk}" in (ack.reason or "")
        assert "no replica of it serving that tenant was placed on the node" in (ack.reason or "")
    assert not SloRollup.objects.exists()
    assert not CounterRollup.objects.exists() and not LatencyRollup.objects.exists()

    # Counted on the node, and visible there: API, /metrics.
    stream = NodeStream.objects.get(node=placed.idle)
    assert stream.rejected_batches == 2 and "no replica" in stream.last_rejection
    body = client_for(world.platform).get(f"/api/v1/telemetry/nodes/{placed.idle.pk}/").json()
    assert body["ingest"]["rejected_batches"] == 2
    assert body["ingest"]["last_rejection"] == stream.last_rejection
    assert body["ingest"]["last_rejected_t"] is not None
    serving_a = client_for(world.admin_a).get(f"/api/v1/telemetry/nodes/{placed.serving.pk}/")
    assert serving_a.status_code == 200 and serving_a.json()["ingest"] is None  # admins only
    metrics = APIClient().get("/metrics").content.decode()
    assert 'tailguard_telemetry_rejected_batches_total{node="gpu-idle"} 2.0' in metrics

    # The node that serves the chat is stored as before.
    honest = post(agent_client(placed.serving), forged(placed.serving, 1, placed, good=5, total=6))
    assert honest.status_code == 200 and honest.json()["outcome"] == "stored"
    assert SloRollup.objects.get(resolution=10, slo_id=placed.slo.pk).total == 6


def test_a_serving_node_counts_only_the_slos_and_tenants_it_was_told(
    world: World, placed: Placed
) -> None:
    good = batch(placed.serving, 1, deployment=placed.chat, ttft=[0.1], slo_id=placed.slo.pk)
    other_threshold = batch(
        placed.serving, 2, deployment=placed.chat, ttft=[0.1], slo_id=placed.slo.pk, threshold=9.0
    )
    unknown_slo = batch(placed.serving, 3, deployment=placed.chat, ttft=[0.1], slo_id=uuid.uuid4())
    storage_read = one_second(
        placed.serving,
        4,
        datetime.now(UTC),
        series=[
            SeriesSketch(
                tenant_id=world.tenant_b.pk,
                deployment_id=None,
                metric="storage_read",
                sketch=sketch_of([0.001]),
                thresholds=[],
            )
        ],
        usage=[],
        gauges={},
    )

    acks = services.store_batches([good, other_threshold, unknown_slo, storage_read]).acks

    assert [a.outcome for a in acks] == ["stored", "rejected", "rejected", "rejected"]
    assert "threshold 9.0" in (acks[1].reason or "") and "not asked to count" in (
        acks[1].reason or ""
    )
    assert "not asked to count" in (acks[2].reason or "")
    assert "holds no volume or replica of that tenant" in (acks[3].reason or "")
    assert SloRollup.objects.filter(resolution=10).count() == 1
    assert NodeStream.objects.get(node=placed.serving).rejected_batches == 3


def test_storage_figures_only_for_the_nodes_own_pools_and_volumes(
    world: World, placed: Placed
) -> None:
    volume = Volume.objects.create(
        tenant=world.tenant_a, name="data", size_bytes=1, pool=make_pool(placed.serving)
    )
    place(placed.serving)
    own = {f"storage.{volume.wire_name}.read_iops": 10.0, "pool.models.free_bytes": 1.0}

    acks = services.store_batches(
        [
            batch(placed.serving, 1, gauges=own),
            batch(placed.idle, 1, gauges={f"storage.{volume.wire_name}.read_iops": 99.0}),
            batch(placed.idle, 2, gauges={"pool.models.free_bytes": 99.0}),
            batch(placed.idle, 3, gauges={f"worker.{placed.chat.pk}.queue_depth": 99.0}),
            batch(placed.idle, 4, gauges={"gpu.0.utilization_pct": 5.0, "host.load1": 0.5}),
        ]
    ).acks

    assert [a.outcome for a in acks] == ["stored", "rejected", "rejected", "rejected", "stored"]
    assert f"gauge storage.{volume.wire_name}.read_iops" in (acks[1].reason or "")
    assert "no such pool" in (acks[2].reason or "") and "no such worker" in (acks[3].reason or "")
    assert NodeStream.objects.get(node=placed.idle).gauges == {
        "gpu.0.utilization_pct": 5.0,
        "host.load1": 0.5,
    }


def test_a_replica_that_moved_away_may_report_for_a_grace_period(placed: Placed) -> None:
    moved_to = make_node("gpu-new", gpus=1)
    place(moved_to, placed.chat)
    issue_revisions([placed.serving], cause="its replica moved")  # the chat is gone from it
    now = datetime.now(UTC)

    def from_old_node(seq: int, end: datetime) -> TelemetryBatch:
        return batch(placed.serving, seq, deployment=placed.chat, ttft=[0.1], end=end)

    acks = services.store_batches(
        [from_old_node(1, now), from_old_node(2, now + GRACE + timedelta(seconds=30))], now=now
    ).acks
    assert [a.outcome for a in acks] == ["stored", "rejected"]
    assert "no replica" in (acks[1].reason or "")
    # A backfill of its own time is judged by the revisions of that time.
    earlier = services.store_batches([from_old_node(3, now - timedelta(seconds=30))]).acks
    assert [a.outcome for a in earlier] == ["stored"]


def test_counts_under_an_old_and_a_new_threshold_never_share_a_row(placed: Placed) -> None:
    """A threshold change mid-bucket: the late counts made under the old threshold and the
    first under the new one land in separate rows at every resolution."""
    now = datetime.now(UTC)
    slo_services.update_slo(placed.slo, threshold_seconds=1.0, now=now)

    def counted(seq: int, threshold: float) -> TelemetryBatch:
        return batch(
            placed.serving,
            seq,
            deployment=placed.chat,
            ttft=[0.2, 0.7],
            slo_id=placed.slo.pk,
            threshold=threshold,
            end=now,
        )

    acks = services.store_batches([counted(1, 0.5), counted(2, 1.0)], now=now).acks
    assert [a.outcome for a in acks] == ["stored", "stored"]
    rows = SloRollup.objects.filter(slo_id=placed.slo.pk)
    for resolution in (10, 60, 3600):
        assert sorted(
            rows.filter(resolution=resolution).values_list("threshold_seconds", "good", "total")
        ) == [(0.5, 1, 2), (1.0, 2, 2)]


def junk_sketch(node: Node, seq: int, placed: Placed, sketch: str) -> str:
    good = batch(node, seq, deployment=placed.chat, ttft=[0.1])
    series = good.series[0].model_copy(update={"sketch": sketch})
    return good.model_copy(update={"series": [series]}).model_dump_json()


@pytest.mark.django_db(transaction=True)
async def test_a_poison_batch_is_rejected_alone_and_delays_no_other_node(
    world: World, placed: Placed
) -> None:
    other = await database_sync_to_async(make_node)("gpu-other", gpus=1)
    second = await database_sync_to_async(fleet.create_deployment)(
        tenant=world.tenant_b, name="chat", model_name="chat", artifact_uri="synthetic://chat"
    )
    await database_sync_to_async(place)(other, second)

    async def connect(node: Node) -> WebsocketCommunicator:
        credential = await database_sync_to_async(with_credential)(node)
        ws = WebsocketCommunicator(
            application, "/ws/agent/", headers=[(b"authorization", f"Node {credential}".encode())]
        )
        connected, _ = await ws.connect()
        assert connected
        return ws

    poisoned, healthy = await connect(placed.serving), await connect(other)
    for sketch in ("bm90IGEgc2tldGNo", ""):  # junk base64, and nothing at all
        seq = 1 if sketch else 2
        await poisoned.send_to(text_data=junk_sketch(placed.serving, seq, placed, sketch))
    await poisoned.send_to(
        text_data=batch(placed.serving, 3, deployment=placed.chat, ttft=[0.2]).model_dump_json()
    )
    await healthy.send_to(
        text_data=batch(other, 1, deployment=second, ttft=[0.3]).model_dump_json()
    )

    acks = [TelemetryAck.model_validate_json(await poisoned.receive_from(10)) for _ in range(3)]
    by_seq = {a.seq: a for a in acks}
    assert [by_seq[s].outcome for s in (1, 2, 3)] == ["rejected", "rejected", "stored"]
    assert "series.0.sketch" in (by_seq[1].reason or "")
    healthy_ack = TelemetryAck.model_validate_json(await healthy.receive_from(10))
    assert healthy_ack.outcome == "stored"
    await poisoned.disconnect()
    await healthy.disconnect()
    for deployment in (placed.chat, second):
        assert await LatencyRollup.objects.filter(resolution=10, deployment=deployment).aexists()
    stream = await NodeStream.objects.aget(node=placed.serving)
    assert stream.rejected_batches == 2 and "sketch" in stream.last_rejection


def oversize(node: Node, seq: int) -> str:
    """A valid batch padded with whitespace past the limit (JSON allows it anywhere)."""
    text = batch(node, seq).model_dump_json()
    return text[:-1] + " " * MAX_BATCH_BYTES + "}"


def nested(node: Node, seq: int) -> str:
    return (
        f'{{"node_id": "{node.pk}", "seq": {seq}, "gauges": ' + "[" * 100_000 + "]" * 100_000 + "}"
    )


def flood(node: Node, seq: int) -> str:
    gauges = {f"host.key{i}": 1.0 for i in range(MAX_GAUGE_KEYS + 1)}
    return batch(node, seq, gauges=gauges).model_dump_json()


@pytest.mark.django_db(transaction=True)
async def test_oversize_nested_and_flooding_batches_answer_alike_on_both_transports(
    placed: Placed,
) -> None:
    node = placed.serving
    credential = await database_sync_to_async(with_credential)(node)
    ws = WebsocketCommunicator(
        application, "/ws/agent/", headers=[(b"authorization", f"Node {credential}".encode())]
    )
    assert (await ws.connect())[0]
    http = APIClient()
    http.credentials(HTTP_AUTHORIZATION=f"Node {credential}")

    for make, seq, words in (
        (oversize, 11, f"batch larger than {MAX_BATCH_BYTES} bytes"),
        (nested, 12, "recursion limit exceeded"),
        (flood, 13, f"gauges: {MAX_GAUGE_KEYS + 1} entries; at most {MAX_GAUGE_KEYS}"),
    ):
        body = make(node, seq)
        await ws.send_to(text_data=body)
        over_ws = TelemetryAck.model_validate_json(await ws.receive_from(10))
        response = await database_sync_to_async(post)(http, body)
        assert response.status_code == 422, (make.__name__, response.content)
        over_http = TelemetryAck.model_validate(response.json())
        assert over_ws == over_http, make.__name__
        assert over_ws.outcome == "rejected" and words in (over_ws.reason or ""), over_ws
        assert over_ws.seq == (0 if make is nested else seq)  # its seq is past any sane depth

    # The connection is still open and serving.
    await ws.send_to(text_data=batch(node, 1).model_dump_json())
    assert TelemetryAck.model_validate_json(await ws.receive_from(10)).outcome == "stored"
    await ws.disconnect()
    assert (await NodeStream.objects.aget(node=node)).rejected_batches == 6
