"""`tailguard-agent simulate`: N lightweight agents in one process, for scale tests.

Each simulated node enrolls, heartbeats, reports a synthetic inventory (8 GPUs over
two NUMA nodes, RDMA ports, NVMe drives) and applies signed revisions through the
same reconciler as a real agent; its workers are recorded, not started. One Celery
consumer serves all the simulated nodes' queues and one HTTP connection pool all
their requests, so hundreds fit on a small machine.

Each node also ships telemetry through the real shipper, buffer and WebSocket sender:
a few GPU gauges and, for the workers of its desired state, latency sketches, exact SLO
counts and usage per tenant+deployment. Those payloads are computed once per desired
state (a handful of variants, rotated), so a batch costs little more than its JSON.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import random
import uuid
from collections.abc import Mapping
from pathlib import Path

from agent.client import ControlPlaneClient, http_client
from agent.enroll import load_or_enroll
from agent.gauges import Reading
from agent.protocol import (
    ComponentResult,
    Components,
    DriveFacts,
    GpuFacts,
    HostFacts,
    Inventory,
    LatencyMetric,
    NicFacts,
    NumaNodeFacts,
    SeriesSketch,
    ThresholdCount,
    UsageCount,
    decode_public_key,
)
from agent.reconciler import Reconciler
from agent.runner import NodeAgent
from agent.shipper import open_shipper
from agent.tasks import Consumer
from dataplane.sketch import LatencySketch

SIM_NAMESPACE = uuid.UUID("5e1f1d2c-7b0a-4f5e-9a1b-3c2d4e5f6a7b")


def synthetic_inventory(hostname: str) -> Inventory:
    """A plausible 8-GPU node whose ids are stable for a given hostname: as in DGX-class
    machines, each GPU shares a PCIe root port with one RDMA NIC, every other one also
    with an NVMe drive."""

    def hexid(kind: str, index: int) -> str:
        return uuid.uuid5(SIM_NAMESPACE, f"{hostname}/{kind}/{index}").hex

    def root(gpu: int) -> str:
        return f"0000:{0x15 + gpu * 0x10:02x}:01.0"

    return Inventory(
        host=HostFacts(
            hostname=hostname,
            kernel="6.8.0-sim",
            os="Simulated Linux",
            cpu_model="Simulated Xeon 8480",
            cpu_count=112,
            memory_bytes=2 * 1024**4,
        ),
        numa=[
            NumaNodeFacts(index=n, cpulist=f"{n * 56}-{n * 56 + 55}", memory_total_bytes=1024**4)
            for n in range(2)
        ],
        gpus=[
            GpuFacts(
                index=i,
                uuid=f"GPU-{hexid('gpu', i)}",
                name="NVIDIA H100 80GB HBM3",
                memory_total_bytes=80 * 1024**3,
                mig_mode="disabled",
                pci_bus_id=f"0000:{0x18 + i * 0x10:02x}:00.0",
                pci_root=root(i),
                numa_node=i // 4,
                driver_version="550.54.15",
                cuda_driver_version="12.4",
            )
            for i in range(8)
        ],
        nics=[
            NicFacts(
                device=f"mlx5_{i}",
                port=1,
                state="active",
                speed_gbps=400.0,
                width="4X",
                link_layer="InfiniBand",
                netdev=None,
                pci_bus_id=f"0000:{0x1A + i * 0x10:02x}:00.0",
                pci_root=root(i),
                numa_node=i // 4,
                gid=None,
            )
            for i in range(8)
        ],
        drives=[
            DriveFacts(
                name=f"nvme{i}n1",
                model="Simulated NVMe 7.68TB",
                serial=hexid("nvme", i)[:16],
                firmware="SIM1",
                capacity_bytes=7_680_000_000_000,
                logical_block_size=4096,
                pci_bus_id=f"0000:{0x1C + i * 0x20:02x}:00.0",
                pci_root=root(2 * i),
                numa_node=i // 2,
            )
            for i in range(4)
        ],
    )


class SimulatedWorkers:
    """Accepts worker specs as a real node would, without starting processes."""

    def __init__(self) -> None:
        self.running: dict[str, str] = {}
        self.components = Components()

    async def apply(self, components: Components) -> list[ComponentResult]:
        self.running = {str(w.replica_id): w.model_name for w in components.workers}
        self.components = components
        return [
            ComponentResult(kind="worker", name=f"replica-{w.replica_id}", ok=True, error=None)
            for w in components.workers
        ]


# Median seconds of each synthetic latency (log-normal, sigma 0.5) and samples per interval.
_MEDIAN_S: dict[LatencyMetric, float] = {
    "queue": 0.01,
    "ttft": 0.12,
    "tpot": 0.02,
    "itl": 0.02,
    "e2e": 2.5,
}
_REQUESTS = 20
_VARIANTS = 4


class SyntheticTelemetry:
    """A collector of plausible figures for a simulated node (see the module docstring)."""

    name = "synthetic"

    def __init__(self, workers: SimulatedWorkers, hostname: str, gpus: int = 8) -> None:
        self._workers = workers
        self._random = random.Random(hostname)
        self._gpus = gpus
        self._components: Components | None = None
        self._variants: list[Reading] = []
        self._tick = 0

    async def collect(self, cursors: Mapping[str, str]) -> Reading:
        if self._workers.components is not self._components:
            self._components = self._workers.components
            self._variants = [self._variant(self._components) for _ in range(_VARIANTS)]
        self._tick += 1
        return self._variants[self._tick % len(self._variants)]

    def _variant(self, components: Components) -> Reading:
        rnd = self._random
        gauges: dict[str, float] = {"host.load1": round(rnd.uniform(2, 20), 2)}
        busy = {i for w in components.workers for i in w.gpu_indices}
        for i in range(self._gpus):
            util = rnd.uniform(60, 99) if i in busy else rnd.uniform(0, 3)
            gauges[f"gpu.{i}.utilization_pct"] = round(util, 1)
            gauges[f"gpu.{i}.memory_used_bytes"] = float(int(util / 100 * 70 * 1024**3))
            gauges[f"gpu.{i}.memory_total_bytes"] = float(80 * 1024**3)
            gauges[f"gpu.{i}.power_w"] = round(90 + util * 6, 1)
            gauges[f"gpu.{i}.temperature_c"] = float(int(35 + util * 0.4))
        series: list[SeriesSketch] = []
        usage: list[UsageCount] = []
        pairs = sorted(
            {(t.tenant_id, w.deployment_id) for w in components.workers for t in w.tenants}
            | {(w.tenant_id, w.deployment_id) for w in components.workers},
            key=str,
        )
        for w in components.workers:
            gauges[f"worker.{w.deployment_id}.queue_depth"] = float(rnd.randint(0, 8))
            gauges[f"worker.{w.deployment_id}.running"] = float(rnd.randint(1, w.max_batch_size))
        for tenant, deployment in pairs:
            slos = [
                s
                for s in components.slo_thresholds
                if s.tenant_id == tenant and s.deployment_id in (None, deployment)
            ]
            failed = int(rnd.random() < 0.2)
            for metric, median in _MEDIAN_S.items():
                values = [rnd.lognormvariate(0, 0.5) * median for _ in range(_REQUESTS)]
                sketch = LatencySketch()
                for value in values:
                    sketch.add(value)
                counts = [
                    ThresholdCount(
                        slo_id=s.slo_id,
                        threshold_seconds=s.threshold_seconds,
                        good=sum(v <= s.threshold_seconds for v in values),
                        total=len(values),
                    )
                    for s in slos
                    if s.metric == metric and s.threshold_seconds is not None
                ]
                if metric == "e2e":
                    counts += [
                        ThresholdCount(
                            slo_id=s.slo_id,
                            threshold_seconds=None,
                            good=_REQUESTS,
                            total=_REQUESTS + failed,
                        )
                        for s in slos
                        if s.metric == "availability"
                    ]
                series.append(
                    SeriesSketch(
                        tenant_id=tenant,
                        deployment_id=deployment,
                        metric=metric,
                        sketch=base64.b64encode(sketch.to_bytes()).decode("ascii"),
                        thresholds=counts,
                    )
                )
            usage.append(
                UsageCount(
                    tenant_id=tenant,
                    deployment_id=deployment,
                    completed=_REQUESTS,
                    failed=failed,
                    rejected=0,
                    cancelled=0,
                    input_tokens=_REQUESTS * 200,
                    output_tokens=_REQUESTS * 120,
                )
            )
        return Reading(gauges=gauges, series=series, usage=usage)


async def simulate(
    *,
    count: int,
    control_plane_url: str,
    bootstrap_token: str | None,
    state_dir: Path,
    prefix: str,
    stop: asyncio.Event,
    inventory_interval_s: float = 300.0,
    resync_interval_s: float = 60.0,
    telemetry_interval_s: float = 1.0,
    telemetry_buffer_batches: int = 21600,
) -> None:
    """Run `count` simulated nodes until `stop`; `telemetry_interval_s` 0 ships none."""
    # A few shared connections: dozens of concurrent requests into one ASGI process cost
    # more in thread contention than they gain (push p99 6.2 s with 64, about 3 s with 8).
    # Requests beyond those wait their turn in order (see ControlPlaneClient's `limit`), so
    # a thousand agents' heartbeats queue behind each other instead of timing out in the
    # connection pool.
    async with http_client(8) as http:
        anon = ControlPlaneClient(http, control_plane_url, limit=asyncio.Semaphore(8))
        hostnames = [f"{prefix}-{i:04d}" for i in range(count)]
        inventories = {h: synthetic_inventory(h) for h in hostnames}
        identities = await asyncio.gather(
            *(
                load_or_enroll(anon, state_dir / h, h, inventories[h].host, bootstrap_token, stop)
                for h in hostnames
            )
        )
        agents = []
        for hostname, identity in zip(hostnames, identities, strict=True):
            workers = SimulatedWorkers()
            client = anon.with_credential(identity.credential)
            reconciler = Reconciler(
                identity.node_id,
                decode_public_key(identity.control_plane_public_key),
                [workers],
                state_dir / hostname,
            )
            telemetry = (
                open_shipper(
                    identity.node_id,
                    state_dir / hostname,
                    client,
                    [SyntheticTelemetry(workers, hostname)],
                    interval_s=telemetry_interval_s,
                    buffer_batches=telemetry_buffer_batches,
                    durable=False,
                )
                if telemetry_interval_s > 0
                else None
            )
            agents.append(
                NodeAgent(
                    identity,
                    client,
                    reconciler,
                    functools.partial(inventories.__getitem__, hostname),
                    inventory_interval_s=inventory_interval_s,
                    resync_interval_s=resync_interval_s,
                    telemetry=telemetry,
                )
            )
        consumer = Consumer(
            identities[0].broker_url,
            {a.identity.queue: a.receive for a in agents},
            name=f"simulator@{prefix}",
        )
        consumer.start()
        # A stop flag per node, all set by `stop`: every task waiting on a flag registers
        # with it, and a flag shared by thousands of tasks makes each wake-up scan them all.
        stops = [asyncio.Event() for _ in agents]

        async def relay() -> None:
            await stop.wait()
            for each in stops:
                each.set()

        relaying = asyncio.create_task(relay())
        try:
            await asyncio.gather(*(a.run(own) for a, own in zip(agents, stops, strict=True)))
        finally:
            relaying.cancel()
            await asyncio.to_thread(consumer.stop)
