"""`check_wire`: what telemetry ingest refuses before a sketch can reach a merge."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from dataplane.sketch import (
    MAX_BIN_INDEX,
    MAX_BINS,
    DDSketchMessage,
    LatencySketch,
    SketchSum,
    check_wire,
)


def wire(change: Callable[[Any], None] | None = None) -> bytes:
    sketch = LatencySketch()
    for value in (0.0, 0.01, 0.2, 0.2, 3.0):
        sketch.add(value)
    message = DDSketchMessage()
    message.ParseFromString(sketch.to_bytes())
    if change is not None:
        change(message)
    return bytes(message.SerializeToString())


def test_a_sketch_of_latencies_passes_and_sums() -> None:
    check_wire(wire())
    summed = SketchSum()
    summed.add_bytes(wire())
    assert summed.count == 5


def _set_contiguous(message: Any, offset: int, counts: list[float]) -> None:
    del message.positiveValues.contiguousBinCounts[:]
    message.positiveValues.contiguousBinIndexOffset = offset
    message.positiveValues.contiguousBinCounts.extend(counts)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda m: m.positiveValues.binCounts.__setitem__(7, float("nan")), "NaN"),
        (lambda m: m.positiveValues.binCounts.__setitem__(7, float("inf")), "infinite"),
        (lambda m: m.negativeValues.binCounts.__setitem__(7, -1.0), "negative"),
        (lambda m: setattr(m, "zeroCount", -2.0), "negative"),
        (lambda m: _set_contiguous(m, 10, [1.0, float("nan"), 1.0]), "NaN"),
        (lambda m: _set_contiguous(m, 10, [1.0, -0.5]), "negative"),
        (lambda m: m.positiveValues.binCounts.__setitem__(MAX_BIN_INDEX + 1, 1.0), "bin index"),
        (lambda m: m.negativeValues.binCounts.__setitem__(-MAX_BIN_INDEX - 1, 1.0), "bin index"),
        (lambda m: _set_contiguous(m, MAX_BIN_INDEX - 1, [1.0, 1.0, 1.0]), "bin index"),
        (lambda m: _set_contiguous(m, -MAX_BIN_INDEX - 1, [1.0]), "bin index"),
        (lambda m: _set_contiguous(m, 0, [1.0] * (MAX_BINS + 1)), "bins in one store"),
        (lambda m: setattr(m.mapping, "gamma", 1.5), "index mapping"),
    ],
)
def test_refused_sketches_name_what_is_wrong(change: Callable[[Any], None], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        check_wire(wire(change))


def test_bytes_that_are_no_sketch_are_refused() -> None:
    with pytest.raises(ValueError, match="not a DDSketch"):
        check_wire(b"\xff\xff\xff")


def test_counts_at_the_edge_of_the_index_range_pass() -> None:
    check_wire(wire(lambda m: _set_contiguous(m, MAX_BIN_INDEX - 2, [1.0, 2.0, 3.0])))
    check_wire(wire(lambda m: m.negativeValues.binCounts.__setitem__(-MAX_BIN_INDEX, 1.0)))
