"""Folding gauge readings into a bucket's stats: sum, count, min, max, last; summing
sketches once decoded."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import uuid4

from agent.protocol import SeriesSketch, TelemetryBatch
from controlplane.telemetry.pipeline.merge import GaugeStats, Rollups, fold_gauge, fold_reading
from controlplane.telemetry.pipeline.validate import parse_batch
from tests.controlplane.telemetry_helpers import sketch_of


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


def test_the_merge_adds_the_sketches_validation_decoded(monkeypatch: Any) -> None:
    """One decode per sketch: what `parse_batch` decoded, `Rollups.of` adds as it is."""
    from controlplane.telemetry.pipeline import merge

    tenant, deployment = uuid4(), uuid4()
    end = datetime(2030, 1, 1, 0, 0, 5, tzinfo=UTC)
    frames = [
        TelemetryBatch(
            node_id=uuid4(),
            seq=1,
            interval_start=end - timedelta(seconds=1),
            interval_end=end,
            gauges={},
            series=[
                SeriesSketch(
                    tenant_id=tenant,
                    deployment_id=deployment,
                    metric="ttft",
                    sketch=sketch_of(values),
                    thresholds=[],
                )
            ],
            counters={},
            usage=[],
        ).model_dump_json()
        for values in ([0.1, 0.2], [0.3], [0.1, 0.2])
    ]
    decoded: dict[str, Any] = {}
    batches = [parse_batch(frame, decoded) for frame in frames]
    assert len(decoded) == 2  # the same text decodes once
    expected = {k: s.to_bytes() for k, s in Rollups.of(batches).latency.items()}

    def no_decode(_: Any) -> bytes:
        raise AssertionError("decoded a sketch twice")

    monkeypatch.setattr(merge.base64, "b64decode", no_decode)
    summed = Rollups.of(batches, decoded=decoded).latency
    assert {k: s.to_bytes() for k, s in summed.items()} == expected
    assert {s.count for s in summed.values()} == {5}
