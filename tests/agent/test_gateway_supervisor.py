"""The node's gateway as the agent runs it: real worker and gateway processes."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import uuid
from pathlib import Path

import httpx

from agent.protocol import Components, GatewaySpec, PeerDeployment, PeerReplica
from agent.supervisor import (
    GatewaySettings,
    GatewaySupervisor,
    ManagedWorker,
    SupervisorSettings,
    WorkerSupervisor,
    render_gateway_config,
)
from dataplane.gateway.config import GatewayConfig
from tests.agent.test_supervisor import spec
from tests.dataplane.inference.procs import key_hash

KEY = "tg-gateway-supervisor-key"


async def complete(url: str) -> httpx.Response:
    async with httpx.AsyncClient() as http:
        return await http.post(
            f"{url}/v1/completions",
            json={"model": "tiny", "prompt": "hi", "max_tokens": 3, "ignore_eos": True},
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=60,
        )


async def follows(
    running: ManagedWorker,
    gateway: GatewaySupervisor,
    url: str,
    squatter: socket.socket | None = None,
) -> None:
    """Kill the worker (with `squatter` taking its port as soon as it is free) and wait
    until the gateway serves through its next start."""
    old_url, old_nonce = running.url, running.nonce
    assert running._process is not None  # noqa: SLF001
    os.kill(running._process.pid, signal.SIGKILL)  # type: ignore[attr-defined]  # noqa: SLF001
    async with asyncio.timeout(120):
        while squatter is not None:
            try:
                # as the worker binds: its connections' TIME_WAIT does not hold the port
                squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                squatter.bind(("127.0.0.1", int((old_url or "").rpartition(":")[2])))
                squatter.listen()
                break
            except OSError:
                await asyncio.sleep(0.01)
        while not (running.ready and running.nonce != old_nonce):
            await asyncio.sleep(0.1)
        assert squatter is not None or running.url == old_url  # its port again
        while True:
            config = GatewayConfig.load(gateway.process.config_path)  # type: ignore[union-attr]
            (replica,) = config.deployments[0].replicas
            if (replica.base_url, replica.nonce) == (running.url, running.nonce):
                break
            await asyncio.sleep(0.1)
        while (await complete(url)).status_code != 200:
            await asyncio.sleep(0.2)  # until the gateway's watcher reloaded the file


async def test_the_gateway_fronts_the_nodes_workers_and_follows_them_to_new_ports(
    tmp_path: Path,
) -> None:
    # restarts wait a second or two: long enough for the test to take a dead worker's port
    settings = SupervisorSettings(
        work_dir=tmp_path, health_interval_s=0.2, backoff_initial_s=2.0, ready_timeout_s=120
    )
    workers = WorkerSupervisor(settings)
    gateway = GatewaySupervisor(settings, GatewaySettings(gateway_id="node-1"), workers)
    replica = uuid.uuid4()
    worker = spec(None, replica)
    worker = worker.model_copy(
        update={"tenants": [worker.tenants[0].model_copy(update={"key_hashes": [key_hash(KEY)]})]}
    )
    desired = Components(workers=[worker], gateway=GatewaySpec())

    async def apply(components: Components) -> list[object]:
        return [*await workers.apply(components), *await gateway.apply(components)]

    try:
        results = await apply(desired)
        assert [(r.kind, r.ok) for r in results] == [("worker", True), ("gateway", True)]  # type: ignore[attr-defined]
        port = results[1].port  # type: ignore[attr-defined]
        url = f"http://127.0.0.1:{port}"
        assert results[1].url == url  # type: ignore[attr-defined]
        reply = await complete(url)
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] == 3

        # The worker dies and comes back on its port, as another start: the gateway follows.
        running = workers.workers[replica]
        await follows(running, gateway, url)
        first_url = running.url

        # It dies again and, its port taken meanwhile, comes back on another: followed too.
        with socket.socket() as squatter:
            await follows(running, gateway, url, squatter)
        assert running.url != first_url
        assert gateway.process is not None and gateway.process.restarts == 0

        # A desired state without the gateway stops it and reports nothing for it.
        assert await gateway.apply(desired.model_copy(update={"gateway": None})) == []
        try:
            await complete(url)
            raise AssertionError("the removed gateway still answers")
        except httpx.TransportError:
            pass
    finally:
        await gateway.close()
        await workers.close()


async def test_a_gateway_no_state_wants_stops_even_one_left_serving_for_the_next_agent(
    tmp_path: Path,
) -> None:
    settings = SupervisorSettings(
        work_dir=tmp_path, health_interval_s=0.2, ready_timeout_s=120, keep_workers=True
    )
    workers = WorkerSupervisor(settings)
    gateway = GatewaySupervisor(settings, GatewaySettings(gateway_id="node-1"), workers)
    worker = spec(None, uuid.uuid4())
    desired = Components(workers=[worker], gateway=GatewaySpec())
    results = [*await workers.apply(desired), *await gateway.apply(desired)]
    assert all(r.ok for r in results), results
    url = results[1].url
    # The agent stops, leaving both serving for the next one (keep_workers).
    await gateway.close()
    await workers.close()
    async with httpx.AsyncClient() as http:
        assert (await http.get(f"{url}/health")).status_code == 200

    # The next agent's state has the worker but no gateway any more: the one left stops.
    workers = WorkerSupervisor(settings)
    gateway = GatewaySupervisor(settings, GatewaySettings(gateway_id="node-1"), workers)
    without = desired.model_copy(update={"gateway": None})
    try:
        assert [r.ok for r in await workers.apply(without)] == [True]
        assert await gateway.apply(without) == []
        async with asyncio.timeout(30), httpx.AsyncClient() as http:
            while True:
                try:
                    await http.get(f"{url}/health")
                except httpx.TransportError:
                    break
                await asyncio.sleep(0.1)
        assert not (tmp_path / "gateway" / "process.json").exists()
    finally:
        await workers.apply(Components())  # a removed worker stops, kept or not


def test_a_gateway_reaches_its_deployments_replicas_on_other_nodes(tmp_path: Path) -> None:
    local = spec(None, uuid.uuid4())
    there = uuid.uuid4()
    peer = PeerDeployment(
        deployment_id=local.deployment_id,
        key="tg-peer-key-0123456789abcdef",
        replicas=[PeerReplica(replica_id=there, url="http://gpu-2.example:9001")],
    )
    gateway = GatewaySpec(peers=[peer])
    components = Components(workers=[local], gateway=gateway)
    config = render_gateway_config(
        gateway, components, {}, GatewaySettings(gateway_id="n1"), tmp_path / "endpoint.json", []
    )
    (route,) = config.deployments
    # Its own worker has not answered yet; the other node's is reached with the peer key.
    assert [(r.replica_id, r.base_url, r.nonce, r.peer_key) for r in route.replicas] == [
        (str(there), "http://gpu-2.example:9001", None, peer.key)
    ]


def test_workers_are_reported_reachable_only_where_other_nodes_can_reach_them(
    tmp_path: Path,
) -> None:
    def url(host: str, advertise: str | None = None) -> str | None:
        return SupervisorSettings(tmp_path, host=host, advertise=advertise).peer_url(9001)

    assert url("127.0.0.1") is None and url("::1") is None
    assert url("127.0.0.1", "gpu-1.internal") == "http://gpu-1.internal:9001"
    assert url("0.0.0.0") == f"http://{socket.gethostname()}:9001"
    assert url("::", "fd00::5") == "http://[fd00::5]:9001"
    assert SupervisorSettings(tmp_path, host="0.0.0.0").peer_url(None) is None
