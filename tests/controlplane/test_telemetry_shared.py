"""Telemetry of a deployment shared between tenants: ingest accepts every tenant it serves,
its own dashboard (the owner's) shows them together, and each tenant's page and stream show
that tenant's own traffic only."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from rest_framework.test import APIClient

from agent.protocol import SeriesSketch, TelemetryBatch
from controlplane.core.choices import Role
from controlplane.fleet import services as fleet
from controlplane.inventory.models import Node
from controlplane.storage.models import Volume
from controlplane.telemetry import selectors, services, streams
from controlplane.telemetry.models import LatencyRollup
from controlplane.telemetry.pipeline.merge import bucket_of
from controlplane.tenancy.services import create_tenant, set_membership
from tests.browser import chromium, screenshot_path, sign_in
from tests.controlplane.conftest import World, give_password, make_node
from tests.controlplane.storage_helpers import make_pool
from tests.controlplane.telemetry_helpers import one_second, place, sketch_of, usage_count

Requests = dict[tuple[Any, Any], list[float]]
"""TTFTs (seconds) per (tenant, deployment) served in one batch."""


def traffic(
    node: Node,
    seq: int,
    requests: Requests,
    *,
    end: datetime | None = None,
    gauges: dict[str, float] | None = None,
) -> TelemetryBatch:
    """One second of a node's telemetry; each request yields 10 output tokens."""
    end = end or bucket_of(datetime.now(UTC) - timedelta(seconds=20), 10)
    series, usage = [], []
    for (tenant, deployment), ttfts in requests.items():
        ids = {"tenant_id": tenant.pk, "deployment_id": deployment.pk}
        series.append(SeriesSketch(**ids, metric="ttft", sketch=sketch_of(ttfts), thresholds=[]))
        usage.append(usage_count(**ids, completed=len(ttfts), output_tokens=10 * len(ttfts)))
    return one_second(node, seq, end, series=series, usage=usage, gauges=gauges or {})


def deploy(tenant: Any, name: str, node: Node, shared_with: tuple[Any, ...] = ()) -> Any:
    deployment = fleet.create_deployment(
        tenant=tenant, name=name, model_name=name, artifact_uri=f"synthetic://{name}"
    )
    if shared_with:
        fleet.share_deployment(deployment, shared_with)
    place(node, deployment)
    return deployment


@dataclass
class Shared:
    """Tenant A's `chat` shared with B, A's unshared `embed`, both on one node; C unrelated."""

    node: Node
    chat: Any
    embed: Any
    tenant_c: Any
    user_c: Any


@pytest.fixture
def shared(world: World) -> Shared:
    node = make_node("shared-1", gpus=2)
    tenant_c = create_tenant(slug="tenant-c", name="Tenant C")
    user_c = get_user_model().objects.create_user("viewer-c", password="x")
    set_membership(tenant=tenant_c, user=user_c, role=Role.VIEWER)
    return Shared(
        node=node,
        chat=deploy(world.tenant_a, "chat", node, shared_with=(world.tenant_b,)),
        embed=deploy(world.tenant_a, "embed", node),
        tenant_c=tenant_c,
        user_c=user_c,
    )


def both_tenants(world: World, shared: Shared) -> Requests:
    """A's 4 fast requests and B's 6 slow ones on the shared deployment."""
    return {
        (world.tenant_a, shared.chat): [0.1] * 4,
        (world.tenant_b, shared.chat): [0.9] * 6,
    }


def outcomes(stored: services.Stored) -> list[tuple[str, str | None]]:
    return [(ack.outcome, ack.reason) for ack in stored.acks]


