"""Local NVMe namespaces from sysfs: the drives the storage engine can carve volumes from.

Controllers live under /sys/class/nvme, their namespaces under /sys/block. With native
NVMe multipath the controller holds hidden path devices (nvme0c0n1) and the block device
is the shared head (nvme0n1), so path names are mapped to their head and reported once.
Fabric controllers (tcp, rdma, fc) are remote storage, not drives of this node, and are
skipped.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from agent.discovery.sysfs import natural_key, numa_node, pci_root_port, read_int, read_text
from agent.protocol import DriveFacts

log = logging.getLogger(__name__)

_NAMESPACE = re.compile(r"^nvme(\d+)(?:c\d+)?n(\d+)$")
_SECTOR_BYTES = 512  # /sys/block/*/size counts 512-byte sectors whatever the block size


def _namespaces(controller_dir: Path) -> Iterator[str]:
    """Block device names of the namespaces this controller serves."""
    for entry in sorted(controller_dir.iterdir(), key=lambda e: natural_key(e.name)):
        match = _NAMESPACE.match(entry.name)
        if match is not None:
            yield f"nvme{match.group(1)}n{match.group(2)}"


def _required(path: Path) -> str:
    """A file every PCIe NVMe controller has; its absence means sysfs is not what we expect."""
    text = read_text(path)
    if text is None:
        raise FileNotFoundError(f"{path} is missing")
    return text


@dataclass(frozen=True)
class NvmeCollector:
    """Local (PCIe) NVMe namespaces in natural name order."""

    sysfs_root: Path = Path("/sys")
    name: str = field(default="nvme", init=False)

    def collect(self) -> list[DriveFacts]:
        class_dir = self.sysfs_root / "class/nvme"
        if not class_dir.is_dir():
            log.debug("no %s; reporting zero NVMe drives", class_dir)
            return []
        drives: dict[str, DriveFacts] = {}
        for controller in sorted(class_dir.iterdir(), key=lambda c: natural_key(c.name)):
            transport = read_text(controller / "transport")
            if transport != "pcie":
                log.debug("skipping %s: transport %s is not local", controller.name, transport)
                continue
            for namespace in _namespaces(controller):
                if namespace not in drives:
                    drives[namespace] = self._drive(controller, namespace)
        return [drives[name] for name in sorted(drives, key=natural_key)]

    def _drive(self, controller: Path, namespace: str) -> DriveFacts:
        block = self.sysfs_root / "block" / namespace
        sectors = read_int(block / "size")
        block_size = read_int(block / "queue/logical_block_size")
        if sectors is None or block_size is None:
            raise FileNotFoundError(f"{block} lacks size or queue/logical_block_size")
        return DriveFacts(
            name=namespace,
            model=_required(controller / "model"),
            serial=_required(controller / "serial"),
            firmware=_required(controller / "firmware_rev"),
            capacity_bytes=sectors * _SECTOR_BYTES,
            logical_block_size=block_size,
            pci_bus_id=_required(controller / "address"),
            pci_root=pci_root_port(controller / "device"),
            numa_node=numa_node(controller / "device"),
        )
