"""An in-test stand-in for spdk_tgt's JSON-RPC server on a Unix socket.

SPDK needs hugepages, NVMe devices and root; CI has none of them. This emulator
speaks the same protocol over the same kind of socket so `SpdkEngine` runs unchanged
against it. It accepts only the methods in `PARAMS`, with only the parameter names
the spdk package's own rpc.py sends for them (test_spdk_emulator.py compares the
table with the package so they cannot drift). Errors and results follow spdk_tgt
v26.05 as measured (the facts in ../shared/spdk/README.md; the SPDK tests run against
both): an unknown method is -32601; a bad or missing parameter is what that method's
decoder answers (-32603 "spdk_json_decode_object failed" for bdev methods, -32602
"Invalid parameters" for nvmf ones); bdev dicts with aliases, assigned_rate_limits and
driver_specific; iostat with tick_rate and ticks; lvol UUIDs from bdev_lvol_create;
the newest listener first; QoS changes refused with EAGAIN on a limited bdev that no
subsystem holds open.

Persistence is modelled like the real thing: a malloc bdev is RAM and forgets its
lvstore on restart, while an AIO file or an (emulated) NVMe drive keeps lvstore
metadata (here in a `<file>.lvs.json` sidecar) and the lvols reappear when the
device is examined; `config=` replays a saved config like `spdk_tgt --json`.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import socketserver
import threading
import time
import uuid as uuidlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
QOS_MIN_IOS_PER_SEC = 1000
MIB = 1 << 20

_LISTEN = frozenset({"trtype", "traddr", "trsvcid", "adrfam"})
_ADRFAM = {"ipv4": "IPv4", "ipv6": "IPv6", "ib": "IB", "fc": "FC", "intra_host": "INTRA_HOST"}

# Parameter names per method, as spdk's rpc.py (spdk.cli.*) sends them.
PARAMS: dict[str, frozenset[str]] = {
    "spdk_get_version": frozenset(),
    "framework_wait_init": frozenset(),
    "rpc_get_methods": frozenset({"current", "include_aliases"}),
    "framework_get_subsystems": frozenset(),
    "framework_get_config": frozenset({"name", "with_batches"}),
    "bdev_malloc_create": frozenset(
        {
            "num_blocks",
            "block_size",
            "physical_block_size",
            "name",
            "uuid",
            "optimal_io_boundary",
            "md_size",
            "md_interleave",
            "dif_type",
            "dif_is_head_of_md",
            "dif_pi_format",
            "numa_id",
        }
    ),
    "bdev_malloc_delete": frozenset({"name"}),
    "bdev_aio_create": frozenset(
        {"filename", "name", "block_size", "readonly", "fallocate", "uuid", "nowait"}
    ),
    "bdev_aio_delete": frozenset({"name"}),
    "bdev_nvme_attach_controller": frozenset(
        {
            "name",
            "trtype",
            "traddr",
            "adrfam",
            "trsvcid",
            "priority",
            "subnqn",
            "hostnqn",
            "hostaddr",
            "hostsvcid",
            "prchk_reftag",
            "prchk_guard",
            "hdgst",
            "ddgst",
            "fabrics_connect_timeout_us",
            "multipath",
            "num_io_queues",
            "ctrlr_loss_timeout_sec",
            "reconnect_delay_sec",
            "fast_io_fail_timeout_sec",
            "psk",
            "max_bdevs",
            "dhchap_key",
            "dhchap_ctrlr_key",
            "allow_unrecognized_csi",
            "disable_sq_flow_control",
            "multipath_opts",
        }
    ),
    "bdev_nvme_detach_controller": frozenset(
        {"name", "trtype", "traddr", "adrfam", "trsvcid", "subnqn", "hostaddr", "hostsvcid"}
    ),
    "bdev_lvol_create_lvstore": frozenset(
        {
            "bdev_name",
            "lvs_name",
            "cluster_sz",
            "clear_method",
            "num_md_pages_per_cluster_ratio",
            "md_page_size",
        }
    ),
    "bdev_lvol_get_lvstores": frozenset({"uuid", "lvs_name"}),
    "bdev_lvol_delete_lvstore": frozenset({"uuid", "lvs_name"}),
    "bdev_lvol_create": frozenset(
        {"lvol_name", "size_in_mib", "thin_provision", "clear_method", "uuid", "lvs_name"}
    ),
    "bdev_lvol_delete": frozenset({"name"}),
    "bdev_lvol_resize": frozenset({"name", "size_in_mib"}),
    "bdev_get_bdevs": frozenset({"name", "timeout"}),
    "bdev_set_qos_limit": frozenset(
        {"name", "rw_ios_per_sec", "rw_mbytes_per_sec", "r_mbytes_per_sec", "w_mbytes_per_sec"}
    ),
    "bdev_get_iostat": frozenset({"per_channel", "reset_mode", "names"}),
    "bdev_wait_for_examine": frozenset(),
    "nvmf_create_transport": frozenset(
        {
            "trtype",
            "tgt_name",
            "max_queue_depth",
            "max_io_qpairs_per_ctrlr",
            "in_capsule_data_size",
            "max_io_size",
            "max_aq_depth",
            "iobuf_small_cache_size",
            "iobuf_large_cache_size",
            "zcopy",
            "num_cqe",
            "max_srq_depth",
            "no_srq",
            "c2h_success",
            "dif_insert_or_strip",
            "sock_priority",
            "acceptor_backlog",
            "abort_timeout_sec",
            "no_wr_batching",
            "control_msg_num",
            "disable_mappable_bar0",
            "disable_adaptive_irq",
            "disable_shadow_doorbells",
            "acceptor_poll_rate",
            "ack_timeout",
            "data_wr_pool_size",
            "disable_command_passthru",
            "kas",
            "min_kato",
            "masked_oncs",
            "masked_fuses",
        }
    ),
    "nvmf_get_transports": frozenset({"trtype", "tgt_name"}),
    "nvmf_create_subsystem": frozenset(
        {
            "nqn",
            "tgt_name",
            "serial_number",
            "model_number",
            "allow_any_host",
            "max_namespaces",
            "ana_reporting",
            "min_cntlid",
            "max_cntlid",
            "dmrsl",
            "wzsl",
            "passthrough",
            "enable_nssr",
            "admin_label",
        }
    ),
    "nvmf_delete_subsystem": frozenset({"nqn", "tgt_name"}),
    "nvmf_subsystem_add_host": frozenset(
        {"nqn", "host", "tgt_name", "psk", "dhchap_key", "dhchap_ctrlr_key"}
    ),
    "nvmf_subsystem_remove_host": frozenset({"nqn", "host", "tgt_name", "timeout_ms"}),
    "nvmf_subsystem_add_ns": frozenset({"nqn", "tgt_name", "namespace"}),
    "nvmf_subsystem_remove_ns": frozenset({"nqn", "nsid", "tgt_name"}),
    "nvmf_subsystem_add_listener": frozenset(
        {"nqn", "tgt_name", "listen_address", "secure_channel", "ana_state", "sock_impl", "numa_id"}
    ),
    "nvmf_subsystem_remove_listener": frozenset({"nqn", "tgt_name", "listen_address"}),
    "nvmf_get_subsystems": frozenset({"nqn", "tgt_name"}),
}

# Object-valued parameters and the keys they may hold.
NESTED: dict[tuple[str, str], frozenset[str]] = {
    ("bdev_nvme_attach_controller", "multipath_opts"): frozenset({"min_io", "policy", "selector"}),
    ("nvmf_subsystem_add_ns", "namespace"): frozenset(
        {"bdev_name", "ptpl_file", "nsid", "nguid", "eui64", "uuid", "anagrpid", "no_auto_visible"}
    ),
    ("nvmf_subsystem_add_listener", "listen_address"): _LISTEN,
    ("nvmf_subsystem_remove_listener", "listen_address"): _LISTEN,
}

_IO_COUNTERS = (
    "bytes_read",
    "num_read_ops",
    "bytes_written",
    "num_write_ops",
    "bytes_unmapped",
    "num_unmap_ops",
    "bytes_copied",
    "num_copy_ops",
    "read_latency_ticks",
    "max_read_latency_ticks",
    "min_read_latency_ticks",
    "write_latency_ticks",
    "max_write_latency_ticks",
    "min_write_latency_ticks",
    "unmap_latency_ticks",
    "max_unmap_latency_ticks",
    "min_unmap_latency_ticks",
    "copy_latency_ticks",
    "max_copy_latency_ticks",
    "min_copy_latency_ticks",
)
_QOS_KEYS = ("rw_ios_per_sec", "rw_mbytes_per_sec", "r_mbytes_per_sec", "w_mbytes_per_sec")
DISCOVERY_NQN = "nqn.2014-08.org.nvmexpress.discovery"


class RpcFailure(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class DecodeFailure(Exception):
    """A parameter is missing or unknown; answered as the method's decoder does."""


