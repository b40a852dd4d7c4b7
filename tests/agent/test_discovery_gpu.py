"""GPU collector: real NVML on this GPU-less machine, and the NVML code path via a look-alike."""

from __future__ import annotations

import ctypes
from pathlib import Path

import pynvml
import pytest

from agent.discovery.base import Collector
from agent.discovery.gpu import GpuCollector, Nvml, cuda_version, normalise_pci_bus_id
from agent.protocol import GpuFacts
from tests.agent.fakes import A100_MIG, H100, L4, FakeNvml, gpu_pci_tree


def _nvml_library_present() -> bool:
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return False
    return True


def test_fake_uses_only_real_pynvml_names() -> None:
    members = [name for name in vars(Nvml) if name.startswith("nvml")]
    assert members and all(hasattr(pynvml, name) for name in members)
    assert all(hasattr(FakeNvml, name) for name in members)


def test_real_nvml_without_driver_reports_zero_gpus() -> None:
    gpus = GpuCollector(pynvml).collect()
    if _nvml_library_present():
        assert all(isinstance(gpu, GpuFacts) for gpu in gpus)  # a GPU machine: whatever it has
    else:
        assert gpus == []


def test_gpus_through_nvml(tmp_path: Path) -> None:
    gpu_pci_tree(tmp_path)
    nvml = FakeNvml([H100, A100_MIG, L4])
    collector: Collector[list[GpuFacts]] = GpuCollector(nvml, tmp_path)
    assert collector.name == "gpu"
    gpus = collector.collect()
    common = {"driver_version": "550.90.07", "cuda_driver_version": "12.4"}
    assert gpus == [
        GpuFacts(
            index=0,
            uuid=H100.uuid,
            name="NVIDIA H100 80GB HBM3",
            memory_total_bytes=85_520_809_984,
            mig_mode="disabled",
            pci_bus_id="0000:17:00.0",
            pci_root="0000:14:01.0",  # above the switch, not the switch's own ports
            numa_node=0,
            **common,
        ),
        GpuFacts(
            index=1,
            uuid=A100_MIG.uuid,
            name="NVIDIA A100-SXM4-80GB",
            memory_total_bytes=85_899_345_920,
            mig_mode="enabled",
            pci_bus_id="0000:b1:00.0",
            pci_root="0000:b0:01.0",
            numa_node=1,
            **common,
        ),
        GpuFacts(
            index=2,
            uuid=L4.uuid,
            name="NVIDIA L4",
            memory_total_bytes=24_152_899_584,
            mig_mode="unsupported",
            pci_bus_id="0000:ca:00.0",
            pci_root="0000:ca:00.0",  # on the root bus itself: its own root
            numa_node=None,
            **common,
        ),
    ]
    assert nvml.shutdowns == 1 and not nvml.initialised


def test_gpu_without_sysfs_entry_has_no_numa_node_or_root(tmp_path: Path) -> None:
    (gpu,) = GpuCollector(FakeNvml([H100]), tmp_path).collect()
    assert gpu.numa_node is None and gpu.pci_root is None


@pytest.mark.parametrize(
    "error", [pynvml.NVMLError_LibraryNotFound(), pynvml.NVMLError_DriverNotLoaded()]
)
def test_missing_library_or_driver_is_zero_gpus(tmp_path: Path, error: Exception) -> None:
    nvml = FakeNvml([H100], init_error=error)
    assert GpuCollector(nvml, tmp_path).collect() == []
    assert nvml.shutdowns == 0


def test_driver_with_no_gpus_is_zero_gpus(tmp_path: Path) -> None:
    nvml = FakeNvml([])
    assert GpuCollector(nvml, tmp_path).collect() == []
    assert nvml.shutdowns == 1


def test_other_nvml_errors_propagate_after_shutdown(tmp_path: Path) -> None:
    nvml = FakeNvml([H100], device_error=pynvml.NVMLError_GpuIsLost())
    with pytest.raises(pynvml.NVMLError_GpuIsLost):
        GpuCollector(nvml, tmp_path).collect()
    assert nvml.shutdowns == 1


def test_permission_denied_at_init_is_not_hidden(tmp_path: Path) -> None:
    nvml = FakeNvml([H100], init_error=pynvml.NVMLError_NoPermission())
    with pytest.raises(pynvml.NVMLError_NoPermission):
        GpuCollector(nvml, tmp_path).collect()


@pytest.mark.parametrize(
    ("nvml_form", "sysfs_form"),
    [
        ("00000000:17:00.0", "0000:17:00.0"),
        ("00000000:B1:00.0", "0000:b1:00.0"),
        ("00000001:0A:1F.7", "0001:0a:1f.7"),
        ("00010000:01:00.0", "10000:01:00.0"),
        ("0000:17:00.0", "0000:17:00.0"),
    ],
)
def test_pci_bus_id_is_normalised_to_sysfs_form(nvml_form: str, sysfs_form: str) -> None:
    assert normalise_pci_bus_id(nvml_form) == sysfs_form


@pytest.mark.parametrize("garbage", ["", "17:00.0", "00000000:17:00.8", "0000:17:00.0\x00"])
def test_malformed_pci_bus_id_is_an_error(garbage: str) -> None:
    with pytest.raises(ValueError, match="not a PCI bus id"):
        normalise_pci_bus_id(garbage)


@pytest.mark.parametrize(("encoded", "text"), [(12040, "12.4"), (11080, "11.8"), (12090, "12.9")])
def test_cuda_version_decoding(encoded: int, text: str) -> None:
    assert cuda_version(encoded) == text
