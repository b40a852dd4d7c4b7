"""The control plane's `/metrics`: fleet state read from the database at scrape time, and
the web processes' ingest counters.

Fleet figures come from a collector object (prometheus client_python's pattern), so a
scrape always sees the database as it is, whichever process answers. Ingest counters live
in each process; several processes behind one address (uvicorn `--workers N`) share a
`PROMETHEUS_MULTIPROC_DIR` (client_python's multiprocess mode, set before the processes
start, emptied at each start), and whichever answers a scrape sums them all, so a counter
never jumps between processes' values.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Iterator

from django.conf import settings
from django.db.models import Count
from django.http import HttpRequest, HttpResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from controlplane.core.metrics import PROCESS

REGISTRY = CollectorRegistry()
"""Collectors of what the database holds; apps built on telemetry add theirs (SLO state)."""
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

BATCHES = Counter(
    "tailguard_telemetry_batches",
    "Telemetry batches answered by the web processes, by outcome.",
    ["outcome"],
    registry=PROCESS,
)
FLUSH_SECONDS = Histogram(
    "tailguard_telemetry_flush_seconds",
    "Time to store one flush of telemetry batches.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
    registry=PROCESS,
)
LAG_SECONDS = Gauge(
    "tailguard_telemetry_lag_seconds",
    "Age of the newest batch in the last flush when it was stored (by any web process).",
    registry=PROCESS,
    multiprocess_mode="mostrecent",
)

GPU_GAUGES = {
    "utilization_pct": ("tailguard_gpu_utilization_ratio", "GPU utilisation, 0 to 1.", 0.01),
    "memory_used_bytes": ("tailguard_gpu_memory_used_bytes", "GPU memory in use.", 1.0),
    "power_w": ("tailguard_gpu_power_watts", "GPU power draw.", 1.0),
    "temperature_c": ("tailguard_gpu_temperature_celsius", "GPU temperature.", 1.0),
}


class FleetCollector(Collector):
    """Nodes, GPUs, deployments and replicas as stored, and each GPU's latest gauges."""

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        from controlplane.fleet.models import Deployment, Replica
        from controlplane.inventory.choices import NodeStatus
        from controlplane.inventory.models import Gpu, Node
        from controlplane.telemetry.models import NodeStream

        nodes = GaugeMetricFamily("tailguard_nodes", "Nodes by status.", labels=["status"])
        by_status = dict(Node.objects.values_list("status").annotate(n=Count("pk")))
        for status in NodeStatus.values:
            nodes.add_metric([status], by_status.get(status, 0))
        yield nodes

        gpus = GaugeMetricFamily("tailguard_gpus", "GPUs by model.", labels=["model"])
        for model, n in Gpu.objects.values_list("name").annotate(n=Count("pk")).order_by("name"):
            gpus.add_metric([model], n)
        yield gpus

        deployments = GaugeMetricFamily(
            "tailguard_deployments", "Deployments by tenant.", labels=["tenant"]
        )
        for slug, n in (
            Deployment.objects.values_list("tenant__slug")
            .annotate(n=Count("pk"))
            .order_by("tenant__slug")
        ):
            deployments.add_metric([slug], n)
        yield deployments

        replicas = GaugeMetricFamily(
            "tailguard_replicas", "Replicas, placed on a node or not.", labels=["placed"]
        )
        placed = Replica.objects.filter(node__isnull=False).count()
        replicas.add_metric(["true"], placed)
        replicas.add_metric(["false"], Replica.objects.count() - placed)
        yield replicas

        rejected = CounterMetricFamily(
            "tailguard_telemetry_rejected_batches",
            "Telemetry batches refused for good per node: malformed, or naming what the node "
            "does not serve (the node's telemetry API says why).",
            labels=["node"],
        )
        for hostname, n in NodeStream.objects.filter(rejected_batches__gt=0).values_list(
            "node__hostname", "rejected_batches"
        ):
            rejected.add_metric([hostname], n)
        yield rejected

        families = {
            suffix: GaugeMetricFamily(name, doc, labels=["node", "gpu"])
            for suffix, (name, doc, _) in GPU_GAUGES.items()
        }
        for hostname, gauges in NodeStream.objects.values_list("node__hostname", "gauges"):
            for key, value in sorted(gauges.items()):
                parts = key.split(".")
                if len(parts) == 3 and parts[0] == "gpu" and parts[2] in GPU_GAUGES:
                    scale = GPU_GAUGES[parts[2]][2]
                    families[parts[2]].add_metric([hostname, parts[1]], value * scale)
        yield from families.values()


def register_collectors() -> None:
    """Called once from the app's ready(): fleet state. Apps built on telemetry register
    their own collectors in REGISTRY at their ready() (SLO state)."""
    REGISTRY.register(FleetCollector())


def metrics_view(request: HttpRequest) -> HttpResponse:
    """Open unless METRICS_TOKEN is set; then Prometheus sends it as a bearer token."""
    token = settings.METRICS_TOKEN
    if token:
        given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), token.encode()):
            return HttpResponse(
                "A bearer token (METRICS_TOKEN) is required.\n",
                status=401,
                content_type="text/plain",
            )
    return HttpResponse(generate_latest(_Exposed()), content_type=CONTENT_TYPE_LATEST)


class _Exposed(Collector):
    """What a scrape sees: the database's collectors, and the processes' metrics."""

    def collect(self) -> Iterator[Metric]:
        yield from REGISTRY.collect()
        directory = os.environ.get(MULTIPROC_ENV)
        found = MultiProcessCollector(None, directory) if directory else PROCESS  # type: ignore[no-untyped-call]
        yield from found.collect()
