"""The SPDK engine: drives a running spdk_tgt over its JSON-RPC Unix socket.

SPDK runs the NVMe driver in user space (polled, no interrupts, no kernel block layer)
and exports volumes over NVMe-oF, so a GPU node can read a model from a storage node
at close to local-drive latency. Mapping of Tailguard's spec onto SPDK objects:

- pool    -> an lvstore named after the pool, on one base bdev: an NVMe controller
             attached by PCIe address (`<pool>_nvme`, bdev `<pool>_nvmen1`), an AIO
             file or block device (`<pool>_aio`) or a malloc bdev (`<pool>_malloc`).
- volume  -> a thick lvol `<tenant>.<volume>` in that lvstore (alias
             `<pool>/<tenant>.<volume>`); sizes round up to the lvstore's cluster size.
- export  -> one subsystem per tenant, `<nqn_prefix>:<tenant>`, allow_any_host false,
             the tenant's volumes as namespaces, one listener on RDMA or TCP.
- qos     -> `bdev_set_qos_limit` on the lvol bdev, read back from
             `assigned_rate_limits`; an unexported lvol is held open meanwhile (as a
             namespace of the staging subsystem `<nqn_prefix>:qos.staging`), since
             SPDK refuses QoS changes on a limited bdev with no I/O channel.

The engine owns every lvstore on the target and every subsystem under its NQN prefix.

Persistence: `save_config(path)` writes the target's live configuration (the
`framework_get_config` of every subsystem, via the spdk package's own `save_config`).
Start the target with `spdk_tgt -r <socket> --json <path>` to replay it: base bdevs
are recreated, lvstores and lvols reappear from their on-disk metadata when the base
bdev is examined (NVMe and AIO; malloc pools are RAM and come back empty), QoS limits
and NVMe-oF subsystems are replayed.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spdk.rpc import config as spdk_config
from spdk.rpc.client import JSONRPCClient, JSONRPCException

from .engine import (
    MIB,
    QOS_FIELDS,
    Action,
    Capabilities,
    Device,
    EngineUnavailable,
    ExportSpec,
    ExportState,
    PoolSpec,
    PoolState,
    QosSpec,
    ReconcileResult,
    RpcError,
    SpecError,
    StorageSpec,
    StorageState,
    Transport,
    VolumeSpec,
    VolumeState,
    check_capacity,
    choose_transport,
    plan_volumes,
    qos_changes,
)
from .stats import IoCounters, IoRates, IoSample, RateTracker

DEFAULT_SOCKET = Path("/var/tmp/spdk.sock")
DEFAULT_NQN_PREFIX = "nqn.2024-06.io.tailguard"
BLOCK_SIZE = 4096
LVOL_NAME_MAX = 63  # SPDK_LVOL_NAME_MAX less the terminating NUL
REQUIRED_METHODS = frozenset(
    {
        "spdk_get_version",
        "framework_wait_init",
        "rpc_get_methods",
        "framework_get_subsystems",
        "framework_get_config",
        "bdev_get_bdevs",
        "bdev_get_iostat",
        "bdev_set_qos_limit",
        "bdev_wait_for_examine",
        "bdev_lvol_create_lvstore",
        "bdev_lvol_get_lvstores",
        "bdev_lvol_delete_lvstore",
        "bdev_lvol_create",
        "bdev_lvol_delete",
        "bdev_lvol_resize",
    }
)
NVMF_METHODS = frozenset(
    {
        "nvmf_create_transport",
        "nvmf_get_transports",
        "nvmf_create_subsystem",
        "nvmf_delete_subsystem",
        "nvmf_get_subsystems",
        "nvmf_subsystem_add_host",
        "nvmf_subsystem_remove_host",
        "nvmf_subsystem_add_ns",
        "nvmf_subsystem_remove_ns",
        "nvmf_subsystem_add_listener",
        "nvmf_subsystem_remove_listener",
    }
)
_BASE_SUFFIX = {"nvme": "_nvmen1", "aio": "_aio", "malloc": "_malloc"}
_DELETE_BASE = {"Malloc disk": "bdev_malloc_delete", "AIO disk": "bdev_aio_delete"}

Json = dict[str, Any]


@dataclass(frozen=True)
class _Snapshot:
    """One read of everything the engine manages on the target."""

    bdevs: dict[str, Json]
    lvstores: dict[str, Json]
    subsystems: dict[str, Json]
    transports: frozenset[str]


class _Rpc:
    """Lets spdk's own helpers (`save_config`) call through the engine's error handling."""

    def __init__(self, call: Callable[..., Any]) -> None:
        self._call = call

    def __getattr__(self, method: str) -> Callable[..., Any]:
        return lambda **params: self._call(method, **params)


class SpdkEngine:
    """StorageEngine over a running spdk_tgt; one JSON-RPC client per calling thread."""

    def __init__(
        self,
        socket_path: Path | str = DEFAULT_SOCKET,
        *,
        rdma_port_active: bool = False,
        nqn_prefix: str = DEFAULT_NQN_PREFIX,
        timeout_s: float = 60.0,
    ) -> None:
        self.socket_path = Path(socket_path)
        self.rdma_port_active = rdma_port_active
        self.nqn_prefix = nqn_prefix
        # Tenant names have no dots, so this never names a tenant's export; one left behind
        # by an engine stopped half-way is deleted like any export the spec does not name.
        self._staging_nqn = f"{nqn_prefix}:qos.staging"
        self.timeout_s = timeout_s
        self._local = threading.local()
        self._clients: list[Any] = []
        self._clients_lock = threading.Lock()
        self._tracker = RateTracker()

    # ---- JSON-RPC ---------------------------------------------------------------------

    def call(self, method: str, **params: Any) -> Any:
        """Call one SPDK RPC; None-valued params are left out, errors raise RpcError."""
        client = self._client()
        try:
            client.send(method, {k: v for k, v in params.items() if v is not None})
            response = client.recv()
        except (JSONRPCException, OSError) as exc:
            self._forget_client()
            detail = getattr(exc, "message", None) or str(exc)
            raise EngineUnavailable(
                f"lost the SPDK target at {self.socket_path} during {method}: {detail.strip()}"
            ) from exc
        error = response.get("error")
        if error is not None:
            raise RpcError(method, int(error.get("code", 0)), str(error.get("message", "")))
        return response.get("result")

    def _client(self) -> Any:
        client = getattr(self._local, "client", None)
        if client is not None:
            return client
        start = (
            f"start it with `spdk_tgt -r {self.socket_path}` (add `--json <saved config>` to "
            f"restore a saved configuration; `--no-huge -s 1024 -u` runs without hugepages for "
            "development) or point the agent at the socket spdk_tgt was started with"
        )
        if not self.socket_path.exists():
            raise EngineUnavailable(f"SPDK RPC socket {self.socket_path} does not exist: {start}")
        try:
            client = JSONRPCClient(str(self.socket_path), timeout=self.timeout_s)
        except JSONRPCException as exc:
            raise EngineUnavailable(
                f"cannot connect to SPDK RPC socket {self.socket_path} "
                f"({exc.message.splitlines()[-1].strip()}): {start}"
            ) from exc
        # Each JSONRPCClient adds a log handler to a logger shared per socket path; keep
        # one so a long-running agent that reconnects does not pile them up.
        logger = client.get_logger()
        for handler in logger.handlers[1:]:
            logger.removeHandler(handler)
        self._local.client = client
        with self._clients_lock:
            self._clients.append(client)
        return client

    def _forget_client(self) -> None:
        client = getattr(self._local, "client", None)
        self._local.client = None
        if client is not None:
            with self._clients_lock:
                self._clients.remove(client)
            _close_quietly(client)

    def close(self) -> None:
        with self._clients_lock:
            clients, self._clients = self._clients, []
        for client in clients:
            _close_quietly(client)
        self._local = threading.local()

    # ---- StorageEngine --------------------------------------------------------------

    def probe(self) -> Capabilities:
        version = self.call("spdk_get_version")["version"]
        self.call("framework_wait_init")
        methods = set(self.call("rpc_get_methods"))
        notes = []
        missing = sorted((REQUIRED_METHODS | NVMF_METHODS) - methods)
        if missing:
            notes.append(f"the target lacks RPC methods: {', '.join(missing)}")
        exports = NVMF_METHODS <= methods
        transports: tuple[Transport, ...] = ()
        if exports:
            transports = (
                (Transport.RDMA, Transport.TCP) if self.rdma_port_active else (Transport.TCP,)
            )
            if not self.rdma_port_active:
                notes.append("no active RDMA port reported: exports use NVMe/TCP")
        return Capabilities(
            engine="spdk",
            version=str(version),
            exports=exports,
            transports=transports,
            qos="bdev_set_qos_limit" in methods,
            direct_io=True,
            notes=tuple(notes),
        )

    def observe(self) -> StorageState:
        return self._state(self._snapshot())

    def reconcile(self, spec: StorageSpec) -> ReconcileResult:
        for volume in spec.volumes:
            if len(_lvol_name(volume)) > LVOL_NAME_MAX:
                raise SpecError(
                    f"lvol name {_lvol_name(volume)!r} is longer than SPDK's {LVOL_NAME_MAX} "
                    "characters; shorten the tenant or volume name"
                )
        snap = self._snapshot()
        actions = self._ensure_pools(spec, snap)
        if actions:
            snap = self._snapshot()
        state = self._state(snap)
        allocated = self._allocator(snap)
        plan = plan_volumes(spec, state, allocated)
        check_capacity(plan, state, allocated)
        actions += self._trim_exports(spec, snap, state)
        for gone in plan.delete:
            self.call("bdev_lvol_delete", name=gone.device)
            actions.append(Action("delete", "volume", gone.name))
        for volume in plan.create:
            self.call(
                "bdev_lvol_create",
                lvs_name=volume.pool,
                lvol_name=_lvol_name(volume),
                size_in_mib=_mib(volume.size_bytes),
            )
            detail = f"{allocated(volume.pool, volume.size_bytes)} bytes in {volume.pool}"
            actions.append(Action("create", "volume", f"{volume.tenant}/{volume.name}", detail))
        for volume, have in plan.grow:
            self.call("bdev_lvol_resize", name=have.device, size_in_mib=_mib(volume.size_bytes))
            actions.append(
                Action("grow", "volume", volume.name, f"to {_mib(volume.size_bytes)} MiB")
            )
        snap = self._snapshot()
        state = self._state(snap)
        actions += self._apply_qos(spec, snap, state)
        actions += self._ensure_exports(spec, snap, state)
        actions += self._remove_pools(spec)
        return ReconcileResult(tuple(actions))

    def stats(self) -> dict[str, IoRates]:
        iostat = self.call("bdev_get_iostat")
        tick_rate = float(iostat["tick_rate"])
        names = {
            bdev["name"]: ident[2]
            for bdev in self.call("bdev_get_bdevs")
            if (ident := _lvol_identity(bdev)) is not None
        }
        volumes = {
            names[b["name"]]: _counters(b, tick_rate) for b in iostat["bdevs"] if b["name"] in names
        }
        return self._tracker.update(IoSample(at_s=iostat["ticks"] / tick_rate, volumes=volumes))

    def save_config(self, path: Path) -> None:
        """Write the live target configuration as JSON for `spdk_tgt --json <path>`."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "w") as fd:
            spdk_config.save_config(_Rpc(self.call), fd, indent=2)
        os.replace(tmp, path)

    def nqn(self, tenant: str) -> str:
        return f"{self.nqn_prefix}:{tenant}"

    # ---- reading the target ---------------------------------------------------------

    def _snapshot(self) -> _Snapshot:
        prefix = f"{self.nqn_prefix}:"
        return _Snapshot(
            bdevs={b["name"]: b for b in self.call("bdev_get_bdevs")},
            lvstores={lvs["name"]: lvs for lvs in self.call("bdev_lvol_get_lvstores")},
            subsystems={
                s["nqn"]: s for s in self.call("nvmf_get_subsystems") if s["nqn"].startswith(prefix)
            },
            transports=frozenset(t["trtype"].upper() for t in self.call("nvmf_get_transports")),
        )

    def _state(self, snap: _Snapshot) -> StorageState:
        pools = tuple(
            PoolState(
                name=name,
                backing=(lvs["base_bdev"],),
                capacity_bytes=lvs["total_data_clusters"] * lvs["cluster_size"],
                free_bytes=lvs["free_clusters"] * lvs["cluster_size"],
            )
            for name, lvs in sorted(snap.lvstores.items())
        )
        volumes = []
        by_bdev: dict[str, str] = {}
        for bdev in snap.bdevs.values():
            ident = _lvol_identity(bdev)
            if ident is None:
                continue
            pool, tenant, name = ident
            by_bdev[bdev["name"]] = name
            limits = bdev.get("assigned_rate_limits", {})
            volumes.append(
                VolumeState(
                    name=name,
                    pool=pool,
                    tenant=tenant,
                    size_bytes=bdev["num_blocks"] * bdev["block_size"],
                    device=bdev["name"],
                    qos=QosSpec(volume=name, **{k: int(limits.get(k, 0)) for k in QOS_FIELDS}),
                )
            )
        exports = tuple(
            self._export_state(sub, by_bdev)
            for nqn, sub in sorted(snap.subsystems.items())
            if nqn != self._staging_nqn
        )
        return StorageState(
            pools=pools, volumes=tuple(sorted(volumes, key=lambda v: v.name)), exports=exports
        )

    def _export_state(self, sub: Json, by_bdev: dict[str, str]) -> ExportState:
        listeners = sub.get("listen_addresses", [])
        first = listeners[0] if listeners else None
        return ExportState(
            tenant=sub["nqn"][len(self.nqn_prefix) + 1 :],
            nqn=sub["nqn"],
            transport=Transport(first["trtype"].upper()) if first else None,
            listen_address=first["traddr"] if first else None,
            listen_port=int(first["trsvcid"]) if first else None,
            hosts=tuple(sorted(h["nqn"] for h in sub.get("hosts", []))),
            volumes=tuple(
                sorted(
                    by_bdev.get(ns["bdev_name"], ns["bdev_name"])
                    for ns in sub.get("namespaces", [])
                )
            ),
        )

    def _allocator(self, snap: _Snapshot) -> Callable[[str, int], int]:
        def allocated(pool: str, size_bytes: int) -> int:
            lvs = snap.lvstores.get(pool)
            cluster = int(lvs["cluster_size"]) if lvs else MIB
            return -(-_mib(size_bytes) * MIB // cluster) * cluster

        return allocated

    # ---- changing the target --------------------------------------------------------

    def _ensure_pools(self, spec: StorageSpec, snap: _Snapshot) -> list[Action]:
        actions = []
        for pool in spec.pools:
            device = _single_device(pool)
            base = pool.name + _BASE_SUFFIX[device.kind]
            lvs = snap.lvstores.get(pool.name)
            if lvs is not None:
                if lvs["base_bdev"] != base:
                    raise SpecError(
                        f"pool {pool.name} is an lvstore on bdev {lvs['base_bdev']}, not on "
                        f"{base}; delete the pool before moving it to another device"
                    )
                continue
            if base not in snap.bdevs:
                self._create_base(pool.name, device)
                actions.append(
                    Action("attach", "device", base, f"{device.kind} {device.address}".strip())
                )
                # An lvstore already on the device is loaded when SPDK examines the bdev.
                self.call("bdev_wait_for_examine")
                if any(lvs["name"] == pool.name for lvs in self.call("bdev_lvol_get_lvstores")):
                    actions.append(Action("import", "pool", pool.name, f"found on {base}"))
                    continue
            self.call("bdev_lvol_create_lvstore", bdev_name=base, lvs_name=pool.name)
            actions.append(Action("create", "pool", pool.name, f"lvstore on {base}"))
        return actions

    def _apply_qos(self, spec: StorageSpec, snap: _Snapshot, state: StorageState) -> list[Action]:
        """Set changed limits, holding the unexported volumes among them open meanwhile.

        SPDK applies a bdev's QoS on the thread of its I/O channels. A bdev that has limits
        and no open channel (not exported) refuses every change, removal included, with
        EAGAIN, for as long as nobody opens it: waiting and retrying cannot converge. So the
        engine does what an operator would: open those bdevs for the change, as namespaces
        of a staging subsystem that has no listener and admits no host, and close them.
        """
        volumes = {v.name: v for v in state.volumes}
        changes = qos_changes(spec, volumes)
        exported = {
            ns["bdev_name"] for sub in snap.subsystems.values() for ns in sub.get("namespaces", [])
        }
        with self._held_open(sorted({volumes[q.volume].device for q in changes} - exported)):
            for qos in changes:
                self.call("bdev_set_qos_limit", name=volumes[qos.volume].device, **qos.limits())
        return [Action("set", "qos", qos.volume, qos.describe()) for qos in changes]

    @contextmanager
    def _held_open(self, devices: list[str]) -> Iterator[None]:
        """Keep `devices` open (with I/O channels) for the duration of the block."""
        if not devices:
            yield
            return
        nqn = self._staging_nqn
        self.call(
            "nvmf_create_subsystem", nqn=nqn, allow_any_host=False, max_namespaces=len(devices)
        )
        try:
            for device in devices:
                self.call("nvmf_subsystem_add_ns", nqn=nqn, namespace={"bdev_name": device})
            yield
        finally:
            self.call("nvmf_delete_subsystem", nqn=nqn)

    def _create_base(self, pool: str, device: Device) -> None:
        if device.kind == "malloc":
            self.call(
                "bdev_malloc_create",
                name=pool + _BASE_SUFFIX["malloc"],
                num_blocks=device.size_bytes // BLOCK_SIZE,
                block_size=BLOCK_SIZE,
            )
        elif device.kind == "aio":
            path = Path(device.address)
            if not path.exists():
                if not device.size_bytes:
                    raise SpecError(
                        f"aio file {path} does not exist and the device has no size_bytes"
                    )
                with open(path, "wb") as f:
                    f.truncate(device.size_bytes)
            self.call(
                "bdev_aio_create",
                filename=str(path),
                name=pool + _BASE_SUFFIX["aio"],
                block_size=BLOCK_SIZE,
            )
        else:
            self.call(
                "bdev_nvme_attach_controller",
                name=f"{pool}_nvme",
                trtype="PCIe",
                traddr=device.address,
            )

    def _trim_exports(
        self, spec: StorageSpec, snap: _Snapshot, state: StorageState
    ) -> list[Action]:
        """Take away what exports should no longer have, before volumes are deleted."""
        actions = []
        exports = {e.tenant: e for e in spec.exports}
        for nqn, sub in sorted(snap.subsystems.items()):
            tenant = nqn[len(self.nqn_prefix) + 1 :]
            export = exports.get(tenant)
            if export is None:
                self.call("nvmf_delete_subsystem", nqn=nqn)
                actions.append(Action("delete", "export", tenant, nqn))
                continue
            keep = self._tenant_devices(spec, state, tenant)
            for ns in sub.get("namespaces", []):
                if ns["bdev_name"] not in keep:
                    self.call("nvmf_subsystem_remove_ns", nqn=nqn, nsid=ns["nsid"])
                    actions.append(Action("unexport", "volume", ns["bdev_name"], nqn))
            for host in sub.get("hosts", []):
                if host["nqn"] not in export.hosts:
                    self.call("nvmf_subsystem_remove_host", nqn=nqn, host=host["nqn"])
                    actions.append(Action("deny", "host", host["nqn"], nqn))
            wanted = self._listen_address(export)
            for address in sub.get("listen_addresses", []):
                if _same_address(address, wanted):
                    continue
                self.call(
                    "nvmf_subsystem_remove_listener",
                    nqn=nqn,
                    listen_address=_address_params(address),
                )
                actions.append(Action("remove", "listener", nqn, _show_address(address)))
        return actions

    def _ensure_exports(
        self, spec: StorageSpec, snap: _Snapshot, state: StorageState
    ) -> list[Action]:
        actions = []
        transports = set(snap.transports)
        for export in spec.exports:
            address = self._listen_address(export)
            if address["trtype"] not in transports:
                self.call("nvmf_create_transport", trtype=address["trtype"])
                transports.add(address["trtype"])
                actions.append(Action("create", "transport", address["trtype"]))
            nqn = self.nqn(export.tenant)
            sub = snap.subsystems.get(nqn)
            if sub is None:
                self.call(
                    "nvmf_create_subsystem",
                    nqn=nqn,
                    allow_any_host=False,
                    serial_number=_serial(export.tenant),
                    model_number="Tailguard volume",
                )
                actions.append(Action("create", "export", export.tenant, nqn))
                sub = {}
            hosts = {h["nqn"] for h in sub.get("hosts", [])}
            for host in export.hosts:
                if host not in hosts:
                    self.call("nvmf_subsystem_add_host", nqn=nqn, host=host)
                    actions.append(Action("allow", "host", host, nqn))
            exported = {ns["bdev_name"] for ns in sub.get("namespaces", [])}
            for device in sorted(self._tenant_devices(spec, state, export.tenant) - exported):
                self.call("nvmf_subsystem_add_ns", nqn=nqn, namespace={"bdev_name": device})
                actions.append(Action("export", "volume", device, nqn))
            if not any(_same_address(a, address) for a in sub.get("listen_addresses", [])):
                self.call("nvmf_subsystem_add_listener", nqn=nqn, listen_address=address)
                actions.append(Action("add", "listener", nqn, _show_address(address)))
        return actions

    def _remove_pools(self, spec: StorageSpec) -> list[Action]:
        wanted = {p.name for p in spec.pools}
        snap = self._snapshot()
        actions = []
        for name, lvs in sorted(snap.lvstores.items()):
            if name in wanted:
                continue
            self.call("bdev_lvol_delete_lvstore", lvs_name=name)
            actions.append(Action("delete", "pool", name))
            base = snap.bdevs.get(lvs["base_bdev"])
            if base is None or not base["name"].startswith(f"{name}_"):
                continue  # a base bdev the engine did not create
            if base["name"] == f"{name}_nvmen1":
                self.call("bdev_nvme_detach_controller", name=f"{name}_nvme")
            elif base["product_name"] in _DELETE_BASE:
                self.call(_DELETE_BASE[base["product_name"]], name=base["name"])
            actions.append(Action("detach", "device", base["name"]))
        return actions

    def _tenant_devices(self, spec: StorageSpec, state: StorageState, tenant: str) -> set[str]:
        wanted = {v.name for v in spec.volumes if v.tenant == tenant}
        return {v.device for v in state.volumes if v.name in wanted}

    def _listen_address(self, export: ExportSpec) -> dict[str, str]:
        version = ipaddress.ip_address(export.listen_address).version
        return {
            "trtype": choose_transport(export, self.rdma_port_active).value,
            "adrfam": f"IPv{version}",
            "traddr": export.listen_address,
            "trsvcid": str(export.listen_port),
        }


def _single_device(pool: PoolSpec) -> Device:
    if pool.directory is not None or len(pool.devices) != 1:
        raise SpecError(
            f"an SPDK pool sits on exactly one block device; pool {pool.name} names "
            f"{len(pool.devices)} device(s)" + (" and a directory" if pool.directory else "")
        )
    return pool.devices[0]


def _lvol_name(volume: VolumeSpec) -> str:
    return f"{volume.tenant}.{volume.name}"


def _lvol_identity(bdev: Json) -> tuple[str, str, str] | None:
    """(pool, tenant, volume) of an lvol this engine created, else None."""
    if "lvol" not in bdev.get("driver_specific", {}):
        return None
    for alias in bdev.get("aliases", []):
        pool, _, lvol = alias.partition("/")
        tenant, dot, name = lvol.partition(".")
        if dot and tenant and name:
            return pool, tenant, name
    return None


def _counters(bdev: Json, tick_rate: float) -> IoCounters:
    return IoCounters(
        read_ops=int(bdev["num_read_ops"]),
        write_ops=int(bdev["num_write_ops"]),
        bytes_read=int(bdev["bytes_read"]),
        bytes_written=int(bdev["bytes_written"]),
        read_latency_s=bdev["read_latency_ticks"] / tick_rate,
        write_latency_s=bdev["write_latency_ticks"] / tick_rate,
    )


def _mib(size_bytes: int) -> int:
    return -(-size_bytes // MIB)


def _serial(tenant: str) -> str:
    """NVMe serial numbers are at most 20 ASCII characters; derive a stable one."""
    return "TG" + hashlib.sha256(tenant.encode()).hexdigest()[:18].upper()


def _same_address(a: Json, b: Json) -> bool:
    keys = ("trtype", "traddr", "trsvcid")
    return all(str(a.get(k, "")).upper() == str(b.get(k, "")).upper() for k in keys)


def _address_params(address: Json) -> dict[str, str]:
    return {k: str(address[k]) for k in ("trtype", "adrfam", "traddr", "trsvcid") if k in address}


def _show_address(address: Json) -> str:
    return f"{address['trtype']} {address['traddr']}:{address['trsvcid']}"


def _close_quietly(client: Any) -> None:
    try:
        client.close()
    except OSError:
        pass
