"""The agent's Prometheus endpoint: the latest telemetry gauges and the shipper's counters.

One collector object (prometheus client_python's custom-collector shape) reads the
shipper's last batch and counters at scrape time, so nothing is kept twice. Served on
`metrics_bind_address:metrics_port` (default 127.0.0.1:9810; port 0 turns it off).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from agent.shipper import TelemetryShipper

log = logging.getLogger(__name__)

# gpu.<index>.<gauge key> -> (metric name, help, scale)
_GPU = {
    "utilization_pct": ("tailguard_agent_gpu_utilization_ratio", "GPU busy fraction", 0.01),
    "memory_used_bytes": ("tailguard_agent_gpu_memory_used_bytes", "GPU memory in use", 1.0),
    "power_w": ("tailguard_agent_gpu_power_watts", "GPU power draw", 1.0),
    "temperature_c": ("tailguard_agent_gpu_temperature_celsius", "GPU core temperature", 1.0),
}


class AgentCollector:
    """Turns the shipper's state into metric families on every scrape."""

    def __init__(self, shipper: TelemetryShipper, applied_generation: Callable[[], int]) -> None:
        self._shipper = shipper
        self._applied_generation = applied_generation

    def collect(self) -> Iterator[Metric]:
        shipper = self._shipper
        gauges = dict(shipper.latest_gauges)
        gpu = {
            key: GaugeMetricFamily(name, doc, labels=["gpu"])
            for key, (name, doc, _) in _GPU.items()
        }
        queue = GaugeMetricFamily(
            "tailguard_agent_worker_queue_depth",
            "Requests waiting in the deployment's workers on this node",
            labels=["deployment"],
        )
        load1 = GaugeMetricFamily("tailguard_agent_host_load1", "One-minute load average")
        for key, value in sorted(gauges.items()):
            kind, _, rest = key.partition(".")
            part, _, name = rest.rpartition(".")
            if kind == "gpu" and name in gpu:
                gpu[name].add_metric([part], value * _GPU[name][2])
            elif kind == "worker" and name == "queue_depth":
                queue.add_metric([part], value)
            elif key == "host.load1":
                load1.add_metric([], value)
        yield from gpu.values()
        if "host.load1" in gauges:
            yield load1
        yield queue
        batches = CounterMetricFamily(
            "tailguard_agent_telemetry_batches",
            "Telemetry batches acknowledged, by outcome",
            labels=["outcome"],
        )
        outcomes = shipper.outcomes
        for outcome in ("stored", "duplicate", "rejected", "retry"):
            batches.add_metric([outcome], float(outcomes.get(outcome, 0)))
        yield batches
        yield GaugeMetricFamily(
            "tailguard_agent_telemetry_buffered_batches",
            "Telemetry batches on disk waiting for an ack",
            value=float(len(shipper.buffer)),
        )
        yield CounterMetricFamily(
            "tailguard_agent_telemetry_dropped",
            "Telemetry batches dropped because the buffer was full",
            value=float(shipper.buffer.dropped_total),
        )
        yield GaugeMetricFamily(
            "tailguard_agent_applied_generation",
            "Generation of the desired state applied on this node (0: none yet)",
            value=float(self._applied_generation()),
        )


class MetricsServer:
    """/metrics served from a background thread (prometheus_client's own HTTP server)."""

    def __init__(self, collector: AgentCollector, port: int, address: str) -> None:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(collector)
        self._server, self._thread = start_http_server(port, address, registry=registry)
        self.port: int = self._server.server_port
        log.info("agent metrics on http://%s:%d/metrics", address, self.port)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