# How spdk_tgt answers a parameter its decoder refuses, where that is not the usual
# -32603 of bdev methods or -32602 of nvmf ones.
_DECODE_ERRORS: dict[str, tuple[int, str]] = {
    "spdk_get_version": (INVALID_PARAMS, "spdk_get_version method requires no parameters"),
    "framework_get_subsystems": (
        INVALID_PARAMS,
        "'framework_get_subsystems' requires no arguments",
    ),
    "framework_get_config": (INVALID_PARAMS, "Invalid arguments"),
    "bdev_wait_for_examine": (INVALID_PARAMS, "bdev_wait_for_examine requires no parameters"),
}


def _decode_failure(method: str) -> RpcFailure:
    if method in _DECODE_ERRORS:
        return RpcFailure(*_DECODE_ERRORS[method])
    if method.startswith("bdev_"):
        return RpcFailure(INTERNAL_ERROR, "spdk_json_decode_object failed")
    return RpcFailure(INVALID_PARAMS, "Invalid parameters")


def _errno_failure(code: int) -> RpcFailure:
    """SPDK answers many handler failures with -errno and strerror as the message."""
    return RpcFailure(-code, os.strerror(code))


@dataclass
class _Bdev:
    name: str
    product_name: str
    block_size: int
    num_blocks: int
    uuid: str
    module: str
    aliases: list[str] = field(default_factory=list)
    driver_specific: dict[str, Any] = field(default_factory=dict)
    qos: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_QOS_KEYS, 0))
    io: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_IO_COUNTERS, 0))
    claimed: bool = False
    config: dict[str, Any] = field(default_factory=dict)  # how save_config recreates it
    backing: Path | None = None


