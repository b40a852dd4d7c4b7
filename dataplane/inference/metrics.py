"""Per-request latency: definitions, Prometheus histograms, sketches and SLO counters.

Definitions follow ``vllm bench serve`` and the OpenTelemetry GenAI conventions, on the
worker's monotonic clock:

* queue = arrival -> first scheduled (admitted to a prefill)
* TTFT  = arrival -> first token out (the engine step that produced it returned)
* ITL   = each gap between consecutive tokens out
* e2e   = arrival -> last token out
* TPOT  = (e2e - TTFT) / (output tokens - 1), defined only with 2+ output tokens

Every finished request goes to (a) Prometheus histograms named after the GenAI
conventions, labelled tenant and model, in a registry of this worker's own; (b) a
DDSketch per tenant+deployment+metric; (c) exact good/total counters for each SLO
threshold in the config. (b) and (c) are read by the agent through ``TelemetryStats
.collect``, which cuts numbered intervals so a reader that retries never counts twice.
"""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from dataplane.inference.config import SloMetric, SloThreshold
from dataplane.sketch import LatencySketch, ThresholdCounter

METRICS: tuple[SloMetric, ...] = ("queue", "ttft", "tpot", "itl", "e2e")


@dataclass
class RequestTiming:
    """Timestamps of one request (``time.perf_counter`` seconds) and its token counts."""

    arrival: float
    input_tokens: int = 0
    scheduled: float | None = None
    token_times: list[float] = field(default_factory=list)

    @property
    def output_tokens(self) -> int:
        return len(self.token_times)

    @property
    def queue(self) -> float | None:
        return None if self.scheduled is None else self.scheduled - self.arrival

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.arrival if self.token_times else None

    @property
    def e2e(self) -> float | None:
        return self.token_times[-1] - self.arrival if self.token_times else None

    @property
    def tpot(self) -> float | None:
        if len(self.token_times) < 2:
            return None
        return (self.token_times[-1] - self.token_times[0]) / (len(self.token_times) - 1)

    @property
    def itls(self) -> list[float]:
        times = self.token_times
        return [later - earlier for earlier, later in zip(times, times[1:], strict=False)]

    def samples(self) -> dict[SloMetric, list[float]]:
        """Every metric's observations for this request (ITL has one per gap)."""
        single: dict[SloMetric, float | None] = {
            "queue": self.queue,
            "ttft": self.ttft,
            "tpot": self.tpot,
            "e2e": self.e2e,
        }
        out: dict[SloMetric, list[float]] = {
            name: [value] for name, value in single.items() if value is not None
        }
        out["itl"] = self.itls
        return out


# Bucket boundaries recommended by the OpenTelemetry GenAI semantic conventions.
TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
)
TPOT_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
)
_DURATION_BUCKETS = (
    0.01,
    0.02,
    0.04,
    0.08,
    0.16,
    0.32,
    0.64,
    1.28,
    2.56,
    5.12,
    10.24,
    20.48,
    40.96,
    81.92,
)


