"""Stand-ins for hardware this CI machine lacks: sysfs/procfs trees and pynvml/pyverbs look-alikes,
and the control plane's side of the telemetry contract (written concurrently elsewhere).

The trees copy the kernel's layout (class links into /sys/devices, `device` links to the PCI
function) and the exact text the kernel writes, trailing newline included. The library fakes
use the real libraries' function names and, for NVML, raise pynvml's own exception classes.
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pynvml

from agent.protocol import (
    AGENT_SOCKET_SUBPROTOCOL,
    HEARTBEAT_FRAME_PREFIX,
    STATUS_FRAME_PREFIX,
    STATUS_SUBPROTOCOL,
    AppliedStatus,
    Heartbeat,
    HeartbeatFrame,
    StatusAck,
    StatusFrame,
    TelemetryBatch,
)


def write(root: Path, relative: str, content: str) -> Path:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    return path


def link(root: Path, relative: str, target: str) -> None:
    """A symlink at `relative` whose (relative) target is written as the kernel writes it."""
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, path)


def _pci_function(sys: Path, address: str, numa_node: int, *upstream: str) -> str:
    """Create /sys/devices/pci<domain>:<bus>/<upstream bridges...>/<address> with its
    numa_node; return its path. `upstream` starts at the root port; none puts the function
    right on the root bus."""
    host_bridge = f"pci{(upstream or (address,))[0][:7]}"
    device = "/".join(("devices", host_bridge, *upstream, address))
    write(sys, f"{device}/numa_node", f"{numa_node}\n")
    link(sys, f"bus/pci/devices/{address}", f"../../../{device}")
    return device


# --- host -------------------------------------------------------------------------------

CPUINFO_BLOCK = """processor\t: {n}
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC 9454 48-Core Processor
stepping\t: 1
cpu MHz\t\t: 2750.000
cache size\t: 1024 KB
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep

"""

MEMINFO = """MemTotal:       1584711680 kB
MemFree:        1501234567 kB
MemAvailable:   1540000000 kB
Buffers:            123456 kB
HugePages_Total:       0
Hugepagesize:       2048 kB
"""

NODE_MEMINFO = """Node {n} MemTotal:       {kb} kB
Node {n} MemFree:        750000000 kB
Node {n} MemUsed:         42355840 kB
Node {n} HugePages_Total:     0
"""

OS_RELEASE = """PRETTY_NAME="Ubuntu 24.04.1 LTS"
NAME="Ubuntu"
VERSION_ID="24.04"
VERSION="24.04.1 LTS (Noble Numbat)"
ID=ubuntu
"""


@dataclass(frozen=True)
class HostRoots:
    sys: Path
    proc: Path
    os_release: Path


def host_tree(tmp: Path, numa: dict[int, tuple[str, int]] | None = None) -> HostRoots:
    """A 2-socket, 192-CPU host; `numa` maps node index to (cpulist, MemTotal kB), {} for none."""
    sys, proc = tmp / "sys", tmp / "proc"
    write(proc, "sys/kernel/hostname", "gpu-node-01\n")
    write(proc, "sys/kernel/osrelease", "6.8.0-45-generic\n")
    write(proc, "cpuinfo", "".join(CPUINFO_BLOCK.format(n=n) for n in range(4)))
    write(proc, "meminfo", MEMINFO)
    write(sys, "devices/system/cpu/online", "0-191\n")
    nodes = (
        {0: ("0-47,96-143", 792355840), 1: ("48-95,144-191", 792355840)} if numa is None else numa
    )
    for index, (cpulist, kb) in nodes.items():
        write(sys, f"devices/system/node/node{index}/cpulist", f"{cpulist}\n")
        write(sys, f"devices/system/node/node{index}/meminfo", NODE_MEMINFO.format(n=index, kb=kb))
    if nodes:
        write(sys, "devices/system/node/online", f"0-{max(nodes)}\n")
        write(sys, "devices/system/node/possible", f"0-{max(nodes)}\n")
    return HostRoots(sys=sys, proc=proc, os_release=write(tmp / "etc", "os-release", OS_RELEASE))


# --- NVML ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class FakeMemory:
    """Shape of pynvml's c_nvmlMemory_t."""

    total: int
    free: int
    used: int


