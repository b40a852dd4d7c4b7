"""The node's gateway as the agent runs it: real worker and gateway processes."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from pathlib import Path

import httpx

from agent.protocol import Components, GatewaySpec
from agent.supervisor import (
    GatewaySettings,
    GatewaySupervisor,
    SupervisorSettings,
    WorkerSupervisor,
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


async def test_the_gateway_fronts_the_nodes_workers_and_follows_them_to_new_ports(
    tmp_path: Path,
) -> None:
    settings = SupervisorSettings(
        work_dir=tmp_path, health_interval_s=0.2, backoff_initial_s=0.2, ready_timeout_s=120
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

        # The worker dies and comes back on another free port: the gateway follows it.
        running = workers.workers[replica]
        old_url, old_pid = running.url, running._process.pid  # type: ignore[union-attr]  # noqa: SLF001
        os.kill(old_pid, signal.SIGKILL)
        async with asyncio.timeout(120):
            while not (running.ready and running.url != old_url):
                await asyncio.sleep(0.1)
            while True:
                config = GatewayConfig.load(gateway.process.config_path)  # type: ignore[union-attr]
                if config.deployments[0].replicas[0].base_url == running.url:
                    break
                await asyncio.sleep(0.1)
            while (reply := await complete(url)).status_code != 200:
                await asyncio.sleep(0.2)  # until the gateway's watcher reloaded the file
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
