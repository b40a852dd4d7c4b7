"""Placement on synthetic inventories: requirements, spreading, stability, explanations."""

from __future__ import annotations

import uuid

from controlplane.fleet.models import Deployment, Replica
from controlplane.fleet.placement import NodeRoom, plan
from controlplane.inventory.models import Drive, Gpu, Nic, Node

TENANT, OTHER = uuid.uuid4(), uuid.uuid4()


def room(
    hostname: str,
    gpus: int = 8,
    *,
    model: str = "NVIDIA H100 80GB HBM3",
    memory: int = 80 * 2**30,
    numa: list[int | None] | None = None,
    nics: dict[str, int] | None = None,
    down_nics: dict[str, int] | None = None,
    drives: dict[str, int] | None = None,
    status: str = "ready",
    labels: dict[str, str] | None = None,
    tenant: uuid.UUID | None = None,
    maintenance: bool = False,
) -> NodeRoom:
    """A node's room; `numa` gives each GPU's NUMA node, `nics`/`drives` map names to theirs."""
    node = Node(
        hostname=hostname,
        status=status,
        labels=labels or {},
        tenant_id=tenant,
        maintenance=maintenance,
    )
    numa = numa or [None] * gpus
    return NodeRoom(
        node,
        [
            Gpu(node=node, index=i, name=model, memory_total_bytes=memory, numa_node=numa[i])
            for i in range(gpus)
        ],
        nics=[
            Nic(node=node, device=name, state=state, numa_node=at)
            for state, names in (("active", nics or {}), ("down", down_nics or {}))
            for name, at in names.items()
        ],
        drives=[
            Drive(node=node, name=name, numa_node=at, capacity_bytes=2**40)
            for name, at in (drives or {}).items()
        ],
    )


def deployment(replicas: int, gpus: int = 1, **fields: object) -> Deployment:
    return Deployment(
        tenant_id=TENANT, name="d", replicas=replicas, gpus_per_replica=gpus, **fields
    )


def new_replica(d: Deployment, index: int) -> Replica:
    return Replica(deployment=d, index=index)


def placed_on(replicas: list[Replica]) -> list[str | None]:
    return [r.node.hostname if r.node else None for r in replicas]


def test_replicas_spread_across_nodes_and_gpus_are_not_shared() -> None:
    rooms = {r.node.pk: r for r in (room("a", 8), room("b", 8), room("c", 8))}
    d = deployment(replicas=6, gpus=2)
    saved, deleted = plan([d], rooms, [], new_replica)
    assert deleted == []
    assert sorted(placed_on(saved)) == ["a", "a", "b", "b", "c", "c"]
    for r in rooms.values():
        mine = [x.gpu_indices for x in saved if x.node is r.node]
        assert sorted(sum(mine, [])) == [0, 1, 2, 3]  # disjoint GPU sets
    assert {x.port for x in saved} == {None}  # each agent reports where its workers listen


def test_requirements_filter_and_the_reason_names_each_refusal() -> None:
    rooms = {
        r.node.pk: r
        for r in (
            room("busy", 1),
            room("a100", 8, model="NVIDIA A100-SXM4-40GB"),
            room("down", status="unreachable"),
            room("drained", maintenance=True),
            room("theirs", tenant=OTHER),
            room("eu", labels={"zone": "eu-1"}),
        )
    }
    d = deployment(replicas=2, gpus=2, gpu_model="H100", node_selector={"zone": "eu-1"})
    saved, _ = plan([d], rooms, [], new_replica)
    assert placed_on(saved) == ["eu", "eu"]

    d = deployment(replicas=1, gpus=2, gpu_model="H100", node_selector={"zone": "us-2"})
    (unplaced,), _ = plan([d], rooms, [], new_replica)
    assert unplaced.node is None
    for words in (
        "lacks label zone=us-2",
        "node is unreachable",
        "node is in maintenance",
        "dedicated to another tenant",
    ):
        assert words in unplaced.reason, unplaced.reason


def fresh(*rooms: NodeRoom) -> dict[uuid.UUID, NodeRoom]:
    """Rooms as a new planning pass sees them: the same nodes, nothing taken yet."""
    return {r.node.pk: NodeRoom(r.node, r.gpus, nics=r.nics, drives=r.drives) for r in rooms}


def test_existing_placements_stay_and_scale_down_removes_the_highest_indices() -> None:
    a, b = room("a"), room("b")
    d = deployment(replicas=3)
    saved, _ = plan([d], fresh(a, b), [], new_replica)
    before = {r.index: (r.node.hostname, r.gpu_indices, r.port) for r in saved}

    again, _ = plan([d], fresh(a, b, room("c")), saved, new_replica)  # c must not attract them
    assert {r.index: (r.node.hostname, r.gpu_indices, r.port) for r in again} == before

    d.replicas = 1
    kept, deleted = plan([d], fresh(a, b), saved, new_replica)
    assert [r.index for r in kept] == [0] and sorted(r.index for r in deleted) == [1, 2]


def test_cpu_deployments_need_no_gpus() -> None:
    rooms = {r.node.pk: r for r in (room("cpu-1", 0), room("cpu-2", 0))}
    saved, _ = plan([deployment(replicas=2, gpus=0)], rooms, [], new_replica)
    assert sorted(placed_on(saved)) == ["cpu-1", "cpu-2"]
    assert all(r.gpu_indices == [] and "placed on" in r.reason for r in saved)
