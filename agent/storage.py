"""The reconciler's driver for storage: pools, volumes, exports and QoS on the node's engine.

The desired components become one `StorageSpec` for the engine (the local engine, or SPDK
when the agent is given spdk_tgt's socket). Engines check a spec before changing anything,
so when one is refused (a pool too small, a pool of the other engine's kind) every storage
component fails with that reason and the node keeps what it had. After each apply, and
every `storage_report_interval_s`, the engine's pool capacity, per-volume I/O rates and
export endpoints (with the transport chosen here) go to the control plane.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from datetime import UTC, datetime
from pathlib import Path
from uuid import UUID

from agent.client import ControlPlaneClient, ControlPlaneError
from agent.protocol import (
    ComponentKind,
    ComponentResult,
    Components,
    ExportEndpoint,
    NvmfTransport,
    PoolKind,
    PoolUsage,
    StorageReport,
    VolumeIo,
    export_nqn,
)
from dataplane.storage import engine as eng
from dataplane.storage.engine import FileVolumes, StorageEngine, StorageError
from dataplane.storage.local import LocalEngine
from dataplane.storage.probe import ProbeVolumes

log = logging.getLogger(__name__)
_TRANSPORT: dict[eng.Transport, NvmfTransport] = {
    eng.Transport.RDMA: "rdma",
    eng.Transport.TCP: "tcp",
}


def storage_spec(
    components: Components, kind: PoolKind, listen_address: str, listen_port: int = 4420
) -> eng.StorageSpec:
    """The engine's spec for the desired components; raises SpecError naming what cannot be."""
    pools = []
    for pool in components.pools:
        if pool.kind != kind:
            raise eng.SpecError(
                f"pool {pool.name} is a {pool.kind} pool but this node's storage runs on the "
                f"{kind} engine; change the pool's kind or the agent's spdk_rpc_socket setting"
            )
        devices: tuple[eng.Device, ...] = ()
        if pool.device:
            devices = (eng.Device(kind="nvme", address=pool.device),)
        elif pool.aio_path:
            size = pool.capacity_bytes or 0
            devices = (eng.Device(kind="aio", address=pool.aio_path, size_bytes=size),)
        pools.append(
            eng.PoolSpec(
                name=pool.name,
                devices=devices,
                directory=pool.directory,
                capacity_bytes=pool.capacity_bytes,
            )
        )
    exports: dict[UUID, eng.ExportSpec] = {}
    for export in components.exports:
        if export.nqn != export_nqn(export.tenant_id):
            raise eng.SpecError(
                f"export nqn {export.nqn} is not tenant {export.tenant_id}'s "
                f"subsystem {export_nqn(export.tenant_id)}"
            )
        exports[export.tenant_id] = eng.ExportSpec(
            tenant=export.tenant_id.hex,
            hosts=tuple(sorted(export.hosts)),
            listen_address=listen_address,
            listen_port=listen_port,
            transport=eng.Transport(export.transport.upper()) if export.transport else None,
        )
    return eng.StorageSpec(
        pools=tuple(pools),
        volumes=tuple(
            eng.VolumeSpec(
                name=v.name, pool=v.pool, tenant=v.tenant_id.hex, size_bytes=v.size_bytes
            )
            for v in components.volumes
        ),
        exports=tuple(exports.values()),
        qos=tuple(
            eng.QosSpec(
                volume=q.volume,
                rw_ios_per_sec=q.rw_ios_per_sec,
                rw_mbytes_per_sec=q.rw_mbytes_per_sec,
                r_mbytes_per_sec=q.r_mbytes_per_sec,
                w_mbytes_per_sec=q.w_mbytes_per_sec,
            )
            for q in components.qos
        ),
    )


def _named(components: Components) -> list[tuple[ComponentKind, str]]:
    return [
        *(("pool", p.name) for p in components.pools),
        *(("volume", v.name) for v in components.volumes),
        *(("export", e.volume) for e in components.exports),
        *(("qos", q.volume) for q in components.qos),
    ]