def test_ingest_accepts_every_tenant_the_deployment_serves_and_no_other(
    world: World, shared: Shared
) -> None:
    chat, c = shared.chat, shared.tenant_c
    stored = services.store_batches(
        [
            traffic(shared.node, 1, {(world.tenant_b, chat): [0.2]}),
            traffic(shared.node, 2, {(c, chat): [0.2]}),
            traffic(shared.node, 3, {(world.tenant_b, shared.embed): [0.2]}),
            traffic(shared.node, 4, {(world.tenant_a, chat): [0.3]}),
        ]
    )

    assert outcomes(stored) == [
        ("stored", None),
        ("rejected", f"no deployment {chat.pk} of tenant {c.pk}"),
        ("rejected", f"no deployment {shared.embed.pk} of tenant {world.tenant_b.pk}"),
        ("stored", None),
    ]
    tenants = set(
        LatencyRollup.objects.filter(deployment=chat, resolution=10).values_list(
            "tenant", flat=True
        )
    )
    assert tenants == {world.tenant_a.pk, world.tenant_b.pk}
    assert not LatencyRollup.objects.filter(deployment=shared.embed).exists()


def test_ingest_checks_a_whole_flush_in_the_same_queries_however_many_deployments(
    world: World, shared: Shared
) -> None:
    a, b = world.tenant_a, world.tenant_b
    # Deployments without rollups yet, so every flush only creates rows.
    fresh = [deploy(a, f"fresh-{i}", shared.node, shared_with=(b,)) for i in range(4)]
    # The node's stream row exists now, and its revisions are parsed.
    services.store_batches([traffic(shared.node, 1, {})])

    def queries(first_seq: int, deployments: list[Any]) -> int:
        batches = [
            traffic(shared.node, first_seq + i, {(a, d): [0.1], (b, d): [0.2]})
            for i, d in enumerate(deployments)
        ]
        with CaptureQueriesContext(connection) as captured:
            assert {ack.outcome for ack in services.store_batches(batches).acks} == {"stored"}
        return len(captured.captured_queries)

    assert queries(2, fresh[:1]) == queries(3, fresh[1:])


def snapshot(client: APIClient, path: str) -> dict[str, Any]:
    response = client.get(f"/api/v1/telemetry/{path}/")
    assert response.status_code == 200, response.content
    body: dict[str, Any] = response.json()
    return body


def test_each_tenants_page_shows_its_own_traffic_on_the_shared_deployment(
    world: World, shared: Shared, client_for: Callable[[Any], APIClient]
) -> None:
    rag = deploy(world.tenant_b, "rag", make_node("gpu-b", world.tenant_b))
    services.store_batches([traffic(shared.node, 1, both_tenants(world, shared))])

    def summaries(user: Any, tenant: Any) -> dict[str, Any]:
        body = snapshot(client_for(user), f"tenants/{tenant.pk}")
        return {d["name"]: d for d in body["deployments"]}

    for user in (world.viewer_a, world.platform):
        seen_by_a = summaries(user, world.tenant_a)
        assert set(seen_by_a) == {"chat", "embed"}
        chat = seen_by_a["chat"]["summary"]
        assert chat["usage"]["completed"] == 4 and chat["usage"]["output_tokens"] == 40
        assert chat["latency"]["ttft"]["count"] == 4
        assert chat["latency"]["ttft"]["p99"] == pytest.approx(0.1, rel=0.01)

    for user in (world.admin_b, world.platform):
        seen_by_b = summaries(user, world.tenant_b)
        assert set(seen_by_b) == {"chat", "rag"}
        assert seen_by_b["chat"]["id"] == str(shared.chat.pk)
        assert seen_by_b["chat"]["tenant"] == str(world.tenant_a.pk)  # the owner, not B
        assert seen_by_b["rag"]["id"] == str(rag.pk)
        chat = seen_by_b["chat"]["summary"]
        assert chat["usage"]["completed"] == 6 and chat["usage"]["output_tokens"] == 60
        assert chat["latency"]["ttft"]["count"] == 6
        assert chat["latency"]["ttft"]["p50"] == pytest.approx(0.9, rel=0.01)

    response = client_for(shared.user_c).get(f"/api/v1/telemetry/tenants/{world.tenant_b.pk}/")
    assert response.status_code == 404


