"""Telemetry ingest: exactly-once rollups, rejections, fairness, the agent WebSocket and
HTTP fallback, retention and /metrics."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from rest_framework.test import APIClient

from agent.protocol import TelemetryAck
from controlplane.asgi import application
from controlplane.fleet import services as fleet
from controlplane.telemetry import ingest as ingest_module
from controlplane.telemetry import services
from controlplane.telemetry.models import (
    CounterRollup,
    GaugeRollup,
    LatencyRollup,
    NodeStream,
    SloRollup,
)
from controlplane.telemetry.pipeline.merge import bucket_of
from controlplane.telemetry.pipeline.store import MAX_SEEN_ABOVE
from controlplane.telemetry.retention import compact_gauges, prune_rollups
from dataplane.sketch import LatencySketch
from tests.controlplane.conftest import make_node
from tests.controlplane.telemetry_helpers import batch, place, ttft_slo, with_credential


@pytest.fixture
def node(db: Any) -> Any:
    return make_node("gpu-1", gpus=1)


@pytest.fixture
def deployment(world: Any, node: Any) -> Any:
    """Tenant A's chat, placed on `node`."""
    deployment = fleet.create_deployment(
        tenant=world.tenant_a, name="chat", model_name="chat", artifact_uri="synthetic://chat"
    )
    place(node, deployment)
    return deployment


def outcomes(acks: list[TelemetryAck]) -> list[str]:
    return [a.outcome for a in acks]


def test_batches_merge_into_every_resolution_exactly_once(
    world: Any, node: Any, deployment: Any
) -> None:
    slo = ttft_slo(world.tenant_a, threshold=0.5).pk
    now = bucket_of(datetime.now(UTC), 10) + timedelta(seconds=5)
    first = batch(node, 1, deployment=deployment, ttft=[0.1, 0.2, 0.9], slo_id=slo, end=now)
    second = batch(node, 2, deployment=deployment, ttft=[0.3] * 7, slo_id=slo, end=now)

    assert outcomes(services.store_batches([first, second]).acks) == ["stored", "stored"]
    assert outcomes(services.store_batches([second, first]).acks) == ["duplicate", "duplicate"]

    for resolution in (10, 60, 3600):
        row = SloRollup.objects.get(resolution=resolution, slo_id=slo)
        assert (row.good, row.total, row.threshold_seconds) == (9, 10, 0.5)
        latency = LatencyRollup.objects.get(resolution=resolution, deployment=deployment)
        assert latency.count == 10
        p50 = LatencySketch.from_bytes(bytes(latency.sketch)).quantile(0.5)
        assert p50 == pytest.approx(0.3, rel=0.01)
        completed = CounterRollup.objects.get(
            resolution=resolution, deployment=deployment, name="completed"
        )
        assert completed.value == 10
    gauges = GaugeRollup.objects.get(resolution=10, node=node).values
    assert gauges["gpu.0.utilization_pct"] == [100.0, 2, 50.0, 50.0, 50.0]
    stream = NodeStream.objects.get(node=node)
    assert (stream.last_seq, stream.batches, stream.seen_above) == (2, 2, [])


def test_a_retried_batch_landing_after_a_later_one_is_still_stored(node: Any) -> None:
    assert outcomes(services.store_batches([batch(node, 1), batch(node, 3)]).acks) == [
        "stored",
        "stored",
    ]
    assert NodeStream.objects.get(node=node).seen_above == [3]
    assert outcomes(services.store_batches([batch(node, 2), batch(node, 3)]).acks) == [
        "stored",
        "duplicate",
    ]
    stream = NodeStream.objects.get(node=node)
    assert (stream.last_seq, stream.seen_above, stream.batches) == (3, [], 3)


def test_gaps_that_never_fill_are_given_up_after_a_bound(node: Any) -> None:
    # Batch 1 was dropped by the agent's full buffer; batches 2.. keep coming.
    services.store_batches([batch(node, s) for s in range(2, MAX_SEEN_ABOVE + 3)])
    stream = NodeStream.objects.get(node=node)
    assert stream.last_seq == MAX_SEEN_ABOVE + 2 and stream.seen_above == []