@dataclass
class _Lvol:
    uuid: str
    name: str
    clusters: int


@dataclass
class _Lvstore:
    uuid: str
    name: str
    base_bdev: str
    cluster_size: int
    total_data_clusters: int
    lvols: dict[str, _Lvol] = field(default_factory=dict)

    @property
    def free_clusters(self) -> int:
        return self.total_data_clusters - sum(lv.clusters for lv in self.lvols.values())


@dataclass
class _Subsystem:
    nqn: str
    allow_any_host: bool
    serial_number: str
    model_number: str
    max_namespaces: int
    hosts: list[str] = field(default_factory=list)
    namespaces: list[dict[str, Any]] = field(default_factory=list)
    listeners: list[dict[str, str]] = field(default_factory=list)


class SpdkEmulator:
    """Serve the JSON-RPC subset SpdkEngine uses, with spdk_tgt's validation and shapes.

    `rdma_capable` False is a machine without an RDMA NIC (a CI machine's spdk_tgt, built
    with RDMA, then fails `nvmf_create_transport` for RDMA).
    """

    def __init__(
        self,
        socket_path: Path,
        *,
        config: Path | None = None,
        nvme_devices: Mapping[str, Path] | None = None,
        rdma_capable: bool = False,
        clock: Callable[[], float] = time.monotonic,
        tick_rate: int = 2_400_000_000,
    ) -> None:
        self.socket_path = Path(socket_path)
        self.config = config
        self.nvme_devices = dict(nvme_devices or {})
        self.rdma_capable = rdma_capable
        self.clock = clock
        self.tick_rate = tick_rate
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self._lock = threading.RLock()
        self._bdevs: dict[str, _Bdev] = {}
        self._lvstores: dict[str, _Lvstore] = {}
        self._transports: dict[str, dict[str, Any]] = {}
        self._subsystems: dict[str, _Subsystem] = {}
        self._server: socketserver.ThreadingUnixStreamServer | None = None
        self._connections: set[socket.socket] = set()

    # ---- lifecycle ------------------------------------------------------------------

    def start(self) -> SpdkEmulator:
        if self.config is not None:
            self._replay(json.loads(self.config.read_text()))
        emulator = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                emulator._serve_connection(self.request)

        self.socket_path.unlink(missing_ok=True)
        server = socketserver.ThreadingUnixStreamServer(str(self.socket_path), Handler)
        server.daemon_threads = True
        self._server = server
        threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="spdk-emulator",
            daemon=True,
        ).start()
        return self

    def stop(self) -> None:
        """Like killing spdk_tgt: the socket goes away and open connections drop."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._server = None
        with self._lock:
            for conn in list(self._connections):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self.socket_path.unlink(missing_ok=True)

    def __enter__(self) -> SpdkEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _serve_connection(self, conn: socket.socket) -> None:
        with self._lock:
            self._connections.add(conn)
        decoder = json.JSONDecoder()
        pending = ""
        try:
            while data := conn.recv(65536):
                pending += data.decode()
                while pending.strip():
                    text = pending.lstrip()
                    try:
                        request, end = decoder.raw_decode(text)
                    except ValueError:
                        pending = text
                        break
                    pending = text[end:]
                    response = self.respond(request)
                    if response is not None:
                        conn.sendall(json.dumps(response).encode())
        except OSError:
            pass
        finally:
            with self._lock:
                self._connections.discard(conn)

    # ---- protocol -------------------------------------------------------------------

    def respond(self, request: Any) -> Any:
        """The JSON-RPC 2.0 answer to one request object or batch (None for notifications)."""
        if isinstance(request, list):
            answers = [a for a in (self.respond(r) for r in request) if a is not None]
            return answers or None
        if (
            not isinstance(request, dict)
            or request.get("jsonrpc") != "2.0"
            or not isinstance(request.get("method"), str)
        ):
            return _error(None, INVALID_REQUEST, "Invalid request")
        try:
            result = self.dispatch(request["method"], request.get("params"))
        except RpcFailure as failure:
            return _error(request.get("id"), failure.code, failure.message)
        if "id" not in request:
            return None
        return {"jsonrpc": "2.0", "id": request["id"], "result": result}

    def dispatch(self, method: str, params: Any) -> Any:
        allowed = PARAMS.get(method)
        if allowed is None:
            raise RpcFailure(METHOD_NOT_FOUND, "Method not found")
        if params is None:
            params = {}
        if method == "framework_wait_init":
            params = {}  # its handler ignores parameters
        try:
            if not isinstance(params, dict):
                raise DecodeFailure
            for key, value in params.items():
                nested = NESTED.get((method, key))
                if key not in allowed or (
                    nested is not None and not (isinstance(value, dict) and set(value) <= nested)
                ):
                    raise DecodeFailure
            with self._lock:
                self.calls.append((method, params))
                handler: Callable[[dict[str, Any]], Any] = getattr(self, "_rpc_" + method)
                return handler(params)
        except DecodeFailure:
            raise _decode_failure(method) from None

    def _replay(self, config: dict[str, Any]) -> None:
        for subsystem in config.get("subsystems", []):
            for entry in subsystem.get("config") or []:
                self.dispatch(entry["method"], entry.get("params"))

    # ---- test hooks -----------------------------------------------------------------

    def record_io(
        self,
        bdev: str,
        *,
        reads: int = 0,
        bytes_read: int = 0,
        read_latency_s: float = 0.0,
        writes: int = 0,
        bytes_written: int = 0,
        write_latency_s: float = 0.0,
    ) -> None:
        """Account I/O on a bdev (by name or alias) as if an initiator had done it."""
        with self._lock:
            io = self._find_bdev(bdev).io
            io["num_read_ops"] += reads
            io["bytes_read"] += bytes_read
            io["read_latency_ticks"] += round(read_latency_s * self.tick_rate)
            io["num_write_ops"] += writes
            io["bytes_written"] += bytes_written
            io["write_latency_ticks"] += round(write_latency_s * self.tick_rate)

    # ---- framework ------------------------------------------------------------------

    def _rpc_spdk_get_version(self, p: dict[str, Any]) -> Any:
        return {
            "version": "SPDK v26.05 (emulated)",
            "fields": {"major": 26, "minor": 5, "patch": 0, "suffix": " (emulated)"},
        }

    def _rpc_framework_wait_init(self, p: dict[str, Any]) -> Any:
        return True

    def _rpc_rpc_get_methods(self, p: dict[str, Any]) -> Any:
        return sorted(PARAMS)

    def _rpc_framework_get_subsystems(self, p: dict[str, Any]) -> Any:
        return [
            {"subsystem": "bdev", "depends_on": []},
            {"subsystem": "nvmf", "depends_on": ["bdev"]},
        ]

    def _rpc_framework_get_config(self, p: dict[str, Any]) -> Any:
        name = _required(p, "name")
        if name == "bdev":
            return self._bdev_config()
        if name == "nvmf":
            return self._nvmf_config()
        raise RpcFailure(INVALID_PARAMS, f"Subsystem '{name}' not found")

    def _bdev_config(self) -> list[dict[str, Any]]:
        config: list[dict[str, Any]] = [
            b.config for b in self._bdevs.values() if b.config and b.module != "lvol"
        ]
        config.append({"method": "bdev_wait_for_examine"})
        for bdev in self._bdevs.values():
            limits = {k: v for k, v in bdev.qos.items() if v}
            if limits:
                config.append(
                    {"method": "bdev_set_qos_limit", "params": {"name": bdev.name, **limits}}
                )
        return config

    def _nvmf_config(self) -> list[dict[str, Any]]:
        config: list[dict[str, Any]] = [
            {"method": "nvmf_create_transport", "params": dict(t)}
            for t in self._transports.values()
        ]
        for sub in self._subsystems.values():
            config.append(
                {
                    "method": "nvmf_create_subsystem",
                    "params": {
                        "nqn": sub.nqn,
                        "allow_any_host": sub.allow_any_host,
                        "serial_number": sub.serial_number,
                        "model_number": sub.model_number,
                        "max_namespaces": sub.max_namespaces,
                    },
                }
            )
            config += [
                {"method": "nvmf_subsystem_add_host", "params": {"nqn": sub.nqn, "host": h}}
                for h in sub.hosts
            ]
            config += [
                {
                    "method": "nvmf_subsystem_add_ns",
                    "params": {
                        "nqn": sub.nqn,
                        "namespace": {k: ns[k] for k in ("nsid", "bdev_name", "uuid")},
                    },
                }
                for ns in sub.namespaces
            ]
            config += [
                {
                    "method": "nvmf_subsystem_add_listener",
                    "params": {"nqn": sub.nqn, "listen_address": dict(listener)},
                }
                for listener in sub.listeners
            ]
        return config

    # ---- bdevs ----------------------------------------------------------------------

    def _find_bdev(self, name: str) -> _Bdev:
        for bdev in self._bdevs.values():
            if name == bdev.name or name in bdev.aliases:
                return bdev
        raise _errno_failure(errno.ENODEV)

    def _add_bdev(self, bdev: _Bdev) -> None:
        if bdev.name in self._bdevs:
            raise _errno_failure(errno.EEXIST)
        self._bdevs[bdev.name] = bdev
        self._examine(bdev)

    def _exporting(self, bdev: _Bdev) -> bool:
        """Whether a subsystem holds the bdev open (with I/O channels) as a namespace."""
        return any(
            ns["bdev_name"] == bdev.name for s in self._subsystems.values() for ns in s.namespaces
        )

    def _rpc_bdev_get_bdevs(self, p: dict[str, Any]) -> Any:
        bdevs = [self._find_bdev(p["name"])] if "name" in p else list(self._bdevs.values())
        return [_bdev_json(b, self._exporting(b)) for b in bdevs]

    def _rpc_bdev_wait_for_examine(self, p: dict[str, Any]) -> Any:
        return True

    def _rpc_bdev_malloc_create(self, p: dict[str, Any]) -> Any:
        block_size = int(_required(p, "block_size"))
        num_blocks = int(_required(p, "num_blocks"))
        name = p.get("name") or f"Malloc{len(self._bdevs)}"
        bdev_uuid = p.get("uuid") or str(uuidlib.uuid4())
        self._add_bdev(
            _Bdev(
                name=name,
                product_name="Malloc disk",
                block_size=block_size,
                num_blocks=num_blocks,
                uuid=bdev_uuid,
                module="malloc",
                config={
                    "method": "bdev_malloc_create",
                    "params": {
                        "name": name,
                        "num_blocks": num_blocks,
                        "block_size": block_size,
                        "uuid": bdev_uuid,
                    },
                },
            )
        )
        return name

    def _rpc_bdev_aio_create(self, p: dict[str, Any]) -> Any:
        filename = Path(_required(p, "filename"))
        name = _required(p, "name")
        block_size = int(p.get("block_size") or 512)
        if not filename.exists():
            raise _errno_failure(errno.ENOENT)
        if filename.is_dir():
            raise _errno_failure(errno.EISDIR)
        if filename.stat().st_size % block_size:
            raise _errno_failure(errno.EINVAL)
        self._add_bdev(
            _Bdev(
                name=name,
                product_name="AIO disk",
                block_size=block_size,
                num_blocks=filename.stat().st_size // block_size,
                uuid=p.get("uuid") or str(uuidlib.uuid4()),
                module="aio",
                driver_specific={
                    "aio": {
                        "filename": str(filename),
                        "block_size_override": "block_size" in p,
                        "readonly": False,
                        "fallocate": False,
                    }
                },
                backing=filename,
                config={
                    "method": "bdev_aio_create",
                    "params": {"name": name, "filename": str(filename), "block_size": block_size},
                },
            )
        )
        return name

    def _rpc_bdev_nvme_attach_controller(self, p: dict[str, Any]) -> Any:
        name = _required(p, "name")
        trtype = _required(p, "trtype")
        traddr = _required(p, "traddr")
        if trtype.lower() != "pcie" or traddr not in self.nvme_devices:
            raise _errno_failure(errno.ENODEV)
        backing = self.nvme_devices[traddr]
        self._add_bdev(
            _Bdev(
                name=f"{name}n1",
                product_name="NVMe disk",
                block_size=4096,
                num_blocks=backing.stat().st_size // 4096,
                uuid=str(uuidlib.uuid5(uuidlib.NAMESPACE_URL, traddr)),
                module="nvme",
                driver_specific={
                    "nvme": [
                        {
                            "trid": {"trtype": "PCIe", "traddr": traddr},
                            "ctrlr_data": {
                                "model_number": "Emulated NVMe",
                                "serial_number": traddr,
                            },
                        }
                    ]
                },
                backing=backing,
                config={
                    "method": "bdev_nvme_attach_controller",
                    "params": {"name": name, "trtype": "PCIe", "traddr": traddr},
                },
            )
        )
        return [f"{name}n1"]

    def _delete_base(self, name: str, module: str) -> None:
        bdev = self._bdevs.get(name)
        if bdev is None or bdev.module != module:
            raise _errno_failure(errno.ENODEV)
        for lvs in [s for s in self._lvstores.values() if s.base_bdev == name]:
            self._unload_lvstore(lvs)  # hot removal: metadata stays on the device
        del self._bdevs[name]

    def _rpc_bdev_malloc_delete(self, p: dict[str, Any]) -> Any:
        self._delete_base(_required(p, "name"), "malloc")
        return True

    def _rpc_bdev_aio_delete(self, p: dict[str, Any]) -> Any:
        self._delete_base(_required(p, "name"), "aio")
        return True

    def _rpc_bdev_nvme_detach_controller(self, p: dict[str, Any]) -> Any:
        self._delete_base(f"{_required(p, 'name')}n1", "nvme")
        return True

    def _rpc_bdev_set_qos_limit(self, p: dict[str, Any]) -> Any:
        bdev = self._find_bdev(_required(p, "name"))
        given = {k: int(p[k]) for k in _QOS_KEYS if k in p}
        if not given:
            raise RpcFailure(-errno.EINVAL, "No rate limits specified")
        if any(bdev.qos.values()) and not self._exporting(bdev):
            # QoS runs on the thread of the bdev's I/O channels; with none open, the change
            # never completes and every later one is refused until the bdev is opened.
            raise RpcFailure(
                INVALID_PARAMS, f"Failed to configure rate limit: {os.strerror(errno.EAGAIN)}"
            )
        for key, value in given.items():
            if key == "rw_ios_per_sec" and value % QOS_MIN_IOS_PER_SEC:
                value += QOS_MIN_IOS_PER_SEC - value % QOS_MIN_IOS_PER_SEC  # SPDK rounds up
            bdev.qos[key] = value
        return True

    def _rpc_bdev_get_iostat(self, p: dict[str, Any]) -> Any:
        names = p.get("names")
        bdevs = [self._find_bdev(n) for n in names] if names else list(self._bdevs.values())
        return {
            "tick_rate": self.tick_rate,
            "ticks": int(self.clock() * self.tick_rate),
            "bdevs": [
                {
                    "name": b.name,
                    **b.io,
                    "io_error": {},
                }
                for b in bdevs
            ],
        }

    # ---- lvol -----------------------------------------------------------------------

    def _find_lvstore(self, p: dict[str, Any]) -> _Lvstore:
        if ("uuid" in p) == ("lvs_name" in p):
            raise RpcFailure(INVALID_PARAMS, "Invalid parameters")
        for lvs in self._lvstores.values():
            if lvs.uuid == p.get("uuid") or lvs.name == p.get("lvs_name"):
                return lvs
        raise _errno_failure(errno.ENODEV)

    def _rpc_bdev_lvol_create_lvstore(self, p: dict[str, Any]) -> Any:
        base = self._find_bdev(_required(p, "bdev_name"))
        name = _required(p, "lvs_name")
        if base.claimed or self._exporting(base):
            raise _errno_failure(errno.EPERM)
        if any(lvs.name == name for lvs in self._lvstores.values()):
            raise _errno_failure(errno.EEXIST)
        cluster = int(p.get("cluster_sz") or 4 * MIB)
        clusters = base.num_blocks * base.block_size // cluster
        md_clusters = -(-(4 + clusters) * 4096 // cluster)
        if clusters - md_clusters < 0:  # a device of exactly one cluster holds no data
            raise RpcFailure(INVALID_PARAMS, os.strerror(errno.ENOSPC))
        lvs = _Lvstore(str(uuidlib.uuid4()), name, base.name, cluster, clusters - md_clusters)
        self._lvstores[lvs.uuid] = lvs
        base.claimed = True
        self._persist(lvs)
        return lvs.uuid

    def _rpc_bdev_lvol_get_lvstores(self, p: dict[str, Any]) -> Any:
        stores = [self._find_lvstore(p)] if p else list(self._lvstores.values())
        return [
            {
                "uuid": lvs.uuid,
                "name": lvs.name,
                "base_bdev": lvs.base_bdev,
                "total_data_clusters": lvs.total_data_clusters,
                "free_clusters": lvs.free_clusters,
                "block_size": self._bdevs[lvs.base_bdev].block_size,
                "cluster_size": lvs.cluster_size,
            }
            for lvs in stores
        ]

    def _rpc_bdev_lvol_delete_lvstore(self, p: dict[str, Any]) -> Any:
        lvs = self._find_lvstore(p)
        self._unload_lvstore(lvs)
        base = self._bdevs[lvs.base_bdev]
        if base.backing is not None:
            _sidecar(base.backing).unlink(missing_ok=True)
        return True

    def _rpc_bdev_lvol_create(self, p: dict[str, Any]) -> Any:
        name = _required(p, "lvol_name")
        size_in_mib = int(_required(p, "size_in_mib"))
        lvs = self._find_lvstore({k: p[k] for k in ("uuid", "lvs_name") if k in p})
        clusters = -(-size_in_mib * MIB // lvs.cluster_size)
        if any(lv.name == name for lv in lvs.lvols.values()):
            raise _errno_failure(errno.EEXIST)
        if clusters > lvs.free_clusters:
            raise RpcFailure(INVALID_PARAMS, os.strerror(errno.ENOSPC))
        lvol = _Lvol(str(uuidlib.uuid4()), name, clusters)
        lvs.lvols[lvol.uuid] = lvol
        self._register_lvol(lvs, lvol)
        self._persist(lvs)
        return lvol.uuid

    def _lvol_of(self, name: str) -> tuple[_Lvstore, _Lvol]:
        bdev = self._find_bdev(name)
        if bdev.module != "lvol":
            raise _errno_failure(errno.ENODEV)
        for lvs in self._lvstores.values():
            if bdev.uuid in lvs.lvols:
                return lvs, lvs.lvols[bdev.uuid]
        raise _errno_failure(errno.ENODEV)

    def _rpc_bdev_lvol_delete(self, p: dict[str, Any]) -> Any:
        lvs, lvol = self._lvol_of(_required(p, "name"))
        del lvs.lvols[lvol.uuid]
        self._remove_bdev(lvol.uuid)
        self._persist(lvs)
        return True

    def _rpc_bdev_lvol_resize(self, p: dict[str, Any]) -> Any:
        lvs, lvol = self._lvol_of(_required(p, "name"))
        clusters = -(-int(_required(p, "size_in_mib")) * MIB // lvs.cluster_size)
        if clusters - lvol.clusters > lvs.free_clusters:
            raise RpcFailure(INVALID_PARAMS, os.strerror(errno.ENOSPC))
        lvol.clusters = clusters
        bdev = self._bdevs[lvol.uuid]
        bdev.num_blocks = clusters * lvs.cluster_size // bdev.block_size
        bdev.driver_specific["lvol"]["num_allocated_clusters"] = clusters
        self._persist(lvs)
        return True

    def _register_lvol(self, lvs: _Lvstore, lvol: _Lvol) -> None:
        base = self._bdevs[lvs.base_bdev]
        self._bdevs[lvol.uuid] = _Bdev(
            name=lvol.uuid,
            product_name="Logical Volume",
            block_size=base.block_size,
            num_blocks=lvol.clusters * lvs.cluster_size // base.block_size,
            uuid=lvol.uuid,
            module="lvol",
            aliases=[f"{lvs.name}/{lvol.name}"],
            driver_specific={
                "lvol": {
                    "lvol_store_uuid": lvs.uuid,
                    "base_bdev": lvs.base_bdev,
                    "thin_provision": False,
                    "num_allocated_clusters": lvol.clusters,
                    "snapshot": False,
                    "clone": False,
                    "esnap_clone": False,
                }
            },
        )

    def _remove_bdev(self, name: str) -> None:
        del self._bdevs[name]
        for sub in self._subsystems.values():  # hot removal takes the namespace with it
            sub.namespaces = [ns for ns in sub.namespaces if ns["bdev_name"] != name]

    def _unload_lvstore(self, lvs: _Lvstore) -> None:
        for lvol_uuid in lvs.lvols:
            self._remove_bdev(lvol_uuid)
        self._bdevs[lvs.base_bdev].claimed = False
        del self._lvstores[lvs.uuid]

    def _persist(self, lvs: _Lvstore) -> None:
        backing = self._bdevs[lvs.base_bdev].backing
        if backing is None:
            return  # RAM: nothing survives
        _sidecar(backing).write_text(
            json.dumps(
                {
                    "uuid": lvs.uuid,
                    "name": lvs.name,
                    "cluster_size": lvs.cluster_size,
                    "total_data_clusters": lvs.total_data_clusters,
                    "lvols": [vars(lv) for lv in lvs.lvols.values()],
                }
            )
        )

    def _examine(self, bdev: _Bdev) -> None:
        """Load an lvstore found on a device, as SPDK's lvol module does on examine."""
        if bdev.backing is None or not _sidecar(bdev.backing).exists():
            return
        meta = json.loads(_sidecar(bdev.backing).read_text())
        lvs = _Lvstore(
            meta["uuid"], meta["name"], bdev.name, meta["cluster_size"], meta["total_data_clusters"]
        )
        lvs.lvols = {lv["uuid"]: _Lvol(**lv) for lv in meta["lvols"]}
        self._lvstores[lvs.uuid] = lvs
        bdev.claimed = True
        for lvol in lvs.lvols.values():
            self._register_lvol(lvs, lvol)

    # ---- nvmf -----------------------------------------------------------------------

    def _subsystem(self, p: dict[str, Any]) -> _Subsystem:
        sub = self._subsystems.get(_required(p, "nqn"))
        if sub is None:
            raise RpcFailure(INVALID_PARAMS, "Invalid parameters")
        return sub

    def _rpc_nvmf_create_transport(self, p: dict[str, Any]) -> Any:
        trtype = _required(p, "trtype").upper()
        if trtype in self._transports:
            raise RpcFailure(INTERNAL_ERROR, f"Transport type '{trtype}' already exists")
        if trtype not in ("TCP", "RDMA"):
            raise RpcFailure(INVALID_PARAMS, f"Invalid transport type '{trtype}'")
        if trtype == "RDMA" and not self.rdma_capable:
            raise RpcFailure(INTERNAL_ERROR, "Failed to create transport.")
        self._transports[trtype] = {**p, "trtype": trtype}
        return True

    def _rpc_nvmf_get_transports(self, p: dict[str, Any]) -> Any:
        return [
            {
                "trtype": trtype,
                "max_queue_depth": 128,
                "max_io_qpairs_per_ctrlr": 127,
                "in_capsule_data_size": 4096,
                "max_io_size": 131072,
                "io_unit_size": 131072,
                "max_aq_depth": 128,
                "num_shared_buffers": 511,
                "buf_cache_size": 4294967295,
                "abort_timeout_sec": 1,
                "zcopy": False,
            }
            for trtype in self._transports
            if p.get("trtype", trtype).upper() == trtype
        ]

    def _rpc_nvmf_create_subsystem(self, p: dict[str, Any]) -> Any:
        nqn = _required(p, "nqn")
        if nqn in self._subsystems or not nqn.startswith("nqn.") or len(nqn) > 223:
            raise RpcFailure(INTERNAL_ERROR, f"Unable to create subsystem {nqn}")
        self._subsystems[nqn] = _Subsystem(
            nqn=nqn,
            allow_any_host=bool(p.get("allow_any_host", False)),
            serial_number=p.get("serial_number", "00000000000000000000"),
            model_number=p.get("model_number", "SPDK bdev Controller"),
            max_namespaces=int(p.get("max_namespaces", 32)),
        )
        return True

    def _rpc_nvmf_delete_subsystem(self, p: dict[str, Any]) -> Any:
        self._subsystem(p)
        del self._subsystems[p["nqn"]]
        return True

    def _rpc_nvmf_subsystem_add_host(self, p: dict[str, Any]) -> Any:
        sub = self._subsystem(p)
        host = _required(p, "host")
        if host in sub.hosts:
            raise RpcFailure(INTERNAL_ERROR, "Internal error")
        sub.hosts.append(host)
        return True

    def _rpc_nvmf_subsystem_remove_host(self, p: dict[str, Any]) -> Any:
        sub = self._subsystem(p)
        host = _required(p, "host")
        if host not in sub.hosts:
            raise RpcFailure(INTERNAL_ERROR, "Internal error")
        sub.hosts.remove(host)
        return True

    def _rpc_nvmf_subsystem_add_ns(self, p: dict[str, Any]) -> Any:
        sub = self._subsystem(p)
        ns = _required(p, "namespace")
        bdev = self._find_bdev(_required(ns, "bdev_name"))
        if (
            bdev.claimed  # by an lvstore
            or self._exporting(bdev)  # a namespace claims its bdev exclusive_write
            or len(sub.namespaces) >= sub.max_namespaces
        ):
            raise RpcFailure(INVALID_PARAMS, "Invalid parameters")
        nsid = int(ns.get("nsid") or 1 + max((n["nsid"] for n in sub.namespaces), default=0))
        sub.namespaces.append(
            {
                "nsid": nsid,
                "bdev_name": bdev.name,
                "name": bdev.name,
                "uuid": ns.get("uuid", bdev.uuid),
            }
        )
        return nsid

    def _rpc_nvmf_subsystem_remove_ns(self, p: dict[str, Any]) -> Any:
        sub = self._subsystem(p)
        nsid = int(_required(p, "nsid"))
        if not any(n["nsid"] == nsid for n in sub.namespaces):
            raise RpcFailure(INVALID_PARAMS, "Invalid parameters")
        sub.namespaces = [n for n in sub.namespaces if n["nsid"] != nsid]
        return True

    def _rpc_nvmf_subsystem_add_listener(self, p: dict[str, Any]) -> Any:
        sub = self._subsystem(p)
        address = _listen_address(p)
        if address["trtype"] not in self._transports or address in sub.listeners:
            raise RpcFailure(INVALID_PARAMS, "Invalid parameters")
        sub.listeners.insert(0, address)  # spdk_tgt lists the newest listener first
        return True

    def _rpc_nvmf_subsystem_remove_listener(self, p: dict[str, Any]) -> Any:
        sub = self._subsystem(p)
        address = _listen_address(p)
        if address not in sub.listeners:
            raise RpcFailure(INVALID_PARAMS, "Invalid parameters")
        sub.listeners.remove(address)
        return True

    def _rpc_nvmf_get_subsystems(self, p: dict[str, Any]) -> Any:
        subsystems: list[dict[str, Any]] = [
            {
                "nqn": DISCOVERY_NQN,
                "subtype": "Discovery",
                "listen_addresses": [],
                "allow_any_host": True,
                "hosts": [],
            }
        ]
        for sub in self._subsystems.values():
            subsystems.append(
                {
                    "nqn": sub.nqn,
                    "subtype": "NVMe",
                    "listen_addresses": [dict(a) for a in sub.listeners],
                    "allow_any_host": sub.allow_any_host,
                    "hosts": [{"nqn": h} for h in sub.hosts],
                    "serial_number": sub.serial_number,
                    "model_number": sub.model_number,
                    "max_namespaces": sub.max_namespaces,
                    "min_cntlid": 1,
                    "max_cntlid": 65519,
                    "namespaces": [dict(ns) for ns in sub.namespaces],
                }
            )
        if "nqn" in p:
            subsystems = [s for s in subsystems if s["nqn"] == p["nqn"]]
            if not subsystems:
                raise _errno_failure(errno.ENODEV)
        return subsystems


