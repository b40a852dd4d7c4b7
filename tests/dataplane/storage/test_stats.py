"""Delta math shared by both engines."""

from __future__ import annotations

import pytest

from dataplane.storage.stats import IoCounters, IoCounterSet, IoSample, RateTracker, rates

MIB = 1 << 20


def test_rates_from_a_delta() -> None:
    delta = IoCounters(
        read_ops=300,
        write_ops=100,
        bytes_read=300 * MIB,
        bytes_written=50 * MIB,
        read_latency_s=0.03,
        write_latency_s=0.2,
    )
    r = rates(delta, interval_s=3.0)
    assert (r.read_iops, r.write_iops, r.iops) == (
        100,
        pytest.approx(100 / 3),
        pytest.approx(400 / 3),
    )
    assert (r.read_mb_s, r.write_mb_s) == (100, pytest.approx(50 / 3))
    assert r.mean_read_latency_us == pytest.approx(100)
    assert r.mean_write_latency_us == pytest.approx(2000)


def test_zero_interval_and_idle_volume_give_zeros() -> None:
    r = rates(IoCounters(read_ops=5, bytes_read=5, read_latency_s=0.005), interval_s=0.0)
    assert (r.read_iops, r.read_mb_s) == (0, 0)
    assert r.mean_read_latency_us == pytest.approx(1000)  # latency does not need the interval
    idle = rates(IoCounters(), interval_s=1.0)
    assert (idle.iops, idle.mean_read_latency_us, idle.mean_write_latency_us) == (0, 0, 0)


def test_tracker_reports_intervals_and_survives_counter_resets() -> None:
    tracker = RateTracker()
    assert tracker.update(IoSample(10.0, {"a": IoCounters(read_ops=100)})) == {}
    out = tracker.update(
        IoSample(12.0, {"a": IoCounters(read_ops=300), "b": IoCounters(read_ops=7)})
    )
    assert set(out) == {"a"}  # b only got its baseline
    assert out["a"].read_iops == 100
    # the target restarted: counters went back to small numbers, taken as counts since then
    out = tracker.update(
        IoSample(13.0, {"a": IoCounters(read_ops=50), "b": IoCounters(read_ops=9)})
    )
    assert (out["a"].read_iops, out["b"].read_iops) == (50, 2)


def test_counter_set_accumulates_per_volume() -> None:
    counters = IoCounterSet()
    counters.ensure("idle")
    counters.record("v", read=True, nbytes=4096, seconds=0.001)
    counters.record("v", read=True, nbytes=8192, seconds=0.003)
    counters.record("v", read=False, nbytes=4096, seconds=0.002)
    snap = counters.snapshot()
    assert snap["idle"] == IoCounters()
    assert snap["v"] == IoCounters(
        read_ops=2,
        write_ops=1,
        bytes_read=12288,
        bytes_written=4096,
        read_latency_s=pytest.approx(0.004),
        write_latency_s=pytest.approx(0.002),
    )
    counters.drop("v")
    assert set(counters.snapshot()) == {"idle"}
