"""The telemetry snapshot API: rollups written by ingest, read back as dashboard points,
and each tenant confined to its own deployments, nodes, volumes and gauges."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from rest_framework.test import APIClient

from agent.protocol import SeriesSketch, TelemetryBatch
from controlplane.fleet import services as fleet
from controlplane.fleet.models import Replica
from controlplane.inventory.models import Node
from controlplane.storage.models import Volume
from controlplane.telemetry import services
from controlplane.telemetry.pipeline.merge import bucket_of
from controlplane.telemetry.retention import compact_gauges
from tests.controlplane.conftest import World, make_node
from tests.controlplane.storage_helpers import make_pool
from tests.controlplane.telemetry_helpers import one_second, place, sketch_of, usage_count


def telemetry(
    node: Node,
    seq: int,
    end: datetime,
    *,
    deployment: Any = None,
    ttft: list[float] = (),  # type: ignore[assignment]
    tpot: list[float] = (),  # type: ignore[assignment]
    failed: int = 0,
    output_tokens: int = 0,
    gauges: dict[str, float] | None = None,
) -> TelemetryBatch:
    """One second of a node's telemetry, with a deployment's latencies and usage."""
    series, usage = [], []
    if deployment is not None:
        owner = {"tenant_id": deployment.tenant_id, "deployment_id": deployment.pk}
        series = [
            SeriesSketch(**owner, metric=metric, sketch=sketch_of(list(values)), thresholds=[])
            for metric, values in (("ttft", ttft), ("tpot", tpot))
            if values
        ]
        usage = [
            usage_count(**owner, completed=len(ttft), failed=failed, output_tokens=output_tokens)
        ]
    return one_second(node, seq, end, series=series, usage=usage, gauges=gauges or {})


def store(*batches: TelemetryBatch) -> None:
    acks = services.store_batches(list(batches)).acks
    assert [a.outcome for a in acks] == ["stored"] * len(batches), acks


def bucket_start(seconds_ago: int) -> datetime:
    """The start of a 10 s bucket about `seconds_ago` in the past."""
    return bucket_of(datetime.now(UTC) - timedelta(seconds=seconds_ago), 10)


@dataclass
class Fleet:
    """Tenant A's node, B's node, a shared node serving both, and one deployment each."""

    node_a: Node
    node_b: Node
    shared: Node
    chat_a: Any
    chat_b: Any


@pytest.fixture
def fleet_of_two(world: World) -> Fleet:
    chats = [
        fleet.create_deployment(
            tenant=tenant, name="chat", model_name="chat", artifact_uri="synthetic://chat"
        )
        for tenant in (world.tenant_a, world.tenant_b)
    ]
    shared = make_node("shared-1", gpus=2)
    place(shared, *chats)
    return Fleet(
        make_node("gpu-a", world.tenant_a, gpus=4),
        make_node("gpu-b", world.tenant_b, gpus=1),
        shared,
        *chats,
    )


def test_deployment_points_merge_sketches_usage_and_queue_depth(
    world: World, fleet_of_two: Fleet, client_for: Callable[[Any], APIClient]
) -> None:
    chat = fleet_of_two.chat_a
    start = bucket_start(60)
    queue = f"worker.{chat.pk}.queue_depth"
    store(
        telemetry(
            fleet_of_two.shared,
            1,
            start + timedelta(seconds=3),
            deployment=chat,
            ttft=[0.1] * 90 + [0.9] * 10,
            tpot=[0.02] * 100,
            output_tokens=500,
            gauges={queue: 2.0},
        ),
        telemetry(
            fleet_of_two.shared,
            2,
            start + timedelta(seconds=13),
            deployment=chat,
            ttft=[0.2] * 100,
            tpot=[0.04] * 100,
            failed=3,
            output_tokens=700,
            gauges={queue: 6.0},
        ),
    )

    body = client_for(world.viewer_a).get(f"/api/v1/telemetry/deployments/{chat.pk}/").json()

    assert body["deployment"]["name"] == "chat" and body["resolution"] == 10
    first, second = body["points"]
    assert (first["t"], second["t"]) == (start.timestamp(), start.timestamp() + 10)
    assert first["latency"]["ttft"]["count"] == 100
    assert first["latency"]["ttft"]["p50"] == pytest.approx(0.1, rel=0.01)
    assert first["latency"]["ttft"]["p99"] == pytest.approx(0.9, rel=0.01)
    assert second["latency"]["tpot"]["p50"] == pytest.approx(0.04, rel=0.01)
    assert first["latency"]["itl"] == {"p50": None, "p90": None, "p99": None, "count": 0}
    assert first["tokens_per_s"] == pytest.approx(50.0)
    assert (first["queue_depth"], second["queue_depth"]) == (2.0, 6.0)
    assert second["usage"]["failed"] == 3

    summary = body["summary"]
    assert summary["window_s"] == 300
    assert summary["latency"]["ttft"]["count"] == 200
    assert summary["latency"]["ttft"]["p50"] == pytest.approx(0.2, rel=0.01)
    assert summary["latency"]["tpot"]["p99"] == pytest.approx(0.04, rel=0.01)
    assert summary["usage"]["completed"] == 200 and summary["usage"]["output_tokens"] == 1200
    assert summary["tokens_per_s"] == pytest.approx(1200 / 300)
    assert summary["queue_depth"] == 6.0  # the newest value, not a mean


def test_node_history_is_bucket_means_and_the_window_picks_the_resolution(
    world: World, fleet_of_two: Fleet, client_for: Callable[[Any], APIClient]
) -> None:
    node = fleet_of_two.node_a
    start = bucket_start(30)
    store(
        telemetry(node, 1, start + timedelta(seconds=3), gauges={"gpu.0.utilization_pct": 40.0}),
        telemetry(node, 2, start + timedelta(seconds=5), gauges={"gpu.0.utilization_pct": 60.0}),
    )
    client = client_for(world.admin_a)

    body = client.get(f"/api/v1/telemetry/nodes/{node.pk}/").json()
    assert body["node"]["hostname"] == "gpu-a" and len(body["node"]["gpus"]) == 4
    assert body["node"]["gauges"] == {"gpu.0.utilization_pct": 60.0}
    assert body["node"]["last_batch_t"] == (start + timedelta(seconds=5)).timestamp()
    assert body["points"] == [{"t": start.timestamp(), "gauges": {"gpu.0.utilization_pct": 50.0}}]

    def coarse(window: int) -> tuple[int, list[dict[str, Any]]]:
        body = client.get(f"/api/v1/telemetry/nodes/{node.pk}/?window={window}").json()
        return body["resolution"], body["points"]

    hour, minute = bucket_of(start, 3600), bucket_of(start, 60)
    mean = {"gpu.0.utilization_pct": 50.0}
    # before compaction the coarse points come from the 10 s rows, after it from its rows
    for compacted_at in (None, minute + timedelta(minutes=1)):
        if compacted_at is not None:
            assert compact_gauges(now=compacted_at) > 0
        assert coarse(86400) == (60, [{"t": minute.timestamp(), "gauges": mean}])
        assert coarse(604800) == (3600, [{"t": hour.timestamp(), "gauges": mean}])


@pytest.mark.parametrize("window", ["abc", "9", "-300", "34560001", "1.5"])
def test_a_bad_window_is_a_400_naming_it(
    world: World, client_for: Callable[[Any], APIClient], window: str
) -> None:
    response = client_for(world.platform).get(f"/api/v1/telemetry/storage/?window={window}")
    assert response.status_code == 400
    assert "window" in response.json()


def test_fleet_shows_tenants_their_nodes_and_only_their_gauges(
    world: World, fleet_of_two: Fleet, client_for: Callable[[Any], APIClient]
) -> None:
    pool = make_pool(fleet_of_two.shared)
    volume_a = Volume.objects.create(tenant=world.tenant_a, name="data", size_bytes=1, pool=pool)
    volume_b = Volume.objects.create(tenant=world.tenant_b, name="data", size_bytes=1, pool=pool)
    place(fleet_of_two.shared)
    gauges = {
        "gpu.0.utilization_pct": 70.0,
        "host.load1": 1.5,
        f"storage.{volume_a.wire_name}.read_iops": 100.0,
        f"storage.{volume_b.wire_name}.read_iops": 200.0,
        f"worker.{fleet_of_two.chat_a.pk}.queue_depth": 1.0,
        f"worker.{fleet_of_two.chat_b.pk}.queue_depth": 2.0,
        "pool.models.free_bytes": 10.0,
    }
    store(telemetry(fleet_of_two.shared, 1, bucket_start(20), gauges=gauges))

    def fleet_of(user: Any) -> dict[str, Any]:
        body = client_for(user).get("/api/v1/telemetry/fleet/").json()
        return {node["hostname"]: node for node in body["nodes"]}

    assert set(fleet_of(world.platform)) == {"gpu-a", "gpu-b", "shared-1"}
    assert fleet_of(world.platform)["shared-1"]["gauges"] == gauges
    seen_by_a = fleet_of(world.viewer_a)
    assert set(seen_by_a) == {"gpu-a", "shared-1"}
    assert seen_by_a["gpu-a"]["gpu_count"] == 4 and seen_by_a["gpu-a"]["gauges"] == {}
    assert seen_by_a["shared-1"]["gauges"] == {
        "gpu.0.utilization_pct": 70.0,
        "host.load1": 1.5,
        f"storage.{volume_a.wire_name}.read_iops": 100.0,
        f"worker.{fleet_of_two.chat_a.pk}.queue_depth": 1.0,
    }
    assert set(fleet_of(world.admin_b)) == {"gpu-b", "shared-1"}


def test_storage_shows_each_tenant_its_own_volumes(
    world: World, fleet_of_two: Fleet, client_for: Callable[[Any], APIClient]
) -> None:
    pool = make_pool(fleet_of_two.node_a)
    volume = Volume.objects.create(tenant=world.tenant_a, name="scratch", size_bytes=1, pool=pool)
    other = Volume.objects.create(
        tenant=world.tenant_b, name="other", size_bytes=1, pool=make_pool(fleet_of_two.node_b)
    )
    place(fleet_of_two.node_a)
    place(fleet_of_two.node_b)
    key = volume.wire_name
    start = bucket_start(30)
    store(
        telemetry(
            fleet_of_two.node_a,
            1,
            start + timedelta(seconds=2),
            gauges={f"storage.{key}.read_iops": 900.0, f"storage.{key}.read_latency_us": 80.0},
        ),
        telemetry(
            fleet_of_two.node_b,
            1,
            start + timedelta(seconds=2),
            gauges={f"storage.{other.wire_name}.write_mb_s": 5.0},
        ),
    )

    body = client_for(world.viewer_a).get("/api/v1/telemetry/storage/").json()
    (node,) = body["nodes"]
    assert node["hostname"] == "gpu-a"
    assert node["volumes"] == [{"key": key, "name": "scratch", "tenant": str(world.tenant_a.pk)}]
    assert node["points"] == [
        {
            "t": start.timestamp(),
            "gauges": {f"storage.{key}.read_iops": 900.0, f"storage.{key}.read_latency_us": 80.0},
        }
    ]
    everything = client_for(world.platform).get("/api/v1/telemetry/storage/").json()
    assert [n["hostname"] for n in everything["nodes"]] == ["gpu-a", "gpu-b"]
    assert everything["nodes"][1]["volumes"] == [
        {"key": other.wire_name, "name": "other", "tenant": str(world.tenant_b.pk)}
    ]


def test_tenant_view_summarises_each_deployment(
    world: World, fleet_of_two: Fleet, client_for: Callable[[Any], APIClient]
) -> None:
    idle = fleet.create_deployment(
        tenant=world.tenant_a, name="embed", model_name="embed", artifact_uri="synthetic://embed"
    )
    store(
        telemetry(
            fleet_of_two.shared,
            1,
            bucket_start(20),
            deployment=fleet_of_two.chat_a,
            ttft=[0.25] * 10,
            output_tokens=30,
        )
    )

    body = client_for(world.viewer_a).get(f"/api/v1/telemetry/tenants/{world.tenant_a.pk}/").json()

    assert body["tenant"]["slug"] == "tenant-a"
    chat, embed = body["deployments"]
    assert (chat["id"], embed["id"]) == (str(fleet_of_two.chat_a.pk), str(idle.pk))
    assert chat["summary"]["latency"]["ttft"]["p99"] == pytest.approx(0.25, rel=0.01)
    assert chat["summary"]["usage"]["completed"] == 10
    assert embed["summary"]["latency"]["ttft"]["count"] == 0 and embed["summary"]["t"] is None


def test_other_tenants_deployments_nodes_and_tenant_views_are_404(
    world: World, fleet_of_two: Fleet, client_for: Callable[[Any], APIClient]
) -> None:
    place(fleet_of_two.node_b, fleet_of_two.chat_b)
    store(
        telemetry(
            fleet_of_two.node_b,
            1,
            bucket_start(20),
            deployment=fleet_of_two.chat_b,
            ttft=[0.5],
            gauges={"gpu.0.utilization_pct": 10.0},
        )
    )
    client = client_for(world.admin_a)
    for url in (
        f"/api/v1/telemetry/deployments/{fleet_of_two.chat_b.pk}/",
        f"/api/v1/telemetry/nodes/{fleet_of_two.node_b.pk}/",
        f"/api/v1/telemetry/tenants/{world.tenant_b.pk}/",
    ):
        response = client.get(url)
        assert response.status_code == 404, url
        assert "gpu" not in response.content.decode() and "0.5" not in response.content.decode()
        assert client_for(world.platform).get(url).status_code == 200, url
    assert APIClient().get("/api/v1/telemetry/fleet/").status_code in (401, 403)


def test_a_deployment_shows_where_its_gateway_routed_requests_and_why(
    world: World, fleet_of_two: Fleet, client_for: Callable[[Any], APIClient]
) -> None:
    chat = fleet_of_two.chat_a
    (replica,) = chat.instances.all()
    start = bucket_start(60)
    prefix = f"worker.{chat.pk}."

    def routing(routed: float, predicted: float, up: float) -> dict[str, float]:
        return {
            f"{prefix}routed:{replica.pk}": routed,
            f"{prefix}predicted_ttft:{replica.pk}": predicted,
            f"{prefix}up:{replica.pk}": up,
        }

    # a second replica on another node, whose gateway speaks for the first one too: ignored
    node_a = fleet_of_two.node_a
    Replica.objects.create(deployment=chat, index=1, node=node_a, port=20001)
    place(node_a)
    store(
        telemetry(fleet_of_two.shared, 1, start + timedelta(seconds=3), gauges=routing(4, 0.2, 1)),
        telemetry(fleet_of_two.shared, 2, start + timedelta(seconds=5), gauges=routing(6, 0.3, 1)),
        telemetry(fleet_of_two.shared, 3, start + timedelta(seconds=13), gauges=routing(2, 0.4, 0)),
        telemetry(node_a, 1, start + timedelta(seconds=14), gauges=routing(50, 9.0, 1)),
    )

    body = client_for(world.viewer_a).get(f"/api/v1/telemetry/deployments/{chat.pk}/").json()
    facts, elsewhere = body["routing"]["replicas"]
    assert (elsewhere["index"], elsewhere["routed_per_s"], elsewhere["up"]) == (1, None, None)
    assert (facts["id"], facts["index"], facts["hostname"]) == (str(replica.pk), 0, "shared-1")
    assert facts["routed_per_s"] == pytest.approx((5 + 2) / 2)  # bucket means, averaged
    assert (facts["predicted_ttft_s"], facts["up"]) == (0.4, False)  # the newest
    assert [p["routed"] for p in body["routing"]["points"]] == [
        {str(replica.pk): 5.0},
        {str(replica.pk): 2.0},
    ]
    # the other tenant's deployment on the same node shows none of it
    other = client_for(world.admin_b).get(
        f"/api/v1/telemetry/deployments/{fleet_of_two.chat_b.pk}/"
    )
    assert [r["routed_per_s"] for r in other.json()["routing"]["replicas"]] == [None]
