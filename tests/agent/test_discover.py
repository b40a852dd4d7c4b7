"""`discover` end to end: a fake machine, this machine, and `python -m agent.discovery`."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from agent.discovery import discover
from agent.protocol import Inventory
from tests.agent.fakes import (
    A100_MIG,
    H100,
    RDMA_PORTS,
    FakeNvml,
    FakeVerbs,
    gpu_pci_tree,
    host_tree,
    nvme_tree,
    rdma_tree,
)

REPO = Path(__file__).resolve().parents[2]


def test_whole_fake_machine(tmp_path: Path) -> None:
    roots = host_tree(tmp_path)
    gpu_pci_tree(roots.sys)
    rdma_tree(roots.sys)
    nvme_tree(roots.sys)
    inventory = discover(
        roots.sys,
        proc_root=roots.proc,
        os_release=roots.os_release,
        nvml=FakeNvml([H100, A100_MIG]),
        verbs=FakeVerbs(RDMA_PORTS),
    )
    assert inventory.host.hostname == "gpu-node-01"
    assert [n.index for n in inventory.numa] == [0, 1]
    assert [(g.pci_bus_id, g.numa_node) for g in inventory.gpus] == [
        ("0000:17:00.0", 0),
        ("0000:b1:00.0", 1),
    ]
    assert len(inventory.nics) == len(RDMA_PORTS)
    # H100 and mlx5_0 sit behind one switch, so under one root port; nothing else does.
    assert inventory.gpus[0].pci_root == inventory.nics[0].pci_root == "0000:14:01.0"
    others = [g.pci_root for g in inventory.gpus[1:]] + [n.pci_root for n in inventory.nics[1:]]
    assert "0000:14:01.0" not in others
    assert [d.name for d in inventory.drives] == ["nvme0n1", "nvme1n1", "nvme1n2", "nvme10n1"]
    assert Inventory.model_validate_json(inventory.model_dump_json()) == inventory


def test_this_machine() -> None:
    inventory = discover()
    assert inventory.host.hostname == socket.gethostname()
    assert inventory.host.cpu_count >= 1 and inventory.host.memory_bytes > 0
    assert inventory.numa


def test_module_prints_inventory_json() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "agent.discovery"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    printed = Inventory.model_validate_json(result.stdout)
    assert printed.host.hostname == socket.gethostname()
    assert result.stderr == ""
