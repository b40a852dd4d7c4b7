"""LocalEngine on tmp_path: the same contract as SpdkEngine, plus aligned file I/O."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest

from dataplane.storage import aligned
from dataplane.storage.aligned import ALIGN, AlignedBuffer, AlignedFile, load_file, read_file
from dataplane.storage.engine import (
    CapacityError,
    Device,
    ExportSpec,
    PoolSpec,
    QosSpec,
    QuotaExceeded,
    SpecError,
    StorageSpec,
    VolumeSpec,
)
from dataplane.storage.local import LocalEngine, Throttle

MIB = 1 << 20


class FakeTime:
    """A clock that only moves when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def spec(tmp_path: Path, *, capacity: int = 64 * MIB, **qos: int) -> StorageSpec:
    return StorageSpec(
        pools=(PoolSpec(name="models", directory=str(tmp_path / "pool"), capacity_bytes=capacity),),
        volumes=(
            VolumeSpec(name="llama", pool="models", tenant="acme", size_bytes=16 * MIB),
            VolumeSpec(name="phi", pool="models", tenant="globex", size_bytes=MIB + 1),
        ),
        qos=(QosSpec(volume="llama", **qos),) if qos else (),
    )


@pytest.fixture
def engine(tmp_path: Path) -> LocalEngine:
    return LocalEngine(tmp_path / "root", chunk_bytes=MIB)


def test_probe_on_a_real_filesystem(engine: LocalEngine, tmp_path: Path) -> None:
    caps = engine.probe()
    assert (caps.engine, caps.exports, caps.transports, caps.qos) == ("local", False, (), True)
    assert caps.direct_io, caps.notes  # tmp_path is on a filesystem that takes O_DIRECT


def test_filesystem_refusing_o_direct_falls_back_and_says_so(
    engine: LocalEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open = os.open

    def tmpfs_like_open(path: object, flags: int, mode: int = 0o777) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, mode)  # type: ignore[arg-type]

    monkeypatch.setattr(aligned.os, "open", tmpfs_like_open)
    caps = engine.probe()
    assert not caps.direct_io
    assert "O_DIRECT refused" in caps.notes[0] and "buffered I/O" in caps.notes[0]
    engine.reconcile(spec(tmp_path))
    file = engine.create_file("llama", "w.bin", 5000)
    assert not file.direct
    file.write_at(0, memoryview(b"x" * 5000))
    file.finish(5000)
    file.close()
    assert engine.read_file("llama", "w.bin") == b"x" * 5000


def test_reconcile_is_idempotent_and_deletes_what_the_spec_drops(
    engine: LocalEngine, tmp_path: Path
) -> None:
    first = engine.reconcile(spec(tmp_path))
    assert [str(a) for a in first.actions] == [
        f"create pool models ({tmp_path / 'pool'}, {64 * MIB} bytes)",
        f"create volume acme/llama ({16 * MIB} bytes)",
        f"create volume globex/phi ({MIB + ALIGN} bytes)",
    ]
    assert not engine.reconcile(spec(tmp_path)).changed
    state = engine.observe()
    assert state.pools[0].free_bytes == 64 * MIB - 16 * MIB - (MIB + ALIGN)
    assert {v.name: v.tenant for v in state.volumes} == {"llama": "acme", "phi": "globex"}

    shutil.rmtree(tmp_path / "pool" / "llama")  # lost behind the engine's back: recreated
    assert [str(a) for a in engine.reconcile(spec(tmp_path)).actions] == [
        f"create volume acme/llama ({16 * MIB} bytes)"
    ]
    engine.create_file("phi", "weights.bin", 100).close()
    smaller = spec(tmp_path).model_copy(update={"volumes": spec(tmp_path).volumes[:1]})
    assert [str(a) for a in engine.reconcile(smaller).actions] == ["delete volume phi"]
    assert not (tmp_path / "pool" / "phi").exists()
    assert [str(a) for a in engine.reconcile(StorageSpec()).actions] == [
        "delete volume llama",
        "delete pool models",
    ]
    assert not (tmp_path / "pool").exists()


