"""The local engine: storage for nodes without SPDK, on the node's own filesystem.

Pools are directories with a capacity; volumes are directories inside them whose size
is a quota the engine enforces (every file is created through `create_file`, which
checks the quota and preallocates the file with fallocate). I/O goes through the
aligned, O_DIRECT-when-possible primitives of `aligned`, and the engine counts its own
calls for `stats()` and paces them for per-volume QoS. There is no NVMe-oF here: a
spec with exports is refused. State (which directory is which pool, volume sizes,
tenants, QoS) lives in a JSON file so a restarted agent finds everything again.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from pydantic import BaseModel

from . import aligned
from .aligned import ALIGN, AlignedBuffer, AlignedFile, align_up, probe_direct_io
from .engine import (
    Action,
    Capabilities,
    CapacityError,
    EngineUnavailable,
    PoolState,
    QosSpec,
    QuotaExceeded,
    ReconcileResult,
    SpecError,
    StorageError,
    StorageSpec,
    StorageState,
    VolumeState,
    check_capacity,
    plan_volumes,
    qos_changes,
)
from .probe import PROBE_FILE, PROBE_FILE_BYTES, fill_probe_file
from .stats import IoCounterSet, IoRates, IoSample, RateTracker

STATE_FILE_NAME = "local-engine.json"


class _PoolRecord(BaseModel):
    directory: str
    capacity_bytes: int


class _VolumeRecord(BaseModel):
    pool: str
    tenant: str
    size_bytes: int


class _State(BaseModel):
    version: int = 1
    pools: dict[str, _PoolRecord] = {}
    volumes: dict[str, _VolumeRecord] = {}
    qos: dict[str, QosSpec] = {}


class _Bucket:
    def __init__(self, rate: float, now: float) -> None:
        self.rate = rate
        self.tokens = rate  # one second of credit
        self.stamp = now

    def take(self, amount: float, now: float) -> float:
        """Deduct `amount`; return how long to wait until the debt is paid."""
        self.tokens = min(self.rate, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.tokens -= amount
        return -self.tokens / self.rate if self.tokens < 0 else 0.0


class Throttle:
    """Token buckets applying one volume's QoS to the engine's own I/O calls.

    An I/O pays its cost up front and sleeps off any debt, so a chunk larger than a
    second of credit still goes through, only later; SPDK likewise admits I/O per
    timeslice rather than splitting it.
    """

    def __init__(
        self,
        qos: QosSpec,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        now = clock()
        mb = float(1 << 20)

        def bucket(limit: int, scale: float) -> _Bucket | None:
            return _Bucket(limit * scale, now) if limit else None

        self._iops = bucket(qos.rw_ios_per_sec, 1.0)
        self._rw = bucket(qos.rw_mbytes_per_sec, mb)
        self._r = bucket(qos.r_mbytes_per_sec, mb)
        self._w = bucket(qos.w_mbytes_per_sec, mb)

    def admit(self, *, read_bytes: int, write_bytes: int) -> None:
        with self._lock:
            now = self._clock()
            costs = (
                (self._iops, 1.0),
                (self._rw, float(read_bytes + write_bytes)),
                (self._r, float(read_bytes)),
                (self._w, float(write_bytes)),
            )
            wait = max((b.take(cost, now) for b, cost in costs if b and cost), default=0.0)
        if wait > 0:
            self._sleep(wait)


class _VolumeObserver:
    """Adapts the engine's per-volume throttle and counters to `aligned.IoObserver`; the
    throttle is looked up per I/O, so a file held open (a read probe's) follows QoS changes."""

    def __init__(
        self, volume: str, counters: IoCounterSet, throttles: Mapping[str, Throttle]
    ) -> None:
        self._volume = volume
        self._counters = counters
        self._throttles = throttles

    def admit(self, *, read_bytes: int, write_bytes: int) -> None:
        if throttle := self._throttles.get(self._volume):
            throttle.admit(read_bytes=read_bytes, write_bytes=write_bytes)

    def record(self, *, read: bool, nbytes: int, seconds: float) -> None:
        self._counters.record(self._volume, read=read, nbytes=nbytes, seconds=seconds)


class LocalEngine:
    """StorageEngine over directories; also `FileVolumes` for model staging."""

    def __init__(
        self,
        root: Path,
        *,
        state_file: Path | None = None,
        chunk_bytes: int = aligned.DEFAULT_CHUNK_BYTES,
        read_workers: int = aligned.DEFAULT_READ_WORKERS,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.root = Path(root)
        self.state_file = state_file or self.root / STATE_FILE_NAME
        self._chunk_bytes = chunk_bytes
        self._read_workers = read_workers
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.RLock()
        self._counters = IoCounterSet()
        self._tracker = RateTracker()
        self._state = self._load_state()
        self._throttles = {
            name: Throttle(qos, clock, sleep) for name, qos in self._state.qos.items()
        }
        for name in self._state.volumes:
            self._counters.ensure(name)

    # ---- StorageEngine --------------------------------------------------------------

    def probe(self) -> Capabilities:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise EngineUnavailable(
                f"local engine root {self.root} is not usable: {exc.strerror}; "
                "point the agent's storage root at a writable directory"
            ) from exc
        notes = []
        direct = True
        for where in [self.root, *(Path(p.directory) for p in self._state.pools.values())]:
            reason = probe_direct_io(where) if where.is_dir() else None
            if reason:
                direct = False
                notes.append(f"{reason}; using buffered I/O there")
        return Capabilities(
            engine="local",
            version=f"linux {os.uname().release}",
            exports=False,
            transports=(),
            qos=True,
            direct_io=direct,
            notes=tuple(notes),
        )

    def observe(self) -> StorageState:
        with self._lock:
            volumes = []
            used: dict[str, int] = {}
            for name, rec in sorted(self._state.volumes.items()):
                path = self._volume_dir(name, rec)
                if not path.is_dir():
                    continue
                used[rec.pool] = used.get(rec.pool, 0) + rec.size_bytes
                volumes.append(
                    VolumeState(
                        name=name,
                        pool=rec.pool,
                        tenant=rec.tenant,
                        size_bytes=rec.size_bytes,
                        device=str(path),
                        qos=self._state.qos.get(name, QosSpec(volume=name)),
                    )
                )
            pools = tuple(
                PoolState(
                    name=name,
                    backing=(rec.directory,),
                    capacity_bytes=rec.capacity_bytes,
                    free_bytes=rec.capacity_bytes - used.get(name, 0),
                )
                for name, rec in sorted(self._state.pools.items())
                if Path(rec.directory).is_dir()
            )
            return StorageState(pools=pools, volumes=tuple(volumes))

    def reconcile(self, spec: StorageSpec) -> ReconcileResult:
        if spec.exports:
            raise SpecError(
                "the local engine cannot export volumes over NVMe-oF (no SPDK target on "
                "this node); drop the exports or run spdk_tgt and use SpdkEngine"
            )
        with self._lock:
            actions = self._reconcile_pools(spec)
            for name, rec in list(self._state.volumes.items()):
                if not self._volume_dir(name, rec).is_dir():  # removed behind our back
                    del self._state.volumes[name]
                    self._state.qos.pop(name, None)
            state = self.observe()
            plan = plan_volumes(spec, state, _allocated)
            check_capacity(plan, state, _allocated)
            for gone in plan.delete:
                shutil.rmtree(gone.device, ignore_errors=True)
                del self._state.volumes[gone.name]
                self._state.qos.pop(gone.name, None)
                self._throttles.pop(gone.name, None)
                self._counters.drop(gone.name)
                actions.append(Action("delete", "volume", gone.name))
            for volume in plan.create:
                rec = _VolumeRecord(
                    pool=volume.pool,
                    tenant=volume.tenant,
                    size_bytes=_allocated(volume.pool, volume.size_bytes),
                )
                self._volume_dir(volume.name, rec).mkdir(parents=True, exist_ok=True)
                self._state.volumes[volume.name] = rec
                self._counters.ensure(volume.name)
                actions.append(
                    Action(
                        "create",
                        "volume",
                        f"{volume.tenant}/{volume.name}",
                        f"{rec.size_bytes} bytes",
                    )
                )
            for volume, _ in plan.grow:
                size = _allocated(volume.pool, volume.size_bytes)
                self._state.volumes[volume.name].size_bytes = size
                actions.append(Action("grow", "volume", volume.name, f"to {size} bytes"))
            current = {v.name: v for v in self.observe().volumes}
            for qos in qos_changes(spec, current):
                if any(qos.limits().values()):
                    self._state.qos[qos.volume] = qos
                    self._throttles[qos.volume] = Throttle(qos, self._clock, self._sleep)
                else:
                    self._state.qos.pop(qos.volume, None)
                    self._throttles.pop(qos.volume, None)
                actions.append(Action("set", "qos", qos.volume, qos.describe()))
            actions += self._remove_pools(spec)
            if actions or not self.state_file.exists():
                self._write_state(self.state_file)
            return ReconcileResult(tuple(actions))

    def stats(self) -> dict[str, IoRates]:
        return self._tracker.update(IoSample(at_s=self._clock(), volumes=self._counters.snapshot()))

    def save_config(self, path: Path) -> None:
        with self._lock:
            self._write_state(path)

    def close(self) -> None:
        """Nothing stays open between calls; present for the protocol."""

    # ---- FileVolumes and the aligned reader -----------------------------------------

    def volume_path(self, volume: str) -> Path:
        return self._volume_dir(volume, self._record(volume))

    def create_file(self, volume: str, relpath: str, size_bytes: int) -> AlignedFile:
        with self._lock:
            rec = self._record(volume)
            path = self._inside(volume, relpath)
            existing = align_up(path.stat().st_size) if path.exists() else 0
            needed = _usage(self._volume_dir(volume, rec)) - existing + align_up(size_bytes)
            if needed > rec.size_bytes:
                raise QuotaExceeded(volume, rec.size_bytes, needed)
            path.parent.mkdir(parents=True, exist_ok=True)
            file = AlignedFile(
                path, reserved_bytes=size_bytes, volume=volume, observer=self._observer(volume)
            )
            try:
                file.reserve()
            except OSError:
                file.close()
                raise
            return file

    def load_file(self, volume: str, relpath: str) -> AlignedBuffer:
        """Read a whole file of a volume into an aligned buffer (the model loader's path)."""
        return aligned.load_file(
            self._inside(volume, relpath),
            chunk_bytes=self._chunk_bytes,
            workers=self._read_workers,
            observer=self._observer(volume),
        )

    def open_probe_file(self, volume: str) -> AlignedFile:
        """The volume's read-probe file, written once with random data (`probe`)."""
        path = self._inside(volume, PROBE_FILE)
        if not path.exists() or path.stat().st_size != PROBE_FILE_BYTES:
            file = self.create_file(volume, PROBE_FILE, PROBE_FILE_BYTES)
            try:
                fill_probe_file(file)
            finally:
                file.close()
        return AlignedFile(
            path, reserved_bytes=PROBE_FILE_BYTES, volume=volume, observer=self._observer(volume)
        )

    def read_file(self, volume: str, relpath: str) -> bytes:
        with self.load_file(volume, relpath) as buf:
            return bytes(buf.view)

    # ---- internals ------------------------------------------------------------------

    def _reconcile_pools(self, spec: StorageSpec) -> list[Action]:
        actions = []
        for pool in spec.pools:
            if pool.devices:
                raise SpecError(
                    f"pool {pool.name} names block devices; the local engine keeps pools "
                    "in directories (set `directory`), SPDK is needed for devices"
                )
            directory = Path(pool.directory) if pool.directory else self.root / "pools" / pool.name
            rec = self._state.pools.get(pool.name)
            if rec and Path(rec.directory) != directory:
                raise SpecError(
                    f"pool {pool.name} lives in {rec.directory}; moving it to {directory} "
                    "would strand its volumes"
                )
            missing = not directory.is_dir()
            directory.mkdir(parents=True, exist_ok=True)
            capacity = pool.capacity_bytes or shutil.disk_usage(directory).total
            if rec is None or missing:
                self._state.pools[pool.name] = _PoolRecord(
                    directory=str(directory), capacity_bytes=capacity
                )
                actions.append(
                    Action("create", "pool", pool.name, f"{directory}, {capacity} bytes")
                )
            elif rec.capacity_bytes != capacity:
                allocated = sum(
                    v.size_bytes for v in self._state.volumes.values() if v.pool == pool.name
                )
                if allocated > capacity:
                    raise CapacityError(pool.name, allocated, capacity)
                rec.capacity_bytes = capacity
                actions.append(Action("resize", "pool", pool.name, f"{capacity} bytes"))
        return actions

    def _remove_pools(self, spec: StorageSpec) -> list[Action]:
        wanted = {p.name for p in spec.pools}
        actions = []
        for name in sorted(set(self._state.pools) - wanted):
            rec = self._state.pools.pop(name)
            try:
                Path(rec.directory).rmdir()
            except OSError:
                pass  # holds files the engine does not own; leave them to the operator
            actions.append(Action("delete", "pool", name))
        return actions

    def _record(self, volume: str) -> _VolumeRecord:
        rec = self._state.volumes.get(volume)
        if rec is None:
            raise StorageError(f"no volume {volume} on this node")
        return rec

    def _volume_dir(self, volume: str, rec: _VolumeRecord) -> Path:
        return Path(self._state.pools[rec.pool].directory) / volume

    def _inside(self, volume: str, relpath: str) -> Path:
        base = self.volume_path(volume).resolve()
        path = (base / relpath).resolve()
        if not path.is_relative_to(base) or path == base:
            raise ValueError(f"{relpath!r} is not a file path inside volume {volume}")
        return path

    def _observer(self, volume: str) -> _VolumeObserver:
        return _VolumeObserver(volume, self._counters, self._throttles)

    def _load_state(self) -> _State:
        if not self.state_file.exists():
            return _State()
        return _State.model_validate_json(self.state_file.read_text())

    def _write_state(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self._state.model_dump(mode="json"), indent=2, sort_keys=True))
        os.replace(tmp, path)


def _allocated(pool: str, size_bytes: int) -> int:
    """A local volume reserves its size rounded up to whole 4 KiB blocks."""
    return align_up(size_bytes, ALIGN)


def _usage(directory: Path) -> int:
    """Bytes a volume's files take, each rounded up to whole 4 KiB blocks."""
    total = 0
    for parent, _, files in os.walk(directory):
        for name in files:
            total += align_up(os.lstat(os.path.join(parent, name)).st_size)
    return total