@dataclass(frozen=True)
class FakeUtilization:
    """Shape of pynvml's c_nvmlUtilization_t."""

    gpu: int
    memory: int


@dataclass(frozen=True)
class FakePciInfo:
    """Shape of pynvml's nvmlPciInfo_t (the fields the collector reads, and their neighbours)."""

    busId: str  # pynvml's field name
    domain: int
    bus: int
    device: int


@dataclass(frozen=True)
class FakeGpu:
    name: str
    uuid: str
    memory_total: int
    bus_id: str
    """As NVML spells it: eight-digit domain, upper-case hex."""
    mig_mode: tuple[int, int] | None
    """(current, pending), or None for a GPU without MIG (NVML raises NotSupported)."""
    utilization: tuple[int, int] = (87, 41)
    """(gpu, memory) percent, as nvmlUtilization_t."""
    memory_used: int = 512 << 20
    power_mw: int = 412_345
    temperature_c: int = 61
    sm_clock_mhz: int = 1755
    mem_clock_mhz: int = 2619
    ecc: tuple[int, int] | None = (3, 0)
    """(corrected, uncorrected) volatile counts, or None without ECC (NotSupported)."""
    throttle_reasons: int = pynvml.nvmlClocksThrottleReasonSwPowerCap


H100 = FakeGpu(
    name="NVIDIA H100 80GB HBM3",
    uuid="GPU-5b3f3d0e-8c1a-2b7e-4f61-9d0a7c3e2b18",
    memory_total=85_520_809_984,
    bus_id="00000000:17:00.0",
    mig_mode=(pynvml.NVML_DEVICE_MIG_DISABLE, pynvml.NVML_DEVICE_MIG_DISABLE),
)
A100_MIG = FakeGpu(
    name="NVIDIA A100-SXM4-80GB",
    uuid="GPU-0e2f1a3b-4c5d-6e7f-8091-a2b3c4d5e6f7",
    memory_total=85_899_345_920,
    bus_id="00000000:B1:00.0",
    mig_mode=(pynvml.NVML_DEVICE_MIG_ENABLE, pynvml.NVML_DEVICE_MIG_ENABLE),
)
L4 = FakeGpu(
    name="NVIDIA L4",
    uuid="GPU-9f8e7d6c-5b4a-3928-1706-f5e4d3c2b1a0",
    memory_total=24_152_899_584,
    bus_id="00000000:CA:00.0",
    mig_mode=None,
)


H100_ROOT = "0000:14:01.0"
"""The root port above H100's PCIe switch, which mlx5_0 sits behind too."""
H100_SWITCH = (H100_ROOT, "0000:15:00.0", "0000:16:00.0")
"""Root port, switch upstream port, switch downstream port."""


def gpu_pci_tree(sys: Path) -> None:
    """PCI functions of H100 (node 0, behind a switch), A100_MIG (node 1, right below its
    root port); L4's sysfs reports no affinity and it sits on the root bus itself."""
    _pci_function(sys, "0000:17:00.0", 0, *H100_SWITCH)
    _pci_function(sys, "0000:b1:00.0", 1, "0000:b0:01.0")
    _pci_function(sys, "0000:ca:00.0", -1)


