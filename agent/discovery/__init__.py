"""Hardware discovery: what a node has, as the `Inventory` message the control plane stores.

Each hardware kind has its own collector (see `Collector`); `discover` runs them all. Every
collector reads from root paths it is given, so tests point them at fake sysfs trees, and
every collector reports absent hardware as empty facts, so a CPU-only laptop enrolls too.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TypeVar

import pynvml

from agent.discovery.base import Collector
from agent.discovery.gpu import GpuCollector, Nvml
from agent.discovery.host import HostCollector, NumaCollector
from agent.discovery.nvme import NvmeCollector
from agent.discovery.rdma import RdmaCollector, Verbs, load_pyverbs
from agent.protocol import Inventory

__all__ = ["Collector", "discover"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")


def _run(collector: Collector[_T]) -> _T:
    facts = collector.collect()
    log.debug("collector %s: %r", collector.name, facts)
    return facts


def discover(
    sysfs_root: Path = Path("/sys"),
    *,
    proc_root: Path = Path("/proc"),
    os_release: Path = Path("/etc/os-release"),
    nvml: Nvml | None = None,
    verbs: Verbs | None = None,
) -> Inventory:
    """Run every collector. `nvml`/`verbs` default to the real libraries (pynvml; pyverbs
    when importable, else the sysfs fallback); pass look-alikes to test without hardware."""
    return Inventory(
        host=_run(HostCollector(sysfs_root, proc_root, os_release)),
        numa=_run(NumaCollector(sysfs_root, proc_root)),
        gpus=_run(GpuCollector(pynvml if nvml is None else nvml, sysfs_root)),
        nics=_run(RdmaCollector(load_pyverbs() if verbs is None else verbs, sysfs_root)),
        drives=_run(NvmeCollector(sysfs_root)),
    )
