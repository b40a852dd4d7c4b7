"""NVIDIA GPUs through NVML (nvidia-ml-py), with NUMA affinity and PCIe root port from sysfs.

A machine without the NVIDIA driver is an ordinary CPU node: NVML's "library not found"
and "driver not loaded" mean zero GPUs, not a failure. NVML is passed in as an object of
the `Nvml` shape (the `pynvml` module itself in production) so the code path can be
exercised without a GPU.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from pynvml import (
    NVML_DEVICE_MIG_ENABLE,
    NVMLError_DriverNotLoaded,
    NVMLError_LibraryNotFound,
    NVMLError_NotSupported,
)

from agent.discovery.sysfs import numa_node, pci_root_port
from agent.protocol import GpuFacts, MigMode

log = logging.getLogger(__name__)

_NVML_BUS_ID = re.compile(r"^([0-9a-fA-F]{1,8}):([0-9a-fA-F]{2}):([0-9a-fA-F]{2})\.([0-7])$")


class MemoryInfo(Protocol):
    @property
    def total(self) -> int: ...


class PciInfo(Protocol):
    @property
    def busId(self) -> str: ...  # pynvml's field name, hence not snake_case


class Nvml(Protocol):
    """The subset of the `pynvml` module this collector calls, under pynvml's own names."""

    def nvmlInit(self) -> None: ...
    def nvmlShutdown(self) -> None: ...
    def nvmlSystemGetDriverVersion(self) -> str: ...
    def nvmlSystemGetCudaDriverVersion(self) -> int: ...
    def nvmlDeviceGetCount(self) -> int: ...
    def nvmlDeviceGetHandleByIndex(self, index: int) -> object: ...
    def nvmlDeviceGetName(self, handle: object) -> str: ...
    def nvmlDeviceGetUUID(self, handle: object) -> str: ...
    def nvmlDeviceGetMemoryInfo(self, handle: object) -> MemoryInfo: ...
    def nvmlDeviceGetMigMode(self, handle: object) -> list[int]: ...
    def nvmlDeviceGetPciInfo(self, handle: object) -> PciInfo: ...


def normalise_pci_bus_id(bus_id: str) -> str:
    """NVML's `00000000:17:00.0` as sysfs spells it: `0000:17:00.0`, lower-case hex."""
    match = _NVML_BUS_ID.match(bus_id)
    if match is None:
        raise ValueError(f"not a PCI bus id: {bus_id!r}")
    domain, bus, device, function = match.groups()
    return f"{int(domain, 16):04x}:{bus.lower()}:{device.lower()}.{function}"


def cuda_version(encoded: int) -> str:
    """NVML's CUDA driver version integer (12040) as `major.minor` (12.4)."""
    return f"{encoded // 1000}.{encoded % 1000 // 10}"


@dataclass(frozen=True)
class GpuCollector:
    """GPUs in NVML index order; pass the `pynvml` module itself in production."""

    nvml: Nvml
    sysfs_root: Path = Path("/sys")
    name: str = field(default="gpu", init=False)

    def collect(self) -> list[GpuFacts]:
        try:
            self.nvml.nvmlInit()
        except (NVMLError_LibraryNotFound, NVMLError_DriverNotLoaded) as exc:
            log.debug("NVML unavailable (%s); reporting zero GPUs", exc)
            return []
        try:
            driver = self.nvml.nvmlSystemGetDriverVersion()
            cuda = cuda_version(self.nvml.nvmlSystemGetCudaDriverVersion())
            return [
                self._gpu(index, driver, cuda) for index in range(self.nvml.nvmlDeviceGetCount())
            ]
        finally:
            self.nvml.nvmlShutdown()

    def _gpu(self, index: int, driver: str, cuda: str) -> GpuFacts:
        handle = self.nvml.nvmlDeviceGetHandleByIndex(index)
        bus_id = normalise_pci_bus_id(self.nvml.nvmlDeviceGetPciInfo(handle).busId)
        device_dir = self.sysfs_root / "bus/pci/devices" / bus_id
        return GpuFacts(
            index=index,
            uuid=self.nvml.nvmlDeviceGetUUID(handle),
            name=self.nvml.nvmlDeviceGetName(handle),
            memory_total_bytes=self.nvml.nvmlDeviceGetMemoryInfo(handle).total,
            mig_mode=self._mig_mode(handle),
            pci_bus_id=bus_id,
            pci_root=pci_root_port(device_dir),
            numa_node=numa_node(device_dir),
            driver_version=driver,
            cuda_driver_version=cuda,
        )

    def _mig_mode(self, handle: object) -> MigMode:
        try:
            current, _pending = self.nvml.nvmlDeviceGetMigMode(handle)
        except NVMLError_NotSupported:
            return "unsupported"
        return "enabled" if current == NVML_DEVICE_MIG_ENABLE else "disabled"
