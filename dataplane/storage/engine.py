"""The storage engine contract: what the node agent asks of a node's storage.

The agent hands an engine a declarative `StorageSpec` (pools, volumes, per-tenant
NVMe-oF exports, per-volume QoS) and calls `reconcile`, level-triggered like the rest
of the agent: running it again with the same spec changes nothing, and anything the
spec no longer names is removed. Two engines implement the `StorageEngine` protocol:
`SpdkEngine` (a running spdk_tgt over JSON-RPC) and `LocalEngine` (directories on the
node's filesystem, for nodes without SPDK). Planning helpers shared by both live here
so that both read a spec the same way.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .stats import IoRates

NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,47}$"
NQN_PATTERN = r"^nqn\.\d{4}-\d{2}\.[a-z0-9.-]+(:.+)?$"
MIB = 1 << 20
# SPDK enforces QoS in 1 ms timeslices: an IOPS limit must be a multiple of 1000
# (SPDK_BDEV_QOS_MIN_IOS_PER_SEC) and bandwidth limits a multiple of 1 MiB/s. SPDK
# rounds other values up, so the engines round first and compare like with like.
QOS_IOPS_STEP = 1000
QOS_FIELDS = ("rw_ios_per_sec", "rw_mbytes_per_sec", "r_mbytes_per_sec", "w_mbytes_per_sec")


class Transport(StrEnum):
    RDMA = "RDMA"
    TCP = "TCP"


class _Spec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Device(_Spec):
    """One block device under an SPDK pool.

    `nvme`: a local NVMe controller by PCIe address (`0000:5e:00.0`). `aio`: a file or
    kernel block device by path (created at `size_bytes` when missing). `malloc`: RAM,
    for development only; its contents and the volumes on it vanish with the target.
    """

    kind: Literal["nvme", "aio", "malloc"]
    address: str = ""
    size_bytes: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _check(self) -> Device:
        if self.kind in ("nvme", "aio") and not self.address:
            raise ValueError(f"a {self.kind} device needs an address")
        if self.kind == "malloc" and (self.size_bytes <= 0 or self.size_bytes % 4096):
            raise ValueError("a malloc device needs size_bytes, a positive multiple of 4096")
        return self


class PoolSpec(_Spec):
    """Where volumes are carved from: SPDK devices, or a directory for the local engine.

    `capacity_bytes` caps a local pool (default: the size of its filesystem); an SPDK
    pool's capacity is whatever its lvstore holds.
    """

    name: str = Field(pattern=NAME_PATTERN)
    devices: tuple[Device, ...] = ()
    directory: str | None = None
    capacity_bytes: int | None = Field(default=None, gt=0)


class VolumeSpec(_Spec):
    """A volume owned by one tenant; names are unique on the node."""

    name: str = Field(pattern=NAME_PATTERN)
    pool: str
    tenant: str = Field(pattern=NAME_PATTERN)
    size_bytes: int = Field(gt=0)


class QosSpec(_Spec):
    """Per-volume rate limits in SPDK's units (IO/s and MiB/s); 0 means unlimited."""

    volume: str
    rw_ios_per_sec: int = Field(default=0, ge=0)
    rw_mbytes_per_sec: int = Field(default=0, ge=0)
    r_mbytes_per_sec: int = Field(default=0, ge=0)
    w_mbytes_per_sec: int = Field(default=0, ge=0)

    def normalized(self) -> QosSpec:
        """The limits as SPDK will hold them: IOPS rounded up to a multiple of 1000."""
        iops = -(-self.rw_ios_per_sec // QOS_IOPS_STEP) * QOS_IOPS_STEP
        return self.model_copy(update={"rw_ios_per_sec": iops})

    def limits(self) -> dict[str, int]:
        """The four limits keyed by their SPDK parameter names."""
        return {name: int(getattr(self, name)) for name in QOS_FIELDS}

    def describe(self) -> str:
        parts = [f"{key}={value}" for key, value in self.limits().items() if value]
        return ", ".join(parts) or "unlimited"


class ExportSpec(_Spec):
    """One NVMe-oF subsystem per tenant exposing all of that tenant's volumes.

    Only the host NQNs in `hosts` may connect. `transport` None means RDMA when the
    node has an active RDMA port and TCP otherwise.
    """

    tenant: str = Field(pattern=NAME_PATTERN)
    hosts: tuple[str, ...] = Field(min_length=1)
    listen_address: str
    listen_port: int = Field(default=4420, gt=0, lt=65536)
    transport: Transport | None = None

    @model_validator(mode="after")
    def _check(self) -> ExportSpec:
        ipaddress.ip_address(self.listen_address)
        for host in self.hosts:
            if not _matches(NQN_PATTERN, host):
                raise ValueError(f"{host!r} is not an NVMe qualified name (nqn.yyyy-mm.domain:...)")
        return self


class StorageSpec(_Spec):
    """Everything a node should hold; what it does not name is removed."""

    pools: tuple[PoolSpec, ...] = ()
    volumes: tuple[VolumeSpec, ...] = ()
    exports: tuple[ExportSpec, ...] = ()
    qos: tuple[QosSpec, ...] = ()

    @model_validator(mode="after")
    def _check(self) -> StorageSpec:
        _unique("pool", (p.name for p in self.pools))
        _unique("volume", (v.name for v in self.volumes))
        _unique("export tenant", (e.tenant for e in self.exports))
        _unique("qos volume", (q.volume for q in self.qos))
        pools = {p.name for p in self.pools}
        volumes = {v.name for v in self.volumes}
        for volume in self.volumes:
            if volume.pool not in pools:
                raise ValueError(f"volume {volume.name} names unknown pool {volume.pool}")
        for qos in self.qos:
            if qos.volume not in volumes:
                raise ValueError(f"qos names unknown volume {qos.volume}")
        return self

    def qos_for(self, volume: str) -> QosSpec:
        """The normalized limits for a volume; unlimited when the spec sets none."""
        for qos in self.qos:
            if qos.volume == volume:
                return qos.normalized()
        return QosSpec(volume=volume)


def _matches(pattern: str, value: str) -> bool:
    return re.fullmatch(pattern, value) is not None


def _unique(what: str, names: Iterable[str]) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(f"{what} {name} appears twice")
        seen.add(name)


# ---- errors ---------------------------------------------------------------------------


class StorageError(Exception):
    """Base of every error an engine raises on purpose."""


class EngineUnavailable(StorageError):
    """The engine's backend cannot be reached (no spdk_tgt, unusable root directory)."""


class SpecError(StorageError, ValueError):
    """The spec asks for something this engine cannot do to the current state."""


class CapacityError(StorageError):
    """Volumes would need more of a pool than it has free."""

    def __init__(self, pool: str, requested_bytes: int, free_bytes: int) -> None:
        self.pool = pool
        self.requested_bytes = requested_bytes
        self.free_bytes = free_bytes
        super().__init__(
            f"pool {pool} has {free_bytes} bytes free but the volumes need {requested_bytes} "
            "bytes; shrink or move volumes, or add capacity to the pool"
        )


class QuotaExceeded(StorageError):
    """A write would take a volume past its size."""

    def __init__(self, volume: str, size_bytes: int, needed_bytes: int) -> None:
        self.volume = volume
        self.size_bytes = size_bytes
        self.needed_bytes = needed_bytes
        super().__init__(
            f"volume {volume} holds {size_bytes} bytes; this write needs {needed_bytes}"
        )


class RpcError(StorageError):
    """The SPDK target answered a JSON-RPC call with an error."""

    def __init__(self, method: str, code: int, message: str) -> None:
        self.method = method
        self.code = code
        self.rpc_message = message
        super().__init__(f"SPDK RPC {method} failed: JSON-RPC error {code}: {message}")


# ---- observed state and results -------------------------------------------------------


@dataclass(frozen=True)
class Capabilities:
    """What the engine found when probed; `notes` explain anything degraded."""

    engine: str
    version: str
    exports: bool
    transports: tuple[Transport, ...]
    qos: bool
    direct_io: bool
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class PoolState:
    name: str
    backing: tuple[str, ...]
    capacity_bytes: int
    free_bytes: int


@dataclass(frozen=True)
class VolumeState:
    """A volume as it exists; `device` is the lvol bdev name or the volume directory."""

    name: str
    pool: str
    tenant: str
    size_bytes: int
    device: str
    qos: QosSpec


@dataclass(frozen=True)
class ExportState:
    tenant: str
    nqn: str
    transport: Transport | None
    listen_address: str | None
    listen_port: int | None
    hosts: tuple[str, ...]
    volumes: tuple[str, ...]


@dataclass(frozen=True)
class StorageState:
    pools: tuple[PoolState, ...] = ()
    volumes: tuple[VolumeState, ...] = ()
    exports: tuple[ExportState, ...] = ()

    def pool(self, name: str) -> PoolState | None:
        return next((p for p in self.pools if p.name == name), None)

    def volume(self, name: str) -> VolumeState | None:
        return next((v for v in self.volumes if v.name == name), None)


@dataclass(frozen=True)
class Action:
    """One change reconcile made, e.g. `create volume tenant-a/llama (1073741824 bytes)`."""

    verb: str
    kind: str
    name: str
    detail: str = ""

    def __str__(self) -> str:
        tail = f" ({self.detail})" if self.detail else ""
        return f"{self.verb} {self.kind} {self.name}{tail}"


@dataclass(frozen=True)
class ReconcileResult:
    actions: tuple[Action, ...]

    @property
    def changed(self) -> bool:
        return bool(self.actions)


class StorageEngine(Protocol):
    """What the node agent drives; both engines implement it."""

    def probe(self) -> Capabilities:
        """Check the backend is usable and report what it can do."""
        ...

    def observe(self) -> StorageState:
        """Pools, volumes (with QoS) and exports as they exist now."""
        ...

    def reconcile(self, spec: StorageSpec) -> ReconcileResult:
        """Make the node hold exactly `spec`; idempotent."""
        ...

    def stats(self) -> dict[str, IoRates]:
        """Per-volume rates since the previous call (a volume's first call is its baseline)."""
        ...

    def save_config(self, path: Path) -> None:
        """Persist the configuration so the backend comes back as it is after a restart."""
        ...

    def close(self) -> None: ...


class VolumeFile(Protocol):
    """A file inside a volume written with 4 KiB aligned I/O (used for model staging)."""

    def write_at(self, offset: int, data: memoryview) -> None: ...

    def read_at(self, offset: int, buf: memoryview) -> int: ...

    def finish(self, size_bytes: int) -> None:
        """Cut the file to its exact size and make it durable."""
        ...

    def close(self) -> None: ...


class FileVolumes(Protocol):
    """Engines whose volumes hold files on this host (the local engine)."""

    def volume_path(self, volume: str) -> Path: ...

    def create_file(self, volume: str, relpath: str, size_bytes: int) -> VolumeFile:
        """Open (creating or reusing) a file reserved at `size_bytes` within the quota."""
        ...


# ---- planning shared by the engines ---------------------------------------------------


def choose_transport(export: ExportSpec, rdma_port_active: bool) -> Transport:
    """An explicit transport wins; otherwise RDMA only when an RDMA port is up."""
    if export.transport is not None:
        return export.transport
    return Transport.RDMA if rdma_port_active else Transport.TCP


@dataclass(frozen=True)
class VolumePlan:
    create: tuple[VolumeSpec, ...]
    grow: tuple[tuple[VolumeSpec, VolumeState], ...]
    delete: tuple[VolumeState, ...]


def plan_volumes(
    spec: StorageSpec, state: StorageState, allocated: Callable[[str, int], int]
) -> VolumePlan:
    """Diff volumes; `allocated(pool, size)` is what a volume of `size` really takes.

    Volumes never shrink or change pool or tenant in place: that would lose data, so
    it is a SpecError and the operator deletes and recreates instead.
    """
    existing = {v.name: v for v in state.volumes}
    wanted = {v.name for v in spec.volumes}
    create: list[VolumeSpec] = []
    grow: list[tuple[VolumeSpec, VolumeState]] = []
    for volume in spec.volumes:
        have = existing.get(volume.name)
        if have is None:
            create.append(volume)
            continue
        if (have.pool, have.tenant) != (volume.pool, volume.tenant):
            raise SpecError(
                f"volume {volume.name} lives in pool {have.pool} for tenant {have.tenant}; "
                "moving it would lose data: remove it from the spec, then add it back"
            )
        target = allocated(volume.pool, volume.size_bytes)
        if target > have.size_bytes:
            grow.append((volume, have))
        elif target < have.size_bytes:
            raise SpecError(
                f"volume {volume.name} is {have.size_bytes} bytes; shrinking it to "
                f"{volume.size_bytes} would lose data"
            )
    delete = tuple(v for v in state.volumes if v.name not in wanted)
    return VolumePlan(create=tuple(create), grow=tuple(grow), delete=delete)


def check_capacity(
    plan: VolumePlan, state: StorageState, allocated: Callable[[str, int], int]
) -> None:
    """Raise CapacityError before touching anything if a pool cannot take the plan."""
    need: dict[str, int] = {}
    freed: dict[str, int] = {}
    for volume in plan.create:
        need[volume.pool] = need.get(volume.pool, 0) + allocated(volume.pool, volume.size_bytes)
    for volume, have in plan.grow:
        extra = allocated(volume.pool, volume.size_bytes) - have.size_bytes
        need[volume.pool] = need.get(volume.pool, 0) + extra
    for gone in plan.delete:
        freed[gone.pool] = freed.get(gone.pool, 0) + gone.size_bytes
    for pool_name, requested in need.items():
        pool = state.pool(pool_name)
        free = (pool.free_bytes if pool else 0) + freed.get(pool_name, 0)
        if requested > free:
            raise CapacityError(pool_name, requested, free)


def qos_changes(spec: StorageSpec, volumes: Mapping[str, VolumeState]) -> list[QosSpec]:
    """Normalized limits that differ from what the volumes hold now."""
    changes = []
    for volume in spec.volumes:
        desired = spec.qos_for(volume.name)
        have = volumes.get(volume.name)
        if have is None or have.qos.limits() != desired.limits():
            changes.append(desired)
    return changes
