"""I/O statistics shared by the storage engines.

Both engines expose cumulative counters (SPDK's `bdev_get_iostat`, the local engine's
own bookkeeping). The agent wants rates, so each engine keeps a `RateTracker` and
reports the delta between two samples: IOPS, MB/s and mean latency per volume.
MB here is 2**20 bytes, the unit SPDK's QoS limits use, so limits and rates compare
directly.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, replace

MB = 1 << 20


@dataclass(frozen=True)
class IoCounters:
    """Monotonic totals for one volume since its counters started."""

    read_ops: int = 0
    write_ops: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    read_latency_s: float = 0.0
    write_latency_s: float = 0.0

    def minus(self, earlier: IoCounters) -> IoCounters:
        """Counts accumulated since `earlier`; a counter that went backwards was reset."""
        if (
            self.read_ops < earlier.read_ops
            or self.write_ops < earlier.write_ops
            or self.bytes_read < earlier.bytes_read
            or self.bytes_written < earlier.bytes_written
        ):
            return self
        return IoCounters(
            read_ops=self.read_ops - earlier.read_ops,
            write_ops=self.write_ops - earlier.write_ops,
            bytes_read=self.bytes_read - earlier.bytes_read,
            bytes_written=self.bytes_written - earlier.bytes_written,
            read_latency_s=max(0.0, self.read_latency_s - earlier.read_latency_s),
            write_latency_s=max(0.0, self.write_latency_s - earlier.write_latency_s),
        )


@dataclass(frozen=True)
class IoSample:
    """Counters of every volume, taken at one instant (`at_s`, any monotonic clock)."""

    at_s: float
    volumes: Mapping[str, IoCounters]


@dataclass(frozen=True)
class IoRates:
    """What happened on one volume between two samples."""

    interval_s: float
    read_iops: float
    write_iops: float
    read_mb_s: float
    write_mb_s: float
    mean_read_latency_us: float
    mean_write_latency_us: float

    @property
    def iops(self) -> float:
        return self.read_iops + self.write_iops

    @property
    def mb_s(self) -> float:
        return self.read_mb_s + self.write_mb_s


def rates(delta: IoCounters, interval_s: float) -> IoRates:
    """Turn counts accumulated over `interval_s` into rates and mean latencies.

    A zero interval (two samples on the same tick) yields zero rates rather than a
    division error; mean latency does not depend on the interval.
    """

    def per_s(value: float) -> float:
        return value / interval_s if interval_s > 0 else 0.0

    def mean_us(total_s: float, ops: int) -> float:
        return total_s / ops * 1e6 if ops else 0.0

    return IoRates(
        interval_s=interval_s,
        read_iops=per_s(delta.read_ops),
        write_iops=per_s(delta.write_ops),
        read_mb_s=per_s(delta.bytes_read / MB),
        write_mb_s=per_s(delta.bytes_written / MB),
        mean_read_latency_us=mean_us(delta.read_latency_s, delta.read_ops),
        mean_write_latency_us=mean_us(delta.write_latency_s, delta.write_ops),
    )


class RateTracker:
    """Remembers the previous sample so each call reports the interval since the last.

    A volume seen for the first time only sets its baseline: it appears in the
    result from the second sample on.
    """

    def __init__(self) -> None:
        self._previous: IoSample | None = None

    def update(self, sample: IoSample) -> dict[str, IoRates]:
        previous, self._previous = self._previous, sample
        if previous is None:
            return {}
        interval = max(0.0, sample.at_s - previous.at_s)
        return {
            name: rates(counters.minus(previous.volumes[name]), interval)
            for name, counters in sample.volumes.items()
            if name in previous.volumes
        }


class IoCounterSet:
    """Thread-safe running totals per volume, fed by the local engine's I/O calls."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._totals: dict[str, IoCounters] = {}

    def record(self, volume: str, *, read: bool, nbytes: int, seconds: float) -> None:
        with self._lock:
            now = self._totals.get(volume, IoCounters())
            if read:
                now = replace(
                    now,
                    read_ops=now.read_ops + 1,
                    bytes_read=now.bytes_read + nbytes,
                    read_latency_s=now.read_latency_s + seconds,
                )
            else:
                now = replace(
                    now,
                    write_ops=now.write_ops + 1,
                    bytes_written=now.bytes_written + nbytes,
                    write_latency_s=now.write_latency_s + seconds,
                )
            self._totals[volume] = now

    def snapshot(self) -> dict[str, IoCounters]:
        with self._lock:
            return dict(self._totals)

    def ensure(self, volume: str) -> None:
        """Start a volume at zero so its first interval is reported from creation."""
        with self._lock:
            self._totals.setdefault(volume, IoCounters())

    def drop(self, volume: str) -> None:
        with self._lock:
            self._totals.pop(volume, None)