@dataclass
class FakeNvml:
    """pynvml look-alike: same function names, same exception classes, same init discipline."""

    gpus: list[FakeGpu]
    init_error: Exception | None = None
    device_error: Exception | None = None
    driver_version: str = "550.90.07"
    cuda_driver_version: int = 12040
    initialised: bool = False
    shutdowns: int = field(default=0)

    def _require_init(self) -> None:
        if not self.initialised:
            raise pynvml.NVMLError_Uninitialized()

    def _gpu(self, handle: object) -> FakeGpu:
        self._require_init()
        assert isinstance(handle, FakeGpu), (
            f"not a handle from nvmlDeviceGetHandleByIndex: {handle!r}"
        )
        return handle

    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise self.init_error
        self.initialised = True

    def nvmlShutdown(self) -> None:
        self._require_init()
        self.initialised = False
        self.shutdowns += 1

    def nvmlSystemGetDriverVersion(self) -> str:
        self._require_init()
        return self.driver_version

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        self._require_init()
        return self.cuda_driver_version

    def nvmlDeviceGetCount(self) -> int:
        self._require_init()
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> object:
        self._require_init()
        if self.device_error is not None:
            raise self.device_error
        if not 0 <= index < len(self.gpus):
            raise pynvml.NVMLError_InvalidArgument()
        return self.gpus[index]

    def nvmlDeviceGetName(self, handle: object) -> str:
        return self._gpu(handle).name

    def nvmlDeviceGetUUID(self, handle: object) -> str:
        return self._gpu(handle).uuid

    def nvmlDeviceGetMemoryInfo(self, handle: object) -> FakeMemory:
        gpu = self._gpu(handle)
        total, used = gpu.memory_total, gpu.memory_used
        return FakeMemory(total=total, free=total - used, used=used)

    def nvmlDeviceGetUtilizationRates(self, handle: object) -> FakeUtilization:
        gpu, memory = self._gpu(handle).utilization
        return FakeUtilization(gpu=gpu, memory=memory)

    def nvmlDeviceGetPowerUsage(self, handle: object) -> int:
        return self._gpu(handle).power_mw

    def nvmlDeviceGetTemperature(self, handle: object, sensor: int) -> int:
        if sensor != pynvml.NVML_TEMPERATURE_GPU:
            raise pynvml.NVMLError_InvalidArgument()
        return self._gpu(handle).temperature_c

    def nvmlDeviceGetClockInfo(self, handle: object, clock_type: int) -> int:
        gpu = self._gpu(handle)
        clocks = {pynvml.NVML_CLOCK_SM: gpu.sm_clock_mhz, pynvml.NVML_CLOCK_MEM: gpu.mem_clock_mhz}
        if clock_type not in clocks:
            raise pynvml.NVMLError_InvalidArgument()
        return clocks[clock_type]

    def nvmlDeviceGetTotalEccErrors(
        self, handle: object, error_type: int, counter_type: int
    ) -> int:
        ecc = self._gpu(handle).ecc
        if ecc is None:
            raise pynvml.NVMLError_NotSupported()
        if counter_type != pynvml.NVML_VOLATILE_ECC:
            raise pynvml.NVMLError_InvalidArgument()
        corrected = error_type == pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED
        return ecc[0] if corrected else ecc[1]

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, handle: object) -> int:
        return self._gpu(handle).throttle_reasons

    def nvmlDeviceGetMigMode(self, handle: object) -> list[int]:
        mode = self._gpu(handle).mig_mode
        if mode is None:
            raise pynvml.NVMLError_NotSupported()
        return list(mode)

    def nvmlDeviceGetPciInfo(self, handle: object) -> FakePciInfo:
        bus_id = self._gpu(handle).bus_id
        domain, bus, rest = bus_id.split(":")
        return FakePciInfo(
            busId=bus_id, domain=int(domain, 16), bus=int(bus, 16), device=int(rest[:2], 16)
        )


# --- RDMA ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class FakePortAttr:
    """Shape of pyverbs.device.PortAttr (ibv_port_attr): enum values, not strings."""

    state: int
    active_speed: int
    active_width: int
    link_layer: int


@dataclass(frozen=True)
class FakeDeviceAttr:
    phys_port_cnt: int


