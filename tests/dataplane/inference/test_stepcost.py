"""The step cost line: a fixed part per call and a part per row, kept apart."""

from __future__ import annotations

import pytest

from dataplane.inference.stepcost import MIN_SEEN, STALE, Line, LinearCost


def fed(*samples: tuple[int, float, int]) -> LinearCost:
    """A cost model fed ``times`` observations of (count, seconds) for each sample."""
    cost = LinearCost()
    for count, seconds, times in samples:
        for _ in range(times):
            cost.observe(count, seconds)
    return cost


def test_the_line_recovers_the_fixed_part_and_the_part_per_row() -> None:
    cost = fed(*((rows, 0.001 + 0.0002 * rows, 5) for rows in (1, 2, 3, 5, 8, 13, 21, 32)))
    assert cost.line is not None
    assert cost.line.base == pytest.approx(0.001, rel=1e-6)
    assert cost.line.per_unit == pytest.approx(0.0002, rel=1e-6)
    # 0.002 s holds the fixed part and five rows, not the ten a mean cost per row at a
    # full batch (0.00023) would suggest.
    assert cost.line.most_within(0.002) == 5


def test_a_burst_of_slow_steps_does_not_hold_the_line_up() -> None:
    # A few slow steps at two rows, never seen again, count for nothing.
    cost = fed((1, 0.0012, 200), (32, 0.0074, 200), (2, 0.02, MIN_SEEN - 1))
    assert cost.line is not None and cost.line.most_within(0.002) >= 3
    # Seen often enough to count, each counts as at most four times the line's
    # prediction, and then only as much as its few observations weigh: steps neither
    # shrink to a row nor, slower still, let the line go flat.
    for slow in (0.02, 0.2, 2.0):
        cost = fed((1, 0.0012, 200), (32, 0.0074, 200), (2, slow, 8))
        assert cost.line is not None
        assert 3 <= cost.line.most_within(0.002) <= 5
        assert cost.line.most_within(0.0075) <= 33


def test_buckets_keep_what_they_saw_while_steps_stay_small() -> None:
    """A step held to one row for a long while still knows what a full batch cost."""
    cost = fed((32, 0.0074, 50), (1, 0.0012, 5000))
    assert cost.line == Line(base=pytest.approx(0.001), per_unit=pytest.approx(0.0002))


def test_a_first_stall_does_not_hold_steps_to_one_row() -> None:
    """Steps of one row cannot tell the fixed part from the part per row: with nothing
    else seen, the cost counts as fixed, so more rows get in and show what they cost;
    a stall at a bigger step, before it counts, changes nothing."""
    cost = fed((16, 2.0, 1), (1, 0.021, 100))
    assert cost.line == Line(0.021, 0.0)
    assert cost.line.most_within(0.0375) > 16
    for rows in (2, 3, 5, 8, 13, 17):
        for _ in range(20):
            cost.observe(rows, 0.02 + 0.001 * rows)
    assert cost.line is not None
    assert cost.line.most_within(0.0375) == 17


def test_one_bucket_keeps_the_last_slope_and_a_cheaper_step_lowers_the_base() -> None:
    falling = fed((1, 0.004, 10), (16, 0.002, 10))  # bigger steps measured faster
    assert falling.line == Line(0.004, 0.0)  # no line slopes down
    sloped = fed((1, 0.0012, 100), (32, 0.0074, 100), (16, 0.0001, 10))
    assert sloped.line is not None and sloped.line.per_unit > 0
    # A machine that got quieter: one row now costs half, and the base follows.
    quiet = fed((1, 0.0012, 100), (32, 0.0074, 10))
    for _ in range(2000):
        quiet.observe(1, 0.0006)
    assert quiet.line is not None and quiet.line.base < 0.0009
    assert quiet.line.per_unit > 0
    quiet.observe(0, 1.0)  # an empty step says nothing
    assert quiet.line.base < 0.0009


def test_most_within_counts_what_fits() -> None:
    line = Line(base=0.001, per_unit=0.0005)
    assert line.most_within(0.0009) == 0
    assert line.most_within(0.001) == 0
    assert line.most_within(0.0015) == 1
    assert line.most_within(0.00349) == 4
    assert Line(0.0, 0.001).most_within(0.003) == 3
    assert Line(0.002, 0.0).most_within(0.001) == 0
    assert Line(0.002, 0.0).most_within(0.003) > 1000


def test_a_dear_bucket_is_forgotten_and_measured_again() -> None:
    """Steps held to one row by a bucket that once looked dear: once it is forgotten,
    the one row's cost counts as fixed, more rows get in, and the line follows them."""
    cost = fed((1, 0.0105, 100), (2, 0.05, 100))
    assert cost.line is not None and cost.line.most_within(0.02) <= 1
    for _ in range(STALE + 1024):
        cost.observe(1, 0.0105)
    assert cost.line == Line(0.0105, 0.0)
    assert cost.line.most_within(0.02) > 2
    for _ in range(20):
        cost.observe(3, 0.0115)
    assert cost.line is not None and cost.line.most_within(0.02) > 10


def test_a_bucket_far_from_the_first_line_counts_at_its_own_cost() -> None:
    cost = fed((16, 0.016, 4))
    assert cost.line == Line(0.016, 0.0)
    for _ in range(MIN_SEEN):
        cost.observe(2048, 2.048)
    assert cost.line is not None
    assert cost.line.seconds(2048) == pytest.approx(2.048, rel=0.01)
