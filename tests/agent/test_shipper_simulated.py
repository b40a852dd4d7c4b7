"""Simulated nodes ship synthetic telemetry through the real shipper, cheaply."""

from __future__ import annotations

import base64
from pathlib import Path

from agent.protocol import Components, TelemetryBatch
from agent.shipper import BUFFER_FILE, TelemetryBuffer, TelemetryShipper
from agent.simulate import SimulatedWorkers, SyntheticTelemetry
from dataplane.sketch import LatencySketch
from tests.agent.samples import DEPLOYMENT, NODE, OTHER_TENANT, SLO, TENANT, components


async def test_synthetic_telemetry_follows_the_desired_state(tmp_path: Path) -> None:
    workers = SimulatedWorkers()
    collector = SyntheticTelemetry(workers, "sim-0000")
    shipper = TelemetryShipper(
        NODE, [collector], TelemetryBuffer(tmp_path / BUFFER_FILE, 100), None, interval_s=1.0
    )
    idle = await collector.collect({})
    assert idle.series == [] and idle.usage == []
    assert {k.split(".")[2] for k in idle.gauges if k.startswith("gpu.")} >= {
        "utilization_pct",
        "power_w",
    }

    await workers.apply(components())
    await shipper.tick()
    ((_, body),) = shipper.buffer.read_from(0, 10)
    batch = TelemetryBatch.model_validate_json(body)
    # Each tenant the worker serves gets every latency metric of its deployment.
    assert {(s.tenant_id, s.deployment_id, s.metric) for s in batch.series} == {
        (tenant, DEPLOYMENT, metric)
        for tenant in (TENANT, OTHER_TENANT)
        for metric in ("queue", "ttft", "tpot", "itl", "e2e")
    }
    by_key = {(s.tenant_id, s.metric): s for s in batch.series}
    (ttft,) = by_key[(TENANT, "ttft")].thresholds
    assert ttft.slo_id == SLO and ttft.threshold_seconds == 0.5 and 0 <= ttft.good <= ttft.total
    (availability,) = by_key[(TENANT, "e2e")].thresholds
    assert availability.threshold_seconds is None
    assert by_key[(OTHER_TENANT, "ttft")].thresholds == []
    assert LatencySketch.from_bytes(base64.b64decode(by_key[(TENANT, "e2e")].sketch)).count > 0
    assert {(u.tenant_id, u.deployment_id) for u in batch.usage} == {
        (TENANT, DEPLOYMENT),
        (OTHER_TENANT, DEPLOYMENT),
    }
    assert f"worker.{DEPLOYMENT}.queue_depth" in batch.gauges

    # Payloads are made once per desired state and reused, not recomputed per batch.
    readings = [await collector.collect({}) for _ in range(8)]
    assert len({id(r) for r in readings}) < len(readings)
    await workers.apply(Components())
    assert (await collector.collect({})).series == []
    shipper.close()
