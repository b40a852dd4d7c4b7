"""What a step costs, as the step loop measures it: seconds as a line in its work.

A decode forward call reads every weight once however many rows it carries, and a
prompt chunk is a forward call of its own, so a step's seconds are a fixed part plus a
part per row (or per prompt token). Spreading the fixed part over the tokens, as a mean
cost per token does, makes small steps look dear: sizing steps from it shrinks them,
which raises the mean again, until a TPOT objective leaves a row or two. ``LinearCost``
keeps the two parts apart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SMOOTHING = 0.1
"""Weight of a new observation in its bucket's means, once it has been seen that often."""
WEIGHT_CAP = 1000
"""Observations past which a bucket weighs no more in the fit."""


@dataclass(frozen=True)
class Line:
    """``base + per_unit * count`` seconds."""

    base: float
    per_unit: float

    def seconds(self, count: float) -> float:
        return self.base + self.per_unit * count

    def most_within(self, seconds: float) -> int:
        """The largest count whose cost fits in ``seconds`` (0 if none does)."""
        if self.per_unit <= 0:
            return 0 if seconds < self.base else 1 << 30
        return max(0, math.floor((seconds - self.base) / self.per_unit + 1e-9))


class LinearCost:
    """Seconds against a count, fit as a line through per-bucket means.

    Counts go into buckets by their power of two (1, 2-3, 4-7, ...). Each bucket keeps
    its mean count and mean seconds (a plain mean over its first observations, then
    smoothed) and how often it was seen; a bucket not seen for a while keeps its means,
    so a step held to a few rows still knows what a full batch cost. The line is least
    squares through the buckets, each weighted by how often it was seen (up to
    ``WEIGHT_CAP``), so a bucket seen a few times in a burst of interference cannot hold
    the line up; with one bucket, or a fit that slopes down or crosses below zero, the
    line goes through the origin instead.
    """

    def __init__(self) -> None:
        self._buckets: dict[int, tuple[float, float, int]] = {}
        self.line: Line | None = None

    def observe(self, count: int, seconds: float) -> None:
        if count <= 0:
            return
        key = count.bit_length()
        x, y, seen = self._buckets.get(key, (0.0, 0.0, 0))
        seen += 1
        weight = max(1.0 / seen, SMOOTHING)
        self._buckets[key] = (x + weight * (count - x), y + weight * (seconds - y), seen)
        self.line = self._fit()

    def _fit(self) -> Line:
        points = [(x, y, float(min(seen, WEIGHT_CAP))) for x, y, seen in self._buckets.values()]
        sw = sum(w for _, _, w in points)
        sx = sum(w * x for x, _, w in points)
        sy = sum(w * y for _, y, w in points)
        sxx = sum(w * x * x for x, _, w in points)
        sxy = sum(w * x * y for x, y, w in points)
        spread = sw * sxx - sx * sx
        if len(points) > 1 and spread > 0:
            per_unit = (sw * sxy - sx * sy) / spread
            base = (sy - per_unit * sx) / sw
            if per_unit > 0 and base >= 0:
                return Line(base, per_unit)
        return Line(0.0, sxy / sxx)
