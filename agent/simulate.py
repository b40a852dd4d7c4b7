"""`tailguard-agent simulate`: N lightweight agents in one process, for scale tests.

Each simulated node enrolls, heartbeats, reports a synthetic inventory (8 GPUs over
two NUMA nodes, RDMA ports, NVMe drives) and applies signed revisions through the
same reconciler as a real agent; its workers are recorded, not started. One Celery
consumer serves all the simulated nodes' queues and one HTTP connection pool all
their requests, so hundreds fit on a small machine.
"""

from __future__ import annotations

import asyncio
import functools
import uuid
from pathlib import Path

import httpx

from agent.client import ControlPlaneClient
from agent.enroll import load_or_enroll
from agent.protocol import (
    ComponentResult,
    Components,
    DriveFacts,
    GpuFacts,
    HostFacts,
    Inventory,
    NicFacts,
    NumaNodeFacts,
    decode_public_key,
)
from agent.reconciler import Reconciler
from agent.runner import NodeAgent
from agent.tasks import Consumer

SIM_NAMESPACE = uuid.UUID("5e1f1d2c-7b0a-4f5e-9a1b-3c2d4e5f6a7b")


def synthetic_inventory(hostname: str) -> Inventory:
    """A plausible 8-GPU node whose ids are stable for a given hostname."""

    def hexid(kind: str, index: int) -> str:
        return uuid.uuid5(SIM_NAMESPACE, f"{hostname}/{kind}/{index}").hex

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
                pci_bus_id=f"0000:{0x1C + i * 0x10:02x}:00.0",
                numa_node=i // 2,
            )
            for i in range(4)
        ],
    )


class SimulatedWorkers:
    """Accepts worker specs as a real node would, without starting processes."""

    def __init__(self) -> None:
        self.running: dict[str, str] = {}

    async def apply(self, components: Components) -> list[ComponentResult]:
        self.running = {str(w.replica_id): w.model_name for w in components.workers}
        return [
            ComponentResult(kind="worker", name=f"replica-{w.replica_id}", ok=True, error=None)
            for w in components.workers
        ]


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
) -> None:
    # A few shared connections: dozens of concurrent requests into one ASGI process cost
    # more in thread contention than they gain (push p99 6.2 s with 64, about 3 s with 8).
    limits = httpx.Limits(max_connections=8, max_keepalive_connections=8)
    async with httpx.AsyncClient(timeout=30, limits=limits) as http:
        anon = ControlPlaneClient(http, control_plane_url)
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
            reconciler = Reconciler(
                identity.node_id,
                decode_public_key(identity.control_plane_public_key),
                [SimulatedWorkers()],
                state_dir / hostname,
            )
            agents.append(
                NodeAgent(
                    identity,
                    anon.with_credential(identity.credential),
                    reconciler,
                    functools.partial(inventories.__getitem__, hostname),
                    inventory_interval_s=inventory_interval_s,
                    resync_interval_s=resync_interval_s,
                )
            )
        consumer = Consumer(
            identities[0].broker_url,
            {a.identity.queue: a.receive for a in agents},
            name=f"simulator@{prefix}",
        )
        consumer.start()
        try:
            await asyncio.gather(*(agent.run(stop) for agent in agents))
        finally:
            await asyncio.to_thread(consumer.stop)