@dataclass(frozen=True)
class FakeDevice:
    """Shape of pyverbs.device.Device: `name` is bytes, as ibv_device.name."""

    name: bytes


@dataclass(frozen=True)
class RdmaPort:
    """One port described both ways: as verbs reports it and as the kernel prints it."""

    device: str
    port: int
    verbs: FakePortAttr
    state_file: str
    rate_file: str
    link_layer_file: str
    gid_file: str | None
    """None makes gids/0 unreadable, as on RoCE ports with an empty table entry."""


RDMA_PORTS = [
    RdmaPort("mlx5_0", 1, FakePortAttr(4, 64, 2, 1), "4: ACTIVE", "200 Gb/sec (4X HDR)",
             "InfiniBand", "fe80:0000:0000:0000:a088:c203:0045:6a2c"),
    RdmaPort("mlx5_1", 1, FakePortAttr(4, 32, 2, 2), "4: ACTIVE", "100 Gb/sec (4X EDR)",
             "Ethernet", "fe80:0000:0000:0000:0e42:a1ff:fe2b:3c4d"),
    RdmaPort("mlx5_2", 1, FakePortAttr(4, 128, 2, 1), "4: ACTIVE", "400 Gb/sec (4X NDR)",
             "InfiniBand", "fe80:0000:0000:0000:a088:c203:0045:7b10"),
    RdmaPort("mlx5_2", 2, FakePortAttr(1, 1, 1, 1), "1: DOWN", "2.5 Gb/sec (1X SDR)",
             "InfiniBand", "0000:0000:0000:0000:0000:0000:0000:0000"),
    RdmaPort("mlx5_10", 1, FakePortAttr(2, 8, 2, 1), "2: INIT", "40 Gb/sec (4X FDR10)",
             "InfiniBand", None),
    RdmaPort("rxe0", 1, FakePortAttr(4, 4, 1, 2), "4: ACTIVE", "10 Gb/sec (1X QDR)",
             "Ethernet", "fe80:0000:0000:0000:5054:00ff:fe12:3456"),
]  # fmt: skip


def rdma_tree(sys: Path) -> None:
    """mlx5_0 (IB, node 0, behind H100's switch), mlx5_1 (RoCE, no affinity), mlx5_2
    (dual-port IB, node 1), mlx5_10 (IB, node 0, no netdev, behind a switch), rxe0 (soft
    RoCE, no PCI parent)."""
    pci: dict[str, tuple[str, int, dict[str, int], tuple[str, ...]]] = {
        "mlx5_0": ("0000:17:00.1", 0, {"ibp23s0f1": 0}, H100_SWITCH),
        "mlx5_1": ("0000:31:00.0", -1, {"ens1f0np0": 0}, ("0000:30:02.0",)),
        "mlx5_2": ("0000:4b:00.0", 1, {"ibp75s0": 0, "ibp75s0d1": 1}, ("0000:4a:01.0",)),
        "mlx5_10": ("0000:9a:00.0", 0, {}, ("0000:97:01.0", "0000:98:00.0", "0000:99:08.0")),
    }
    ib_dirs: dict[str, str] = {}
    for device in dict.fromkeys(port.device for port in RDMA_PORTS):
        if device in pci:
            address, node, netdevs, upstream = pci[device]
            function = _pci_function(sys, address, node, *upstream)
            ib_dirs[device] = f"{function}/infiniband/{device}"
            link(sys, f"{ib_dirs[device]}/device", f"../../../{address}")
            for netdev, dev_port in netdevs.items():
                write(sys, f"{function}/net/{netdev}/dev_port", f"{dev_port}\n")
        else:
            ib_dirs[device] = f"devices/virtual/infiniband/{device}"
        link(sys, f"class/infiniband/{device}", f"../../{ib_dirs[device]}")
    for port in RDMA_PORTS:
        port_dir = f"{ib_dirs[port.device]}/ports/{port.port}"
        write(sys, f"{port_dir}/state", port.state_file + "\n")
        write(sys, f"{port_dir}/rate", port.rate_file + "\n")
        write(sys, f"{port_dir}/link_layer", port.link_layer_file + "\n")
        write(sys, f"{port_dir}/phys_state", "5: LinkUp\n")
        if port.gid_file is None:
            (sys / port_dir / "gids/0").mkdir(parents=True)  # reading it fails with an OSError
        else:
            write(sys, f"{port_dir}/gids/0", port.gid_file + "\n")