def test_capacity_and_shrink_and_exports_are_refused(engine: LocalEngine, tmp_path: Path) -> None:
    with pytest.raises(CapacityError) as caught:
        engine.reconcile(spec(tmp_path, capacity=16 * MIB))
    assert (caught.value.pool, caught.value.free_bytes) == ("models", 16 * MIB)
    assert caught.value.requested_bytes == 16 * MIB + MIB + ALIGN
    assert engine.observe().volumes == ()

    engine.reconcile(spec(tmp_path))
    shrunk = spec(tmp_path).model_copy(
        update={
            "volumes": (
                spec(tmp_path).volumes[0].model_copy(update={"size_bytes": MIB}),
                spec(tmp_path).volumes[1],
            )
        }
    )
    with pytest.raises(SpecError, match="shrinking"):
        engine.reconcile(shrunk)
    exported = spec(tmp_path).model_copy(
        update={
            "exports": (
                ExportSpec(
                    tenant="acme",
                    hosts=("nqn.2014-08.org.nvmexpress:uuid:1",),
                    listen_address="10.0.0.1",
                ),
            )
        }
    )
    with pytest.raises(SpecError, match="NVMe-oF"):
        engine.reconcile(exported)
    with pytest.raises(SpecError, match="directories"):
        engine.reconcile(
            StorageSpec(
                pools=(PoolSpec(name="x", devices=(Device(kind="nvme", address="0000:01:00.0"),)),)
            )
        )


def test_quota_is_enforced_on_files(engine: LocalEngine, tmp_path: Path) -> None:
    engine.reconcile(spec(tmp_path))
    engine.create_file("phi", "a.bin", MIB).close()
    with pytest.raises(QuotaExceeded) as caught:
        engine.create_file("phi", "b.bin", 8192)
    assert (caught.value.volume, caught.value.size_bytes) == ("phi", MIB + ALIGN)
    engine.create_file("phi", "b.bin", 4096).close()  # exactly fills the quota
    file = engine.create_file("phi", "a.bin", MIB)  # reopening an existing file reuses its space
    with pytest.raises(QuotaExceeded):
        file.write_at(MIB, memoryview(bytearray(ALIGN)))
    file.close()
    with pytest.raises(ValueError, match="inside volume"):
        engine.create_file("phi", "../llama/escape.bin", 1)


def test_aligned_writes_are_direct_and_files_exact(engine: LocalEngine, tmp_path: Path) -> None:
    engine.reconcile(spec(tmp_path))
    payload = os.urandom(3 * MIB + 123)
    file = engine.create_file("llama", "model/weights.bin", len(payload))
    assert file.direct
    assert os.stat(file.path).st_size == len(payload)  # preallocated with fallocate
    with pytest.raises(ValueError, match="multiple of 4096"):
        file.write_at(100, memoryview(payload[:ALIGN]))
    with AlignedBuffer(MIB) as buf:  # the fast path: page-aligned source, whole blocks
        buf.raw[:] = payload[:MIB]
        file.write_at(0, buf.raw)
    file.write_at(MIB, memoryview(payload[MIB:]))  # unaligned source and tail: bounced and padded
    file.finish(len(payload))
    file.close()
    assert os.stat(tmp_path / "pool" / "llama" / "model" / "weights.bin").st_size == len(payload)
    assert engine.read_file("llama", "model/weights.bin") == payload


@pytest.mark.parametrize("size", [0, 1, ALIGN - 1, ALIGN, ALIGN + 1, 5 * MIB + 17])
@pytest.mark.parametrize("workers", [1, 4])
def test_aligned_reader_returns_exact_bytes(tmp_path: Path, size: int, workers: int) -> None:
    path = tmp_path / "f.bin"
    data = os.urandom(size)
    path.write_bytes(data)
    assert read_file(path, chunk_bytes=MIB, workers=workers) == data
    with load_file(path, chunk_bytes=MIB, workers=workers) as buf:
        assert len(buf.view) == size and buf.view == data
    with pytest.raises(ValueError):
        load_file(path, chunk_bytes=1000)


