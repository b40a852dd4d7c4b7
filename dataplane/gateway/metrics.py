"""The gateway's Prometheus metrics: latency as clients see it, routing and admission."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from dataplane.inference.metrics import TPOT_BUCKETS, TTFT_BUCKETS, RequestTiming


class GatewayMetrics:
    """Histograms named as the worker's (GenAI conventions), labelled tenant and model,
    measured from the request's arrival at the gateway."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        labels = ("tenant", "model")
        self.ttft = Histogram(
            "gen_ai_server_time_to_first_token_seconds",
            "Time to the first token, at the gateway",
            labels,
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "gen_ai_server_time_per_output_token_seconds",
            "Time per output token after the first, at the gateway",
            labels,
            buckets=TPOT_BUCKETS,
            registry=r,
        )
        self.queue = Histogram(
            "tailguard_gateway_queue_time_seconds",
            "Arrival at the gateway to sent to a replica",
            labels,
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            "tailguard_gateway_requests", "Requests by outcome", (*labels, "outcome"), registry=r
        )
        self.routed = Counter(
            "tailguard_gateway_routed",
            "Requests sent to each replica",
            ("model", "replica"),
            registry=r,
        )
        self.replica_up = Gauge(
            "tailguard_gateway_replica_up",
            "1 while a replica streams its state",
            ("model", "replica"),
            registry=r,
        )
        self.waiting = Gauge(
            "tailguard_gateway_waiting_requests",
            "Requests waiting at the gateway",
            ("model",),
            registry=r,
        )

    def observe(self, tenant: str, model: str, timing: RequestTiming) -> None:
        if timing.ttft is not None:
            self.ttft.labels(tenant, model).observe(timing.ttft)
        if timing.tpot is not None:
            self.tpot.labels(tenant, model).observe(timing.tpot)
        if timing.queue is not None:
            self.queue.labels(tenant, model).observe(timing.queue)

    def render(self) -> bytes:
        return bytes(generate_latest(self.registry))
