"""Placement by topology, GPU model and memory, and the spread and pack strategies."""

from __future__ import annotations

from typing import Any

from controlplane.fleet.models import Replica
from controlplane.fleet.placement import NodeRoom, plan
from tests.controlplane.test_placement import deployment, fresh, new_replica, placed_on, room

GIB = 2**30
TWO_NUMA = [0, 0, 0, 0, 1, 1, 1, 1]


def rooted(node: NodeRoom, gpus: dict[int, str | None], parts: dict[str, str | None]) -> NodeRoom:
    """`node` with PCIe root ports: `gpus` by index, `parts` NICs and drives by name."""
    for gpu in node.gpus:
        gpu.pci_root = gpus.get(gpu.index, gpu.pci_root)
    for part in [*node.nics, *node.drives]:
        name = getattr(part, "device", None) or part.name
        part.pci_root = parts.get(name, part.pci_root)
    return node


def test_a_node_whose_gpus_share_numa_with_nic_and_nvme_beats_one_that_does_not() -> None:
    # "a-far" sorts first, so only the topology can send the replica to "b-near".
    far = room("a-far", 2, numa=[1, 1], nics={"mlx5_0": 0}, drives={"nvme0n1": 0})
    near = room("b-near", 2, numa=[0, 0], nics={"mlx5_0": 0}, drives={"nvme0n1": 0})
    (replica,), _ = plan([deployment(replicas=1, gpus=2)], fresh(far, near), [], new_replica)

    assert replica.node.hostname == "b-near" and replica.gpu_indices == [0, 1]
    assert replica.reason.startswith(
        "placed on b-near: GPUs 0,1 on NUMA 0 with mlx5_0 and nvme0n1 (same NUMA), "
        "NVIDIA H100 80GB HBM3 (80 GiB); spread: 0 replicas of this deployment already there; "
        "2 of 2 nodes fit"
    ), replica.reason
    explained = replica.explanation
    assert explained["rdma_nics"] == ["mlx5_0"] and explained["nvme_drives"] == ["nvme0n1"]
    assert explained["topology"] == {
        "gpus_same_root_as_rdma_nic": 0,  # no root ports reported: the NUMA tiers decide
        "gpus_near_rdma_nic": 2,
        "gpus_same_root_as_nvme_drive": 0,
        "gpus_near_nvme_drive": 2,
        "one_numa_node": True,
    }
    assert explained["pcie_roots"] == []
    (runner_up,) = explained["alternatives"]
    assert runner_up["node"] == "a-far"
    assert "GPUs 0,1 on NUMA 1 with no RDMA NIC or NVMe drive there" in runner_up["summary"]


def test_within_a_node_the_gpus_next_to_the_active_nic_are_chosen() -> None:
    node = room(
        "gpu-a",
        numa=TWO_NUMA,
        nics={"mlx5_1": 1},
        down_nics={"mlx5_0": 0},  # a port that is down is no reason to go there
        drives={"nvme0n1": 0, "nvme1n1": 1},
    )
    saved, _ = plan([deployment(replicas=3, gpus=2)], fresh(node), [], new_replica)
    # The NUMA node with the NIC holds two replicas; the third goes next to the NVMe drive.
    assert [r.gpu_indices for r in saved] == [[4, 5], [6, 7], [0, 1]]
    assert "GPUs 4,5 on NUMA 1 with mlx5_1 and nvme1n1 (same NUMA)" in saved[0].reason
    assert "GPUs 0,1 on NUMA 0 with nvme0n1 (same NUMA)" in saved[2].reason


def test_an_rdma_nic_outweighs_an_nvme_drive_and_one_numa_node_outweighs_two() -> None:
    nic_side = room("a", 2, numa=[0, 1], nics={"mlx5_0": 0, "mlx5_1": 1})
    drive_side = room("b", 2, numa=[0, 0], drives={"nvme0n1": 0})
    one_numa = room("c", 2, numa=[0, 0], nics={"mlx5_0": 0, "mlx5_1": 1})
    (best,), _ = plan(
        [deployment(1, gpus=2)], fresh(nic_side, drive_side, one_numa), [], new_replica
    )
    assert best.node.hostname == "c"

    (split,), _ = plan([deployment(1, gpus=2)], fresh(nic_side, drive_side), [], new_replica)
    assert split.node.hostname == "a"
    assert "GPU 0 on NUMA 0 with mlx5_0 (same NUMA); GPU 1 on NUMA 1 with mlx5_1" in split.reason
    assert split.explanation["topology"]["one_numa_node"] is False


