"""The console's live dashboards: pages and their access rules, then a real browser on a real
ASGI server watching a deployment's chart move while an enrolled node posts telemetry."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from django.test import Client
from websockets.sync.client import connect as websocket

from agent.protocol import SeriesSketch, TelemetryBatch, UsageCount
from controlplane import processes
from controlplane.fleet import services as fleet
from controlplane.inventory.models import AgentReport, Node
from controlplane.inventory.services import create_bootstrap_token
from controlplane.storage.models import Volume
from controlplane.telemetry import services, streams
from tests.browser import chromium, screenshot_path, sign_in
from tests.controlplane.conftest import World, give_password, make_node
from tests.controlplane.storage_helpers import make_pool
from tests.controlplane.telemetry_helpers import batch, place, sketch_of
from tests.e2e.stack import REPO, Stack, running_stack, wait_for

BUNDLE = REPO / "frontend" / "dist" / "console.js"


def chat(tenant: Any) -> Any:
    return fleet.create_deployment(
        tenant=tenant, name="chat", model_name="chat", artifact_uri="synthetic://chat"
    )


def signed_in(user: Any) -> Client:
    client = Client()
    client.force_login(user)
    return client


# --- pages ---------------------------------------------------------------------------------


def test_pages_need_a_login_and_the_login_page_signs_in(world: World) -> None:
    anonymous = Client()
    response = anonymous.get("/console/")
    assert response.status_code == 302
    assert response["Location"].startswith("/console/login/?next=/console/")

    world.viewer_a.set_password("viewer-pass")
    world.viewer_a.save()
    assert "Sign in" in anonymous.get("/console/login/").content.decode()
    wrong = anonymous.post("/console/login/", {"username": "viewer-a", "password": "nope"})
    assert "Wrong username or password" in wrong.content.decode()
    right = anonymous.post("/console/login/", {"username": "viewer-a", "password": "viewer-pass"})
    assert right.status_code == 302 and right["Location"] == "/console/"
    assert anonymous.get("/console/").status_code == 200


def test_each_page_names_its_snapshot_and_streams(world: World) -> None:
    deployment = chat(world.tenant_a)
    node = make_node("gpu-a", world.tenant_a, gpus=2)
    pages = {
        "/console/fleet/": ("fleet", "/api/v1/telemetry/fleet/", []),
        f"/console/nodes/{node.pk}/": (
            "node",
            f"/api/v1/telemetry/nodes/{node.pk}/",
            [streams.node(node.pk)],
        ),
        f"/console/deployments/{deployment.pk}/": (
            "deployment",
            f"/api/v1/telemetry/deployments/{deployment.pk}/",
            [streams.deployment(deployment.pk)],
        ),
        "/console/storage/": ("storage", "/api/v1/telemetry/storage/", []),
        f"/console/tenants/{world.tenant_a.pk}/": (
            "tenant",
            f"/api/v1/telemetry/tenants/{world.tenant_a.pk}/",
            [streams.tenant(world.tenant_a.pk)],
        ),
    }
    client = signed_in(world.viewer_a)
    for url, (page, snapshot, names) in pages.items():
        response = client.get(url)
        assert response.status_code == 200, url
        assert response.context["page"] == page and response.context["snapshot"] == snapshot
        assert response.context["streams"] == names
        assert 'src="/static/console/console.js"' in response.content.decode()
    tenants = client.get("/console/tenants/").content.decode()
    assert "Tenant A" in tenants and "Tenant B" not in tenants
    # the fleet stream is the platform admins'; tenant users follow their nodes' streams
    assert signed_in(world.platform).get("/console/").context["streams"] == [streams.FLEET]


def test_other_tenants_pages_are_404(world: World) -> None:
    deployment = chat(world.tenant_b)
    node = make_node("gpu-b", world.tenant_b)
    client = signed_in(world.admin_a)
    for url in (
        f"/console/deployments/{deployment.pk}/",
        f"/console/nodes/{node.pk}/",
        f"/console/tenants/{world.tenant_b.pk}/",
    ):
        assert client.get(url).status_code == 404, url
        assert signed_in(world.platform).get(url).status_code == 200, url


@pytest.mark.browser
def test_every_page_draws_its_snapshot(
    live_server: Any, world: World, bundle: Path, settings: Any
) -> None:
    """Rendering only (the WSGI live server has no WebSocket): no script errors anywhere."""
    deployment = chat(world.tenant_a)
    node = make_node("gpu-a", world.tenant_a, gpus=2)
    volume = Volume.objects.create(
        tenant=world.tenant_a, name="scratch", size_bytes=1, pool=make_pool(node)
    )
    place(node, deployment)
    gauges = {
        "gpu.0.utilization_pct": 81.0,
        "gpu.1.utilization_pct": 43.0,
        "host.cpu_util_pct": 12.0,
        f"storage.{volume.wire_name}.read_iops": 1234.0,
    }
    services.store_batches(
        [batch(node, 1, deployment=deployment, ttft=[0.3] * 5, gauges=gauges, output_tokens=9)]
    )
    give_password(world.admin_a, "admin-pass", settings)

    with chromium() as browser:
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        sign_in(page, f"{live_server.url}/console/login/", "admin-a", "admin-pass")
        row = f"#tenant-table tr[data-deployment='{deployment.pk}']"
        for path, shows in (
            ("/console/fleet/", ["#fleet-table :text('gpu-a')", "#fleet-table :text('62 %')"]),
            (
                f"/console/nodes/{node.pk}/",
                [":text('NVIDIA H100 80GB HBM3')", "td:text('81 %')", ".panel canvas"],
            ),
            ("/console/storage/", ["td:text('scratch')", "td:text('1234')"]),
            (
                f"/console/tenants/{world.tenant_a.pk}/",
                [f"{row} :text('chat')", f"{row} :text-is('5')"],
            ),
        ):
            page.goto(f"{live_server.url}{path}")
            for selector in shows:
                page.wait_for_selector(f"#dashboard {selector}", timeout=10_000)
            page.screenshot(path=screenshot_path(f"console-{path.split('/')[2]}"))
    assert errors == []


@pytest.mark.browser
def test_a_platform_admin_sees_a_nodes_rejected_batches_and_why(
    live_server: Any, world: World, bundle: Path, settings: Any
) -> None:
    deployment = chat(world.tenant_a)
    node = make_node("gpu-forger", gpus=1)
    place(node)  # it serves nothing, yet names acme's chat
    acks = services.store_batches(
        [batch(node, 1, deployment=deployment, ttft=[0.1]), batch(node, 2)]
    ).acks
    assert [a.outcome for a in acks] == ["rejected", "stored"]
    give_password(world.platform, "platform-pass", settings)

    with chromium() as browser:
        page = browser.new_page()
        sign_in(page, f"{live_server.url}/console/login/", world.platform.username, "platform-pass")
        page.goto(f"{live_server.url}/console/nodes/{node.pk}/")
        page.wait_for_selector("#node-rejected :text('1')", timeout=10_000)
        reason = page.inner_text("#node-rejection")
        assert f"deployment {deployment.pk}" in reason and "no replica" in reason
        page.screenshot(path=screenshot_path("console-node-rejections"), full_page=True)


# --- a real server -------------------------------------------------------------------------


def enroll(stack: Stack, tenant: Any) -> tuple[str, str]:
    """Enroll a node the way its agent does; returns (node id, node credential)."""
    token = create_bootstrap_token(name="dash", tenant=tenant).secret
    host = {
        "hostname": "gpu-live",
        "kernel": "6.8.0",
        "os": "Debian 12",
        "cpu_model": "Xeon",
        "cpu_count": 64,
        "memory_bytes": 2**38,
    }
    body = {
        "schema_version": 1,
        "bootstrap_token": token,
        "hostname": "gpu-live",
        "agent_version": "0.1.0",
        "host": host,
    }
    response = httpx.post(f"{stack.url}/api/v1/agent/enroll/", json=body, timeout=10)
    assert response.status_code == 201, response.text
    grant = response.json()
    return grant["node_id"], grant["node_credential"]


@contextmanager
def telemetry_flowing(stack: Stack, tenant: Any, deployment: Any) -> Iterator[list[int]]:
    """An enrolled node POSTs a batch every 0.5 s, each with slower TTFTs than the last.

    Like an agent, it keeps a batch the server could not be reached for and sends it again.
    Yields the HTTP status codes of the answers so far.
    """
    node_id, credential = enroll(stack, tenant)
    place(Node.objects.get(pk=node_id), deployment)
    replica = deployment.instances.get()
    statuses: list[int] = []
    stop = threading.Event()

    def post() -> None:
        headers = {"Authorization": f"Node {credential}"}
        owner = {"tenant_id": str(deployment.tenant_id), "deployment_id": str(deployment.pk)}
        with httpx.Client(base_url=stack.url, headers=headers, timeout=10) as client:
            seq = 1
            while not stop.wait(0.5):
                end = datetime.now(UTC)
                ttft = [0.05 * seq + 0.01 * i for i in range(20)]
                batch = TelemetryBatch(
                    node_id=node_id,
                    seq=seq,
                    interval_start=end - timedelta(seconds=0.5),
                    interval_end=end,
                    gauges={
                        "gpu.0.utilization_pct": float(seq % 100),
                        f"worker.{deployment.pk}.queue_depth": float(seq % 7),
                        # the node's gateway: requests routed to the replica, and why
                        f"worker.{deployment.pk}.routed:{replica.pk}": float(seq % 5),
                        f"worker.{deployment.pk}.predicted_ttft:{replica.pk}": 0.12,
                        f"worker.{deployment.pk}.up:{replica.pk}": 1.0,
                    },
                    series=[
                        SeriesSketch(**owner, metric=m, sketch=sketch_of(values), thresholds=[])
                        for m, values in (("ttft", ttft), ("tpot", [v / 50 for v in ttft]))
                    ],
                    counters={},
                    usage=[
                        UsageCount(
                            **owner,
                            completed=20,
                            failed=seq % 3,
                            rejected=0,
                            cancelled=0,
                            input_tokens=400,
                            output_tokens=100 * seq,
                        )
                    ],
                )
                try:
                    response = client.post(
                        "/api/v1/agent/telemetry/",
                        content=batch.model_dump_json(),
                        headers={"Content-Type": "application/json"},
                    )
                except httpx.TransportError:
                    continue  # the control plane is restarting: send it again
                statuses.append(response.status_code)
                seq += 1

    thread = threading.Thread(target=post, daemon=True)
    thread.start()
    try:
        yield statuses
    finally:
        stop.set()
        thread.join(timeout=15)


def session_cookie(stack: Stack, username: str, password: str) -> str:
    """Sign in through the console's login form, as a browser does."""
    with httpx.Client(base_url=stack.url, timeout=10) as client:
        client.get("/console/login/")
        response = client.post(
            "/console/login/",
            data={
                "username": username,
                "password": password,
                "csrfmiddlewaretoken": client.cookies["csrftoken"],
            },
        )
        assert response.status_code == 302, response.text
        return f"sessionid={client.cookies['sessionid']}"