def test_the_deployment_dashboard_is_the_owners_and_shows_every_tenant_together(
    world: World, shared: Shared, client_for: Callable[[Any], APIClient]
) -> None:
    services.store_batches([traffic(shared.node, 1, both_tenants(world, shared))])
    path = f"deployments/{shared.chat.pk}"

    for user in (world.viewer_a, world.platform):
        summary = snapshot(client_for(user), path)["summary"]
        assert summary["usage"]["completed"] == 10
        assert summary["latency"]["ttft"]["count"] == 10
        assert summary["latency"]["ttft"]["p50"] == pytest.approx(0.9, rel=0.01)
        assert summary["latency"]["ttft"]["p99"] == pytest.approx(0.9, rel=0.01)
        assert summary["latency"]["ttft"]["p90"] == pytest.approx(0.9, rel=0.01)

    response = client_for(world.admin_b).get(f"/api/v1/telemetry/{path}/")
    assert response.status_code == 404
    assert "0.9" not in response.content.decode()
    console = Client()
    console.force_login(world.admin_b)
    assert console.get(f"/console/deployments/{shared.chat.pk}/").status_code == 404
    assert console.get(f"/console/tenants/{world.tenant_b.pk}/").status_code == 200

    deployment_stream = streams.deployment(shared.chat.pk)
    assert selectors.stream_access(world.viewer_a, deployment_stream) is not None
    assert selectors.stream_access(world.admin_b, deployment_stream) is None
    assert selectors.stream_access(world.admin_b, streams.tenant(world.tenant_b.pk)) is not None
    assert selectors.stream_access(world.admin_b, streams.tenant(world.tenant_a.pk)) is None


def test_each_tenants_delta_carries_its_own_counts_and_the_deployments_all_of_them(
    world: World, shared: Shared
) -> None:
    queue = {f"worker.{shared.chat.pk}.queue_depth": 3.0}
    stored = services.store_batches(
        [traffic(shared.node, 1, both_tenants(world, shared), gauges=queue)]
    )
    deltas = dict(stored.deltas)
    chat = str(shared.chat.pk)

    total = deltas[streams.deployment(chat)]["point"]
    assert total["usage"]["completed"] == 10 and total["latency"]["ttft"]["count"] == 10
    expected = {
        world.tenant_a: (4, 0.1),
        world.tenant_b: (6, 0.9),
    }
    for tenant, (completed, p50) in expected.items():
        delta = deltas[streams.tenant(tenant.pk)]
        assert delta["tenant_id"] == str(tenant.pk)
        assert set(delta["deployments"]) == {chat}
        point = delta["deployments"][chat]
        assert point.keys() == total.keys()
        assert point["usage"]["completed"] == completed
        assert point["usage"]["output_tokens"] == 10 * completed
        assert point["tokens_per_s"] == pytest.approx(10 * completed)
        assert point["latency"]["ttft"]["count"] == completed
        assert point["latency"]["ttft"]["p50"] == pytest.approx(p50, rel=0.01)
        assert point["queue_depth"] == 3.0  # the workers' queue, shared by both
    assert streams.tenant(shared.tenant_c.pk) not in deltas

    # Only B's traffic: A's page has nothing new to add.
    later = services.store_batches(
        [traffic(shared.node, 2, {(world.tenant_b, shared.chat): [0.5]})]
    )
    assert {stream for stream, _ in later.deltas if stream.startswith("tenant:")} == {
        streams.tenant(world.tenant_b.pk)
    }


