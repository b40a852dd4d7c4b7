"""Read probes on the local engine: a file of random data written once, reads through the
engine's own path (counted, paced by QoS as it changes), latencies counted exactly."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from dataplane.storage.aligned import ALIGN, AlignedBuffer
from dataplane.storage.local import LocalEngine
from dataplane.storage.probe import PROBE_FILE, PROBE_FILE_BYTES, ProbeWindow, ReadProbe

from .test_local_engine import MIB, FakeTime, spec


@pytest.fixture
def engine(tmp_path: Path) -> LocalEngine:
    return LocalEngine(tmp_path / "root", chunk_bytes=MIB)


def test_the_probe_file_is_random_written_once_and_inside_the_quota(
    engine: LocalEngine, tmp_path: Path
) -> None:
    engine.reconcile(spec(tmp_path))
    engine.open_probe_file("llama").close()
    path = tmp_path / "pool" / "llama" / PROBE_FILE
    first = path.read_bytes()
    assert len(first) == PROBE_FILE_BYTES and first.count(0) < PROBE_FILE_BYTES // 64
    engine.open_probe_file("llama").close()
    assert path.read_bytes() == first  # reused, not rewritten
    # phi's volume (1 MiB + 1 byte) still takes the probe file but nothing beside it
    engine.open_probe_file("phi").close()
    assert (tmp_path / "pool" / "phi" / PROBE_FILE).stat().st_size == PROBE_FILE_BYTES


def test_a_held_probe_file_follows_qos_changes(tmp_path: Path) -> None:
    fake = FakeTime()
    engine = LocalEngine(tmp_path / "root", chunk_bytes=MIB, clock=fake.clock, sleep=fake.sleep)
    engine.reconcile(spec(tmp_path))
    file = engine.open_probe_file("llama")
    fake.slept.clear()
    with AlignedBuffer(ALIGN) as buf:
        for _ in range(20):
            file.read_at(0, buf.raw)
        assert fake.slept == []
        engine.reconcile(spec(tmp_path, rw_ios_per_sec=1000))  # set while the file is open
        for _ in range(1020):
            file.read_at(0, buf.raw)
    file.close()
    # a second's credit (1000 I/Os), then 20 more at 1000/s
    assert sum(fake.slept) == pytest.approx(0.02)


def _measure(probe: ReadProbe, reads: int) -> ProbeWindow:
    """Windows taken until `reads` reads were measured, merged."""
    total = ProbeWindow()
    deadline = time.monotonic() + 120  # a guard against a hung probe, not a timing check
    while total.sketch.count + total.errors < reads:
        assert time.monotonic() < deadline, "the probe stopped reading"
        window = probe.take()
        total.sketch.merge(window.sketch)
        total.errors += window.errors
        for bound, counter in window.counters.items():
            total.counters.setdefault(bound, type(counter)(bound)).merge(counter)
        time.sleep(0.05)
    return total


def test_a_probe_reads_through_the_engine_and_counts_every_read(
    engine: LocalEngine, tmp_path: Path
) -> None:
    engine.reconcile(spec(tmp_path))
    engine.stats()
    probe = ReadProbe("llama", lambda: engine.open_probe_file("llama"), rate_per_s=400)
    probe.count_against([3600.0, 1e-12])
    probe.start()
    try:
        window = _measure(probe, 40)
    finally:
        probe.stop()
    rest = probe.take()
    reads = window.sketch.count + rest.sketch.count
    assert window.errors == 0 and reads >= 40
    everything, nothing = window.counters[3600.0], window.counters[1e-12]
    assert everything.good == everything.total == window.sketch.count
    assert nothing.good == 0 and nothing.total == window.sketch.count
    rates = engine.stats()["llama"]
    assert rates.read_iops > 0 and rates.read_mb_s > 0