def test_stats_count_the_engines_own_io(tmp_path: Path) -> None:
    fake = FakeTime()
    engine = LocalEngine(tmp_path / "root", chunk_bytes=MIB, read_workers=1, clock=fake.clock)
    engine.reconcile(spec(tmp_path))
    assert engine.stats() == {}
    file = engine.create_file("llama", "w.bin", 2 * MIB)
    with AlignedBuffer(MIB) as buf:
        file.write_at(0, buf.raw)
        file.write_at(MIB, buf.raw)
    file.finish(2 * MIB)
    file.close()
    with engine.load_file("llama", "w.bin") as loaded:
        assert len(loaded.view) == 2 * MIB
    fake.now += 2.0
    rates = engine.stats()
    assert set(rates) == {"llama", "phi"}
    llama = rates["llama"]
    assert (llama.write_iops, llama.read_iops) == (1.0, 1.0)  # 2 writes, 2 reads over 2 s
    assert (llama.write_mb_s, llama.read_mb_s) == (1.0, 1.0)
    assert llama.mean_read_latency_us > 0 and llama.mean_write_latency_us > 0
    assert rates["phi"].iops == 0


def test_qos_is_rounded_read_back_and_paces_io(tmp_path: Path) -> None:
    fake = FakeTime()
    engine = LocalEngine(
        tmp_path / "root", chunk_bytes=MIB, read_workers=1, clock=fake.clock, sleep=fake.sleep
    )
    engine.reconcile(spec(tmp_path, rw_ios_per_sec=1500, r_mbytes_per_sec=1))
    llama = engine.observe().volume("llama")
    assert llama is not None and llama.qos.limits()["rw_ios_per_sec"] == 2000
    assert not engine.reconcile(spec(tmp_path, rw_ios_per_sec=1500, r_mbytes_per_sec=1)).changed

    (tmp_path / "pool" / "llama" / "f.bin").write_bytes(b"\0" * (4 * MIB))
    engine.read_file("llama", "f.bin")
    # 1 MiB/s with one second of credit: 4 MiB of reads owe 3 seconds
    assert sum(fake.slept) == pytest.approx(3.0)

    engine.reconcile(spec(tmp_path))  # limits dropped
    fake.slept.clear()
    engine.read_file("llama", "f.bin")
    assert fake.slept == []


def test_throttle_limits_iops() -> None:
    fake = FakeTime()
    throttle = Throttle(QosSpec(volume="v", rw_ios_per_sec=1000), fake.clock, fake.sleep)
    for _ in range(3000):
        throttle.admit(read_bytes=ALIGN, write_bytes=0)
    assert fake.now - 100.0 == pytest.approx(2.0)  # 1000 free, 2000 more at 1000/s


def test_saved_state_restores_the_engine(engine: LocalEngine, tmp_path: Path) -> None:
    engine.reconcile(spec(tmp_path, w_mbytes_per_sec=10))
    saved = tmp_path / "saved.json"
    engine.save_config(saved)
    before = engine.observe()
    restarted = LocalEngine(tmp_path / "root", state_file=saved)
    assert restarted.observe() == before
    assert not restarted.reconcile(spec(tmp_path, w_mbytes_per_sec=10)).changed


def test_aligned_file_rejects_writes_past_its_reservation(tmp_path: Path) -> None:
    file = AlignedFile(tmp_path / "x.bin", reserved_bytes=ALIGN, volume="v")
    with pytest.raises(QuotaExceeded):
        file.write_at(0, memoryview(bytearray(2 * ALIGN)))
    file.close()