@pytest.fixture
def bundle() -> Path:
    assert BUNDLE.exists(), (
        "frontend/dist/console.js is missing: ./tailguard builds it "
        "(or: npm ci --prefix frontend && npm run --prefix frontend build)"
    )
    return BUNDLE


@pytest.mark.e2e
@pytest.mark.browser
def test_deployment_dashboard_follows_telemetry_live(
    transactional_db: Any,
    world: World,
    tmp_path: Path,
    free_port: int,
    bundle: Path,
    settings: Any,
) -> None:
    deployment = chat(world.tenant_a)
    give_password(world.viewer_a, "viewer-pass", settings)

    with (
        running_stack(tmp_path, free_port) as stack,
        telemetry_flowing(stack, world.tenant_a, deployment) as statuses,
        chromium() as browser,
    ):
        node = Node.objects.get(replicas__deployment=deployment)
        AgentReport.objects.update_or_create(
            node=node, defaults={"gateway_url": "http://gpu-a.example:8080"}
        )
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        sign_in(
            page, f"{stack.url}/console/deployments/{deployment.pk}/", "viewer-a", "viewer-pass"
        )
        page.wait_for_selector("#conn-state[data-state=live]", timeout=30_000)
        assert "tenant-a / chat" in page.inner_text("h1")
        # where its clients send requests: the gateway of the node it runs on
        assert "OpenAI endpoint http://gpu-a.example:8080/v1" in page.inner_text(".crumbs")
        # and where that gateway sent them, and why
        page.wait_for_selector("#routing-table tbody tr", timeout=30_000)
        row = page.inner_text("#routing-table tbody tr")
        assert f"#0 on {node.hostname}" in row and "up" in row and "120 ms" in row, row

        def chart_state() -> tuple[int, int, str]:
            panel = page.locator("#chart-ttft")
            return (
                int(panel.get_attribute("data-version") or 0),
                int(panel.get_attribute("data-points") or 0),
                page.inner_text("#tile-ttft-p99 .value"),
            )

        before = chart_state()
        # deltas arrive: the chart redraws, gains points, and the slower TTFTs show
        wait_for(
            lambda: (now := chart_state())[0] >= before[0] + 3 and now[2] != before[2],
            30,
            "the TTFT chart to follow the telemetry",
        )
        page.wait_for_function(
            "document.querySelectorAll('#chart-ttft .u-series').length >= 3"  # x, p50, p99
        )
        page.screenshot(path=screenshot_path("console-deployment"), full_page=True)

        # a dropped connection heals: while the server restarts the page says so, then it
        # reconnects, reloads its snapshot and follows the deltas again
        stack.stop("web")
        page.wait_for_selector("#conn-state[data-state=down]", timeout=30_000)
        stack.spawn("web", processes.web("127.0.0.1", stack.port))
        page.wait_for_selector("#conn-state[data-state=live]", timeout=60_000)
        version = chart_state()[0]
        wait_for(lambda: chart_state()[0] >= version + 2, 30, "deltas after reconnecting")
    assert statuses and set(statuses) == {200}, statuses