def test_invalid_batches_are_rejected_with_a_reason_and_store_nothing(
    world: Any, node: Any, deployment: Any
) -> None:
    foreign = batch(node, 1, deployment=deployment, ttft=[0.1])
    foreign = foreign.model_copy(
        update={"series": [foreign.series[0].model_copy(update={"tenant_id": world.tenant_b.pk})]}
    )
    future = batch(node, 2, end=datetime.now(UTC) + timedelta(hours=1))
    ghost = batch(node, 3, deployment=deployment, ttft=[0.1])
    ghost = ghost.model_copy(
        update={"usage": [ghost.usage[0].model_copy(update={"deployment_id": uuid.uuid4()})]}
    )
    acks = services.store_batches([foreign, future, ghost]).acks
    assert outcomes(acks) == ["rejected"] * 3
    assert f"no deployment {deployment.pk} of tenant {world.tenant_b.pk}" in (acks[0].reason or "")
    assert "ahead of the control plane's clock" in (acks[1].reason or "")
    assert "no deployment" in (acks[2].reason or "")
    assert not LatencyRollup.objects.exists() and not GaugeRollup.objects.exists()
    # Rejected sequence numbers are not claimed: a corrected resend is stored.
    assert outcomes(services.store_batches([batch(node, 1)]).acks) == ["stored"]


def test_deltas_name_the_streams_of_nodes_deployments_and_tenants(
    node: Any, deployment: Any
) -> None:
    stored = services.store_batches(
        [batch(node, 1, deployment=deployment, ttft=[0.1, 0.2], output_tokens=40)]
    )
    by_stream = dict(stored.deltas)
    assert by_stream["fleet"]["nodes"][0]["hostname"] == "gpu-1"
    assert by_stream[f"node:{node.pk}"]["point"]["gauges"] == {"gpu.0.utilization_pct": 50.0}
    point = by_stream[f"deployment:{deployment.pk}"]["point"]
    assert point["usage"]["completed"] == 2 and point["tokens_per_s"] == pytest.approx(40.0)
    assert point["latency"]["ttft"]["count"] == 2
    assert by_stream[f"tenant:{deployment.tenant_id}"]["deployments"][str(deployment.pk)] == point


def test_retention_and_gauge_compaction(node: Any) -> None:
    now = datetime.now(UTC)
    services.store_batches([batch(node, 1, end=now - timedelta(minutes=3))])
    services.store_batches(
        [batch(node, 2, end=now - timedelta(minutes=3), gauges={"host.load1": 4.0})]
    )
    assert compact_gauges(now) >= 1
    minute = GaugeRollup.objects.get(resolution=60, node=node)
    assert minute.values["gpu.0.utilization_pct"][:2] == [50.0, 1]
    assert minute.values["host.load1"][:2] == [4.0, 1]
    assert compact_gauges(now) >= 1  # rerunning recomputes, never double counts
    assert GaugeRollup.objects.get(resolution=60, node=node).values == minute.values

    GaugeRollup.objects.filter(resolution=10).update(bucket=now - timedelta(days=3))
    assert prune_rollups(now) == 1
    assert not GaugeRollup.objects.filter(resolution=10).exists()
    assert GaugeRollup.objects.filter(resolution=60).exists()  # kept 35 days


async def test_a_flooding_node_cannot_crowd_out_another(db: Any) -> None:
    ingestor = ingest_module.Ingestor()
    loud, quiet = uuid.uuid4(), uuid.uuid4()
    acks = [ingestor.submit(loud, f'{{"node_id": "{loud}", "seq": {s}}}') for s in range(1, 101)]
    ingestor.submit(quiet, f'{{"node_id": "{quiet}", "seq": 1}}')
    refused = [a.result() for a in acks if a.done()]
    assert len(refused) == 100 - ingest_module.MAX_QUEUED
    assert {a.outcome for a in refused} == {"retry"} and refused[0].retry_after_s
    assert [a.seq for a in refused] == list(range(ingest_module.MAX_QUEUED + 1, 101))
    first_flush = ingestor._take()
    assert sum(1 for p in first_flush if p.node_id == loud) == ingest_module.TAKE_PER_NODE
    assert any(p.node_id == quiet for p in first_flush)
    assert ingestor._task is not None
    ingestor._task.cancel()


@pytest.mark.django_db(transaction=True)
async def test_agent_websocket_acks_each_batch(world: Any, deployment: Any) -> None:
    node = await database_sync_to_async(make_node)("gpu-ws")
    await database_sync_to_async(place)(node, deployment)
    credential = await database_sync_to_async(with_credential)(node)
    headers = [(b"authorization", f"Node {credential}".encode())]

    denied = WebsocketCommunicator(
        application, "/ws/agent/", headers=[(b"authorization", b"Node nope")]
    )
    await denied.connect()
    assert (await denied.receive_output())["code"] == 4401

    ws = WebsocketCommunicator(application, "/ws/agent/", headers=headers)
    connected, _ = await ws.connect()
    assert connected
    good = batch(node, 1, deployment=deployment, ttft=[0.25])
    await ws.send_to(text_data=good.model_dump_json())
    await ws.send_to(text_data=good.model_dump_json())
    other = batch(node, 2).model_copy(update={"node_id": uuid.uuid4()})
    await ws.send_to(text_data=other.model_dump_json())
    await ws.send_to(text_data='{"seq": 9, "gauges": "nope"}')
    acks = [TelemetryAck.model_validate_json(await ws.receive_from(timeout=10)) for _ in range(4)]
    by_outcome = sorted((a.outcome, a.seq) for a in acks)
    assert by_outcome == [("duplicate", 1), ("rejected", 2), ("rejected", 9), ("stored", 1)]
    reasons = " ".join(a.reason or "" for a in acks)
    assert "not this connection's node" in reasons and "gauges" in reasons
    await ws.disconnect()
    assert await LatencyRollup.objects.filter(resolution=10, deployment=deployment).acount() == 1
    stream = await NodeStream.objects.aget(node=node)
    assert stream.batches == 1 and stream.rejected_batches == 2


