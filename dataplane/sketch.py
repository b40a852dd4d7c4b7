"""Mergeable latency sketches and exact SLO threshold counters.

Percentiles on dashboards come from DDSketch (1% relative error, mergeable across
workers, nodes and time windows without losing that bound); SLO compliance comes from
exact good/total counts per threshold, never from a sketch. The wire form of a sketch
is DDSketch's own protobuf message (``ddsketch.pb``), so any DDSketch implementation can
read it; it carries the bins and zero count (hence the count) but not min/max/sum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from ddsketch import DDSketch
from ddsketch.ddsketch import BaseDDSketch
from ddsketch.pb.ddsketch_pb2 import DDSketch as DDSketchMessage
from ddsketch.pb.proto import DDSketchProto
from google.protobuf.message import DecodeError

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


class _Bins:
    """One store's counts as a dense array starting at bin index `offset`."""

    def __init__(self) -> None:
        self.offset = 0
        self.counts: npt.NDArray[np.float64] = np.zeros(0)

    def add(self, offset: int, counts: npt.NDArray[np.float64]) -> None:
        if not counts.size:
            return
        if not self.counts.size:
            self.offset, self.counts = offset, counts.copy()
            return
        low = min(self.offset, offset)
        high = max(self.offset + self.counts.size, offset + counts.size)
        if (low, high) != (self.offset, self.offset + self.counts.size):
            grown = np.zeros(high - low)
            grown[self.offset - low : self.offset - low + self.counts.size] = self.counts
            self.offset, self.counts = low, grown
        self.counts[offset - low : offset - low + counts.size] += counts

    def add_sparse(self, indices: npt.NDArray[np.int64], counts: npt.NDArray[np.float64]) -> None:
        """Add bins given by index: spread into one dense run, then added at once."""
        if not indices.size:
            return
        low = int(indices.min())
        dense = np.zeros(int(indices.max()) - low + 1)
        np.add.at(dense, indices - low, counts)
        self.add(low, dense)

    def add_store(self, store: Any) -> None:
        self.add(store.contiguousBinIndexOffset, np.array(store.contiguousBinCounts, dtype=float))
        sparse = store.binCounts
        self.add_sparse(
            np.fromiter(sparse.keys(), np.int64, len(sparse)),
            np.fromiter(sparse.values(), float, len(sparse)),
        )

    def write(self, store: Any) -> None:
        nonzero = np.flatnonzero(self.counts)
        if nonzero.size:
            store.contiguousBinIndexOffset = self.offset + int(nonzero[0])
            store.contiguousBinCounts.extend(self.counts[nonzero[0] : nonzero[-1] + 1].tolist())


_MAPPING_MESSAGE = DDSketchMessage.FromString(LatencySketch().to_bytes()).mapping
"""The index mapping every sketch here uses (a checked sketch's must equal it)."""
_MAPPING = (_MAPPING_MESSAGE.gamma, _MAPPING_MESSAGE.indexOffset, _MAPPING_MESSAGE.interpolation)
MAX_BIN_INDEX = 8192
"""Far past any latency a sketch holds (1 ns to 10^6 s is about -1050 to 700 at 1%): a
wider index range is forged, and would make a dense sum allocate without bound."""
MAX_BINS = 8192


@dataclass(frozen=True)
class _Store:
    """One store of a checked sketch: its dense counts from bin `offset`, and its sparse
    bins' indices and counts (arrays, read-only: a flush keeps every checked sketch until
    it is merged, so they must be small and are shared)."""

    offset: int
    counts: npt.NDArray[np.float64]
    sparse_indices: npt.NDArray[np.int64]
    sparse_counts: npt.NDArray[np.float64]


@dataclass(frozen=True)
class CheckedSketch:
    """A wire sketch that `check_wire` decoded and found sound, in the form
    `SketchSum.add_checked` adds: the bins are read out of the message once (its mapping
    is this module's, or the check fails)."""

    zero: float
    positive: _Store
    negative: _Store