def test_gpu_model_and_memory_filter_and_say_why() -> None:
    rooms = fresh(
        room("a100", 4, model="NVIDIA A100-SXM4-40GB", memory=40 * GIB),
        room("h100", 4, model="NVIDIA H100 80GB HBM3", memory=80 * GIB),
        room("h100-small", 4, model="NVIDIA H100 PCIe", memory=64 * GIB),
    )
    d = deployment(replicas=2, gpus=2, gpu_model="H100", min_gpu_memory_bytes=80 * GIB)
    saved, _ = plan([d], rooms, [], new_replica)
    assert placed_on(saved) == ["h100", "h100"]

    d = deployment(replicas=1, gpus=2, gpu_model="H100", min_gpu_memory_bytes=96 * GIB)
    (unplaced,), _ = plan([d], rooms, [], new_replica)
    assert unplaced.node is None and unplaced.explanation["placed"] is False
    for words in (
        "not placed: no node fits (",
        "1 has no H100 GPUs (has NVIDIA A100-SXM4-40GB) [a100]",
        "2 has too little GPU memory: 0 of 4 H100 GPUs have 96 GiB, needs 2 [h100, h100-small]",
    ):
        assert words in unplaced.reason, unplaced.reason
    assert {
        "reason": "has no H100 GPUs (has NVIDIA A100-SXM4-40GB)",
        "count": 1,
        "nodes": ["a100"],
    } in (unplaced.explanation["ruled_out"])


def test_busy_gpus_are_named_with_what_is_left() -> None:
    node = room("gpu-a", 4)
    saved, _ = plan([deployment(replicas=2, gpus=3)], fresh(node), [], new_replica)
    assert (
        saved[1].reason
        == "not placed: no node fits (1 has busy GPUs: 1 of 4 GPUs free, needs 3 [gpu-a])"
    )


def _layout(saved: list[Replica]) -> dict[str, int]:
    return {host: placed_on(saved).count(host) for host in sorted(set(placed_on(saved)))}


def test_spread_balances_and_pack_fills_the_fullest_node_first() -> None:
    a, b, c = room("a", 4), room("b", 4), room("c", 4)
    spread = deployment(replicas=4)
    saved, _ = plan([spread], fresh(a, b, c), [], new_replica)
    assert _layout(saved) == {"a": 2, "b": 1, "c": 1}
    assert "spread: 1 replica of this deployment already there" in saved[3].reason

    pack = deployment(replicas=4, placement_strategy="pack")
    saved, _ = plan([pack], fresh(a, b, c), [], new_replica)
    assert _layout(saved) == {"a": 4}
    assert "pack: 3 replicas of this deployment already there, 1 GPU free" in saved[3].reason

    # Another deployment already holds two of b's GPUs: pack starts on the fuller node,
    # spread starts away from it.
    other = deployment(replicas=1, gpus=2)
    busy = fresh(a, b, c)
    held, _ = plan([other], {b.node.pk: busy[b.node.pk]}, [], new_replica)
    pack.replicas = spread.replicas = 2
    packed, _ = plan([other, pack], fresh(a, b, c), held, new_replica)
    assert placed_on(packed) == ["b", "b", "b"]
    spread_out, _ = plan([other, spread], fresh(a, b, c), held, new_replica)
    assert placed_on(spread_out) == ["b", "a", "c"]


def test_topology_comes_before_the_strategy() -> None:
    wired = room("b-wired", 2, numa=[0, 0], nics={"mlx5_0": 0}, drives={"nvme0n1": 0})
    plain = room("a-plain", 2, numa=[0, 0])
    saved, _ = plan([deployment(replicas=3)], fresh(plain, wired), [], new_replica)
    # Both of the wired node's GPUs go first, spread or not; then the plain node.
    assert placed_on(saved) == ["b-wired", "b-wired", "a-plain"]


def test_a_node_whose_nic_shares_the_gpus_root_port_beats_one_alike_in_numa() -> None:
    # Alike by NUMA: GPUs, NIC and drive all on NUMA 0. Only b's NIC is under GPU 0's port.
    gpus = {0: "0000:15:01.0", 1: "0000:25:01.0"}
    apart = rooted(
        room("a-apart", 2, numa=[0, 0], nics={"mlx5_0": 0}, drives={"nvme0n1": 0}),
        gpus,
        {"mlx5_0": "0000:35:01.0", "nvme0n1": "0000:45:01.0"},
    )
    together = rooted(
        room("b-together", 2, numa=[0, 0], nics={"mlx5_0": 0}, drives={"nvme0n1": 0}),
        gpus,
        {"mlx5_0": "0000:15:01.0", "nvme0n1": "0000:45:01.0"},
    )
    (replica,), _ = plan([deployment(replicas=1, gpus=2)], fresh(apart, together), [], new_replica)

    assert replica.node.hostname == "b-together" and replica.gpu_indices == [0, 1]
    assert replica.reason.startswith(
        "placed on b-together: GPUs 0,1 on NUMA 0 with mlx5_0 and nvme0n1 (same NUMA); "
        "GPU 0 shares PCIe root port 0000:15:01.0 with mlx5_0, NVIDIA H100 80GB HBM3 (80 GiB); "
    ), replica.reason
    explained = replica.explanation
    assert explained["topology"] == {
        "gpus_same_root_as_rdma_nic": 1,
        "gpus_near_rdma_nic": 2,
        "gpus_same_root_as_nvme_drive": 0,
        "gpus_near_nvme_drive": 2,
        "one_numa_node": True,
    }
    assert explained["pcie_roots"] == [
        {"root": "0000:15:01.0", "gpus": [0], "rdma_nics": ["mlx5_0"], "nvme_drives": []},
        {"root": "0000:25:01.0", "gpus": [1], "rdma_nics": [], "nvme_drives": []},
    ]
    (runner_up,) = explained["alternatives"]
    assert runner_up["node"] == "a-apart" and "PCIe root port" not in runner_up["summary"]


