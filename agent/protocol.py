"""Every message between a node agent and the control plane, and how desired state is signed.

Both sides import this one module (the control plane reaches the agent only through it), so
a field changes in one place. Models forbid unknown fields and constrain values, so a
malformed message fails with a `pydantic.ValidationError` that names the offending field
instead of half-applying. Desired state is signed with Ed25519 over `canonical_json`, which
is deterministic, so the control plane's signature survives a JSON round trip to the agent.

Imports only pydantic, the standard library and `cryptography` (a base dependency).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Callable, Hashable, Iterable
from datetime import datetime
from pathlib import Path
from typing import Annotated, Literal, TypeVar
from urllib.parse import urlsplit
from uuid import UUID

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    IPvAnyAddress,
    StringConstraints,
    ValidationInfo,
    field_validator,
    model_validator,
)

SCHEMA_VERSION: Literal[1] = 1

# Bound every integer to a signed 64-bit range so it fits a PostgreSQL bigint column.
_INT64_MAX = 2**63 - 1
_BASE64 = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"
_PRINTABLE = r"^[^\x00-\x1f\x7f]*$"

Count = Annotated[int, Field(strict=True, ge=0, le=_INT64_MAX)]
Positive = Annotated[int, Field(strict=True, ge=1, le=_INT64_MAX)]
Port = Annotated[int, Field(strict=True, ge=1, le=65535)]
Finite = Annotated[float, Field(strict=True, allow_inf_nan=False)]
NonNegativeFloat = Annotated[float, Field(strict=True, ge=0, allow_inf_nan=False)]
PositiveFloat = Annotated[float, Field(strict=True, gt=0, allow_inf_nan=False)]

Label = Annotated[
    str, StringConstraints(strict=True, min_length=1, max_length=256, pattern=_PRINTABLE)
]
"""A human-readable name that must not be empty (model name, component name)."""
FactText = Annotated[str, StringConstraints(strict=True, max_length=256, pattern=_PRINTABLE)]
"""Free text reported by hardware; may be empty because firmware sometimes leaves it blank."""
Name = Annotated[
    str, StringConstraints(strict=True, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
]
"""A machine name: volume, pool, device; safe in file names and SPDK bdev names."""
Hostname = Annotated[
    str,
    StringConstraints(strict=True, pattern=r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,251}[A-Za-z0-9])?$"),
]
Version = Annotated[str, StringConstraints(strict=True, pattern=r"^[0-9A-Za-z.+_-]{1,64}$")]
Secret = Annotated[str, StringConstraints(strict=True, pattern=r"^[\x21-\x7e]{16,512}$")]
"""A bearer secret: printable ASCII without spaces, long enough not to be guessable."""
Url = Annotated[
    str,
    StringConstraints(strict=True, max_length=2048, pattern=r"^[a-z][a-z0-9+.-]*://[\x21-\x7e]*$"),
]
Sha256Hex = Annotated[str, StringConstraints(strict=True, pattern=r"^[0-9a-f]{64}$")]
AbsolutePath = Annotated[
    str, StringConstraints(strict=True, max_length=1024, pattern=r"^/[^\x00-\x1f\x7f]*$")
]
PciBusId = Annotated[
    str,
    StringConstraints(
        strict=True,
        pattern=r"^(?:[0-9a-f]{4}|[1-9a-f][0-9a-f]{4,7}):[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$",
    ),
]
"""Lower-case domain:bus:device.function as sysfs spells it, e.g. `0000:17:00.0`; the domain
has four digits unless it is larger (VMD domains such as `10000`), never NVML's eight."""
NumaIndex = Annotated[int, Field(strict=True, ge=0, le=4095)]
Cpulist = Annotated[
    str,
    StringConstraints(
        strict=True, max_length=4096, pattern=r"^(?:\d+(?:-\d+)?(?:,\d+(?:-\d+)?)*)?$"
    ),
]
"""The kernel's cpulist format, e.g. `0-15,32-47`; empty for a memory-only node."""
Gid = Annotated[str, StringConstraints(strict=True, pattern=r"^[0-9a-f]{4}(?::[0-9a-f]{4}){7}$")]
Nqn = Annotated[
    str,
    StringConstraints(
        strict=True, max_length=223, pattern=r"^nqn\.\d{4}-\d{2}\.[A-Za-z0-9.-]+(?::[\x21-\x7e]+)?$"
    ),
]
MetricKey = Annotated[
    str, StringConstraints(strict=True, pattern=r"^[A-Za-z_][A-Za-z0-9_.:/-]{0,199}$")
]
OptionKey = Annotated[
    str, StringConstraints(strict=True, pattern=r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")
]


def _base64_of(length: int | None) -> Callable[[str], str]:
    """Build a validator that the text is standard base64 of `length` bytes (any if None)."""

    def check(value: str) -> str:
        try:
            raw = base64.b64decode(value, validate=True)
        except binascii.Error as exc:
            raise ValueError(f"not valid base64: {exc}") from None
        if length is not None and len(raw) != length:
            raise ValueError(f"must decode to {length} bytes, got {len(raw)}")
        return value

    return check


Base64Bytes = Annotated[
    str,
    StringConstraints(strict=True, max_length=1 << 22, pattern=_BASE64),
]
"""Opaque bytes as standard base64 text (sketches, signatures); at most 3 MiB decoded.
The pattern admits exactly the text that decodes, so nothing decodes it here (telemetry
carries several sketches a batch, a thousand batches a second)."""
Ed25519PublicKeyB64 = Annotated[
    str, StringConstraints(strict=True, pattern=_BASE64), AfterValidator(_base64_of(32))
]
"""An Ed25519 public key: its raw 32 bytes, standard base64."""

MigMode = Literal["disabled", "enabled", "unsupported"]
PortState = Literal["nop", "down", "init", "armed", "active", "active_defer"]
"""An RDMA port's logical state, as the kernel's `ports/N/state` file names it, lower-cased."""
LinkLayer = Literal["InfiniBand", "Ethernet"]
SloMetric = Literal["ttft", "tpot", "itl", "e2e", "queue", "availability", "storage_read"]
LatencyMetric = Literal["ttft", "tpot", "itl", "e2e", "queue", "storage_read"]
ComponentKind = Literal["worker", "gateway", "pool", "volume", "export", "qos", "slo_threshold"]
MeasuredAt = Literal["worker", "gateway"]
PoolKind = Literal["local", "spdk"]
"""`local`: a directory for the local engine; `spdk`: an lvstore on one NVMe drive."""
NvmfTransport = Literal["rdma", "tcp"]
ApplyState = Literal["applied", "failed", "rejected"]
TelemetryOutcome = Literal["stored", "duplicate", "rejected", "retry"]
"""`stored`: durable; `duplicate`: seq at or under the node's high-watermark, already stored;
`rejected`: invalid for good (log the reason, drop it); `retry`: the control plane is busy
or failing, send it again after `retry_after_s`."""
RejectionReason = Literal[
    "bad_signature", "unsigned", "stale_generation", "replayed", "hash_mismatch", "wrong_node"
]

_T = TypeVar("_T")


def _unique(items: list[_T], key: Callable[[_T], Hashable], what: str) -> list[_T]:
    """Reject duplicates, so a spec can never name one thing twice with different settings."""
    seen: set[Hashable] = set()
    for item in items:
        k = key(item)
        if k in seen:
            raise ValueError(f"duplicate {what} {k!r}")
        seen.add(k)
    return items


def _all_known(names: Iterable[str], known: set[str], what: str) -> None:
    """Reject references to volumes the same state does not declare."""
    missing = sorted(set(names) - known)
    if missing:
        raise ValueError(f"{what} refers to undeclared volume(s) {missing}; add them to volumes")


class _Model(BaseModel):
    """Strict base: unknown fields are errors and instances are immutable once validated."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _unset(value: object) -> bool:
    """For `exclude_if` of fields added after schema version 1 shipped: left out of the wire
    form while unset, a state that does not use them stays byte-identical (and hash-identical)
    to what earlier agents accept. Unset is None, an empty list, 0 or False."""
    return value is None or value == [] or (type(value) in (int, bool) and not value)


class _Message(_Model):
    """A top-level message; `schema_version` lets either side refuse a format it cannot read."""

    schema_version: Literal[1] = SCHEMA_VERSION

    @field_validator("schema_version", mode="before")
    @classmethod
    def _exactly_int(cls, value: object) -> object:
        # Literal[1] alone accepts True (True == 1); the version must be the integer itself.
        if type(value) is not int:
            raise ValueError("schema_version must be the integer 1")
        return value


# --- Hardware facts ---------------------------------------------------------------------


class HostFacts(_Model):
    """The machine as a whole; placement and capacity planning start here."""

    hostname: Hostname
    kernel: FactText
    os: FactText
    cpu_model: FactText
    cpu_count: Positive
    memory_bytes: Positive


class NumaNodeFacts(_Model):
    """One NUMA node, so workers can be pinned next to their GPU, NIC and drive."""

    index: NumaIndex
    cpulist: Cpulist
    memory_total_bytes: Count


class GpuFacts(_Model):
    """One physical GPU as NVML sees it; MIG mode decides whether it can be partitioned."""

    index: Count
    uuid: Annotated[str, StringConstraints(strict=True, pattern=r"^GPU-[0-9A-Fa-f-]{8,64}$")]
    name: FactText
    memory_total_bytes: Count
    mig_mode: MigMode
    pci_bus_id: PciBusId
    pci_root: PciBusId | None = Field(default=None, exclude_if=_unset)
    """The PCIe root port above it; None where unknown (older agents, no PCI parent)."""
    numa_node: NumaIndex | None
    driver_version: FactText
    cuda_driver_version: Annotated[str, StringConstraints(strict=True, pattern=r"^\d+\.\d+$")]


class NicFacts(_Model):
    """One RDMA port; a dual-port adapter reports two."""

    device: Name
    port: Annotated[int, Field(strict=True, ge=1, le=255)]
    state: PortState
    speed_gbps: NonNegativeFloat
    width: Annotated[str, StringConstraints(strict=True, pattern=r"^\d{1,2}X$")]
    link_layer: LinkLayer
    netdev: Name | None
    pci_bus_id: PciBusId | None
    """None for software devices (rxe, siw) that sit on no PCI function."""
    pci_root: PciBusId | None = Field(default=None, exclude_if=_unset)
    """The PCIe root port above it; None where unknown (older agents, no PCI parent)."""
    numa_node: NumaIndex | None
    gid: Gid | None


class DriveFacts(_Model):
    """One NVMe namespace, with the facts of the controller that serves it."""

    name: Annotated[str, StringConstraints(strict=True, pattern=r"^nvme\d+n\d+$")]
    model: FactText
    serial: FactText
    firmware: FactText
    capacity_bytes: Count
    logical_block_size: Annotated[int, Field(strict=True, ge=512, le=1 << 16)]
    pci_bus_id: PciBusId
    pci_root: PciBusId | None = Field(default=None, exclude_if=_unset)
    """The PCIe root port above it; None where unknown (older agents, no PCI parent)."""
    numa_node: NumaIndex | None

    @field_validator("logical_block_size")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value & (value - 1):
            raise ValueError("must be a power of two")
        return value


# --- Enrollment, inventory, liveness ----------------------------------------------------


class Enrollment(_Message):
    """First contact: the agent trades a one-time bootstrap token for a node identity."""

    bootstrap_token: Secret
    hostname: Hostname
    agent_version: Version
    host: HostFacts

    @field_validator("host")
    @classmethod
    def _same_host(cls, host: HostFacts, info: ValidationInfo) -> HostFacts:
        claimed = info.data.get("hostname")
        if claimed is not None and claimed != host.hostname:
            raise ValueError(f"host.hostname {host.hostname!r} differs from hostname {claimed!r}")
        return host


class EnrollmentGrant(_Message):
    """What enrolling gives the agent: its identity and how to trust and reach the control plane."""

    node_id: UUID
    node_credential: Secret
    control_plane_public_key: Ed25519PublicKeyB64
    queue: Annotated[str, StringConstraints(strict=True, max_length=64)]
    broker_url: Url
    heartbeat_interval_s: Annotated[float, Field(strict=True, gt=0, le=3600, allow_inf_nan=False)]

    @field_validator("queue")
    @classmethod
    def _queue_of_node(cls, queue: str, info: ValidationInfo) -> str:
        node_id = info.data.get("node_id")
        if node_id is not None and queue != queue_name(node_id):
            raise ValueError(f"must be {queue_name(node_id)!r}, the node's own queue")
        return queue


class Inventory(_Message):
    """Everything discovered on a node; the control plane replaces its hardware rows with it."""

    host: HostFacts
    numa: list[NumaNodeFacts]
    gpus: list[GpuFacts]
    nics: list[NicFacts]
    drives: list[DriveFacts]


class Heartbeat(_Message):
    """Liveness plus the applied generation, so the control plane sees nodes that lag."""

    node_id: UUID
    sent_at: AwareDatetime
    agent_version: Version
    applied_generation: Count
    """0 until the node has applied its first desired state."""
    uptime_s: NonNegativeFloat


# --- Desired state ----------------------------------------------------------------------


SYNTHETIC_SCHEME = "synthetic://"


class ArtifactRef(_Model):
    """Where model weights live and the digest the agent checks them against before use.

    `synthetic://<name>?layers=..&hidden=..` names a built-in synthetic model that the
    node generates from seeded weights: nothing to download, so no digest or size.
    """

    uri: Url
    sha256: Sha256Hex | None = None
    size_bytes: Positive | None = None

    @model_validator(mode="after")
    def _digest_unless_synthetic(self) -> ArtifactRef:
        synthetic = self.uri.startswith(SYNTHETIC_SCHEME)
        if not synthetic and (self.sha256 is None or self.size_bytes is None):
            raise ValueError("sha256 and size_bytes are required for a downloadable artifact")
        if synthetic and (self.sha256 is not None or self.size_bytes is not None):
            raise ValueError("a synthetic:// artifact has no sha256 or size_bytes")
        return self


class TenantServing(_Model):
    """A tenant a worker serves, its fair-queuing share, its limits, and the inference keys
    that name it. A limit left out (None) is unlimited."""

    tenant_id: UUID
    weight: PositiveFloat
    """Relative share of the worker under contention; only ratios between tenants matter."""
    priority: Count
    """Higher classes are admitted first and may pause lower ones."""
    key_hashes: list[Sha256Hex]
    max_concurrency: Positive | None = Field(default=None, exclude_if=_unset)
    """Most of the tenant's requests holding a batch slot at once; more wait in its queue."""
    tokens_per_s: PositiveFloat | None = Field(default=None, exclude_if=_unset)
    """Output tokens per second the tenant may receive from this worker (a token bucket)."""
    burst_tokens: Positive | None = Field(default=None, exclude_if=_unset)
    """The bucket's size; None means one second's worth of `tokens_per_s`."""

    @model_validator(mode="after")
    def _burst_needs_rate(self) -> TenantServing:
        if self.burst_tokens is not None and self.tokens_per_s is None:
            raise ValueError("burst_tokens sizes the tokens_per_s bucket; set tokens_per_s too")
        return self

    @field_validator("key_hashes")
    @classmethod
    def _distinct_keys(cls, value: list[str]) -> list[str]:
        return _unique(value, lambda h: h, "key hash")


class WorkerSpec(_Model):
    """One inference worker process (a replica of a deployment) on this node."""

    replica_id: UUID
    deployment_id: UUID
    tenant_id: UUID
    model_name: Label
    artifact: ArtifactRef
    runtime_options: dict[OptionKey, str | int | float | bool]
    gpu_indices: list[Count]
    port: Port | None = Field(default=None, exclude_if=_unset)
    """Where the worker listens; None lets the agent take a free port and report it."""
    max_batch_size: Positive
    max_tokens_per_step: Positive
    max_queue_delay_ms: Count
    max_queue_len: Positive
    tpot_steps: bool = Field(default=False, exclude_if=_unset)
    """Size each step to the tightest TPOT objective of the tenants served."""
    tenants: list[TenantServing]
    volume: Name | None = Field(default=None, exclude_if=_unset)
    """The volume a downloadable artifact is staged into; its TensorRT cache lives there too."""
    peer_key_hash: Sha256Hex | None = Field(default=None, exclude_if=_unset)
    """The deployment's peer key (its hash): gateways on other nodes read the worker's live
    state with it. None: only this node's gateway does, over loopback."""

    @field_validator("gpu_indices")
    @classmethod
    def _distinct_gpus(cls, value: list[int]) -> list[int]:
        return _unique(value, lambda i: i, "GPU index")

    @field_validator("tenants")
    @classmethod
    def _distinct_tenants(cls, value: list[TenantServing]) -> list[TenantServing]:
        return _unique(value, lambda t: t.tenant_id, "tenant")


class PeerReplica(_Model):
    """A replica on another node, where that node's agent reported its worker reachable."""

    replica_id: UUID
    url: Url


class PeerDeployment(_Model):
    """A deployment's replicas on other nodes, and the key their live state is read with."""

    deployment_id: UUID
    key: Secret
    """The deployment's peer key; its workers on every node hold its hash."""
    replicas: list[PeerReplica]

    @field_validator("replicas")
    @classmethod
    def _distinct_replicas(cls, value: list[PeerReplica]) -> list[PeerReplica]:
        return _unique(value, lambda r: r.replica_id, "peer replica")


class GatewaySpec(_Model):
    """The node's OpenAI gateway, in front of every deployment the node runs workers of: it
    routes each request to the replica with the lowest predicted TTFT and holds the tenants'
    shares and limits across those replicas (and, with counters shared in Redis, across
    every gateway of the fleet)."""

    port: Port | None = Field(default=None, exclude_if=_unset)
    """Where it listens; None lets the agent take a free port and report it."""
    peers: list[PeerDeployment] = Field(default_factory=list, exclude_if=_unset)
    """The replicas of its deployments that run on other nodes, so each deployment's
    gateways all reach all of its replicas: one endpoint serves the whole deployment."""

    @field_validator("peers")
    @classmethod
    def _distinct_deployments(cls, value: list[PeerDeployment]) -> list[PeerDeployment]:
        return _unique(value, lambda p: p.deployment_id, "peer deployment")


class PoolSpec(_Model):
    """Where this node's volumes are carved from; the node's engine must be of the pool's kind."""

    name: Name
    kind: PoolKind
    directory: AbsolutePath | None = None
    """local: the pool's directory; None puts it under the agent's state directory."""
    device: PciBusId | None = None
    """spdk: the NVMe drive (PCI address) the pool's lvstore sits on."""
    aio_path: AbsolutePath | None = Field(default=None, exclude_if=_unset)
    """spdk, instead of `device`: a file or kernel block device the lvstore sits on (SPDK's
    AIO bdev), so a machine without a spare NVMe drive can have an SPDK pool."""
    capacity_bytes: Positive | None = None
    """local: a cap on what volumes may take; None means the filesystem's size.
    spdk on an aio_path: the size its file is created at when missing."""

    @field_validator("capacity_bytes")
    @classmethod
    def _whole_blocks(cls, value: int | None, info: ValidationInfo) -> int | None:
        # SPDK refuses an AIO file whose size is not a whole number of its 4 KiB blocks.
        if value is not None and info.data.get("aio_path") and value % 4096:
            raise ValueError("an aio file's size must be a multiple of 4096 (4 KiB blocks)")
        return value

    @model_validator(mode="after")
    def _backing_matches_kind(self) -> PoolSpec:
        if self.kind == "spdk":
            if (self.device is None) == (self.aio_path is None) or self.directory:
                raise ValueError(
                    "an spdk pool names its NVMe device or its aio_path (one of them) and no "
                    "directory"
                )
            if self.device is not None and self.capacity_bytes:
                raise ValueError("an spdk pool on an NVMe device takes the drive's capacity")
        if self.kind == "local" and (self.device is not None or self.aio_path is not None):
            raise ValueError("a local pool is a directory; it names no device or aio_path")
        return self


class VolumeSpec(_Model):
    """A logical volume the storage engine keeps on this node for one tenant."""

    name: Name
    tenant_id: UUID
    pool: Name
    size_bytes: Positive
    read_probe_per_s: Count = Field(default=0, exclude_if=_unset)
    """Random 4 KiB reads per second the agent makes to measure the volume's read latency
    (the storage_read series); 0, the default, makes none and is left off the wire."""


class ExportSpec(_Model):
    """One volume exposed over NVMe-oF in subsystem `nqn`, to the listed host NQNs only.

    Exports that share an `nqn` are one subsystem (the tenant's, see `export_nqn`), so they
    name the same tenant and hosts. `transport` None lets the agent choose: RDMA when the
    node has an active RDMA port, TCP otherwise.
    """

    volume: Name
    tenant_id: UUID
    nqn: Nqn
    hosts: list[Nqn]
    transport: NvmfTransport | None = None


class QosSpec(_Model):
    """Limits on one volume, in SPDK's `bdev_set_qos_limit` terms; 0 means unlimited."""

    volume: Name
    rw_ios_per_sec: Count
    rw_mbytes_per_sec: Count
    r_mbytes_per_sec: Count
    w_mbytes_per_sec: Count


class SloThreshold(_Model):
    """A latency bound the worker counts good/total against, exactly, per request."""

    slo_id: UUID
    tenant_id: UUID
    deployment_id: UUID | None
    metric: SloMetric
    threshold_seconds: PositiveFloat | None
    """None exactly when metric is availability, which counts successes, not a bound."""
    measured_at: MeasuredAt = Field(default="worker", exclude_if=lambda v: v == "worker")
    """Whose counts the SLO takes: the workers' or the node's gateway's (both count every
    threshold: the worker sizes steps and the gateway admits by them)."""

    @field_validator("threshold_seconds")
    @classmethod
    def _threshold_matches_metric(cls, value: float | None, info: ValidationInfo) -> float | None:
        metric = info.data.get("metric")
        if metric == "availability" and value is not None:
            raise ValueError("must be null for the availability metric")
        if metric is not None and metric != "availability" and value is None:
            raise ValueError(f"is required for the {metric} metric")
        return value


class Components(_Model):
    """Everything a node should run; `content_hash` covers exactly this."""

    workers: list[WorkerSpec] = Field(default_factory=list)
    gateway: GatewaySpec | None = Field(default=None, exclude_if=_unset)
    """None: the node runs no gateway."""
    pools: list[PoolSpec] = Field(default_factory=list, exclude_if=_unset)
    volumes: list[VolumeSpec] = Field(default_factory=list)
    exports: list[ExportSpec] = Field(default_factory=list)
    qos: list[QosSpec] = Field(default_factory=list)
    slo_thresholds: list[SloThreshold] = Field(default_factory=list)

    @field_validator("workers")
    @classmethod
    def _distinct_workers(cls, value: list[WorkerSpec]) -> list[WorkerSpec]:
        _unique(value, lambda w: w.replica_id, "replica_id")
        _unique([w for w in value if w.port is not None], lambda w: w.port, "worker port")
        return value

    @field_validator("pools")
    @classmethod
    def _distinct_pools(cls, value: list[PoolSpec]) -> list[PoolSpec]:
        return _unique(value, lambda p: p.name, "pool name")

    @field_validator("volumes")
    @classmethod
    def _distinct_volumes(cls, value: list[VolumeSpec]) -> list[VolumeSpec]:
        return _unique(value, lambda v: v.name, "volume name")

    @field_validator("exports")
    @classmethod
    def _exports_known(cls, value: list[ExportSpec], info: ValidationInfo) -> list[ExportSpec]:
        if "volumes" in info.data:
            _all_known((e.volume for e in value), {v.name for v in info.data["volumes"]}, "export")
        subsystems: dict[str, tuple[UUID, frozenset[str]]] = {}
        for export in value:
            same = subsystems.setdefault(export.nqn, (export.tenant_id, frozenset(export.hosts)))
            if same != (export.tenant_id, frozenset(export.hosts)):
                raise ValueError(f"exports in subsystem {export.nqn} differ in tenant or hosts")
        return _unique(value, lambda e: e.volume, "export volume")

    @field_validator("qos")
    @classmethod
    def _qos_known(cls, value: list[QosSpec], info: ValidationInfo) -> list[QosSpec]:
        if "volumes" in info.data:
            _all_known((q.volume for q in value), {v.name for v in info.data["volumes"]}, "qos")
        return _unique(value, lambda q: q.volume, "qos volume")

    @field_validator("slo_thresholds")
    @classmethod
    def _distinct_thresholds(cls, value: list[SloThreshold]) -> list[SloThreshold]:
        return _unique(value, lambda s: (s.slo_id, s.deployment_id), "slo_id/deployment_id")

    @model_validator(mode="after")
    def _worker_volumes_known(self) -> Components:
        wanted = (w.volume for w in self.workers if w.volume is not None)
        _all_known(wanted, {v.name for v in self.volumes}, "worker")
        return self


class DesiredState(_Message):
    """One revision of what a node should run; generations only ever increase per node."""

    node_id: UUID
    generation: Positive
    content_hash: Sha256Hex
    issued_at: AwareDatetime
    components: Components

    @classmethod
    def build(
        cls, node_id: UUID, generation: int, issued_at: datetime, components: Components
    ) -> DesiredState:
        """Create a state whose `content_hash` is computed, never typed in by hand."""
        return cls(
            node_id=node_id,
            generation=generation,
            content_hash=content_hash(components),
            issued_at=issued_at,
            components=components,
        )


class SignedDesiredState(_Message):
    """The envelope that travels; `signature` may be absent so that is reported as `unsigned`."""

    state: DesiredState
    signature: Base64Bytes | None = None


# --- Results and telemetry --------------------------------------------------------------


class ComponentResult(_Model):
    """How applying one component went; `error` is text an operator can act on."""

    kind: ComponentKind
    name: Label
    ok: bool
    error: Annotated[str, StringConstraints(strict=True, min_length=1, max_length=4096)] | None
    port: Port | None = Field(default=None, exclude_if=_unset)
    """A worker's or the gateway's port on the node, once it answered as itself."""
    url: Url | None = Field(default=None, exclude_if=_unset)
    """The gateway's address for clients, as the agent is configured to advertise it; a
    worker's address for other nodes' gateways, where the agent lets them reach it."""

    @field_validator("error")
    @classmethod
    def _error_iff_failed(cls, value: str | None, info: ValidationInfo) -> str | None:
        ok = info.data.get("ok")
        if ok is True and value is not None:
            raise ValueError("must be null when ok is true")
        if ok is False and value is None:
            raise ValueError("is required when ok is false")
        return value


class AppliedStatus(_Message):
    """The agent's answer to one desired state: applied, failed in part, or refused whole."""

    node_id: UUID
    generation: Positive
    content_hash: Sha256Hex
    state: ApplyState
    components: list[ComponentResult]
    reported_at: AwareDatetime
    rejection_reason: RejectionReason | None = None
    detail: Annotated[str, StringConstraints(strict=True, max_length=4096)] | None = None
    """Why it was rejected, in words an operator can act on."""

    @field_validator("rejection_reason")
    @classmethod
    def _reason_iff_rejected(
        cls, value: RejectionReason | None, info: ValidationInfo
    ) -> RejectionReason | None:
        state = info.data.get("state")
        if state == "rejected" and value is None:
            raise ValueError("is required when state is rejected")
        if state is not None and state != "rejected" and value is not None:
            raise ValueError(f"must be null when state is {state}")
        return value


class ThresholdCount(_Model):
    """Exact good/total requests against one SLO threshold over the batch interval."""

    slo_id: UUID
    threshold_seconds: PositiveFloat | None
    good: Count
    total: Count

    @field_validator("total")
    @classmethod
    def _good_within_total(cls, value: int, info: ValidationInfo) -> int:
        good = info.data.get("good")
        if good is not None and good > value:
            raise ValueError(f"must be at least good ({good})")
        return value


class SeriesSketch(_Model):
    """A mergeable latency sketch for one tenant, deployment and metric over the interval.

    `thresholds` carries the exact counts for the SLOs on this series; availability SLOs
    (no latency bound) travel on the e2e series with `threshold_seconds` null.
    """

    tenant_id: UUID
    deployment_id: UUID | None
    """None for node-level series such as storage_read."""
    metric: LatencyMetric
    sketch: Base64Bytes
    thresholds: list[ThresholdCount]


class PoolUsage(_Model):
    """A pool as the engine holds it: what it can take and what is still free."""

    name: Name
    capacity_bytes: Count
    free_bytes: Count


class VolumeIo(_Model):
    """One volume's I/O since the previous report; MB is 2**20 bytes, as in QoS limits."""

    name: Name
    pool: Name
    read_iops: NonNegativeFloat
    write_iops: NonNegativeFloat
    read_mb_s: NonNegativeFloat
    write_mb_s: NonNegativeFloat
    mean_read_latency_us: NonNegativeFloat
    mean_write_latency_us: NonNegativeFloat


class ExportEndpoint(_Model):
    """Where a tenant's subsystem listens on this node, with the transport the agent chose."""

    tenant_id: UUID
    nqn: Nqn
    transport: NvmfTransport
    address: IPvAnyAddress
    port: Port


class StorageReport(_Message):
    """The node's storage engine as it is: pool capacity, per-volume I/O, export endpoints."""

    node_id: UUID
    reported_at: AwareDatetime
    engine: PoolKind
    pools: list[PoolUsage]
    volumes: list[VolumeIo]
    exports: list[ExportEndpoint]

    @field_validator("pools")
    @classmethod
    def _distinct_pools(cls, value: list[PoolUsage]) -> list[PoolUsage]:
        return _unique(value, lambda p: p.name, "pool name")


class UsageCount(_Model):
    """One tenant's requests and tokens on one deployment over the batch interval.

    Availability counts `completed` as good and `failed + rejected` as bad; a request the
    client cancelled counts for neither.
    """

    tenant_id: UUID
    deployment_id: UUID
    completed: Count
    failed: Count
    rejected: Count
    cancelled: Count
    input_tokens: Count
    output_tokens: Count


class TelemetryBatch(_Message):
    """One interval of measurements; `seq` makes a resend after an outage idempotent.

    Gauge keys: `gpu.<index>.<name>`, `host.<name>`, `storage.<volume>.<name>`,
    `pool.<pool>.<name>`, `worker.<deployment_id>.<name>` (see agent/shipper.py).
    `counters` are node-level counts over the interval; `usage` is per tenant+deployment.
    """

    node_id: UUID
    seq: Count
    interval_start: AwareDatetime
    interval_end: AwareDatetime
    gauges: dict[MetricKey, Finite]
    series: list[SeriesSketch]
    counters: dict[MetricKey, Count]
    usage: list[UsageCount] = Field(default_factory=list)

    @field_validator("interval_end")
    @classmethod
    def _ends_after_start(cls, value: datetime, info: ValidationInfo) -> datetime:
        start = info.data.get("interval_start")
        if start is not None and value < start:
            raise ValueError("must not be before interval_start")
        return value


class TelemetryAck(_Message):
    """The control plane's answer to one batch, on the WebSocket or as the HTTP body."""

    seq: Count
    outcome: TelemetryOutcome
    reason: Annotated[str, StringConstraints(strict=True, max_length=4096)] | None = None
    retry_after_s: NonNegativeFloat | None = None


AGENT_SOCKET_SUBPROTOCOL = "tailguard.agent.2"
"""Offered by agents that send heartbeats over the telemetry WebSocket too; a control plane
that selects it takes them there. Without it (an older control plane), heartbeats go by
HTTP as before."""
HEARTBEAT_FRAME_PREFIX = '{"heartbeat":'
"""A text frame on the telemetry WebSocket that starts so is a heartbeat, not a batch (no
valid batch does: its fields are fixed)."""


def heartbeat_frame(heartbeat: Heartbeat) -> str:
    """`{"heartbeat": <Heartbeat>}`, for the telemetry WebSocket."""
    return f"{HEARTBEAT_FRAME_PREFIX}{heartbeat.model_dump_json()}}}"


class HeartbeatFrame(_Model):
    """A heartbeat frame on the telemetry WebSocket (see `heartbeat_frame`)."""

    heartbeat: Heartbeat


STATUS_SUBPROTOCOL = "tailguard.agent.3"
"""Offered, before AGENT_SOCKET_SUBPROTOCOL, by agents that send their status reports over
the telemetry WebSocket too; a control plane that selects it answers each with a
`StatusAck` frame. Otherwise reports are POSTed as before."""
AGENT_SOCKET_SUBPROTOCOLS = (STATUS_SUBPROTOCOL, AGENT_SOCKET_SUBPROTOCOL)
"""What an agent offers, newest first."""
STATUS_FRAME_PREFIX = '{"status":'
"""A text frame on the telemetry WebSocket that starts so is a status report."""
STATUS_ACK_PREFIX = '{"status_id":'
"""A frame from the control plane that starts so is a `StatusAck`, not a `TelemetryAck`."""

StatusOutcome = Literal["recorded", "rejected", "retry"]


def status_frame(status: AppliedStatus, status_id: int) -> str:
    """`{"status": <AppliedStatus>, "id": status_id}`, for the telemetry WebSocket; the
    id, the agent's own, names the report in its ack."""
    return f'{STATUS_FRAME_PREFIX}{status.model_dump_json()},"id":{status_id}}}'


class StatusFrame(_Model):
    """A status report frame on the telemetry WebSocket (see `status_frame`)."""

    status: AppliedStatus
    id: Count


class StatusAck(_Model):
    """The control plane's answer to a status frame: `recorded` (stored, or a repeat of one
    stored), `rejected` (it never will be; `reason` says why) or `retry` (send it again)."""

    status_id: Count
    outcome: StatusOutcome
    reason: Annotated[str, StringConstraints(strict=True, max_length=4096)] | None = None


# --- Helpers ----------------------------------------------------------------------------


EXPORT_NQN_PREFIX = "nqn.2024-06.io.tailguard"


def export_nqn(tenant_id: UUID) -> str:
    """The NQN of a tenant's NVMe-oF subsystem; the SPDK engine names it the same way."""
    return f"{EXPORT_NQN_PREFIX}:{tenant_id.hex}"


def queue_name(node_id: UUID) -> str:
    """The Celery queue a node consumes; one per node so a revision reaches only its node."""
    return f"agent.{node_id}"


def canonical_json(model: BaseModel) -> bytes:
    """Deterministic UTF-8 JSON (sorted keys, no whitespace): the bytes hashed and signed."""
    return json.dumps(
        model.model_dump(mode="json"),
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        allow_nan=False,
    ).encode("utf-8")


def content_hash(components: Components) -> str:
    """SHA-256 hex of the canonical components, so unchanged content is recognisable."""
    return hashlib.sha256(canonical_json(components)).hexdigest()


def state_tag(generation: int, content_hash: str) -> str:
    """The HTTP entity tag of a desired state: an agent's periodic pull names the state it
    applied (`If-None-Match`) and gets 304 while that is still the newest, instead of the
    whole signed document."""
    return f'"{generation}-{content_hash}"'


# Domain separation: a signature over a desired state can never pass as one over another
# kind of message, even if the control plane key comes to sign other things.
SIGNING_CONTEXT = b"tailguard.desired_state.v1\x00"


class SignatureError(Exception):
    """A desired state the agent must not apply; `reason` goes into `AppliedStatus`."""

    def __init__(self, reason: RejectionReason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason: RejectionReason = reason
        self.detail = detail


def sign_state(state: DesiredState, private_key: Ed25519PrivateKey) -> SignedDesiredState:
    """Sign a desired state; refuses a state whose content_hash does not match its components."""
    expected = content_hash(state.components)
    if state.content_hash != expected:
        raise ValueError(
            f"content_hash {state.content_hash} does not match the components ({expected}); "
            "build the state with DesiredState.build"
        )
    signature = private_key.sign(SIGNING_CONTEXT + canonical_json(state))
    return SignedDesiredState(state=state, signature=base64.b64encode(signature).decode("ascii"))


def verify_state(
    signed: SignedDesiredState,
    public_key: Ed25519PublicKey,
    *,
    node_id: UUID | None = None,
    applied_generation: int = 0,
) -> DesiredState:
    """Return the state only if it is signed by `public_key`, consistent, for this node and new.

    Checks run in trust order: the signature first, so nothing unauthenticated is looked at.
    Raises SignatureError naming why the state must be rejected.
    """
    if signed.signature is None:
        raise SignatureError("unsigned", "the desired state carries no signature")
    state = signed.state
    try:
        public_key.verify(
            base64.b64decode(signed.signature), SIGNING_CONTEXT + canonical_json(state)
        )
    except InvalidSignature:
        raise SignatureError(
            "bad_signature", f"signature does not verify for generation {state.generation}"
        ) from None
    actual = content_hash(state.components)
    if state.content_hash != actual:
        raise SignatureError(
            "hash_mismatch", f"content_hash {state.content_hash} but components hash to {actual}"
        )
    if node_id is not None and state.node_id != node_id:
        raise SignatureError("wrong_node", f"addressed to node {state.node_id}, this is {node_id}")
    if state.generation < applied_generation:
        raise SignatureError(
            "stale_generation",
            f"generation {state.generation} is older than applied {applied_generation}",
        )
    if state.generation == applied_generation:
        raise SignatureError("replayed", f"generation {state.generation} is already applied")
    return state


def encode_public_key(key: Ed25519PublicKey) -> str:
    """The wire form of a public key for `EnrollmentGrant.control_plane_public_key`."""
    return base64.b64encode(key.public_bytes_raw()).decode("ascii")


def decode_public_key(text: str) -> Ed25519PublicKey:
    """The inverse of `encode_public_key`; raises ValueError on anything but 32 raw bytes."""
    return Ed25519PublicKey.from_public_bytes(base64.b64decode(_base64_of(32)(text), validate=True))


def broker_transport_options(broker_url: str) -> dict[str, object]:
    """Kombu transport options both ends derive from the same broker URL.

    `filesystem://localhost/path` (the embedded default; `filesystem:///path` works too, but
    kombu then warns on every connection that it has no hostname) names a folder shared by
    the processes of one machine; other brokers need nothing beyond their URL.
    """
    if not broker_url.startswith("filesystem://"):
        return {}
    folder = Path(urlsplit(broker_url).path or ".")
    (folder / "control").mkdir(parents=True, exist_ok=True)
    return {
        "data_folder_in": str(folder),
        "data_folder_out": str(folder),
        "control_folder": str(folder / "control"),
        "store_processed": False,
    }
