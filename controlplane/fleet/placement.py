"""Placement: which node (and which GPUs and port) each replica runs on.

Pure functions over in-memory rows, so the whole fleet is planned at once and tests
need no database. Replicas keep their place while it stays valid; unplaced ones go
to an eligible node, spread across nodes, and record why when none fits. A replica of
a deployment with a model volume also needs a storage pool on its node with room for
it (the roomiest), and records that pool.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from controlplane.inventory.choices import NodeStatus

WORKER_PORT_BASE = 18000


@dataclass
class NodeRoom:
    """What is still free on one node while planning."""

    node: Any
    gpus: list[Any]
    pools: dict[Any, int] = field(default_factory=dict)
    """Free bytes for model volumes in each of the node's pools (by pool id)."""
    used_gpus: set[int] = field(default_factory=set)
    used_ports: set[int] = field(default_factory=set)
    replicas_of: Counter[Any] = field(default_factory=Counter)

    def fitting_gpus(self, deployment: Any) -> list[int]:
        return [
            gpu.index
            for gpu in self.gpus
            if gpu.index not in self.used_gpus
            and deployment.gpu_model.lower() in gpu.name.lower()
            and gpu.memory_total_bytes >= deployment.min_gpu_memory_bytes
        ]

    def fitting_pool(self, size_bytes: int) -> Any:
        """The pool with the most room if it can hold `size_bytes`, else None."""
        best = max(self.pools, key=lambda pk: self.pools[pk], default=None)
        return best if best is not None and self.pools[best] >= size_bytes else None

    def take(
        self,
        replica: Any,
        gpu_indices: list[int],
        port: int | None = None,
        pool: Any = None,
        volume_bytes: int = 0,
    ) -> None:
        replica.node = self.node
        replica.gpu_indices = gpu_indices
        replica.port = port if port is not None else self.free_port()
        replica.pool_id = pool
        self.used_gpus.update(gpu_indices)
        self.used_ports.add(replica.port)
        self.replicas_of[replica.deployment_id] += 1
        if pool is not None:
            self.pools[pool] -= volume_bytes

    def free_port(self) -> int:
        port = WORKER_PORT_BASE
        while port in self.used_ports:
            port += 1
        return port


def why_not(deployment: Any, room: NodeRoom) -> str | None:
    """The first requirement this node fails for new work of `deployment`, or None."""
    node = room.node
    if node.status != NodeStatus.READY:
        return f"node is {node.status}"
    if node.maintenance:
        return "node is in maintenance"
    if node.tenant_id is not None and node.tenant_id != deployment.tenant_id:
        return "node is dedicated to another tenant"
    for key, value in deployment.node_selector.items():
        if node.labels.get(key) != value:
            return f"lacks label {key}={value}"
    if len(room.fitting_gpus(deployment)) < deployment.gpus_per_replica:
        wanted = f"{deployment.gpu_model} " if deployment.gpu_model else ""
        return f"has fewer than {deployment.gpus_per_replica} free {wanted}GPUs"
    if deployment.model_volume_bytes and room.fitting_pool(deployment.model_volume_bytes) is None:
        return f"has no storage pool with {deployment.model_volume_bytes} bytes free"
    return None


def _still_valid(replica: Any, deployment: Any, room: NodeRoom | None) -> bool:
    if room is None:
        return False
    owned = {gpu.index for gpu in room.gpus}
    needed = deployment.model_volume_bytes
    volume_fits = not needed or room.pools.get(replica.pool_id, -1) >= needed
    return (
        set(replica.gpu_indices) <= owned - room.used_gpus
        and replica.port not in room.used_ports
        and volume_fits
    )


def plan(
    deployments: list[Any], rooms: dict[Any, NodeRoom], replicas: list[Any], new_replica: Any
) -> tuple[list[Any], list[Any]]:
    """Place every deployment's replicas; returns (replicas to save, replicas to delete).

    `new_replica(deployment, index)` builds an unsaved replica row.
    """
    by_deployment: dict[Any, dict[int, Any]] = {}
    to_delete = []
    wanted = {d.pk: d for d in deployments}
    for replica in replicas:
        deployment = wanted.get(replica.deployment_id)
        if deployment is None or replica.index >= deployment.replicas:
            to_delete.append(replica)
        else:
            by_deployment.setdefault(deployment.pk, {})[replica.index] = replica

    # Existing placements first, so new work never displaces running replicas.
    unplaced, to_save = [], []
    for deployment in deployments:
        existing = by_deployment.get(deployment.pk, {})
        for index in range(deployment.replicas):
            replica = existing.get(index) or new_replica(deployment, index)
            to_save.append(replica)
            room = rooms.get(replica.node_id) if replica.node_id else None
            if room is not None and _still_valid(replica, deployment, room):
                pool = replica.pool_id if deployment.model_volume_bytes else None
                room.take(
                    replica,
                    list(replica.gpu_indices),
                    replica.port,
                    pool,
                    deployment.model_volume_bytes or 0,
                )
            else:
                unplaced.append((deployment, replica))

    for deployment, replica in unplaced:
        refusals: Counter[str] = Counter()
        fits = []
        for room in rooms.values():
            reason = why_not(deployment, room)
            if reason is None:
                fits.append(room)
            else:
                refusals[reason] += 1
        if not fits:
            replica.node, replica.gpu_indices, replica.port, replica.pool_id = None, [], None, None
            detail = "; ".join(f"{count} {reason}" for reason, count in refusals.most_common())
            replica.reason = f"not placed: no node fits ({detail or 'no nodes'})"
            continue
        room = min(
            fits,
            key=lambda r: (
                r.replicas_of[deployment.pk],
                sum(r.replicas_of.values()),
                r.node.hostname,
            ),
        )
        size = deployment.model_volume_bytes or 0
        room.take(
            replica,
            room.fitting_gpus(deployment)[: deployment.gpus_per_replica],
            pool=room.fitting_pool(size) if size else None,
            volume_bytes=size,
        )
        replica.reason = (
            f"placed on {room.node.hostname}: {len(fits)} of {len(rooms)} nodes fit; "
            f"fewest replicas of this deployment"
        )
    return to_save, to_delete