def test_a_shared_root_port_outweighs_a_shared_numa_node() -> None:
    # A single-socket machine reports no NUMA node, yet its GPUs and NIC share a switch.
    numa_only = room("a-numa", 2, numa=[0, 0], nics={"mlx5_0": 0}, drives={"nvme0n1": 0})
    one_switch = rooted(
        room("b-switch", 2, numa=[None, None], nics={"mlx5_0": None}),
        {0: "0000:15:01.0", 1: "0000:15:01.0"},
        {"mlx5_0": "0000:15:01.0"},
    )
    (replica,), _ = plan(
        [deployment(replicas=1, gpus=2)], fresh(numa_only, one_switch), [], new_replica
    )
    assert replica.node.hostname == "b-switch"
    assert "GPUs 0,1 share PCIe root port 0000:15:01.0 with mlx5_0" in replica.reason
    assert replica.explanation["topology"]["gpus_same_root_as_rdma_nic"] == 2


def test_within_a_numa_node_gpus_under_the_nic_then_the_drive_come_first() -> None:
    # Every GPU shares NUMA 0 with the NIC and the drive; root ports tell them apart. The
    # down port under GPU 0's root port counts for nothing.
    node = rooted(
        room(
            "gpu-a",
            4,
            numa=[0, 0, 0, 0],
            nics={"mlx5_1": 0},
            down_nics={"mlx5_0": 0},
            drives={"nvme0n1": 0},
        ),
        {i: f"0000:{0x15 + 0x10 * i:02x}:01.0" for i in range(4)},
        {"mlx5_0": "0000:15:01.0", "mlx5_1": "0000:35:01.0", "nvme0n1": "0000:25:01.0"},
    )
    saved, _ = plan([deployment(replicas=4, gpus=1)], fresh(node), [], new_replica)
    assert [r.gpu_indices for r in saved] == [[2], [1], [0], [3]]
    assert "GPU 2 shares PCIe root port 0000:35:01.0 with mlx5_1" in saved[0].reason
    assert "GPU 1 shares PCIe root port 0000:25:01.0 with nvme0n1" in saved[1].reason
    assert saved[1].explanation["topology"]["gpus_same_root_as_nvme_drive"] == 1
    assert "shares PCIe root port" not in saved[2].reason


def _fleet() -> list[NodeRoom]:
    return [
        room("a", 8, numa=TWO_NUMA, nics={"mlx5_0": 1}, drives={"nvme0n1": 0}),
        room("b", 4, numa=[0, 1, 0, 1], nics={"mlx5_0": 0, "mlx5_1": 1}),
        room("c", 4, numa=[0, 0, 0, 0], drives={"nvme0n1": 0, "nvme1n1": 0}),
        room("d", 2),
    ]


def _outcome(saved: list[Replica]) -> list[tuple[Any, ...]]:
    return [
        (
            r.node and r.node.hostname,
            r.gpu_indices,
            r.reason,
            {k: v for k, v in r.explanation.items() if k != "pcie_roots"},
        )
        for r in saved
    ]


def test_unknown_or_unshared_root_ports_leave_the_numa_ranking_as_it_was() -> None:
    work = [deployment(replicas=3, gpus=2), deployment(replicas=4, gpus=1)]
    unknown, _ = plan(work, fresh(*_fleet()), [], new_replica)
    assert placed_on(unknown) == ["b", "a", "a", "b", "b", "c", "a"]  # as before root ports

    # Every device under its own root port (a VM's flat bus): nothing shares, nothing moves.
    flat = [
        rooted(
            r,
            {g.index: f"0000:{0x10 + g.index:02x}:00.0" for g in r.gpus},
            {
                p: f"0000:{0x80 + i:02x}:00.0"
                for i, p in enumerate(["mlx5_0", "mlx5_1", "nvme0n1", "nvme1n1"])
            },
        )
        for r in _fleet()
    ]
    unshared, _ = plan(work, fresh(*flat), [], new_replica)
    assert _outcome(unshared) == _outcome(unknown)
    assert unshared[0].explanation["pcie_roots"] != []

    # None (facts from an agent that predates root ports) reads as unknown too.
    none = [
        rooted(r, dict.fromkeys(range(8)), dict.fromkeys(["mlx5_0", "nvme0n1"])) for r in _fleet()
    ]
    assert _outcome(plan(work, fresh(*none), [], new_replica)[0]) == _outcome(unknown)