def test_http_fallback(world: Any, node: Any, deployment: Any) -> None:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Node {with_credential(node)}")
    body = batch(node, 1, deployment=deployment, ttft=[0.1]).model_dump_json()
    first = client.post("/api/v1/agent/telemetry/", body, content_type="application/json")
    assert first.status_code == 200 and first.json()["outcome"] == "stored"
    again = client.post("/api/v1/agent/telemetry/", body, content_type="application/json")
    assert again.json()["outcome"] == "duplicate"
    late = batch(node, 2, end=datetime.now(UTC) - timedelta(days=3)).model_dump_json()
    refused = client.post("/api/v1/agent/telemetry/", late, content_type="application/json")
    assert refused.status_code == 422 and refused.json()["outcome"] == "rejected"
    assert refused.json()["seq"] == 2 and "retention" in refused.json()["reason"]
    malformed = client.post("/api/v1/agent/telemetry/", "{}", content_type="application/json")
    assert malformed.status_code == 422 and "seq" in malformed.json()["reason"]
    anonymous = APIClient().post("/api/v1/agent/telemetry/", body, content_type="application/json")
    assert anonymous.status_code == 401


def test_metrics_show_fleet_and_gpu_gauges(node: Any, settings: Any) -> None:
    services.store_batches(
        [batch(node, 1, gauges={"gpu.0.utilization_pct": 75.0, "gpu.0.power_w": 300.0})]
    )
    text = APIClient().get("/metrics").content.decode()
    assert 'tailguard_nodes{status="pending"} 1.0' in text
    assert 'tailguard_gpus{model="NVIDIA H100 80GB HBM3"} 1.0' in text
    assert 'tailguard_gpu_utilization_ratio{gpu="0",node="gpu-1"} 0.75' in text
    assert 'tailguard_gpu_power_watts{gpu="0",node="gpu-1"} 300.0' in text
    settings.METRICS_TOKEN = "s3cret-token-for-scrapes"
    assert APIClient().get("/metrics").status_code == 401
    scraper = APIClient()
    scraper.credentials(HTTP_AUTHORIZATION="Bearer s3cret-token-for-scrapes")
    assert scraper.get("/metrics").status_code == 200


WEB_PROCESS = """
import sys
from controlplane.telemetry import metrics
metrics.BATCHES.labels("stored").inc(int(sys.argv[1]))
metrics.FLUSH_SECONDS.observe(0.02)
"""