class WorkerMetrics:
    """Prometheus metrics of one worker, in a registry of its own."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.registry = CollectorRegistry()
        labels = ("tenant", "model")
        r = self.registry
        self._histograms: dict[SloMetric, Histogram] = {
            "ttft": Histogram(
                "gen_ai_server_time_to_first_token_seconds",
                "Time to generate the first token",
                labels,
                buckets=TTFT_BUCKETS,
                registry=r,
            ),
            "tpot": Histogram(
                "gen_ai_server_time_per_output_token_seconds",
                "Time per output token after the first",
                labels,
                buckets=TPOT_BUCKETS,
                registry=r,
            ),
            "e2e": Histogram(
                "gen_ai_server_request_duration_seconds",
                "Arrival to last token",
                labels,
                buckets=_DURATION_BUCKETS,
                registry=r,
            ),
            "queue": Histogram(
                "tailguard_request_queue_time_seconds",
                "Arrival to first scheduled",
                labels,
                buckets=TTFT_BUCKETS,
                registry=r,
            ),
            "itl": Histogram(
                "tailguard_inter_token_latency_seconds",
                "Gap between consecutive output tokens",
                labels,
                buckets=TPOT_BUCKETS,
                registry=r,
            ),
        }
        self.tokens = Counter(
            "tailguard_tokens", "Tokens processed", (*labels, "direction"), registry=r
        )
        self.requests = Counter(
            "tailguard_requests", "Requests by outcome", (*labels, "outcome"), registry=r
        )
        self.running = Gauge(
            "tailguard_running_requests", "Sequences in the decode batch", registry=r
        )
        self.waiting = Gauge(
            "tailguard_waiting_requests", "Requests queued for admission", registry=r
        )
        self.step_seconds = Histogram(
            "tailguard_engine_step_seconds",
            "Wall time of one prefill or decode step",
            ("kind",),
            buckets=TPOT_BUCKETS,
            registry=r,
        )

    def observe_request(self, tenant: str, timing: RequestTiming) -> None:
        for name, values in timing.samples().items():
            histogram = self._histograms[name].labels(tenant, self.model)
            for value in values:
                histogram.observe(value)
        self.tokens.labels(tenant, self.model, "input").inc(timing.input_tokens)
        self.tokens.labels(tenant, self.model, "output").inc(timing.output_tokens)

    def count(self, tenant: str, outcome: str) -> None:
        self.requests.labels(tenant, self.model, outcome).inc()

    def render(self) -> bytes:
        return bytes(generate_latest(self.registry))


@dataclass
class _TenantTotals:
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    rejected: int = 0
    input_tokens: int = 0
    output_tokens: int = 0


@dataclass
class _Window:
    start: float
    sketches: dict[tuple[str, SloMetric], LatencySketch] = field(default_factory=dict)
    slo: dict[tuple[str, SloMetric, float], ThresholdCounter] = field(default_factory=dict)
    totals: dict[str, _TenantTotals] = field(default_factory=dict)


class TelemetryStats:
    """Sketches, exact SLO counters and token totals per tenant for this deployment.

    ``collect(after)`` implements at-least-once delivery without double counting: the
    reader passes the last sequence number it stored; if the worker's pending interval
    is newer, it is sent again, otherwise a new interval is cut and becomes pending.
    Sequence numbers restart with the process; ``instance`` (random per process) tells
    a reader when that happened, so it starts again from ``after=0``.
    """

    def __init__(self, deployment_id: str, model: str, thresholds: Iterable[SloThreshold]) -> None:
        self.deployment_id = deployment_id
        self.model = model
        self._thresholds: dict[tuple[str, SloMetric], list[float]] = {}
        self.set_thresholds(thresholds)
        self._window = _Window(start=time.time())
        self.instance = uuid.uuid4().hex
        self._seq = 0
        self._pending: dict[str, Any] | None = None

    def set_thresholds(self, thresholds: Iterable[SloThreshold]) -> None:
        """New thresholds count from now on; counts already made stay in the window. A
        threshold named twice (two SLOs with the same bound) is one counter, which the
        agent maps to each of them."""
        table: dict[tuple[str, SloMetric], list[float]] = {}
        for t in thresholds:
            bounds = table.setdefault((t.tenant, t.metric), [])
            if t.threshold_seconds not in bounds:
                bounds.append(t.threshold_seconds)
        self._thresholds = table

    def tightest(self, tenant: str, metric: SloMetric) -> float | None:
        """The tenant's smallest threshold for ``metric`` (seconds), None without one."""
        return min(self._thresholds.get((tenant, metric), ()), default=None)

    def _totals(self, tenant: str) -> _TenantTotals:
        return self._window.totals.setdefault(tenant, _TenantTotals())

    def record(self, tenant: str, timing: RequestTiming) -> None:
        window = self._window
        for metric, values in timing.samples().items():
            if not values:
                continue
            sketch = window.sketches.get((tenant, metric))
            if sketch is None:  # made once per window, not per request
                sketch = window.sketches[tenant, metric] = LatencySketch()
            counters = [
                window.slo.get((tenant, metric, threshold))
                or window.slo.setdefault((tenant, metric, threshold), ThresholdCounter(threshold))
                for threshold in self._thresholds.get((tenant, metric), ())
            ]
            for value in values:
                sketch.add(value)
                for counter in counters:
                    counter.observe(value)
        totals = self._totals(tenant)
        totals.completed += 1
        totals.input_tokens += timing.input_tokens
        totals.output_tokens += timing.output_tokens

    def count_cancelled(self, tenant: str) -> None:
        self._totals(tenant).cancelled += 1

    def count_rejected(self, tenant: str) -> None:
        self._totals(tenant).rejected += 1

    def count_failed(self, tenant: str) -> None:
        """A request the engine failed (HTTP 500): bad for availability, not measured."""
        self._totals(tenant).failed += 1

    def collect(self, after: int) -> dict[str, Any]:
        """The pending interval if the reader has not stored it yet, else a new one."""
        if self._pending is not None and self._pending["seq"] > after:
            return self._pending
        now = time.time()
        window, self._window = self._window, _Window(start=now)
        for (tenant, metric), thresholds in self._thresholds.items():
            for threshold in thresholds:
                window.slo.setdefault((tenant, metric, threshold), ThresholdCounter(threshold))
        self._seq += 1
        dep = self.deployment_id
        self._pending = {
            "instance": self.instance,
            "seq": self._seq,
            "deployment_id": dep,
            "model": self.model,
            "interval_start": window.start,
            "interval_end": now,
            "sketches": [
                {
                    "tenant": tenant,
                    "deployment_id": dep,
                    "metric": metric,
                    "count": sketch.count,
                    "sketch": base64.b64encode(sketch.to_bytes()).decode("ascii"),
                }
                for (tenant, metric), sketch in sorted(window.sketches.items())
            ],
            "slo": [
                {
                    "tenant": tenant,
                    "deployment_id": dep,
                    "metric": metric,
                    "threshold_seconds": threshold,
                    "good": c.good,
                    "total": c.total,
                }
                for (tenant, metric, threshold), c in sorted(window.slo.items())
            ],
            "requests": [
                {"tenant": tenant, "deployment_id": dep, **vars(totals)}
                for tenant, totals in sorted(window.totals.items())
            ],
        }
        return self._pending
