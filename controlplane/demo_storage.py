"""The demo's storage: acme's volume `datasets` under a QoS policy, kept busy by a reader.

With SPDK found (`SPDK_TGT_BIN`, else `spdk_tgt` on PATH, with `spdk_nvme_perf` beside it)
the demo starts a target of its own (socket and pool file under the data directory), the
agent drives it, the volume sits in an SPDK pool on that file and is exported to a reader
over NVMe/TCP on loopback; otherwise the volume sits in a local pool and the agent's read
probe reads it. SPDK busy-polls (this build's target in interrupt mode too): the target
and the reader each spin a core, so both run at nice 19, where CFS lets a nice-0 thread
(the demo's worker computes on one) preempt them at once; at nice 0 they would triple its
step times' p90.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from django.db import transaction
from spdk.rpc.client import JSONRPCClient, JSONRPCException

from agent.protocol import export_nqn
from controlplane.processes import dpdk_runtime_dir, nvme_reader, spdk_target
from controlplane.storage import services as storage
from controlplane.storage.choices import PoolKind
from controlplane.storage.models import Export, Pool, QosPolicy, Volume

MIB = 1 << 20
POOL = "demo"
POOL_BYTES = 256 * MIB
QOS = {"name": "datasets", "rw_ios_per_sec": 1000, "r_mbytes_per_sec": 20}
VOLUME = {"name": "datasets", "size_bytes": 64 * MIB}
PROBE_READS_PER_S = 200
"""On a local pool: the agent's read probe keeps 200 random 4 KiB reads a second flowing
through the engine under the QoS policy, so the storage page moves."""
READER_NQN = "nqn.2024-06.io.tailguard:demo-reader"
SOCKET_PATH_MAX = 107  # sun_path holds 108 bytes with the terminating NUL
NICE = ["nice", "-n", "19"]
RESTART_DELAY_S = 2.0


@dataclass(frozen=True)
class SpdkBinaries:
    target: Path
    perf: Path


def find_spdk() -> SpdkBinaries | None:
    """spdk_tgt as the storage tests find it (SPDK_TGT_BIN), else on PATH; spdk_nvme_perf
    must sit beside it (SPDK's build and its release tarballs put them together)."""
    found = os.environ.get("SPDK_TGT_BIN") or shutil.which("spdk_tgt")
    if not found:
        return None
    target = Path(found)
    perf = target.with_name("spdk_nvme_perf")
    return SpdkBinaries(target, perf) if perf.is_file() else None


class DemoStorage:
    """A local pool read by the agent's probe; `SpdkDemoStorage` replaces the engine."""

    kind = PoolKind.LOCAL

    def __init__(self, data: Path) -> None:
        self.data = data
        self.target_argv: list[str] | None = None
        """spdk_tgt's command line, for the demo to start before the agent."""
        self.target_pid: int | None = None
        self.agent_env: dict[str, str] = {}

    @staticmethod
    def choose(data: Path) -> DemoStorage:
        """SPDK when it is found and its socket path fits under `data`, else local."""
        spdk = find_spdk()
        if spdk is None:
            return DemoStorage(data)
        if len(str(data / "spdk" / "spdk.sock")) > SOCKET_PATH_MAX:
            print(
                f"SPDK found, but a socket under {data} would be longer than a Unix socket "
                "path may be: the demo's storage runs on the local engine.",
                flush=True,
            )
            return DemoStorage(data)
        return SpdkDemoStorage(data, spdk)

    @transaction.atomic
    def seed(self, tenant: Any, node: Any) -> Volume:
        """The pool on the demo's node and acme's volume in it under QoS (idempotent; an
        earlier run's pool on the other engine is replaced, volume and all)."""
        old = Pool.objects.filter(node=node, name=POOL).exclude(kind=self.kind).first()
        if old is not None:
            for stale in old.volumes.all():
                storage.delete_volume(stale)
            storage.delete_pool(old)
        pool = Pool.objects.filter(node=node, name=POOL).first()
        if pool is None:
            pool = storage.create_pool(node=node, name=POOL, kind=self.kind, **self.backing())
        policy = QosPolicy.objects.filter(tenant=tenant, name=QOS["name"]).first()
        if policy is None:
            policy = storage.create_qos_policy(tenant=tenant, **QOS)
        volume = Volume.objects.filter(tenant=tenant, name=VOLUME["name"]).first()
        if volume is None:
            volume = storage.create_volume(
                tenant=tenant, pool=pool, qos_policy=policy, **VOLUME, **self.volume_fields()
            )
        return volume

    def backing(self) -> dict[str, Any]:
        directory = self.data / "pools" / POOL
        directory.mkdir(parents=True, exist_ok=True)
        return {"directory": str(directory), "capacity_bytes": POOL_BYTES}

    def volume_fields(self) -> dict[str, Any]:
        return {"read_probe_per_s": PROBE_READS_PER_S}

    def target_ready(self) -> bool:
        """No target to wait for."""
        return True

    def start_reader(self) -> None:
        """Nothing to start: the agent's probe reads a local volume."""

    def describe(self, volume: Volume) -> str:
        return (
            f"volume '{volume.name}' in local pool '{volume.pool.name}': "
            f"{volume.read_probe_per_s} probe reads/s under QoS {_qos_text(volume)}"
        )

    def close(self) -> None:
        """Nothing to clean up."""


class SpdkDemoStorage(DemoStorage):
    """The demo's own spdk_tgt, a pool on a file, and spdk_nvme_perf reading the export."""

    kind = PoolKind.SPDK

    def __init__(self, data: Path, spdk: SpdkBinaries) -> None:
        super().__init__(data)
        self.spdk = spdk
        self.dir = data / "spdk"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.socket = self.dir / "spdk.sock"
        self.socket.unlink(missing_ok=True)  # left by a target that was killed
        self.port = _free_port()
        self.target_argv = [*NICE, *spdk_target(spdk.target, self.socket)]
        self.agent_env = {
            "TAILGUARD_AGENT_SPDK_RPC_SOCKET": str(self.socket),
            "TAILGUARD_AGENT_NVMF_LISTEN_ADDRESS": "127.0.0.1",
            "TAILGUARD_AGENT_NVMF_LISTEN_PORT": str(self.port),
        }
        self._nqn = ""
        self._reader: _Reader | None = None

    def backing(self) -> dict[str, Any]:
        return {"aio_path": str(self.dir / "demo-pool.img"), "capacity_bytes": POOL_BYTES}

    def volume_fields(self) -> dict[str, Any]:
        return {}  # read by spdk_nvme_perf: an SPDK volume is measured where it is read

    @transaction.atomic
    def seed(self, tenant: Any, node: Any) -> Volume:
        volume = super().seed(tenant, node)
        export = Export.objects.filter(tenant=tenant).first()
        if export is None:
            storage.create_export(tenant=tenant, hosts=[READER_NQN])
        elif READER_NQN not in export.hosts:
            storage.update_export(export, hosts=[*export.hosts, READER_NQN])
        self._nqn = export_nqn(tenant.pk)
        return volume

    def target_ready(self) -> bool:
        """spdk_tgt answers on its socket and has initialised its subsystems."""
        if not self.socket.exists():
            return False
        try:
            with JSONRPCClient(str(self.socket), timeout=10.0) as client:
                client.call("framework_wait_init")
        except (JSONRPCException, OSError):
            return False
        return True

    def start_reader(self) -> None:
        address = (
            f"trtype:TCP adrfam:IPv4 traddr:127.0.0.1 trsvcid:{self.port} "
            f"subnqn:{self._nqn} hostnqn:{READER_NQN}"
        )
        argv = [*NICE, *nvme_reader(self.spdk.perf, address, core=(os.cpu_count() or 1) - 1)]
        self._reader = _Reader(argv, self.data / "logs" / "nvme-reader.log")
        self._reader.start()

    def describe(self, volume: Volume) -> str:
        return (
            f"volume '{volume.name}' in SPDK pool '{volume.pool.name}' (a file; spdk_tgt at "
            f"nice 19): spdk_nvme_perf reads it over NVMe/TCP at 127.0.0.1:{self.port} under "
            f"QoS {_qos_text(volume)}"
        )

    def close(self) -> None:
        """Stop the reader; once the demo has stopped the target, remove what it leaves."""
        if self._reader is not None:
            self._reader.stop()
        self.socket.unlink(missing_ok=True)
        if self.target_pid is not None:
            shutil.rmtree(dpdk_runtime_dir(self.target_pid), ignore_errors=True)


class _Reader(threading.Thread):
    """Runs spdk_nvme_perf until stopped, starting it again whenever it exits."""

    def __init__(self, argv: list[str], log: Path) -> None:
        super().__init__(name="nvme-reader", daemon=True)
        self._argv = argv
        self._log = log
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None

    def run(self) -> None:
        while not self._stopping.is_set():
            with self._lock, open(self._log, "ab") as log:
                if self._stopping.is_set():
                    return
                self._proc = subprocess.Popen(self._argv, stdout=log, stderr=subprocess.STDOUT)
            self._proc.wait()
            shutil.rmtree(dpdk_runtime_dir(self._proc.pid), ignore_errors=True)
            self._stopping.wait(RESTART_DELAY_S)

    def stop(self) -> None:
        """A reader holds nothing worth a clean shutdown: it is killed."""
        with self._lock:
            self._stopping.set()
            if self._proc is not None and self._proc.poll() is None:
                self._proc.kill()
        self.join(timeout=10)


def _free_port() -> int:
    """A TCP port free on loopback now, for the target's NVMe/TCP listener."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _qos_text(volume: Volume) -> str:
    policy = volume.qos_policy
    if policy is None:
        return "none"
    return f"{policy.rw_ios_per_sec} IOPS, {policy.r_mbytes_per_sec} MiB/s read"
