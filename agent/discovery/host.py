"""Host identity, CPUs, memory and NUMA layout, read from /proc, /sys and os-release.

Placement pins workers to the NUMA node of their GPU and NIC, so the node list must be
right even on machines that expose no node directories (those get one node 0 holding
every CPU and all memory, which is what the kernel means by their absence).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from agent.discovery.sysfs import cpulist_count, natural_key, read_text
from agent.protocol import HostFacts, NumaNodeFacts

log = logging.getLogger(__name__)

_MEM_TOTAL = re.compile(r"^(?:Node\s+\d+\s+)?MemTotal:\s+(\d+)\s+kB$", re.MULTILINE)
_NODE_DIR = re.compile(r"^node(\d+)$")


def _mem_total_bytes(meminfo: str) -> int:
    """MemTotal from /proc/meminfo or a node's meminfo (both count in KiB)."""
    match = _MEM_TOTAL.search(meminfo)
    if match is None:
        raise ValueError("meminfo has no MemTotal line")
    return int(match.group(1)) * 1024


def _online_cpus(sysfs_root: Path) -> str:
    return (sysfs_root / "devices/system/cpu/online").read_text(encoding="ascii").strip()


def _os_name(os_release: Path) -> str:
    """PRETTY_NAME (else NAME) from os-release(5); plain "Linux" when the file is missing."""
    fields: dict[str, str] = {}
    for line in (read_text(os_release) or "").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields[key.strip()] = value.strip().strip("\"'")
    return fields.get("PRETTY_NAME") or fields.get("NAME") or "Linux"


def _cpu_model(cpuinfo: str) -> str:
    """The first `model name` in /proc/cpuinfo; empty on architectures that print none."""
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "model name":
            return " ".join(value.split())
    return ""


@dataclass(frozen=True)
class HostCollector:
    """Identity and size of the machine; these files exist on every Linux host."""

    sysfs_root: Path = Path("/sys")
    proc_root: Path = Path("/proc")
    os_release: Path = Path("/etc/os-release")
    name: str = field(default="host", init=False)

    def collect(self) -> HostFacts:
        kernel_dir = self.proc_root / "sys/kernel"
        return HostFacts(
            hostname=(kernel_dir / "hostname").read_text(encoding="utf-8").strip(),
            kernel=(kernel_dir / "osrelease").read_text(encoding="utf-8").strip(),
            os=_os_name(self.os_release),
            cpu_model=_cpu_model((self.proc_root / "cpuinfo").read_text(encoding="utf-8")),
            cpu_count=cpulist_count(_online_cpus(self.sysfs_root)),
            memory_bytes=_mem_total_bytes((self.proc_root / "meminfo").read_text(encoding="utf-8")),
        )


@dataclass(frozen=True)
class NumaCollector:
    """NUMA nodes in index order, with their CPUs and memory."""

    sysfs_root: Path = Path("/sys")
    proc_root: Path = Path("/proc")
    name: str = field(default="numa", init=False)

    def collect(self) -> list[NumaNodeFacts]:
        node_root = self.sysfs_root / "devices/system/node"
        node_dirs = (
            sorted(
                (d for d in node_root.iterdir() if _NODE_DIR.match(d.name)),
                key=lambda d: natural_key(d.name),
            )
            if node_root.is_dir()
            else []
        )
        if not node_dirs:
            log.debug("no NUMA node directories under %s; reporting one node 0", node_root)
            meminfo = (self.proc_root / "meminfo").read_text(encoding="utf-8")
            return [
                NumaNodeFacts(
                    index=0,
                    cpulist=_online_cpus(self.sysfs_root),
                    memory_total_bytes=_mem_total_bytes(meminfo),
                )
            ]
        return [
            NumaNodeFacts(
                index=int(d.name.removeprefix("node")),
                cpulist=(d / "cpulist").read_text(encoding="ascii").strip(),
                memory_total_bytes=_mem_total_bytes((d / "meminfo").read_text(encoding="ascii")),
            )
            for d in node_dirs
        ]
