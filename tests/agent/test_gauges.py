"""Telemetry collectors: NVML (faked: no GPU here), procfs, the storage engine, and worker
stats windows mapped to series, SLO ids, availability and usage."""

from __future__ import annotations

import base64
import uuid
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pynvml
import pytest

from agent.gauges import (
    AppliedComponents,
    GpuGauges,
    HostGauges,
    StorageGauges,
    WorkerStats,
    WorkerWindow,
    windows_to_reading,
)
from agent.protocol import Components, PoolSpec, SloThreshold, TelemetryBatch, VolumeSpec
from agent.storage import StorageDriver
from dataplane.inference.config import SloThreshold as WorkerThreshold
from dataplane.inference.metrics import RequestTiming, TelemetryStats
from dataplane.sketch import LatencySketch
from dataplane.storage.local import LocalEngine
from tests.agent.fakes import H100, L4, FakeNvml, write
from tests.agent.samples import NODE, NOW, OTHER_TENANT, TENANT

MIB = 1 << 20


async def test_gpu_gauges_from_nvml() -> None:
    nvml = FakeNvml([H100, replace(L4, ecc=None)])
    collector = GpuGauges(nvml)
    gauges = (await collector.collect({})).gauges
    assert {k: v for k, v in gauges.items() if k.startswith("gpu.0.")} == {
        "gpu.0.utilization_pct": 87.0,
        "gpu.0.memory_util_pct": 41.0,
        "gpu.0.memory_used_bytes": float(512 << 20),
        "gpu.0.memory_total_bytes": float(H100.memory_total),
        "gpu.0.power_w": 412.345,
        "gpu.0.temperature_c": 61.0,
        "gpu.0.sm_clock_mhz": 1755.0,
        "gpu.0.mem_clock_mhz": 2619.0,
        "gpu.0.ecc_corrected": 3.0,
        "gpu.0.ecc_uncorrected": 0.0,
        "gpu.0.throttle_reasons": float(pynvml.nvmlClocksThrottleReasonSwPowerCap),
    }
    # The L4 has no ECC: those readings are left out, the others are there.
    assert "gpu.1.ecc_corrected" not in gauges and gauges["gpu.1.temperature_c"] == 61.0
    await collector.collect({})
    assert nvml.initialised and nvml.shutdowns == 0  # initialised once, kept open
    collector.close()
    assert nvml.shutdowns == 1


@pytest.mark.parametrize(
    "error", [pynvml.NVMLError_LibraryNotFound(), pynvml.NVMLError_DriverNotLoaded()]
)
async def test_no_nvml_means_no_gpu_gauges(error: Exception) -> None:
    collector = GpuGauges(FakeNvml([H100], init_error=error))
    assert (await collector.collect({})).gauges == {}
    collector.close()