@pytest.mark.e2e
def test_a_tenant_user_cannot_subscribe_to_another_tenants_streams(
    transactional_db: Any, world: World, tmp_path: Path, free_port: int, settings: Any
) -> None:
    mine, theirs = chat(world.tenant_a), chat(world.tenant_b)
    give_password(world.admin_a, "admin-pass", settings)

    with running_stack(tmp_path, free_port) as stack:
        headers = {"Cookie": session_cookie(stack, "admin-a", "admin-pass"), "Origin": stack.url}
        url = stack.url.replace("http", "ws") + "/ws/dashboard/"
        with websocket(url, additional_headers=headers, open_timeout=10) as ws:
            for name, expected in (
                (streams.deployment(theirs.pk), "error"),
                (streams.tenant(world.tenant_b.pk), "error"),
                (streams.FLEET, "error"),
                (streams.deployment(mine.pk), "subscribed"),
            ):
                ws.send(json.dumps({"subscribe": name}))
                answer = json.loads(ws.recv(timeout=10))
                assert (answer["type"], answer["stream"]) == (expected, name), answer
        # without a session the server refuses the connection outright
        with pytest.raises(Exception, match="4401|403"):
            with websocket(url, additional_headers={"Origin": stack.url}, open_timeout=10) as ws:
                ws.recv(timeout=10)