def check_wire(data: bytes) -> CheckedSketch:
    """The sketch in `data`, decoded for `SketchSum.add_checked` (so a checked sketch is
    not decoded again to be merged); raise ValueError, in words a sender can act on,
    unless it is a sketch that `SketchSum` can add: DDSketch protobuf of this module's
    index mapping, with finite, non-negative counts in a bounded index range."""
    message = DDSketchMessage()
    try:
        message.ParseFromString(data)
    except DecodeError as exc:
        raise ValueError(f"not a DDSketch protobuf message ({exc})") from None
    mapping = message.mapping
    if (mapping.gamma, mapping.indexOffset, mapping.interpolation) != _MAPPING:
        raise ValueError(
            f"index mapping gamma={mapping.gamma} differs from the {RELATIVE_ACCURACY:.0%} "
            "relative-accuracy mapping every sketch here uses"
        )
    total = least = message.zeroCount
    stores = []
    for store in (message.positiveValues, message.negativeValues):
        contiguous, sparse = store.contiguousBinCounts, store.binCounts
        size = len(contiguous) + len(sparse)
        if size > MAX_BINS:
            raise ValueError(f"{size} bins in one store; at most {MAX_BINS}")
        if sparse and max(abs(i) for i in sparse) > MAX_BIN_INDEX:
            raise ValueError(f"a bin index outside -{MAX_BIN_INDEX}..{MAX_BIN_INDEX}")
        first = store.contiguousBinIndexOffset
        # One conversion to an array, checked and later added by numpy: this runs for
        # every sketch ingested.
        counts = np.array(contiguous, dtype=float)
        if counts.size:
            if max(abs(first), abs(first + counts.size - 1)) > MAX_BIN_INDEX:
                raise ValueError(f"a bin index outside -{MAX_BIN_INDEX}..{MAX_BIN_INDEX}")
            total += float(counts.sum())
            least = min(least, float(counts.min()))
        indices = np.fromiter(sparse.keys(), np.int64, len(sparse))
        weights = np.fromiter(sparse.values(), float, len(sparse))
        if weights.size:
            total += float(weights.sum())
            least = min(least, float(weights.min()))
        for array in (counts, indices, weights):
            array.setflags(write=False)
        stores.append(_Store(first, counts, indices, weights))
    # A sum is finite only if no count is infinite or NaN; with none NaN, `least` is the
    # smallest count.
    if not math.isfinite(total) or least < 0:
        raise ValueError("a bin count that is negative, infinite or NaN")
    return CheckedSketch(message.zeroCount, stores[0], stores[1])


class SketchSum:
    """Encoded sketches summed bin by bin: a merge that never builds DDSketch objects.

    Decoding a sketch into the library's stores adds one bin per call, which is too slow
    where thousands of sketches a second are merged (telemetry ingest). Sketches of the
    same index mapping merge exactly by adding bin counts, which is what this does.
    """

    def __init__(self) -> None:
        self._mapping: Any = None
        self._positive = _Bins()
        self._negative = _Bins()
        self._zero = 0.0

    def add_bytes(self, data: bytes) -> None:
        message = DDSketchMessage()
        message.ParseFromString(data)
        self._add_mapping(message.mapping)
        self._zero += message.zeroCount
        self._positive.add_store(message.positiveValues)
        self._negative.add_store(message.negativeValues)

    def add_checked(self, checked: CheckedSketch) -> None:
        """Add a sketch as `check_wire` returned it, without decoding it again."""
        self._add_mapping(_MAPPING_MESSAGE)
        self._zero += checked.zero
        for bins, store in ((self._positive, checked.positive), (self._negative, checked.negative)):
            bins.add(store.offset, store.counts)
            bins.add_sparse(store.sparse_indices, store.sparse_counts)

    def add(self, other: SketchSum) -> None:
        if other._mapping is None:
            return
        self._add_mapping(other._mapping)
        self._zero += other._zero
        self._positive.add(other._positive.offset, other._positive.counts)
        self._negative.add(other._negative.offset, other._negative.counts)

    def _add_mapping(self, mapping: Any) -> None:
        if self._mapping is None:
            self._mapping = mapping
        elif (mapping.gamma, mapping.indexOffset, mapping.interpolation) != (
            self._mapping.gamma,
            self._mapping.indexOffset,
            self._mapping.interpolation,
        ):
            raise ValueError("only sketches of the same index mapping can be summed")

    @property
    def count(self) -> int:
        return round(self._zero + float(self._positive.counts.sum() + self._negative.counts.sum()))

    def to_bytes(self) -> bytes:
        if self._mapping is None:
            return LatencySketch().to_bytes()
        message = DDSketchMessage()
        message.mapping.CopyFrom(self._mapping)
        message.zeroCount = self._zero
        self._positive.write(message.positiveValues)
        self._negative.write(message.negativeValues)
        return bytes(message.SerializeToString())

    def sketch(self) -> LatencySketch:
        """The sum as a sketch that answers quantiles."""
        return LatencySketch.from_bytes(self.to_bytes())
