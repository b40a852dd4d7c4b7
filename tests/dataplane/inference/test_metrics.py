"""Latency definitions, exact SLO counting, the stats read protocol and sketches."""

from __future__ import annotations

import base64
import random

import pytest

from dataplane.inference.config import SloThreshold
from dataplane.inference.metrics import RequestTiming, TelemetryStats, WorkerMetrics
from dataplane.sketch import RELATIVE_ACCURACY, LatencySketch, ThresholdCounter


def timing() -> RequestTiming:
    return RequestTiming(
        arrival=10.0, input_tokens=7, scheduled=10.25, token_times=[10.5, 10.75, 11.0, 11.5, 12.5]
    )


def test_definitions_on_recorded_timestamps() -> None:
    t = timing()
    assert t.queue == pytest.approx(0.25)
    assert t.ttft == pytest.approx(0.5)
    assert t.e2e == pytest.approx(2.5)
    # TPOT = (e2e - TTFT) / (output tokens - 1) = (2.5 - 0.5) / 4
    assert t.tpot == pytest.approx(0.5)
    assert t.itls == pytest.approx([0.25, 0.25, 0.5, 1.0])
    assert t.output_tokens == 5
    samples = t.samples()
    assert set(samples) == {"queue", "ttft", "tpot", "itl", "e2e"}
    assert len(samples["itl"]) == 4 and samples["ttft"] == [pytest.approx(0.5)]


def test_single_token_and_tokenless_requests() -> None:
    one = RequestTiming(arrival=0.0, scheduled=0.1, token_times=[0.3])
    assert one.tpot is None and one.itls == [] and one.e2e == one.ttft
    assert "tpot" not in one.samples()
    none = RequestTiming(arrival=0.0)
    assert none.samples() == {"itl": []}


def thresholds() -> list[SloThreshold]:
    return [
        SloThreshold(tenant="a", metric="ttft", threshold_seconds=0.5),
        SloThreshold(tenant="a", metric="itl", threshold_seconds=0.25),
        SloThreshold(tenant="b", metric="e2e", threshold_seconds=1.0),
    ]


def test_slo_counters_are_exact_and_inclusive_at_the_threshold() -> None:
    stats = TelemetryStats("dep", "m", [*thresholds(), thresholds()[0]])  # one named twice
    stats.record("a", timing())  # ttft exactly 0.5: good; itl 0.25, 0.25 good, 0.5, 1.0 bad
    stats.record("a", RequestTiming(arrival=0.0, scheduled=0.0, token_times=[0.75]))
    snap = stats.collect(after=0)
    slo = {
        (s["tenant"], s["metric"], s["threshold_seconds"]): (s["good"], s["total"])
        for s in snap["slo"]
    }
    assert slo[("a", "ttft", 0.5)] == (1, 2)
    assert slo[("a", "itl", 0.25)] == (2, 4)
    assert slo[("b", "e2e", 1.0)] == (0, 0)
    assert snap["requests"] == [
        {
            "tenant": "a",
            "deployment_id": "dep",
            "completed": 2,
            "failed": 0,
            "cancelled": 0,
            "rejected": 0,
            "input_tokens": 7,
            "output_tokens": 6,
        }
    ]


def test_collect_resends_until_acknowledged_and_never_double_counts() -> None:
    stats = TelemetryStats("dep", "m", thresholds())
    stats.record("a", timing())
    first = stats.collect(after=0)
    assert first["seq"] == 1
    stats.record("a", timing())
    # The reader lost the answer and asks again: the same interval, not a new one.
    assert stats.collect(after=0) is first
    second = stats.collect(after=1)
    assert second["seq"] == 2
    counts = [
        {s["metric"]: s["count"] for s in snap["sketches"]}["ttft"] for snap in (first, second)
    ]
    assert counts == [1, 1]
    third = stats.collect(after=2)
    assert third["seq"] == 3 and third["sketches"] == []
    assert first["instance"] == third["instance"] != TelemetryStats("dep", "m", []).instance


def test_reloaded_thresholds_count_from_then_on() -> None:
    stats = TelemetryStats("dep", "m", thresholds())
    stats.record("a", timing())
    stats.set_thresholds([SloThreshold(tenant="a", metric="ttft", threshold_seconds=0.1)])
    stats.record("a", timing())
    slo = {
        (s["metric"], s["threshold_seconds"]): (s["good"], s["total"])
        for s in stats.collect(after=0)["slo"]
    }
    assert slo[("ttft", 0.5)] == (1, 1)
    assert slo[("ttft", 0.1)] == (0, 1)


def test_snapshot_sketches_decode() -> None:
    stats = TelemetryStats("dep", "m", [])
    for _ in range(3):
        stats.record("a", timing())
    by_metric = {s["metric"]: s for s in stats.collect(after=0)["sketches"]}
    sketch = LatencySketch.from_bytes(base64.b64decode(by_metric["e2e"]["sketch"]))
    assert sketch.count == 3
    assert sketch.quantile(0.5) == pytest.approx(2.5, rel=RELATIVE_ACCURACY)


def test_prometheus_names_follow_genai_conventions() -> None:
    metrics = WorkerMetrics("synthetic")
    metrics.observe_request("a", timing())
    metrics.count("a", "length")
    text = metrics.render().decode()
    for name in (
        "gen_ai_server_time_to_first_token_seconds",
        "gen_ai_server_time_per_output_token_seconds",
        "gen_ai_server_request_duration_seconds",
        "tailguard_request_queue_time_seconds",
        "tailguard_inter_token_latency_seconds",
    ):
        assert f'{name}_count{{model="synthetic",tenant="a"}}' in text, name
    assert 'tailguard_tokens_total{direction="output",model="synthetic",tenant="a"} 5.0' in text
    assert 'tailguard_inter_token_latency_seconds_count{model="synthetic",tenant="a"} 4.0' in text
    # Each worker has its own registry: a second one starts from zero.
    assert "tenant=" not in WorkerMetrics("synthetic").render().decode()


def test_sketch_round_trip_and_merge_keep_the_error_bound() -> None:
    rng = random.Random(5)
    left = [rng.lognormvariate(-4, 1) for _ in range(5000)]
    right = [rng.lognormvariate(-2, 0.5) for _ in range(3000)]
    a, b = LatencySketch(), LatencySketch()
    for v in left:
        a.add(v)
    for v in right:
        b.add(v)
    restored = LatencySketch.from_bytes(a.to_bytes())
    assert restored.count == 5000
    assert restored.quantile(0.99) == pytest.approx(a.quantile(0.99), rel=1e-12)
    restored.merge(LatencySketch.from_bytes(b.to_bytes()))
    everything = sorted(left + right)
    assert restored.count == len(everything)
    for q in (0.5, 0.9, 0.99):
        exact = everything[int(q * (len(everything) - 1))]
        estimate = restored.quantile(q)
        assert estimate is not None
        assert abs(estimate - exact) <= RELATIVE_ACCURACY * exact * 1.01
    assert LatencySketch().quantile(0.5) is None
    assert LatencySketch.from_bytes(LatencySketch().to_bytes()).count == 0


def test_threshold_counter_merge() -> None:
    a, b = ThresholdCounter(0.2), ThresholdCounter(0.2)
    for v in (0.1, 0.2, 0.3):
        a.observe(v)
    b.observe(0.05)
    a.merge(b)
    assert (a.good, a.total) == (3, 4)
    with pytest.raises(ValueError):
        a.merge(ThresholdCounter(0.3))
