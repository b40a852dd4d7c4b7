"""This web process's own Prometheus metrics (telemetry's `/metrics` serves them). With
`PROMETHEUS_MULTIPROC_DIR` set, every process writes them to files there and a scrape sums
them all (client_python's multiprocess mode)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

PROCESS = CollectorRegistry()

AGENT_TURN_WAIT = Histogram(
    "tailguard_agent_request_wait_seconds",
    "Time agents' requests waited for a turn (AGENT_REQUEST_THREADS) in a web process: "
    "long waits mean the web processes serve more nodes than their cores take.",
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
    registry=PROCESS,
)
AGENT_LEFT = Counter(
    "tailguard_agent_requests_left",
    "Agents' requests dropped because their agent left while they waited for a turn.",
    registry=PROCESS,
)
