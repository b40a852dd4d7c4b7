"""Folding gauge readings into a bucket's stats: sum, count, min, max, last."""

from __future__ import annotations

from controlplane.telemetry.pipeline.merge import GaugeStats, fold_gauge, fold_reading


def test_readings_fold_into_sum_count_min_max_and_last() -> None:
    bucket: dict[str, GaugeStats] = {}
    for reading in ({"a": 3.0, "b": -1.0}, {"a": 1.0}, {"a": 2.0, "b": -4.0}):
        fold_reading(bucket, reading)
    assert bucket == {"a": [6.0, 3, 1.0, 3.0, 2.0], "b": [-5.0, 2, -4.0, -1.0, -4.0]}


def test_folding_readings_one_by_one_equals_folding_their_buckets() -> None:
    readings = [{"a": v} for v in (5.0, 7.0, 6.0, 9.0, 1.0)]
    by_reading: dict[str, GaugeStats] = {}
    for reading in readings:
        fold_reading(by_reading, reading)
    early: dict[str, GaugeStats] = {}
    late: dict[str, GaugeStats] = {}
    for reading in readings[:2]:
        fold_reading(early, reading)
    for reading in readings[2:]:
        fold_reading(late, reading)
    fold_gauge(early, "a", late["a"])
    assert early == by_reading