class FakeContext:
    """Shape of pyverbs.device.Context, opened on one device."""

    def __init__(self, ports: dict[int, FakePortAttr], closed: list[str], name: str) -> None:
        self._ports, self._closed, self._name = ports, closed, name

    def query_device(self) -> FakeDeviceAttr:
        return FakeDeviceAttr(phys_port_cnt=len(self._ports))

    def query_port(self, port_num: int) -> FakePortAttr:
        return self._ports[port_num]

    def close(self) -> None:
        self._closed.append(self._name)


class FakeVerbs:
    """Shape of the pyverbs.device module: get_device_list() and the Context class."""

    def __init__(self, ports: list[RdmaPort]) -> None:
        self._devices: dict[str, dict[int, FakePortAttr]] = {}
        for port in ports:
            self._devices.setdefault(port.device, {})[port.port] = port.verbs
        self.closed: list[str] = []

    def get_device_list(self) -> list[FakeDevice]:
        return [FakeDevice(name.encode()) for name in self._devices]

    def Context(self, *, name: str) -> FakeContext:  # a class in pyverbs, hence the case
        return FakeContext(self._devices[name], self.closed, name)


# --- NVMe ---------------------------------------------------------------------------------


def _controller(sys: Path, ctrl: str, *, transport: str, address: str) -> None:
    name = ctrl.rsplit("/", 1)[1]
    write(sys, f"{ctrl}/model", "SAMSUNG MZQL23T8HCLS-00A07              \n")
    write(sys, f"{ctrl}/serial", f"S64HNE0T1234{name[-1]}      \n")
    write(sys, f"{ctrl}/firmware_rev", "GDC5602Q\n")
    write(sys, f"{ctrl}/transport", f"{transport}\n")
    write(sys, f"{ctrl}/address", f"{address}\n")
    write(sys, f"{ctrl}/state", "live\n")
    link(sys, f"class/nvme/{name}", f"../../{ctrl}")
    if transport == "pcie":
        link(sys, f"{ctrl}/device", f"../../../{address}")


def _namespace(sys: Path, directory: str, name: str, sectors: int, block_size: int) -> None:
    write(sys, f"{directory}/size", f"{sectors}\n")
    write(sys, f"{directory}/queue/logical_block_size", f"{block_size}\n")
    write(sys, f"{directory}/queue/physical_block_size", f"{block_size}\n")
    link(sys, f"block/{name}", "../" + directory)


