"""RDMA ports (InfiniBand and RoCE) through pyverbs, or sysfs where pyverbs is not installed.

pyverbs needs rdma-core's native libraries, which most machines lack, so it is loaded only
on demand (`load_pyverbs`) and the kernel's /sys/class/infiniband files give the same link
facts. Location facts (PCI address and root port, NUMA node, netdev, GID 0) come from sysfs either way:
verbs does not report them.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Protocol

from agent.discovery.sysfs import (
    natural_key,
    numa_node,
    pci_address,
    pci_root_port,
    read_int,
    read_text,
)
from agent.protocol import LinkLayer, NicFacts, PortState

log = logging.getLogger(__name__)

# ibv_port_state, ibv_query_port(3)
_VERBS_STATE: dict[int, PortState] = {
    0: "nop",
    1: "down",
    2: "init",
    3: "armed",
    4: "active",
    5: "active_defer",
}
# Per-lane Gb/s for ibv_port_attr.active_speed, rounded as the kernel's `rate` file rounds
# them (drivers/infiniband/core/sysfs.c), so both sources report the same number.
_VERBS_LANE_GBPS = {1: 2.5, 2: 5.0, 4: 10.0, 8: 10.0, 16: 14.0, 32: 25.0, 64: 50.0, 128: 100.0}
_VERBS_WIDTH = {1: 1, 2: 4, 4: 8, 8: 12, 16: 2}
_VERBS_LINK_LAYER: dict[int, LinkLayer] = {0: "InfiniBand", 1: "InfiniBand", 2: "Ethernet"}
_SYSFS_STATE: dict[str, PortState] = {state: state for state in _VERBS_STATE.values()}
_SYSFS_LINK_LAYER: dict[str, LinkLayer] = {layer: layer for layer in _VERBS_LINK_LAYER.values()}
_SYSFS_RATE = re.compile(r"^(\d+(?:\.\d+)?) Gb/sec \((\d+)X(?: \w+)?\)$")
_NULL_GID = "0000:0000:0000:0000:0000:0000:0000:0000"


class VerbsPortAttr(Protocol):
    @property
    def state(self) -> int: ...
    @property
    def active_speed(self) -> int: ...
    @property
    def active_width(self) -> int: ...
    @property
    def link_layer(self) -> int: ...


class VerbsDeviceAttr(Protocol):
    @property
    def phys_port_cnt(self) -> int: ...


class VerbsContext(Protocol):
    def query_device(self) -> VerbsDeviceAttr: ...
    def query_port(self, port_num: int) -> VerbsPortAttr: ...
    def close(self) -> None: ...


class VerbsDevice(Protocol):
    @property
    def name(self) -> bytes: ...


class Verbs(Protocol):
    """The subset of the `pyverbs.device` module this collector calls, under its own names."""

    def get_device_list(self) -> Sequence[VerbsDevice]: ...
    def Context(self, *, name: str) -> VerbsContext: ...  # a class in pyverbs, hence the case


def load_pyverbs() -> Verbs | None:
    """`pyverbs.device` when rdma-core's Python bindings are installed, else None."""
    try:
        import pyverbs.device
    except ImportError as exc:
        log.debug("pyverbs unavailable (%s); reading RDMA ports from sysfs", exc)
        return None
    module: Verbs = pyverbs.device
    return module


class _Link(NamedTuple):
    """What a port's link is doing: the facts verbs and sysfs both know."""

    state: PortState
    speed_gbps: float
    width: str
    link_layer: LinkLayer


def _link_from_verbs(attr: VerbsPortAttr) -> _Link:
    lanes = _VERBS_WIDTH.get(attr.active_width, 0)
    return _Link(
        state=_VERBS_STATE[attr.state],
        speed_gbps=_VERBS_LANE_GBPS.get(attr.active_speed, 2.5) * lanes,
        width=f"{lanes}X",
        link_layer=_VERBS_LINK_LAYER[attr.link_layer],
    )


def parse_rate(text: str) -> tuple[float, str]:
    """The `rate` file, e.g. `100 Gb/sec (4X EDR)`, as (100.0, "4X")."""
    match = _SYSFS_RATE.match(text)
    if match is None:
        raise ValueError(f"unrecognised RDMA port rate {text!r}")
    return float(match.group(1)), f"{match.group(2)}X"


