"""The agent's /metrics: the latest gauges and the shipper's counters, under the contract's names."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from agent.client import ControlPlaneClient
from agent.gauges import GpuGauges, Reading
from agent.metrics import AgentCollector, MetricsServer
from agent.shipper import BUFFER_FILE, TelemetryBuffer, TelemetrySender, TelemetryShipper
from tests.agent.fakes import H100, FakeNvml, TelemetryControlPlane
from tests.agent.samples import DEPLOYMENT, NODE
from tests.serving import serving

CREDENTIAL = "tgn_8f2d3c4b5a69788796a5b4c3d2e1f0"


class Node:
    name = "node"

    async def collect(self, cursors: Mapping[str, str]) -> Reading:
        return Reading(gauges={"host.load1": 1.25, f"worker.{DEPLOYMENT}.queue_depth": 6.0})


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_metrics_endpoint_serves_gauges_and_shipping_counters(tmp_path: Path) -> None:
    buffer = TelemetryBuffer(tmp_path / BUFFER_FILE, max_batches=2)
    control_plane = TelemetryControlPlane(CREDENTIAL, reject=frozenset({3}))
    async with httpx.AsyncClient(timeout=5) as http, serving(control_plane) as url:
        sender = TelemetrySender(buffer, ControlPlaneClient(http, url, CREDENTIAL))
        shipper = TelemetryShipper(
            NODE, [GpuGauges(FakeNvml([H100])), Node()], buffer, sender, interval_s=1.0
        )
        for _ in range(4):  # one more than the buffer holds: batch 1 is dropped
            await shipper.tick()
        stop = asyncio.Event()
        task = asyncio.create_task(sender.run(stop))
        for _ in range(200):
            if len(buffer) == 0:
                break
            await asyncio.sleep(0.02)
        await shipper.tick()  # batch 5, waiting for its ack when scraped (sender stopped)
        stop.set()
        await task
        server = MetricsServer(AgentCollector(shipper, lambda: 7), 0, "127.0.0.1")
        try:
            text = (await http.get(f"http://127.0.0.1:{server.port}/metrics")).text
        finally:
            server.stop()
            shipper.close()
    found = samples(text)
    gpu = (("gpu", "0"),)
    assert found[("tailguard_agent_gpu_utilization_ratio", gpu)] == 0.87
    assert found[("tailguard_agent_gpu_memory_used_bytes", gpu)] == 512 << 20
    assert found[("tailguard_agent_gpu_power_watts", gpu)] == 412.345
    assert found[("tailguard_agent_gpu_temperature_celsius", gpu)] == 61.0
    assert found[("tailguard_agent_host_load1", ())] == 1.25
    assert found[("tailguard_agent_worker_queue_depth", (("deployment", str(DEPLOYMENT)),))] == 6.0
    outcome = "tailguard_agent_telemetry_batches_total"
    assert found[(outcome, (("outcome", "stored"),))] == 1  # batch 4; 1 and 2 were dropped
    assert found[(outcome, (("outcome", "rejected"),))] == 1
    assert found[("tailguard_agent_telemetry_dropped_total", ())] == 2
    assert found[("tailguard_agent_telemetry_buffered_batches", ())] == 1
    assert found[("tailguard_agent_applied_generation", ())] == 7
