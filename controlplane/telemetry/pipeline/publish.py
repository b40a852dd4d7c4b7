"""Step 5: live deltas for the dashboards, sent once the flush is committed.

One delta per stream a dashboard watches (the fleet's first: every node row waits for it),
built from the flush's own batches and merged rollups, not from the database. A stream no
dashboard subscribes to gets none: most node, deployment and tenant streams have nobody
watching most of the time, and building and sending their deltas was most of a flush's
publishing. A dashboard that subscribes later starts from its REST snapshot (the
database) either way; one flush that lands between its snapshot and its subscribe reaches
it with its next periodic snapshot, as do deltas the channel layer drops.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Sequence
from datetime import datetime
from typing import Any, TypeVar
from uuid import UUID

import redis
from channels.layers import InMemoryChannelLayer, get_channel_layer
from channels_redis.core import RedisChannelLayer

from agent.protocol import TelemetryBatch
from controlplane.telemetry import streams
from controlplane.telemetry.choices import Resolution
from controlplane.telemetry.models import NodeStream
from controlplane.telemetry.pipeline.merge import USAGE_FIELDS, Rollups
from dataplane.sketch import LatencySketch, SketchSum

log = logging.getLogger(__name__)

QUANTILES = {"p50": 0.5, "p90": 0.9, "p99": 0.99}

WATCH_TIMEOUT_S = 1.0
"""How long asking Redis which streams have subscribers may take; past it, all count."""
_MEMBERS = """local found = {}
for i, key in ipairs(KEYS) do found[i] = redis.call('ZCARD', key) end
return found"""
_clients: dict[str, redis.Redis] = {}

PUBLISH_CONCURRENCY = 16
"""Deltas in flight to the channel layer at once: each costs a few Redis round trips, and
one flush has one per watched node."""


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


def watched(names: Sequence[str]) -> set[str]:
    """The streams among `names` that some dashboard subscribes to now: for the Redis
    layer, the groups with members (one script call per Redis host, however many names).
    When the layer cannot tell, every stream counts as watched."""
    layer = get_channel_layer()
    if layer is None:
        return set()
    if isinstance(layer, InMemoryChannelLayer):
        return {n for n in names if layer.groups.get(streams.group_name(n))}
    if not isinstance(layer, RedisChannelLayer):
        return set(names)
    group_key = getattr(layer, "_group_key", None)
    hosts = getattr(layer, "hosts", None)
    if group_key is None or not hosts or any(set(host) != {"address"} for host in hosts):
        return set(names)  # a layer of other options (passwords, TLS, sentinels)
    by_host: dict[int, list[str]] = defaultdict(list)
    for name in names:
        by_host[layer.consistent_hash(streams.group_name(name))].append(name)
    found: set[str] = set()
    try:
        for index, on_host in by_host.items():
            client = _client(hosts[index]["address"])
            keys = [group_key(streams.group_name(n)) for n in on_host]
            counts = client.eval(_MEMBERS, len(keys), *keys)
            found.update(n for n, count in zip(on_host, counts, strict=True) if count)
    except Exception as exc:  # deltas are best effort: never fail a flush over them
        log.warning("could not ask Redis which live streams are watched: %r", exc)
        return set(names)
    return found


def _client(address: str) -> redis.Redis:
    client = _clients.get(address)
    if client is None:
        client = _clients[address] = redis.Redis.from_url(
            address, socket_timeout=WATCH_TIMEOUT_S, socket_connect_timeout=WATCH_TIMEOUT_S
        )
    return client


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
    watching: Callable[[Sequence[str]], set[str]] | None = None,
) -> list[tuple[str, dict[str, Any]]]:
    """The delta of every stream the flush touched that `watching` says someone watches
    (given every name at once; by default, all of them), the fleet's first: one message
    every node's row waits for, where each node's own stream has at most a page or two
    watching."""
    node_ids = sorted({b.node_id for b in accepted}, key=str)
    served = {
        (s.tenant_id, s.deployment_id)
        for b in accepted
        for s in b.series
        if s.deployment_id is not None
    } | {(u.tenant_id, u.deployment_id) for b in accepted for u in b.usage}
    names = [
        streams.FLEET,
        *(streams.node(n) for n in node_ids),
        *(streams.deployment(d) for d in sorted({d for _, d in served}, key=str)),
        *(streams.tenant(t) for t in sorted({t for t, _ in served}, key=str)),
    ]
    live = set(names) if watching is None else watching(names)
    nodes: list[tuple[str, dict[str, Any]]] = []
    fleet = []
    for node_id in node_ids:
        stream = node_streams[node_id]
        t = stream.last_interval_end.timestamp() if stream.last_interval_end else time.time()
        point = {"t": t, "gauges": stream.gauges}
        if streams.node(node_id) in live:
            nodes.append(
                (
                    streams.node(node_id),
                    {"type": "node.delta", "node_id": str(node_id), "point": point},
                )
            )
        fleet.append(
            {
                "id": str(node_id),
                "hostname": stream.node.hostname,
                "status": stream.node.status,
                **point,
            }
        )
    deltas: list[tuple[str, dict[str, Any]]] = []
    if streams.FLEET in live:
        deltas.append((streams.FLEET, {"type": "fleet.delta", "nodes": fleet}))
    for deployment_id, point in _points(
        accepted, rollups, lambda _, d: d, lambda d: streams.deployment(d) in live
    ).items():
        deltas.append(
            (
                streams.deployment(deployment_id),
                {"type": "deployment.delta", "deployment_id": str(deployment_id), "point": point},
            )
        )
    per_tenant: dict[UUID, dict[str, Any]] = defaultdict(dict)
    for (tenant_id, deployment_id), point in _points(
        accepted, rollups, lambda t, d: (t, d), lambda k: streams.tenant(k[0]) in live
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
    wanted: Callable[[_Key], bool],
) -> dict[_Key, dict[str, Any]]:
    """One point per key from this flush's batches, merging every (tenant, deployment)
    series that `key` maps alike: per deployment, its tenants together; per tenant and
    deployment, that tenant's own. Only `wanted` keys: the sketch merges and quantiles
    are the cost. Queue depth is the worker's, whoever's requests wait."""
    sketches: dict[_Key, dict[str, SketchSum]] = defaultdict(dict)
    for (resolution, _, tenant_id, deployment_id, metric), summed in rollups.latency.items():
        if resolution == Resolution.TEN_SECONDS and deployment_id is not None:
            k = key(tenant_id, deployment_id)
            if wanted(k):
                sketches[k].setdefault(metric, SketchSum()).add(summed)
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
            if not wanted(k):
                continue
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