class StorageDriver:
    """Drives one engine; engine calls run in threads, one at a time."""

    def __init__(
        self,
        engine: StorageEngine,
        kind: PoolKind,
        *,
        listen_address: str = "0.0.0.0",
        listen_port: int = 4420,
        config_path: Path | None = None,
    ) -> None:
        self.kind = kind
        self._engine = engine
        self._listen_address = listen_address
        self._listen_port = listen_port
        self._config_path = config_path
        self._lock = asyncio.Lock()
        self._applied = asyncio.Event()
        self._probed = False

    @property
    def probe_volumes(self) -> ProbeVolumes | None:
        """The engine as `ProbeVolumes` when its volumes' files are on this host."""
        return self._engine if isinstance(self._engine, LocalEngine) else None

    @property
    def file_volumes(self) -> FileVolumes | None:
        """The engine as `FileVolumes` when its volumes are directories (models stage there)."""
        return self._engine if isinstance(self._engine, LocalEngine) else None

    async def apply(self, components: Components) -> list[ComponentResult]:
        named = _named(components)
        try:
            spec = storage_spec(components, self.kind, self._listen_address, self._listen_port)
            async with self._lock:
                await asyncio.to_thread(self._reconcile, spec)
        except Exception as exc:  # every failure becomes the components' error text
            log.warning("storage not applied: %s", exc)
            error = f"{exc}"[:4000] or repr(exc)
            return [
                ComponentResult(kind=kind, name=name, ok=False, error=error) for kind, name in named
            ]
        finally:
            self._applied.set()
        return [ComponentResult(kind=kind, name=name, ok=True, error=None) for kind, name in named]

    def _reconcile(self, spec: eng.StorageSpec) -> None:
        if not self._probed:
            capabilities = self._engine.probe()
            self._probed = True
            for note in capabilities.notes:
                log.info("%s engine: %s", capabilities.engine, note)
        result = self._engine.reconcile(spec)
        for action in result.actions:
            log.info("storage: %s", action)
        if result.changed and self._config_path is not None:
            self._engine.save_config(self._config_path)

    def report(self, node_id: UUID) -> StorageReport:
        """Pools, per-volume rates since the previous report, and export endpoints."""
        state = self._engine.observe()
        rates = self._engine.stats()
        pool_of = {v.name: v.pool for v in state.volumes}
        return StorageReport(
            node_id=node_id,
            reported_at=datetime.now(UTC),
            engine=self.kind,
            pools=[
                PoolUsage(
                    name=p.name, capacity_bytes=p.capacity_bytes, free_bytes=max(0, p.free_bytes)
                )
                for p in state.pools
            ],
            volumes=[
                VolumeIo(
                    name=name,
                    pool=pool_of[name],
                    read_iops=r.read_iops,
                    write_iops=r.write_iops,
                    read_mb_s=r.read_mb_s,
                    write_mb_s=r.write_mb_s,
                    mean_read_latency_us=r.mean_read_latency_us,
                    mean_write_latency_us=r.mean_write_latency_us,
                )
                for name, r in sorted(rates.items())
                if name in pool_of
            ],
            exports=[
                ExportEndpoint(
                    tenant_id=UUID(hex=e.tenant),
                    nqn=e.nqn,
                    transport=_TRANSPORT[e.transport],
                    address=ipaddress.ip_address(e.listen_address),
                    port=e.listen_port,
                )
                for e in state.exports
                if e.transport is not None and e.listen_address is not None and e.listen_port
            ],
        )

    async def snapshot(self, node_id: UUID) -> StorageReport:
        """`report` taken between applies (engine calls are not run concurrently)."""
        async with self._lock:
            return await asyncio.to_thread(self.report, node_id)

    async def report_forever(
        self,
        client: ControlPlaneClient,
        node_id: UUID,
        stop: asyncio.Event,
        interval_s: float,
    ) -> None:
        """Report after every apply and at least every `interval_s` until `stop`."""
        failing = False
        while not stop.is_set():
            self._applied.clear()
            try:
                await client.post_storage(await self.snapshot(node_id))
                failing = False
            except (StorageError, ControlPlaneError, OSError, ValueError) as exc:
                if not failing:
                    log.warning("storage report failed: %s", exc)
                failing = True
            woken = asyncio.create_task(self._applied.wait())
            stopped = asyncio.create_task(stop.wait())
            await asyncio.wait(
                {woken, stopped}, timeout=interval_s, return_when=asyncio.FIRST_COMPLETED
            )
            woken.cancel()
            stopped.cancel()
