"""Mergeable latency sketches and exact SLO threshold counters.

Percentiles on dashboards come from DDSketch (1% relative error, mergeable across
workers, nodes and time windows without losing that bound); SLO compliance comes from
exact good/total counts per threshold, never from a sketch. The wire form of a sketch
is DDSketch's own protobuf message (``ddsketch.pb``), so any DDSketch implementation can
read it; it carries the bins and zero count (hence the count) but not min/max/sum.
"""

from __future__ import annotations

from dataclasses import dataclass

from ddsketch import DDSketch
from ddsketch.ddsketch import BaseDDSketch
from ddsketch.pb.ddsketch_pb2 import DDSketch as DDSketchMessage
from ddsketch.pb.proto import DDSketchProto

RELATIVE_ACCURACY = 0.01


class LatencySketch:
    """A DDSketch of latencies in seconds with bytes round-trip and merge."""

    def __init__(self, sketch: BaseDDSketch | None = None) -> None:
        self._sketch: BaseDDSketch = sketch if sketch is not None else DDSketch(RELATIVE_ACCURACY)

    def add(self, value: float) -> None:
        self._sketch.add(value)

    def merge(self, other: LatencySketch) -> None:
        """Fold ``other`` in; both must use the same relative accuracy."""
        self._sketch.merge(other._sketch)

    @property
    def count(self) -> int:
        return int(self._sketch.count)

    def quantile(self, q: float) -> float | None:
        """Value at quantile ``q`` in [0, 1], within 1% of the true one; None if empty."""
        value = self._sketch.get_quantile_value(q)
        return None if value is None else float(value)

    def to_bytes(self) -> bytes:
        """DDSketch protobuf, with the empty bins at either end of each store dropped
        (the library serialises its whole preallocated range)."""
        message = DDSketchProto.to_proto(self._sketch)  # type: ignore[no-untyped-call]
        for store in (message.positiveValues, message.negativeValues):
            counts = list(store.contiguousBinCounts)
            nonzero = [i for i, c in enumerate(counts) if c]
            kept = counts[nonzero[0] : nonzero[-1] + 1] if nonzero else []
            store.contiguousBinIndexOffset += nonzero[0] if nonzero else 0
            del store.contiguousBinCounts[:]
            store.contiguousBinCounts.extend(kept)
        return bytes(message.SerializeToString())

    @classmethod
    def from_bytes(cls, data: bytes) -> LatencySketch:
        message = DDSketchMessage()
        message.ParseFromString(data)
        return cls(DDSketchProto.from_proto(message))  # type: ignore[no-untyped-call]


@dataclass
class ThresholdCounter:
    """Exact count of events and of those at or under a threshold (good)."""

    threshold_seconds: float
    good: int = 0
    total: int = 0

    def observe(self, value: float) -> None:
        self.total += 1
        if value <= self.threshold_seconds:
            self.good += 1

    def merge(self, other: ThresholdCounter) -> None:
        if other.threshold_seconds != self.threshold_seconds:
            raise ValueError("only counters of the same threshold can be merged")
        self.good += other.good
        self.total += other.total