def test_metrics_sum_the_counters_of_every_web_process(
    node: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Web processes sharing a PROMETHEUS_MULTIPROC_DIR (uvicorn --workers N): whichever
    answers a scrape shows every process's counters summed, next to the fleet's state."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    for count in (3, 4):  # two processes, gone before the scrape as restarted ones are
        subprocess.run([sys.executable, "-c", WEB_PROCESS, str(count)], env=env, check=True)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    text = APIClient().get("/metrics").content.decode()
    assert 'tailguard_telemetry_batches_total{outcome="stored"} 7.0' in text
    assert "tailguard_telemetry_flush_seconds_count 2.0" in text
    assert 'tailguard_nodes{status="pending"} 1.0' in text


@pytest.mark.django_db(transaction=True)
async def test_heartbeats_over_the_agent_websocket(world: Any) -> None:
    """An agent that offers the subprotocol sends heartbeats as frames: recorded with the
    next flush (before the acks of that flush), the node made ready with its version; a
    heartbeat naming another node is ignored. Without the subprotocol (an older agent) such
    a frame is only a malformed batch."""
    from agent.protocol import AGENT_SOCKET_SUBPROTOCOL, Heartbeat, heartbeat_frame
    from controlplane.inventory.models import AgentReport, Node

    node = await database_sync_to_async(make_node)("gpu-hb")
    other = await database_sync_to_async(make_node)("gpu-hb-other")
    await Node.objects.filter(pk__in=[node.pk, other.pk]).aupdate(status="unreachable")
    credential = await database_sync_to_async(with_credential)(node)
    headers = [(b"authorization", f"Node {credential}".encode())]

    def beat(node_id: uuid.UUID) -> str:
        return heartbeat_frame(
            Heartbeat(
                node_id=node_id,
                sent_at=datetime(2026, 1, 1, tzinfo=UTC),
                agent_version="9.8.7",
                applied_generation=0,
                uptime_s=1.0,
            )
        )

    ws = WebsocketCommunicator(
        application, "/ws/agent/", headers=headers, subprotocols=[AGENT_SOCKET_SUBPROTOCOL]
    )
    connected, subprotocol = await ws.connect()
    assert connected and subprotocol == AGENT_SOCKET_SUBPROTOCOL
    await ws.send_to(text_data=beat(other.pk))
    await ws.send_to(text_data=beat(node.pk))
    await ws.send_to(text_data=batch(node, 1).model_dump_json())
    ack = TelemetryAck.model_validate_json(await ws.receive_from(timeout=10))
    assert ack.outcome == "stored" and ack.seq == 1  # the only answer: heartbeats get none
    await ws.disconnect()
    await node.arefresh_from_db()
    await other.arefresh_from_db()
    assert (node.status, node.agent_version) == ("ready", "9.8.7")
    assert (other.status, other.agent_version) == ("unreachable", "")
    assert not await AgentReport.objects.filter(node=other).aexists()

    older = WebsocketCommunicator(application, "/ws/agent/", headers=headers)
    connected, subprotocol = await older.connect()
    assert connected and subprotocol is None
    await older.send_to(text_data=beat(node.pk))
    ack = TelemetryAck.model_validate_json(await older.receive_from(timeout=10))
    assert ack.outcome == "rejected"
    await older.disconnect()


@pytest.mark.django_db(transaction=True)
async def test_status_reports_over_the_agent_websocket(world: Any) -> None:
    """An agent that offers the status subprotocol sends its status reports as frames:
    each is recorded as the HTTP view records it, then acked by its id; a report naming
    another node, or one that does not validate, is rejected by its id. An agent that
    offers only the older subprotocol gets that one, and POSTs its reports."""
    from agent.protocol import (
        AGENT_SOCKET_SUBPROTOCOL,
        AGENT_SOCKET_SUBPROTOCOLS,
        STATUS_SUBPROTOCOL,
        AppliedStatus,
        StatusAck,
        status_frame,
    )
    from controlplane.fleet.models import Revision
    from controlplane.inventory.models import AgentReport
    from tests.controlplane.test_agent_reports import T0, _ready_node_with_revision, _status

    node, credential = await database_sync_to_async(_ready_node_with_revision)(world)
    status = AppliedStatus.model_validate(await database_sync_to_async(_status)(node))
    headers = [(b"authorization", f"Node {credential}".encode())]

    async def answer(ws: WebsocketCommunicator, frame: str) -> StatusAck:
        await ws.send_to(text_data=frame)
        return StatusAck.model_validate_json(await ws.receive_from(timeout=10))

    ws = WebsocketCommunicator(
        application, "/ws/agent/", headers=headers, subprotocols=list(AGENT_SOCKET_SUBPROTOCOLS)
    )
    connected, subprotocol = await ws.connect()
    assert connected and subprotocol == STATUS_SUBPROTOCOL
    another = status.model_copy(update={"node_id": uuid.uuid4(), "state": "failed"})
    refused = await answer(ws, status_frame(another, 7))
    assert (refused.status_id, refused.outcome) == (7, "rejected")
    assert "not this connection's node" in (refused.reason or "")
    broken = await answer(ws, '{"status": {"generation": 1}, "id": 8}')
    assert (broken.status_id, broken.outcome) == (8, "rejected")
    await ws.send_to(text_data='{"status": 1, "id": true}')  # names no report: no answer
    assert (await answer(ws, status_frame(status, 9))).model_dump() == {
        "status_id": 9,
        "outcome": "recorded",
        "reason": None,
    }
    assert (await answer(ws, status_frame(status, 10))).outcome == "recorded"  # a repeat
    await ws.disconnect()
    revision = await Revision.objects.aget(node=node, generation=1)
    assert (revision.status, revision.reported_at) == ("applied", T0)
    assert (await AgentReport.objects.aget(node=node)).applied_generation == 1

    older = WebsocketCommunicator(
        application, "/ws/agent/", headers=headers, subprotocols=[AGENT_SOCKET_SUBPROTOCOL]
    )
    connected, subprotocol = await older.connect()
    assert connected and subprotocol == AGENT_SOCKET_SUBPROTOCOL
    await older.disconnect()
