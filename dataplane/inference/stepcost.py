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
import statistics
from dataclasses import dataclass

SMOOTHING = 0.1
"""Weight of a new observation in its bucket's means, once it has been seen that often."""
MIN_SEEN = 4
"""Observations before a bucket counts in the fit."""
WEIGHT_CAP = 1000
"""Observations past which a bucket weighs no more in the fit."""
OUTLIER = 4.0
"""An observation counts as at most this many times its bucket's mean."""
STALE = 20_000
"""Observations after which a bucket not seen among them is forgotten."""


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


class _Bucket:
    """Means of the counts and seconds seen in one bucket: the median of the first
    ``MIN_SEEN`` seconds (a first call's stall among them counts for nothing), then
    a mean that ends up smoothed."""

    def __init__(self) -> None:
        self.firsts: list[float] = []
        self.count = 0.0
        self.seconds = 0.0
        self.seen = 0
        self.last = 0  # the cost model's observation that last fell here

    def observe(self, count: int, seconds: float, index: int) -> None:
        self.seen += 1
        self.last = index
        weight = max(1.0 / self.seen, SMOOTHING)
        self.count += weight * (count - self.count)
        if self.seen < MIN_SEEN:
            self.firsts.append(seconds)
        elif self.seen == MIN_SEEN:
            self.seconds = statistics.median([*self.firsts, seconds])
            self.firsts = []
        else:
            if self.seconds > 0:
                seconds = min(seconds, OUTLIER * self.seconds)
            self.seconds += weight * (seconds - self.seconds)


class LinearCost:
    """Seconds against a count, fit as a line through per-bucket means.

    Counts go into buckets by their power of two (1, 2-3, 4-7, ...). Each bucket keeps
    its mean count and mean seconds (from the median of its first observations, then a
    mean that ends up smoothed) and how often it was seen; a bucket not seen for a while
    keeps its means, so a step held to a few rows still knows what a full batch cost,
    until ``STALE`` observations pass without it. The line is least squares through the
    buckets seen ``MIN_SEEN`` times, each weighted by how often it was seen (up to
    ``WEIGHT_CAP``); an observation counts as at most ``OUTLIER`` times its bucket's
    mean and, once buckets give a line, what the line predicts for it, so a stall (a
    first call, a burst of interference) cannot hold the line up or flatten it. A
    fit that crosses below zero goes through the origin. Where the buckets give no line
    of positive slope (a fit that slopes down, or one bucket among others not seen
    enough yet), the last line's slope is kept and drawn through the most observed
    bucket: a step held to one row, which got cheaper, lowers the base and lets more rows
    in. With no line yet, or no other bucket remembered, the bucket's cost is all fixed:
    a step of one row cannot tell its fixed part from its part per row, and taking it all
    as per row would hold steps to that row for good, while taking it as fixed lets rows
    in until larger steps show their cost (so a bucket that once made larger steps look
    dear is measured again once forgotten).
    """

    def __init__(self) -> None:
        self._buckets: dict[int, _Bucket] = {}
        self._observed = 0
        self.line: Line | None = None
        self._fitted = False  # the line is a fit through buckets, not a fallback

    def observe(self, count: int, seconds: float) -> None:
        if count <= 0:
            return
        self._observed += 1
        if self._fitted and self.line is not None:
            seconds = min(seconds, OUTLIER * self.line.seconds(count))
        bucket = self._buckets.setdefault(count.bit_length(), _Bucket())
        bucket.observe(count, seconds, self._observed)
        if self._observed % 1024 == 0:
            self._buckets = {
                key: b for key, b in self._buckets.items() if self._observed - b.last <= STALE
            }
        self.line = self._fit() or self.line

    def _fit(self) -> Line | None:
        points = [
            (b.count, b.seconds, float(min(b.seen, WEIGHT_CAP)))
            for b in self._buckets.values()
            if b.seen >= MIN_SEEN
        ]
        if not points:
            return None
        sw = sum(w for _, _, w in points)
        sx = sum(w * x for x, _, w in points)
        sy = sum(w * y for _, y, w in points)
        sxx = sum(w * x * x for x, _, w in points)
        sxy = sum(w * x * y for x, y, w in points)
        spread = sw * sxx - sx * sx
        self._fitted = len(points) > 1 and spread > 0
        if self._fitted:
            per_unit = (sw * sxy - sx * sy) / spread
            if per_unit > 0:
                base = (sy - per_unit * sx) / sw
                # A line that would cross below zero: the best one through the origin.
                return Line(base, per_unit) if base >= 0 else Line(0.0, sxy / sxx)
            self._fitted = False
        x, y, _ = max(points, key=lambda point: point[2])
        alone = len(self._buckets) == 1
        per_unit = 0.0 if self.line is None or alone else self.line.per_unit
        return Line(max(0.0, y - per_unit * x), per_unit)