async def test_host_gauges_from_procfs(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    write(proc, "loadavg", "3.52 2.10 1.07 4/1234 56789\n")
    write(
        proc,
        "meminfo",
        "MemTotal:       1000 kB\nMemFree:         100 kB\nMemAvailable:    400 kB\n",
    )
    write(proc, "stat", "cpu  100 0 100 700 100 0 0 0 0 0\ncpu0 100 0 100 700 100 0 0 0 0 0\n")
    collector = HostGauges(proc)
    first = (await collector.collect({})).gauges
    assert first == {
        "host.load1": 3.52,
        "host.mem_total_bytes": 1000 * 1024.0,
        "host.mem_used_bytes": 600 * 1024.0,
    }  # CPU utilisation needs two samples
    write(proc, "stat", "cpu  160 0 120 800 120 0 0 0 0 0\n")  # +80 busy of +200
    assert (await collector.collect({})).gauges["host.cpu_util_pct"] == pytest.approx(40.0)


async def test_storage_gauges_from_the_local_engine(tmp_path: Path) -> None:
    driver = StorageDriver(LocalEngine(tmp_path / "root"), "local")
    await driver.apply(
        Components(
            pools=[
                PoolSpec(
                    name="models",
                    kind="local",
                    directory=str(tmp_path / "pool"),
                    capacity_bytes=64 * MIB,
                )
            ],
            volumes=[VolumeSpec(name="v-1", tenant_id=TENANT, pool="models", size_bytes=8 * MIB)],
        )
    )
    collector = StorageGauges(driver, NODE)
    await collector.collect({})  # the engine's first sample is the baseline of its rates
    gauges = (await collector.collect({})).gauges
    assert gauges["pool.models.capacity_bytes"] == 64 * MIB
    assert gauges["pool.models.free_bytes"] == 56 * MIB
    assert {k for k in gauges if k.startswith("storage.v-1.")} == {
        f"storage.v-1.{name}"
        for name in (
            "read_iops",
            "write_iops",
            "read_mb_s",
            "write_mb_s",
            "read_latency_us",
            "write_latency_us",
        )
    }


# --- worker stats -> batch ---------------------------------------------------------------

DEP_A = uuid.UUID("3d2a1f00-5b6c-4d7e-8f90-a1b2c3d4e5f6")
DEP_B = uuid.UUID("4e3b2a11-6c7d-4e8f-9a01-b2c3d4e5f607")
SLO_TTFT_A = uuid.UUID(int=1)
SLO_TTFT_ALL = uuid.UUID(int=2)
SLO_AVAIL = uuid.UUID(int=3)
SLO_OTHER = uuid.UUID(int=4)


def desired_thresholds() -> list[SloThreshold]:
    return [
        SloThreshold(
            slo_id=SLO_TTFT_A,
            tenant_id=TENANT,
            deployment_id=DEP_A,
            metric="ttft",
            threshold_seconds=0.5,
        ),
        SloThreshold(
            slo_id=SLO_TTFT_ALL,
            tenant_id=TENANT,
            deployment_id=None,
            metric="ttft",
            threshold_seconds=1.0,
        ),
        SloThreshold(
            slo_id=SLO_AVAIL,
            tenant_id=TENANT,
            deployment_id=None,
            metric="availability",
            threshold_seconds=None,
        ),
        SloThreshold(
            slo_id=SLO_OTHER,
            tenant_id=OTHER_TENANT,
            deployment_id=None,
            metric="ttft",
            threshold_seconds=0.5,
        ),
    ]


def worker_thresholds() -> list[WorkerThreshold]:
    """What the supervisor renders into a worker's config for the same SLOs."""
    return [
        WorkerThreshold(tenant=str(TENANT), metric="ttft", threshold_seconds=0.5),
        WorkerThreshold(tenant=str(TENANT), metric="ttft", threshold_seconds=1.0),
    ]


def request(ttft: float) -> RequestTiming:
    return RequestTiming(
        arrival=0.0, input_tokens=10, scheduled=0.01, token_times=[ttft, ttft + 0.1]
    )


def window(stats: TelemetryStats, queue_depth: int, running: int) -> WorkerWindow:
    """A window as the worker's /v1/internal/stats serves it."""
    payload: dict[str, Any] = {**stats.collect(0), "queue_depth": queue_depth, "running": running}
    return WorkerWindow.model_validate(payload)


def test_worker_windows_become_series_slo_counts_usage_and_gauges() -> None:
    tenant = str(TENANT)
    first = TelemetryStats(str(DEP_A), "m", worker_thresholds())  # two workers of DEP_A
    second = TelemetryStats(str(DEP_A), "m", worker_thresholds())
    other = TelemetryStats(str(DEP_B), "m", worker_thresholds())  # another deployment
    for ttft in (0.2, 0.7):
        first.record(tenant, request(ttft))
    second.record(tenant, request(1.5))
    second.count_failed(tenant)
    second.count_rejected(tenant)
    second.count_cancelled(tenant)
    other.record(tenant, request(0.3))
    reading = windows_to_reading(
        [window(first, 2, 3), window(second, 1, 4), window(other, 0, 1)], desired_thresholds()
    )

    series = {(s.deployment_id, s.metric): s for s in reading.series}
    assert {metric for dep, metric in series if dep == DEP_A} == {
        "queue",
        "ttft",
        "tpot",
        "itl",
        "e2e",
    }
    ttft_a = series[(DEP_A, "ttft")]
    merged = LatencySketch.from_bytes(base64.b64decode(ttft_a.sketch))
    assert merged.count == 3  # both workers' sketches merged
    assert {(c.slo_id, c.threshold_seconds, c.good, c.total) for c in ttft_a.thresholds} == {
        (SLO_TTFT_A, 0.5, 1, 3),
        (SLO_TTFT_ALL, 1.0, 2, 3),
    }
    # The deployment-less SLO applies to DEP_B too; DEP_A's own SLO does not.
    assert {c.slo_id for c in series[(DEP_B, "ttft")].thresholds} == {SLO_TTFT_ALL}
    # Availability on e2e: good = completed, total = completed + failed + rejected.
    (availability,) = [c for c in series[(DEP_A, "e2e")].thresholds if c.slo_id == SLO_AVAIL]
    assert (availability.threshold_seconds, availability.good, availability.total) == (None, 3, 5)
    assert all(c.slo_id != SLO_OTHER for s in reading.series for c in s.thresholds)

    usage = {u.deployment_id: u for u in reading.usage}
    assert (usage[DEP_A].completed, usage[DEP_A].failed, usage[DEP_A].rejected) == (3, 1, 1)
    assert (usage[DEP_A].cancelled, usage[DEP_A].input_tokens, usage[DEP_A].output_tokens) == (
        1,
        30,
        6,
    )
    assert reading.gauges == {
        f"worker.{DEP_A}.queue_depth": 3.0,
        f"worker.{DEP_A}.running": 7.0,
        f"worker.{DEP_B}.queue_depth": 0.0,
        f"worker.{DEP_B}.running": 1.0,
    }
    TelemetryBatch(
        node_id=NODE,
        seq=1,
        interval_start=NOW,
        interval_end=NOW,
        gauges=reading.gauges,
        series=reading.series,
        counters={},
        usage=reading.usage,
    )  # a valid batch


def test_requests_that_all_failed_still_carry_availability() -> None:
    stats = TelemetryStats(str(DEP_A), "m", [])
    stats.count_failed(str(TENANT))
    stats.count_rejected(str(TENANT))
    reading = windows_to_reading([window(stats, 0, 0)], desired_thresholds())
    (series,) = reading.series
    assert (
        series.metric == "e2e"
        and LatencySketch.from_bytes(base64.b64decode(series.sketch)).count == 0
    )
    assert [(c.slo_id, c.good, c.total) for c in series.thresholds] == [(SLO_AVAIL, 0, 2)]


async def test_applied_components_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "applied-components.json"
    applied = AppliedComponents(path)
    components = Components(slo_thresholds=desired_thresholds())
    assert await applied.apply(components) == []
    assert AppliedComponents(path).components == components


def test_an_slo_measured_at_the_gateway_takes_the_gateways_counts_only() -> None:
    tenant = str(TENANT)
    thresholds = [  # SLO_TTFT_ALL at the worker, the others at the gateway
        t if t.slo_id == SLO_TTFT_ALL else t.model_copy(update={"measured_at": "gateway"})
        for t in desired_thresholds()
    ]
    worker, gateway = (TelemetryStats(str(DEP_A), "m", worker_thresholds()) for _ in range(2))
    worker.record(tenant, request(0.2))  # fast where it was served...
    gateway.record(tenant, request(0.7))  # ...slower as the client saw it, queueing included
    gateway.count_rejected(tenant)  # turned away at the gateway: the worker never saw it
    reading = windows_to_reading([window(worker, 0, 1)], thresholds, [window(gateway, 0, 0)])

    series = {(s.deployment_id, s.metric): s for s in reading.series}
    ttft = series[(DEP_A, "ttft")]
    assert LatencySketch.from_bytes(base64.b64decode(ttft.sketch)).count == 1  # the worker's
    assert {(c.slo_id, c.threshold_seconds, c.good, c.total) for c in ttft.thresholds} == {
        (SLO_TTFT_ALL, 1.0, 1, 1),  # measured at the worker
        (SLO_TTFT_A, 0.5, 0, 1),  # measured at the gateway: 0.7 s is over 0.5 s
    }
    (availability,) = [c for c in series[(DEP_A, "e2e")].thresholds if c.slo_id == SLO_AVAIL]
    assert (availability.good, availability.total) == (1, 2)  # the gateway's rejection counts
    (usage,) = reading.usage
    assert (usage.completed, usage.rejected) == (1, 0)  # requests counted once, at the worker


async def test_the_gateways_routing_becomes_per_replica_gauges() -> None:
    async with httpx.AsyncClient() as http:
        stats = WorkerStats(SimpleNamespace(workers={}), AppliedComponents(), http)
    replica = str(uuid.UUID(int=7))

    def routed(instance: str, count: int, predicted: float | None) -> WorkerWindow:
        return WorkerWindow.model_validate(
            {
                "instance": instance,
                "seq": count,
                "deployment_id": str(DEP_A),
                "replicas": [
                    {
                        "replica_id": replica,
                        "up": predicted is not None,
                        "routed": count,
                        "predicted_ttft_s": predicted,
                    }
                ],
            }
        )

    prefix = f"worker.{DEP_A}."
    first = stats._routing([routed("g1", 10, 0.25)], now=100.0)  # noqa: SLF001
    assert first == {f"{prefix}up:{replica}": 1.0, f"{prefix}predicted_ttft:{replica}": 0.25}
    later = stats._routing([routed("g1", 16, 0.5)], now=102.0)  # noqa: SLF001
    assert later[f"{prefix}routed:{replica}"] == 3.0  # 6 requests in 2 s
    down = stats._routing([routed("g2", 1, None)], now=103.0)  # noqa: SLF001
    assert down == {f"{prefix}up:{replica}": 0.0}  # a new gateway start: no rate yet
    emptied = WorkerWindow.model_validate(
        {"instance": "g2", "seq": 2, "deployment_id": str(DEP_A), "replicas": []}
    )
    assert stats._routing([emptied], now=104.0) == {}  # noqa: SLF001
    assert not stats._routed  # noqa: SLF001  # a replica no longer named is forgotten