def parse_state(text: str) -> PortState:
    """The `state` file, e.g. `4: ACTIVE`, as "active"."""
    _number, _, label = text.partition(":")
    state = _SYSFS_STATE.get(label.strip().lower())
    if state is None:
        raise ValueError(f"unrecognised RDMA port state {text!r}")
    return state


def _link_from_sysfs(port_dir: Path) -> _Link:
    speed, width = parse_rate((port_dir / "rate").read_text(encoding="ascii").strip())
    layer_text = (port_dir / "link_layer").read_text(encoding="ascii").strip()
    link_layer = _SYSFS_LINK_LAYER.get(layer_text)
    if link_layer is None:
        raise ValueError(f"unrecognised link layer {layer_text!r} in {port_dir}")
    return _Link(
        state=parse_state((port_dir / "state").read_text(encoding="ascii").strip()),
        speed_gbps=speed,
        width=width,
        link_layer=link_layer,
    )


def _gid0(port_dir: Path) -> str | None:
    """GID index 0, or None when the table entry is empty (RoCE ports answer EINVAL then)."""
    try:
        gid = read_text(port_dir / "gids/0")
    except OSError:
        return None
    return None if gid in (None, _NULL_GID) else gid


def _netdev(device_dir: Path, port: int) -> str | None:
    """The network interface of this port: the one whose dev_port is port-1, or the only one."""
    net_dir = device_dir / "net"
    names = sorted((p.name for p in net_dir.iterdir()), key=natural_key) if net_dir.is_dir() else []
    for name in names:
        if read_int(net_dir / name / "dev_port") == port - 1:
            return name
    return names[0] if len(names) == 1 else None


@dataclass(frozen=True)
class RdmaCollector:
    """`verbs=None` reads link facts from sysfs; pass `load_pyverbs()` to ask the hardware."""

    verbs: Verbs | None
    sysfs_root: Path = Path("/sys")
    name: str = field(default="rdma", init=False)

    def collect(self) -> list[NicFacts]:
        class_dir = self.sysfs_root / "class/infiniband"
        if self.verbs is None and not class_dir.is_dir():
            log.debug("no %s; reporting zero RDMA ports", class_dir)
            return []
        links = self._verbs_links(self.verbs) if self.verbs is not None else self._sysfs_links()
        return [self._nic(device, port, link) for device, port, link in links]

    def _sysfs_links(self) -> Iterator[tuple[str, int, _Link]]:
        class_dir = self.sysfs_root / "class/infiniband"
        for device_dir in sorted(class_dir.iterdir(), key=lambda d: natural_key(d.name)):
            ports_dir = device_dir / "ports"
            for port_dir in sorted(ports_dir.iterdir(), key=lambda p: int(p.name)):
                yield device_dir.name, int(port_dir.name), _link_from_sysfs(port_dir)

    def _verbs_links(self, verbs: Verbs) -> Iterator[tuple[str, int, _Link]]:
        names = sorted((d.name.decode() for d in verbs.get_device_list()), key=natural_key)
        if not names:
            log.debug("pyverbs lists no RDMA devices; reporting zero RDMA ports")
        for name in names:
            context = verbs.Context(name=name)
            try:
                port_count = context.query_device().phys_port_cnt
                links = [
                    (p, _link_from_verbs(context.query_port(p))) for p in range(1, port_count + 1)
                ]
            finally:
                context.close()
            for port, link in links:
                yield name, port, link

    def _nic(self, device: str, port: int, link: _Link) -> NicFacts:
        ib_dir = self.sysfs_root / "class/infiniband" / device
        parent = ib_dir / "device"
        return NicFacts(
            device=device,
            port=port,
            state=link.state,
            speed_gbps=link.speed_gbps,
            width=link.width,
            link_layer=link.link_layer,
            netdev=_netdev(parent, port),
            pci_bus_id=pci_address(parent),
            pci_root=pci_root_port(parent),
            numa_node=numa_node(parent),
            gid=_gid0(ib_dir / "ports" / str(port)),
        )
