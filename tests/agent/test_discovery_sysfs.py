"""The PCIe root port of a device, read from where its sysfs directory lives."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.discovery.sysfs import pci_root_port
from agent.protocol import GpuFacts, Inventory
from tests.agent.fakes import link, write
from tests.agent.samples import inventory


@pytest.mark.parametrize(
    ("device", "root"),
    [
        # root port, switch upstream port, switch downstream port, endpoint
        ("pci0000:14/0000:14:01.0/0000:15:00.0/0000:16:00.0/0000:17:00.0", "0000:14:01.0"),
        ("pci0000:b0/0000:b0:01.0/0000:b1:00.0", "0000:b0:01.0"),
        # on the root bus itself (an integrated endpoint, a VM's flat bus): its own root
        ("pci0000:00/0000:00:05.0", "0000:00:05.0"),
        # behind Intel VMD: the root port of the device's own (VMD) domain
        ("pci0000:00/0000:00:0e.0/pci10000:e0/10000:e0:1d.0/10000:e1:00.0", "10000:e0:1d.0"),
    ],
)
def test_root_port_through_the_bus_link(tmp_path: Path, device: str, root: str) -> None:
    address = device.rsplit("/", 1)[1]
    write(tmp_path, f"devices/{device}/numa_node", "0\n")
    link(tmp_path, f"bus/pci/devices/{address}", f"../../../devices/{device}")
    assert pci_root_port(tmp_path / "bus/pci/devices" / address) == root


def test_no_entry_or_no_pci_parent_is_unknown(tmp_path: Path) -> None:
    assert pci_root_port(tmp_path / "bus/pci/devices/0000:17:00.0") is None
    # A soft RoCE device has no `device` link; a platform device is not on a PCI bus.
    write(tmp_path, "devices/virtual/infiniband/rxe0/ports/1/state", "4: ACTIVE\n")
    assert pci_root_port(tmp_path / "devices/virtual/infiniband/rxe0/device") is None
    write(tmp_path, "devices/platform/serial8250/uevent", "\n")
    link(tmp_path, "class/tty/ttyS0/device", "../../../devices/platform/serial8250")
    assert pci_root_port(tmp_path / "class/tty/ttyS0/device") is None


def test_facts_without_a_root_port_still_validate_and_stay_off_the_wire() -> None:
    older = inventory().model_dump(mode="json")
    assert "pci_root" not in older["gpus"][0]  # what an agent before root ports sends
    assert Inventory.model_validate(older).gpus[0].pci_root is None
    gpu = GpuFacts.model_validate({**older["gpus"][0], "pci_root": "0000:14:01.0"})
    assert gpu.model_dump()["pci_root"] == "0000:14:01.0"
    with pytest.raises(ValueError, match="pci_root"):
        GpuFacts.model_validate({**older["gpus"][0], "pci_root": "pci0000:14"})
