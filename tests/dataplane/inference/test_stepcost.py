"""The step cost line: a fixed part per call and a part per row, kept apart."""

from __future__ import annotations

import pytest

from dataplane.inference.stepcost import Line, LinearCost


def test_the_line_recovers_the_fixed_part_and_the_part_per_row() -> None:
    cost = LinearCost()
    for rows in (1, 2, 3, 5, 8, 13, 21, 32):
        for _ in range(5):
            cost.observe(rows, 0.001 + 0.0002 * rows)
    assert cost.line is not None
    assert cost.line.base == pytest.approx(0.001, rel=1e-6)
    assert cost.line.per_unit == pytest.approx(0.0002, rel=1e-6)
    # 0.002 s holds the fixed part and five rows, not the ten a mean cost per row at a
    # full batch (0.00023) would suggest.
    assert cost.line.most_within(0.002) == 5


def test_a_bucket_seen_in_a_burst_of_interference_does_not_hold_the_line_up() -> None:
    cost = LinearCost()
    for _ in range(200):
        cost.observe(1, 0.0012)
        cost.observe(32, 0.0074)
    for _ in range(3):  # a few slow steps at two rows, never seen again
        cost.observe(2, 0.02)
    assert cost.line is not None
    assert cost.line.most_within(0.002) >= 3


def test_buckets_keep_what_they_saw_while_steps_stay_small() -> None:
    """A step held to one row for a long while still knows what a full batch cost."""
    cost = LinearCost()
    for _ in range(50):
        cost.observe(32, 0.0074)
    for _ in range(5000):
        cost.observe(1, 0.0012)
    assert cost.line == Line(base=pytest.approx(0.001), per_unit=pytest.approx(0.0002))


def test_one_bucket_or_a_falling_fit_goes_through_the_origin() -> None:
    cost = LinearCost()
    cost.observe(4, 0.004)
    assert cost.line == Line(0.0, 0.001)
    cost.observe(16, 0.002)  # bigger steps measured faster: no line slopes down
    assert cost.line is not None
    assert cost.line.base == 0.0 and cost.line.per_unit > 0
    cost.observe(0, 1.0)  # an empty step says nothing
    assert cost.line.per_unit > 0


def test_most_within_counts_what_fits() -> None:
    line = Line(base=0.001, per_unit=0.0005)
    assert line.most_within(0.0009) == 0
    assert line.most_within(0.001) == 0
    assert line.most_within(0.0015) == 1
    assert line.most_within(0.00349) == 4
    assert Line(0.0, 0.001).most_within(0.003) == 3
