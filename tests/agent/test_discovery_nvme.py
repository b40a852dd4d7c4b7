"""NVMe collector on a fake sysfs tree: plain, multipath and fabric controllers."""

from __future__ import annotations

from pathlib import Path

from agent.discovery.base import Collector
from agent.discovery.nvme import NvmeCollector
from agent.protocol import DriveFacts
from tests.agent.fakes import nvme_tree, write

MODEL = "SAMSUNG MZQL23T8HCLS-00A07"


def test_local_namespaces_in_natural_order(tmp_path: Path) -> None:
    nvme_tree(tmp_path)
    collector: Collector[list[DriveFacts]] = NvmeCollector(tmp_path)
    assert collector.name == "nvme"
    assert collector.collect() == [
        DriveFacts(
            name="nvme0n1", model=MODEL, serial="S64HNE0T12340", firmware="GDC5602Q",
            capacity_bytes=7_501_476_528 * 512, logical_block_size=512,
            pci_bus_id="0000:c1:00.0", pci_root="0000:c0:01.1", numa_node=0,
        ),
        DriveFacts(
            name="nvme1n1", model=MODEL, serial="S64HNE0T12341", firmware="GDC5602Q",
            capacity_bytes=1_875_385_008 * 8 * 512, logical_block_size=4096,
            pci_bus_id="0000:c2:00.0", pci_root="0000:c0:01.2", numa_node=None,
        ),
        DriveFacts(
            name="nvme1n2", model=MODEL, serial="S64HNE0T12341", firmware="GDC5602Q",
            capacity_bytes=1_875_385_008 * 8 * 512, logical_block_size=4096,
            pci_bus_id="0000:c2:00.0", pci_root="0000:c0:01.2", numa_node=None,
        ),
        DriveFacts(
            name="nvme10n1", model=MODEL, serial="S64HNE0T12340", firmware="GDC5602Q",
            capacity_bytes=1_000_215_216 * 512, logical_block_size=512,
            pci_bus_id="0001:03:00.0", pci_root="0001:00:03.0", numa_node=1,
        ),
    ]  # fmt: skip


def test_fabric_namespaces_are_not_local_drives(tmp_path: Path) -> None:
    nvme_tree(tmp_path)
    assert "nvme2n1" not in {d.name for d in NvmeCollector(tmp_path).collect()}


def test_second_path_to_a_namespace_reports_it_once(tmp_path: Path) -> None:
    nvme_tree(tmp_path)
    # A dual-ported drive: controller nvme3 is another path into subsystem 1.
    ctrl = "devices/pci0000:c3/0000:c3:00.0/nvme/nvme3"
    for name, text in [("transport", "pcie"), ("address", "0000:c3:00.0"), ("model", MODEL),
                       ("serial", "S64HNE0T12341"), ("firmware_rev", "GDC5602Q")]:  # fmt: skip
        write(tmp_path, f"{ctrl}/{name}", text + "\n")
    write(tmp_path, f"{ctrl}/nvme1c3n1/ana_state", "non-optimized\n")
    (tmp_path / "class/nvme/nvme3").symlink_to(f"../../{ctrl}")
    names = [d.name for d in NvmeCollector(tmp_path).collect()]
    assert names == ["nvme0n1", "nvme1n1", "nvme1n2", "nvme10n1"]


def test_no_nvme_is_zero_drives(tmp_path: Path) -> None:
    assert NvmeCollector(tmp_path).collect() == []


def test_this_machine_does_not_fail() -> None:
    drives = NvmeCollector().collect()
    if not Path("/sys/class/nvme").is_dir():
        assert drives == []