def test_a_tenant_sees_the_node_of_a_deployment_shared_with_it(
    world: World, shared: Shared, client_for: Callable[[Any], APIClient]
) -> None:
    volume = Volume.objects.create(
        tenant=world.tenant_a, name="data", size_bytes=1, pool=make_pool(shared.node)
    )
    place(shared.node)
    node_wide = {"gpu.0.utilization_pct": 70.0, "host.load1": 1.5}
    chat_queue = {f"worker.{shared.chat.pk}.queue_depth": 2.0}
    gauges = {
        **node_wide,
        **chat_queue,
        f"worker.{shared.embed.pk}.queue_depth": 5.0,
        f"storage.{volume.wire_name}.read_iops": 100.0,
        "pool.models.free_bytes": 10.0,
    }
    services.store_batches([traffic(shared.node, 1, {}, gauges=gauges)])

    fleet_of_b = snapshot(client_for(world.admin_b), "fleet")["nodes"]
    assert [n["hostname"] for n in fleet_of_b] == ["shared-1"]
    assert fleet_of_b[0]["gauges"] == node_wide | chat_queue
    node_of_b = snapshot(client_for(world.admin_b), f"nodes/{shared.node.pk}")
    assert node_of_b["node"]["gauges"] == node_wide | chat_queue
    assert set(node_of_b["points"][0]["gauges"]) == set(node_wide | chat_queue)
    access = selectors.stream_access(world.admin_b, streams.node(shared.node.pk))
    assert access is not None and access.gauges is not None
    assert access.gauges.filter(gauges) == node_wide | chat_queue

    assert snapshot(client_for(world.viewer_a), "fleet")["nodes"][0]["gauges"] == {
        key: value for key, value in gauges.items() if not key.startswith("pool.")
    }
    assert snapshot(client_for(shared.user_c), "fleet")["nodes"] == []
    response = client_for(shared.user_c).get(f"/api/v1/telemetry/nodes/{shared.node.pk}/")
    assert response.status_code == 404


def test_a_sharers_snapshots_take_the_same_queries_however_many_deployments_serve_it(
    world: World, shared: Shared
) -> None:
    a, b = world.tenant_a, world.tenant_b
    services.store_batches([traffic(shared.node, 1, both_tenants(world, shared))])

    def queries() -> int:
        with CaptureQueriesContext(connection) as captured:
            selectors.tenant_snapshot(b, 300)
            selectors.fleet_snapshot(world.admin_b)
        return len(captured.captured_queries)

    before = queries()
    more = [deploy(a, "code", shared.node, shared_with=(b,)), deploy(b, "rag", shared.node)]
    services.store_batches(
        [traffic(shared.node, 2, {(b, d): [0.4] for d in more} | both_tenants(world, shared))]
    )
    assert len(selectors.tenant_snapshot(b, 300)["deployments"]) == 3
    assert queries() == before


@pytest.mark.browser
def test_the_sharers_console_page_marks_the_shared_deployment_and_shows_its_counts(
    live_server: Any, world: World, shared: Shared, settings: Any
) -> None:
    """Rendering only (the WSGI live server has no WebSocket); needs frontend/dist built."""
    rag = deploy(world.tenant_b, "rag", make_node("gpu-b", world.tenant_b))
    services.store_batches([traffic(shared.node, 1, both_tenants(world, shared))])
    give_password(world.admin_b, "admin-pass", settings)

    with chromium() as browser:
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        sign_in(page, f"{live_server.url}/console/login/", "admin-b", "admin-pass")
        page.goto(f"{live_server.url}/console/tenants/{world.tenant_b.pk}/")
        row = f"#tenant-table tr[data-deployment='{shared.chat.pk}']"
        page.wait_for_selector(f"{row} :text('chat (shared)')", timeout=10_000)
        assert page.locator(f"{row} td").nth(8).inner_text() == "6"
        assert page.locator(f"{row} a").count() == 0
        own = page.locator(f"#tenant-table tr[data-deployment='{rag.pk}'] a")
        assert own.get_attribute("href") == f"/console/deployments/{rag.pk}/"
        page.screenshot(path=screenshot_path("console-tenant-shared"))
    assert errors == []
