"""Small readers for kernel pseudo-files, shared by every sysfs-backed collector.

Kernel attribute files end in a newline and use -1 for "no NUMA affinity"; these helpers
turn them into Python values and treat a missing file as absence rather than an error.
"""

from __future__ import annotations

import re
from pathlib import Path

_PCI_ADDRESS = re.compile(r"^[0-9a-f]{4,8}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")
_HOST_BRIDGE = re.compile(r"^pci[0-9a-f]{4,8}:[0-9a-f]{2}$")


def read_text(path: Path) -> str | None:
    """The file's content without surrounding whitespace, or None when it does not exist."""
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip()
    except (FileNotFoundError, NotADirectoryError):
        return None


def read_int(path: Path) -> int | None:
    """A decimal integer attribute, or None when the file does not exist."""
    text = read_text(path)
    return None if text is None else int(text)


def numa_node(device_dir: Path) -> int | None:
    """The NUMA node of a PCI device; None on single-node machines, which report -1."""
    node = read_int(device_dir / "numa_node")
    return None if node is None or node < 0 else node


def pci_address(device_link: Path) -> str | None:
    """The PCI address a `device` link points at, or None for a non-PCI (virtual) parent."""
    if not device_link.exists():
        return None
    name = device_link.resolve().name
    return name if _PCI_ADDRESS.match(name) else None


def pci_root_port(device_dir: Path) -> str | None:
    """The PCIe root port a PCI device sits under, from where its sysfs directory lives.

    `/sys/bus/pci/devices/<bdf>` (and a class device's `device` link) resolves to
    `/sys/devices/pci<domain>:<bus>/<root port>/.../<bdf>`: the first address after the
    host bridge is the root port. A device right on the root bus (an integrated endpoint,
    or a VM without emulated root ports) has no port above it and is reported as its own
    root, so it shares a root with nothing else. Behind a VMD controller the path holds a
    second host bridge (`pci10000:e0`); the last one counts, since it is the device's own
    domain. None when the entry is missing or has no PCI parent (rxe, siw).
    """
    if not device_dir.exists():
        return None
    parts = device_dir.resolve().parts
    bridges = [i for i, part in enumerate(parts) if _HOST_BRIDGE.match(part)]
    if not bridges or not _PCI_ADDRESS.match(parts[-1]):
        return None
    below = parts[bridges[-1] + 1]
    return below if _PCI_ADDRESS.match(below) else None


def natural_key(name: str) -> tuple[str | int, ...]:
    """Sort key putting mlx5_2 before mlx5_10 and nvme2n1 before nvme10n1."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


def cpulist_count(cpulist: str) -> int:
    """How many CPUs a kernel cpulist such as `0-15,32-47` names."""
    count = 0
    for chunk in filter(None, cpulist.split(",")):
        first, _, last = chunk.partition("-")
        count += int(last or first) - int(first) + 1
    return count