def nvme_tree(sys: Path) -> None:
    """nvme0: PCIe, node 0, one 512-byte namespace. nvme1: PCIe with native multipath, no
    affinity, two 4 KiB namespaces; both below root ports of host bridge pci0000:c0.
    nvme2: NVMe/TCP (remote, not a local drive). nvme10: PCIe, node 1, behind a switch in
    domain 0001, namespace sorts after nvme2n1 only with natural ordering."""
    ctrl0 = _pci_function(sys, "0000:c1:00.0", 0, "0000:c0:01.1") + "/nvme/nvme0"
    _controller(sys, ctrl0, transport="pcie", address="0000:c1:00.0")
    _namespace(sys, f"{ctrl0}/nvme0n1", "nvme0n1", 7_501_476_528, 512)

    ctrl1 = _pci_function(sys, "0000:c2:00.0", -1, "0000:c0:01.2") + "/nvme/nvme1"
    _controller(sys, ctrl1, transport="pcie", address="0000:c2:00.0")
    subsystem = "devices/virtual/nvme-subsystem/nvme-subsys1"
    for nsid in (1, 2):
        write(sys, f"{ctrl1}/nvme1c1n{nsid}/ana_state", "optimized\n")
        _namespace(sys, f"{subsystem}/nvme1n{nsid}", f"nvme1n{nsid}", 1_875_385_008 * 8, 4096)

    ctrl2 = "devices/virtual/nvme-fabrics/ctl/nvme2"
    _controller(sys, ctrl2, transport="tcp", address="traddr=10.0.0.5,trsvcid=4420")
    _namespace(sys, f"{ctrl2}/nvme2n1", "nvme2n1", 2_000_000, 512)

    ctrl10 = (
        _pci_function(sys, "0001:03:00.0", 1, "0001:00:03.0", "0001:01:00.0", "0001:02:01.0")
        + "/nvme/nvme10"
    )
    _controller(sys, ctrl10, transport="pcie", address="0001:03:00.0")
    _namespace(sys, f"{ctrl10}/nvme10n1", "nvme10n1", 1_000_215_216, 512)


# --- the control plane's side of the telemetry contract ----------------------------------


