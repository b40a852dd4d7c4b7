"""Step 5: live deltas for the dashboards, sent once the flush is committed.

One delta per stream a dashboard watches (the fleet's first: every node row waits for it),
built from the flush's own batches and merged rollups, not from the database. The channel
layer may drop some: a dashboard heals from its REST snapshot.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable
from datetime import datetime
from typing import Any, TypeVar
from uuid import UUID

from channels.layers import get_channel_layer

from agent.protocol import TelemetryBatch
from controlplane.telemetry import streams
from controlplane.telemetry.choices import Resolution
from controlplane.telemetry.models import NodeStream
from controlplane.telemetry.pipeline.merge import USAGE_FIELDS, Rollups
from dataplane.sketch import LatencySketch, SketchSum

QUANTILES = {"p50": 0.5, "p90": 0.9, "p99": 0.99}

PUBLISH_CONCURRENCY = 16
"""Deltas in flight to the channel layer at once: each costs a few Redis round trips, and
one flush has one per node."""


async def publish(deltas: Iterable[tuple[str, dict[str, Any]]]) -> None:
    """Send each delta to its stream's group, in order but several at a time; the channel
    layer may drop some (by design)."""
    layer = get_channel_layer()
    if layer is None:
        return
    slots = asyncio.Semaphore(PUBLISH_CONCURRENCY)

    async def send(stream: str, payload: dict[str, Any]) -> None:
        async with slots:
            await layer.group_send(
                streams.group_name(stream),
                {"type": "live.delta", "stream": stream, "payload": payload},
            )

    await asyncio.gather(*(send(stream, payload) for stream, payload in deltas))


def latency_summary(sketch: LatencySketch) -> dict[str, float | int | None]:
    """p50/p90/p99 and count of one sketch, as points on dashboards show them."""
    summary: dict[str, float | int | None] = {
        name: sketch.quantile(q) for name, q in QUANTILES.items()
    }
    summary["count"] = sketch.count
    return summary


def deltas_of(
    accepted: list[TelemetryBatch],
    node_streams: dict[UUID, NodeStream],
    rollups: Rollups,
) -> list[tuple[str, dict[str, Any]]]:
    """Every stream's delta, the fleet's first: one message every node's row waits for,
    where each node's own stream has at most a page or two watching."""
    nodes: list[tuple[str, dict[str, Any]]] = []
    fleet = []
    for node_id in sorted({b.node_id for b in accepted}, key=str):
        stream = node_streams[node_id]
        t = stream.last_interval_end.timestamp() if stream.last_interval_end else time.time()
        point = {"t": t, "gauges": stream.gauges}
        nodes.append(
            (streams.node(node_id), {"type": "node.delta", "node_id": str(node_id), "point": point})
        )
        fleet.append(
            {
                "id": str(node_id),
                "hostname": stream.node.hostname,
                "status": stream.node.status,
                **point,
            }
        )
    deltas: list[tuple[str, dict[str, Any]]] = [
        (streams.FLEET, {"type": "fleet.delta", "nodes": fleet})
    ]
    for deployment_id, point in _points(accepted, rollups, lambda _, d: d).items():
        deltas.append(
            (
                streams.deployment(deployment_id),
                {"type": "deployment.delta", "deployment_id": str(deployment_id), "point": point},
            )
        )
    per_tenant: dict[UUID, dict[str, Any]] = defaultdict(dict)
    for (tenant_id, deployment_id), point in _points(
        accepted, rollups, lambda t, d: (t, d)
    ).items():
        per_tenant[tenant_id][str(deployment_id)] = point
    for tenant_id, points in per_tenant.items():
        deltas.append(
            (
                streams.tenant(tenant_id),
                {"type": "tenant.delta", "tenant_id": str(tenant_id), "deployments": points},
            )
        )
    return deltas + nodes


_Key = TypeVar("_Key", bound=Hashable)


def _points(
    accepted: list[TelemetryBatch],
    rollups: Rollups,
    key: Callable[[UUID, UUID], _Key],
) -> dict[_Key, dict[str, Any]]:
    """One point per key from this flush's batches, merging every (tenant, deployment)
    series that `key` maps alike: per deployment, its tenants together; per tenant and
    deployment, that tenant's own. Queue depth is the worker's, whoever's requests wait."""
    sketches: dict[_Key, dict[str, SketchSum]] = defaultdict(dict)
    for (resolution, _, tenant_id, deployment_id, metric), summed in rollups.latency.items():
        if resolution == Resolution.TEN_SECONDS and deployment_id is not None:
            sketches[key(tenant_id, deployment_id)].setdefault(metric, SketchSum()).add(summed)
    usage: dict[_Key, dict[str, int]] = defaultdict(lambda: dict.fromkeys(USAGE_FIELDS, 0))
    spans: dict[_Key, list[datetime]] = {}
    queue: dict[_Key, float] = defaultdict(float)
    for batch in accepted:
        touched: dict[_Key, UUID] = {}
        for series in batch.series:
            if series.deployment_id is not None:
                touched[key(series.tenant_id, series.deployment_id)] = series.deployment_id
        for u in batch.usage:
            k = key(u.tenant_id, u.deployment_id)
            touched[k] = u.deployment_id
            for name in USAGE_FIELDS:
                usage[k][name] += getattr(u, name)
        for k, deployment_id in touched.items():
            span = spans.setdefault(k, [batch.interval_start, batch.interval_end])
            span[0] = min(span[0], batch.interval_start)
            span[1] = max(span[1], batch.interval_end)
            queue[k] += batch.gauges.get(f"worker.{deployment_id}.queue_depth", 0.0)
    points = {}
    for k, (start, end) in spans.items():
        window_s = max((end - start).total_seconds(), 1e-3)
        counts = usage[k]
        points[k] = {
            "t": end.timestamp(),
            "window_s": window_s,
            "latency": {m: latency_summary(s.sketch()) for m, s in sorted(sketches[k].items())},
            "usage": counts,
            "tokens_per_s": counts["output_tokens"] / window_s,
            "queue_depth": queue[k],
        }
    return points