def _error(request_id: Any, code: int, message: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "error": {"code": code, "message": message}}


def _required(params: dict[str, Any], key: str) -> Any:
    if key not in params:
        raise DecodeFailure
    return params[key]


def _listen_address(p: dict[str, Any]) -> dict[str, str]:
    address = _required(p, "listen_address")
    if not {"trtype", "traddr"} <= set(address):
        raise DecodeFailure
    return {
        "trtype": str(address["trtype"]).upper(),
        "adrfam": _ADRFAM[str(address.get("adrfam", "ipv4")).lower()],
        "traddr": str(address["traddr"]),
        "trsvcid": str(address.get("trsvcid", "")),
    }


def _sidecar(backing: Path) -> Path:
    return backing.with_name(backing.name + ".lvs.json")


def _bdev_json(bdev: _Bdev, exported: bool) -> dict[str, Any]:
    claim = {"claim_type": "read_many_write_one"} if bdev.claimed else {}
    if exported:
        claim = {"claim_type": "exclusive_write"}
    return {
        "name": bdev.name,
        "aliases": list(bdev.aliases),
        "product_name": bdev.product_name,
        "block_size": bdev.block_size,
        "num_blocks": bdev.num_blocks,
        "uuid": bdev.uuid,
        "assigned_rate_limits": dict(bdev.qos),
        "claimed": bool(claim),
        **claim,
        "zoned": False,
        "supported_io_types": {
            "read": True,
            "write": True,
            "unmap": True,
            "write_zeroes": True,
            "flush": True,
            "reset": True,
            "nvme_admin": bdev.module == "nvme",
            "nvme_io": bdev.module == "nvme",
        },
        "driver_specific": json.loads(json.dumps(bdev.driver_specific)),
    }