class TelemetryControlPlane:
    """An ASGI app speaking the control plane's side of the telemetry contract.

    `/ws/agent/` (Authorization `Node <credential>`, else close code 4401) and the POST
    fallback `/api/v1/agent/telemetry/`, over a per-node high-watermark: a seq at or
    under it is a duplicate. Scripted behaviours: `reject` (seqs answered rejected),
    `retry_once` (the first arrival of each is answered retry, and every later seq on
    that connection too until it comes again), `http_script` (statuses the POST answers
    first, in order: 429 or 5xx), `websocket=False` (refuse the upgrade), `hold_acks`
    (hold acks until the agent pauses, then answer them newest first, as acks may come
    in any order), `heartbeats` (select AGENT_SOCKET_SUBPROTOCOL when offered and take
    heartbeat frames, as control planes since that subprotocol do; without it, this is an
    older control plane, which reads every frame as a batch), `statuses` (select
    STATUS_SUBPROTOCOL when offered, take heartbeats and status reports, and answer
    each report with the next of `status_script`'s outcomes, `recorded` once it runs
    out; `close` closes the connection instead, `silent` answers nothing).
    """

    def __init__(
        self,
        credential: str,
        *,
        websocket: bool = True,
        heartbeats: bool = False,
        statuses: bool = False,
        status_script: list[str] | None = None,
        reject: frozenset[int] = frozenset(),
        retry_once: frozenset[int] = frozenset(),
        http_script: list[int] | None = None,
        hold_acks: bool = False,
        last_seq: int = 0,
    ) -> None:
        self.credential = credential
        self.websocket = websocket
        self.takes_heartbeats = heartbeats
        self.heartbeats: list[Heartbeat] = []
        self.takes_statuses = statuses
        self.status_script = list(status_script or [])
        self.statuses: list[AppliedStatus] = []
        self.reject = reject
        self.retry_pending = set(retry_once)
        self.http_script = list(http_script or [])
        self.hold_acks = hold_acks
        self.last_seq = last_seq
        self.stored: list[int] = []
        self.received: list[tuple[str, int]] = []
        self.max_outstanding = 0

    def _answer(self, seq: int, missing: list[int]) -> dict[str, object]:
        """The ack for one batch; `missing` holds the seq this connection waits for."""
        if seq <= self.last_seq:
            return {"seq": seq, "outcome": "duplicate"}
        if missing and seq != missing[0]:
            return {"seq": seq, "outcome": "retry", "retry_after_s": 0.05}
        if seq in self.retry_pending:
            self.retry_pending.discard(seq)
            missing[:] = [seq]
            return {"seq": seq, "outcome": "retry", "retry_after_s": 0.05}
        if seq in self.reject:
            return {"seq": seq, "outcome": "rejected", "reason": f"batch {seq} is malformed"}
        missing.clear()
        self.last_seq = seq
        self.stored.append(seq)
        return {"seq": seq, "outcome": "stored"}

    def _authorised(self, scope: dict[str, Any]) -> bool:
        headers = dict(scope["headers"])
        return headers.get(b"authorization") == f"Node {self.credential}".encode()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "websocket" and scope["path"] == "/ws/agent/":
            await self._socket(scope, receive, send)
        elif scope["type"] == "http" and scope["path"] == "/api/v1/agent/telemetry/":
            await self._post(scope, receive, send)
        elif scope["type"] == "http":
            await _respond(send, 404, {"detail": "not found"})

    async def _socket(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()  # websocket.connect
        if not self.websocket:
            await send({"type": "websocket.close", "code": 1008})  # refused: HTTP 403
            return
        offered = scope["subprotocols"]
        selected = None
        if self.takes_statuses and STATUS_SUBPROTOCOL in offered:
            selected = STATUS_SUBPROTOCOL
        elif (self.takes_heartbeats or self.takes_statuses) and AGENT_SOCKET_SUBPROTOCOL in offered:
            selected = AGENT_SOCKET_SUBPROTOCOL
        accept = {"subprotocol": selected} if selected else {}
        await send({"type": "websocket.accept", **accept})
        if not self._authorised(scope):
            await send({"type": "websocket.close", "code": 4401})
            return
        missing: list[int] = []
        held: list[dict[str, object]] = []
        outstanding = 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), 0.05 if held else None)
            except TimeoutError:  # the agent has stopped sending: answer, newest first
                for ack in reversed(held):
                    await send({"type": "websocket.send", "text": json.dumps(ack)})
                outstanding -= len(held)
                held.clear()
                continue
            if message["type"] != "websocket.receive":
                return
            if selected and message["text"].startswith(HEARTBEAT_FRAME_PREFIX):
                self.heartbeats.append(
                    HeartbeatFrame.model_validate_json(message["text"]).heartbeat
                )
                continue
            if selected == STATUS_SUBPROTOCOL and message["text"].startswith(STATUS_FRAME_PREFIX):
                report = StatusFrame.model_validate_json(message["text"])
                self.statuses.append(report.status)
                outcome = self.status_script.pop(0) if self.status_script else "recorded"
                if outcome == "close":
                    await send({"type": "websocket.close", "code": 1011})
                    return
                if outcome != "silent":
                    answer = StatusAck.model_validate(
                        {"status_id": report.id, "outcome": outcome, "reason": outcome}
                    )
                    await send({"type": "websocket.send", "text": answer.model_dump_json()})
                continue
            batch = TelemetryBatch.model_validate_json(message["text"])
            self.received.append(("ws", batch.seq))
            outstanding += 1
            self.max_outstanding = max(self.max_outstanding, outstanding)
            ack = self._answer(batch.seq, missing)
            if self.hold_acks:
                held.append(ack)
            else:
                await send({"type": "websocket.send", "text": json.dumps(ack)})
                outstanding -= 1

    async def _post(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if not self._authorised(scope):
            await _respond(send, 401, {"detail": "bad node credential"})
            return
        batch = TelemetryBatch.model_validate_json(body)
        self.received.append(("http", batch.seq))
        if self.http_script:
            status = self.http_script.pop(0)
            headers = [(b"retry-after", b"0")] if status == 429 else []
            await _respond(send, status, {"detail": "busy"}, headers)
            return
        ack = self._answer(batch.seq, [])
        await _respond(send, 422 if ack["outcome"] == "rejected" else 200, ack)


async def _respond(
    send: Any, status: int, body: object, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), *(headers or [])],
        }
    )
    await send({"type": "http.response.body", "body": json.dumps(body).encode()})
