"""Read-side queries over telemetry for the dashboards: snapshots and who may see what.

Visibility: platform admins see everything. A tenant user sees the nodes dedicated to one
of their tenants or running a replica of a deployment serving them (their own or one shared
with them), and on those nodes the node-wide GPU and host gauges, the worker gauges of the
deployments serving them, but only their own volumes' and (on dedicated nodes) pools'
gauges. A deployment's own dashboard is its owner's (it shows every tenant's traffic
together); a tenant's page shows each deployment serving it with that tenant's traffic only.
Points have the shapes of streams.py's deltas, so a page treats a snapshot and a delta alike.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from django.db.models import Count, Q, QuerySet
from django.utils import timezone

from controlplane.core.scoping import is_platform_admin, readable_tenant_ids, scope
from controlplane.fleet.models import Deployment, Replica
from controlplane.fleet.selectors import serving
from controlplane.inventory.models import Node
from controlplane.storage.models import Volume, wire_name
from controlplane.telemetry import streams
from controlplane.telemetry.choices import LatencyMetric, Resolution
from controlplane.telemetry.models import CounterRollup, GaugeRollup, LatencyRollup, NodeStream
from controlplane.telemetry.pipeline.merge import USAGE_FIELDS, bucket_of, fold_gauge
from controlplane.telemetry.pipeline.publish import QUANTILES, latency_summary
from controlplane.telemetry.retention import COMPACTION_LOOKBACK
from controlplane.tenancy.models import Tenant
from dataplane.sketch import LatencySketch

WINDOW_DEFAULT_S = 300
WINDOW_MIN_S = 10
WINDOW_MAX_S = 400 * 86400  # what the hourly rollups keep
MAX_POINTS = 1500
"""A window is answered at the finest resolution that needs at most this many points."""

DEPLOYMENT_METRICS = (
    LatencyMetric.TTFT,
    LatencyMetric.TPOT,
    LatencyMetric.ITL,
    LatencyMetric.QUEUE,
    LatencyMetric.E2E,
)


# --- Visibility ---------------------------------------------------------------------------


def visible_nodes(user: Any) -> QuerySet[Node]:
    """Nodes dedicated to the user's tenants or running a replica of a deployment serving
    them (owned or shared with them)."""
    tenant_ids = readable_tenant_ids(user)
    nodes = Node.objects.all()
    if tenant_ids is None:
        return nodes
    replicas = Replica.objects.filter(serving(tenant_ids, "deployment")).values("node")
    return nodes.filter(Q(tenant__in=tenant_ids) | Q(pk__in=replicas))


def visible_deployments(user: Any) -> QuerySet[Deployment]:
    """Deployments whose own dashboard the user may open: their tenants' only, since it
    shows the traffic of every tenant the deployment serves."""
    return scope(Deployment.objects.select_related("tenant"), user)


def visible_tenants(user: Any) -> QuerySet[Tenant]:
    return scope(Tenant.objects.all(), user, "id")


@dataclass(frozen=True)
class GaugeScope:
    """Which of a node's gauge keys a user may read; None admits every name."""

    volumes: frozenset[str] | None = None
    deployments: frozenset[str] | None = None
    pools: bool = True
    prefix: str = ""
    """Only keys that start with this (e.g. "storage.")."""

    def allows_volume(self, name: str) -> bool:
        return self.volumes is None or name in self.volumes

    def allows(self, key: str) -> bool:
        if not key.startswith(self.prefix):
            return False
        kind, _, rest = key.partition(".")
        name = rest.rpartition(".")[0]
        if kind == "storage":
            return self.allows_volume(name)
        if kind == "worker":
            return self.deployments is None or name in self.deployments
        if kind == "pool":
            return self.pools
        return True

    def filter(self, gauges: Mapping[str, Any]) -> dict[str, Any]:
        return {key: value for key, value in gauges.items() if self.allows(key)}


EVERYTHING = GaugeScope()


def gauge_scopes(user: Any, nodes: Iterable[Node]) -> dict[UUID, GaugeScope]:
    """Each node's GaugeScope for the user, in three queries whatever the number of nodes.

    Worker gauges are those of every deployment serving the user's tenants; the model
    volumes of replicas stay their deployment owner's, like any volume."""
    nodes = list(nodes)
    tenant_ids = readable_tenant_ids(user)
    if tenant_ids is None:
        return {node.pk: EVERYTHING for node in nodes}
    node_ids = [node.pk for node in nodes]
    volumes: dict[UUID, set[str]] = defaultdict(set)
    for pk, node_id in Volume.objects.filter(
        tenant__in=tenant_ids, pool__node__in=node_ids
    ).values_list("pk", "pool__node"):
        volumes[node_id].add(wire_name("v", pk))
    for pk, node_id in Replica.objects.filter(
        deployment__tenant__in=tenant_ids, node__in=node_ids
    ).values_list("pk", "node"):
        volumes[node_id].add(wire_name("m", pk))
    deployments = frozenset(
        str(pk)
        for pk in Deployment.objects.filter(serving(tenant_ids)).values_list("pk", flat=True)
    )
    return {
        node.pk: GaugeScope(
            volumes=frozenset(volumes[node.pk]),
            deployments=deployments,
            pools=node.tenant_id in tenant_ids,
        )
        for node in nodes
    }


@dataclass(frozen=True)
class StreamAccess:
    """A stream the user may subscribe to, and how to cut node gauges down for them."""

    stream: str
    gauges: GaugeScope | None = field(default=None)


def stream_access(user: Any, stream: str) -> StreamAccess | None:
    """The user's access to a live stream by name; None when it is unknown or not theirs
    (the two look the same, so names of other tenants' objects reveal nothing)."""
    if stream == streams.FLEET:
        return StreamAccess(stream) if is_platform_admin(user) else None
    kind, _, raw_id = stream.partition(":")
    try:
        pk = UUID(raw_id)
    except ValueError:
        return None
    if kind == "node":
        node = visible_nodes(user).filter(pk=pk).first()
        return None if node is None else StreamAccess(stream, gauge_scopes(user, [node])[pk])
    if kind == "deployment":
        return StreamAccess(stream) if visible_deployments(user).filter(pk=pk).exists() else None
    if kind == "tenant":
        return StreamAccess(stream) if visible_tenants(user).filter(pk=pk).exists() else None
    return None


# --- Windows and points ------------------------------------------------------------------


def resolution_for(window_s: int) -> int:
    """The finest rollup resolution that answers the window in at most MAX_POINTS points."""
    for resolution in sorted(Resolution.values):
        if window_s / resolution <= MAX_POINTS:
            return int(resolution)
    return int(Resolution.ONE_HOUR)


def _window_start(window_s: int, resolution: int) -> datetime:
    return bucket_of(timezone.now() - timedelta(seconds=window_s), resolution)


def _t(moment: datetime | None) -> float | None:
    return None if moment is None else moment.timestamp()


def _mean(stats: list[float]) -> float:
    """A rollup gauge is [sum, count, min, max, last]."""
    total, count = stats[0], stats[1]
    return total / count if count else stats[4]


def _percentiles(sketch: LatencySketch | None) -> dict[str, Any]:
    if sketch is None:
        return dict.fromkeys(QUANTILES) | {"count": 0}
    return latency_summary(sketch)


@dataclass
class _Totals:
    """Latency sketches, usage counts and queue depth of one deployment over some span."""

    sketches: dict[str, LatencySketch] = field(default_factory=dict)
    usage: dict[str, int] = field(default_factory=lambda: dict.fromkeys(USAGE_FIELDS, 0))
    queue_depth: float | None = None

    def add_sketch(self, metric: str, blob: bytes) -> None:
        sketch = LatencySketch.from_bytes(blob)
        if metric in self.sketches:
            self.sketches[metric].merge(sketch)
        else:
            self.sketches[metric] = sketch

    def point(self, t: float | None, window_s: int) -> dict[str, Any]:
        return {
            "t": t,
            "window_s": window_s,
            "latency": {m: _percentiles(self.sketches.get(m)) for m in DEPLOYMENT_METRICS},
            "usage": dict(self.usage),
            "tokens_per_s": self.usage["output_tokens"] / window_s,
            "queue_depth": self.queue_depth,
        }


@dataclass
class _Series:
    """One deployment's per-bucket totals and the totals of the whole window."""

    buckets: dict[datetime, _Totals] = field(default_factory=lambda: defaultdict(_Totals))
    window: _Totals = field(default_factory=_Totals)


def _deployment_series(
    deployment_ids: list[UUID], resolution: int, since: datetime, tenant: Tenant | None = None
) -> dict[UUID, _Series]:
    """Merge the rollups of several deployments, bucket by bucket, in three queries: every
    tenant's series together, or with `tenant` only that tenant's (queue depth is the
    workers', whoever waits)."""
    series: dict[UUID, _Series] = {pk: _Series() for pk in deployment_ids}
    rollups: dict[str, Any] = {
        "deployment__in": deployment_ids,
        "resolution": resolution,
        "bucket__gte": since,
    }
    if tenant is not None:
        rollups["tenant"] = tenant
    for deployment_id, bucket, metric, blob in LatencyRollup.objects.filter(
        metric__in=DEPLOYMENT_METRICS, **rollups
    ).values_list("deployment", "bucket", "metric", "sketch"):
        series[deployment_id].buckets[bucket].add_sketch(metric, bytes(blob))
        series[deployment_id].window.add_sketch(metric, bytes(blob))
    for deployment_id, bucket, name, value in CounterRollup.objects.filter(
        name__in=USAGE_FIELDS, **rollups
    ).values_list("deployment", "bucket", "name", "value"):
        series[deployment_id].buckets[bucket].usage[name] += value
        series[deployment_id].window.usage[name] += value
    keys = {f"worker.{pk}.queue_depth": pk for pk in deployment_ids}
    latest: dict[UUID, dict[UUID, tuple[datetime, float]]] = defaultdict(dict)
    serving = Q(*(Q(values__has_key=key) for key in keys), _connector=Q.OR)
    for node_id, bucket, values in _gauge_rows(serving, resolution, since) if keys else []:
        for key, deployment_id in keys.items():
            if key not in values:
                continue
            totals = series[deployment_id].buckets[bucket]
            totals.queue_depth = (totals.queue_depth or 0.0) + _mean(values[key])
            seen = latest[deployment_id].get(node_id)
            if seen is None or seen[0] < bucket:
                latest[deployment_id][node_id] = (bucket, values[key][4])
    for deployment_id, per_node in latest.items():
        series[deployment_id].window.queue_depth = sum(last for _, last in per_node.values())
    return series


ROUTING_GAUGES = ("routed", "predicted_ttft", "up")
"""Per-replica gauges a node's gateway reports for each deployment it fronts, keyed
`worker.<deployment>.<name>:<replica>`: requests routed per second, the TTFT it predicts
for a request sent now, and whether the replica streams its state."""


def _routing(deployment: Deployment, resolution: int, since: datetime) -> dict[str, Any]:
    """Where the gateways sent the deployment's requests over the window, and why: each
    replica's routed rate per bucket and over the buckets that have one, and its latest
    predicted TTFT and state, as its own node's gateway reported them."""
    replicas = list(
        Replica.objects.filter(deployment=deployment, node__isnull=False)
        .select_related("node")
        .order_by("index")
    )
    prefix = f"worker.{deployment.pk}."
    keys = {
        f"{prefix}{name}:{replica.pk}": (name, str(replica.pk), replica.node_id)
        for replica in replicas
        for name in ROUTING_GAUGES
    }
    buckets: dict[datetime, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    window: dict[str, list[float]] = defaultdict(list)
    latest: dict[tuple[str, str], tuple[datetime, float]] = {}
    nodes = Q(node__in={replica.node_id for replica in replicas})
    for node_id, bucket, values in _gauge_rows(nodes, resolution, since) if replicas else []:
        for key, stats in values.items():
            name, replica_id, home = keys.get(key, (None, None, None))
            if name is None or node_id != home:
                continue  # a gateway routes to its own node's replicas: only that node speaks
            if name == "routed":
                buckets[bucket][replica_id] += _mean(stats)
                window[replica_id].append(_mean(stats))
            seen = latest.get((name, replica_id))
            if seen is None or seen[0] <= bucket:
                latest[(name, replica_id)] = (bucket, stats[4])

    def facts(replica: Replica) -> dict[str, Any]:
        rid = str(replica.pk)
        rates = window[rid]
        up = latest.get(("up", rid))
        predicted = latest.get(("predicted_ttft", rid))
        return {
            "id": rid,
            "index": replica.index,
            "hostname": replica.node.hostname,
            "routed_per_s": sum(rates) / len(rates) if rates else None,
            "predicted_ttft_s": None if predicted is None else predicted[1],
            "up": None if up is None else up[1] == 1,
        }

    return {
        "replicas": [facts(replica) for replica in replicas],
        "points": [
            {"t": _t(bucket), "routed": dict(rates)} for bucket, rates in sorted(buckets.items())
        ],
    }


def deployment_snapshot(deployment: Deployment, window_s: int) -> dict[str, Any]:
    """A deployment's points over the window plus one summary point for all of it, and
    where its gateways routed its requests."""
    resolution = resolution_for(window_s)
    since = _window_start(window_s, resolution)
    series = _deployment_series([deployment.pk], resolution, since)[deployment.pk]
    return {
        "deployment": _deployment_facts(deployment),
        "routing": _routing(deployment, resolution, since),
        "window_s": window_s,
        "resolution": resolution,
        "points": [
            totals.point(_t(bucket), resolution)
            for bucket, totals in sorted(series.buckets.items())
        ],
        "summary": series.window.point(_t(max(series.buckets, default=None)), window_s),
    }


def _deployment_facts(deployment: Deployment) -> dict[str, Any]:
    return {
        "id": deployment.pk,
        "name": deployment.name,
        "tenant": deployment.tenant_id,
        "model_name": deployment.model_name,
        "replicas": deployment.replicas,
    }


def tenant_snapshot(tenant: Tenant, window_s: int) -> dict[str, Any]:
    """Every deployment serving the tenant (its own and those shared with it) with a
    summary point over the window of the tenant's own traffic on it."""
    resolution = resolution_for(window_s)
    since = _window_start(window_s, resolution)
    deployments = list(
        Deployment.objects.filter(serving([tenant.pk])).order_by("name", "tenant__slug")
    )
    series = _deployment_series([d.pk for d in deployments], resolution, since, tenant)
    return {
        "tenant": {"id": tenant.pk, "slug": tenant.slug, "name": tenant.name},
        "window_s": window_s,
        "resolution": resolution,
        "deployments": [
            _deployment_facts(d)
            | {
                "summary": series[d.pk].window.point(
                    _t(max(series[d.pk].buckets, default=None)), window_s
                )
            }
            for d in deployments
        ],
    }


# --- Nodes -------------------------------------------------------------------------------


def _nodes_with_stream(nodes: QuerySet[Node]) -> QuerySet[Node]:
    return nodes.select_related("telemetry").annotate(gpu_count=Count("gpus")).order_by("hostname")


def _node_facts(node: Node, gauges: GaugeScope) -> dict[str, Any]:
    stream = getattr(node, "telemetry", None)
    return {
        "id": node.pk,
        "hostname": node.hostname,
        "status": node.status,
        "tenant": node.tenant_id,
        "maintenance": node.maintenance,
        "gpu_count": node.gpu_count,  # type: ignore[attr-defined]
        "last_batch_t": _t(stream.last_interval_end) if stream else None,
        "gauges": gauges.filter(stream.gauges) if stream else {},
    }


def fleet_snapshot(user: Any) -> dict[str, Any]:
    """Every visible node with its latest gauges, as the fleet stream's delta has them."""
    nodes = list(_nodes_with_stream(visible_nodes(user)))
    scopes = gauge_scopes(user, nodes)
    return {
        "t": timezone.now().timestamp(),
        "nodes": [_node_facts(node, scopes[node.pk]) for node in nodes],
    }


def node_with_stream(user: Any, pk: UUID) -> Node | None:
    return _nodes_with_stream(visible_nodes(user)).filter(pk=pk).first()


GaugeRow = tuple[UUID, datetime, dict[str, list[float]]]


def _gauge_rows(where: Q, resolution: int, since: datetime) -> list[GaugeRow]:
    """(node, bucket, values) of gauge rollups at `resolution`, oldest first.

    Ingest writes gauges at 10 s only and compaction derives the coarser rows once their
    bucket has closed, so the newest coarse buckets (those compaction has not reached) are
    folded here from 10 s rows.
    """
    rows: list[GaugeRow] = list(
        GaugeRollup.objects.filter(where, resolution=resolution, bucket__gte=since)
        .order_by("bucket")
        .values_list("node", "bucket", "values")
    )
    if resolution == Resolution.TEN_SECONDS:
        return rows
    compacted = {node_id: bucket for node_id, bucket, _ in rows}  # the newest per node
    lookback = COMPACTION_LOOKBACK[Resolution(resolution)]
    open_since = max(since, bucket_of(timezone.now(), resolution) - lookback)
    pending: dict[tuple[UUID, datetime], dict[str, list[float]]] = defaultdict(dict)
    for node_id, bucket, values in GaugeRollup.objects.filter(
        where, resolution=Resolution.TEN_SECONDS, bucket__gte=open_since
    ).values_list("node", "bucket", "values"):
        coarse = bucket_of(bucket, resolution)
        if node_id in compacted and coarse <= compacted[node_id]:
            continue
        for key, stats in values.items():
            fold_gauge(pending[(node_id, coarse)], key, stats)
    rows += [(node_id, bucket, values) for (node_id, bucket), values in pending.items()]
    return sorted(rows, key=lambda row: row[1])


def _gauge_points(
    node: Node, resolution: int, since: datetime, gauges: GaugeScope
) -> list[dict[str, Any]]:
    return [
        {
            "t": bucket.timestamp(),
            "gauges": {key: _mean(stats) for key, stats in values.items() if gauges.allows(key)},
        }
        for _, bucket, values in _gauge_rows(Q(node=node), resolution, since)
    ]


def node_snapshot(user: Any, node: Node, window_s: int) -> dict[str, Any]:
    """A node's facts, GPUs and gauge history (bucket means) over the window."""
    resolution = resolution_for(window_s)
    gauges = gauge_scopes(user, [node])[node.pk]
    return {
        "node": _node_facts(node, gauges)
        | {"gpus": list(node.gpus.order_by("index").values("index", "name", "memory_total_bytes"))},
        "ingest": _ingest(node) if is_platform_admin(user) else None,
        "window_s": window_s,
        "resolution": resolution,
        "points": _gauge_points(node, resolution, _window_start(window_s, resolution), gauges),
    }


def _ingest(node: Node) -> dict[str, Any]:
    """What became of the node's batches; reasons may name any tenant, so admins only."""
    stream = getattr(node, "telemetry", None) or NodeStream(node=node)
    return {
        "batches": stream.batches,
        "rejected_batches": stream.rejected_batches,
        "last_rejection": stream.last_rejection,
        "last_rejected_t": _t(stream.last_rejected_at),
    }


def storage_snapshot(user: Any, window_s: int) -> dict[str, Any]:
    """Per visible node with storage pools: its volumes and their storage.* gauge history."""
    resolution = resolution_for(window_s)
    since = _window_start(window_s, resolution)
    nodes = list(
        visible_nodes(user).filter(storage_pools__isnull=False).distinct().order_by("hostname")
    )
    scopes = gauge_scopes(user, nodes)
    names = _volume_names([node.pk for node in nodes])
    result = []
    for node in nodes:
        storage = replace(scopes[node.pk], prefix="storage.")
        points = _gauge_points(node, resolution, since, storage)
        known = {key: facts for key, facts in names[node.pk].items() if storage.allows_volume(key)}
        reported = {key.split(".")[1] for point in points for key in point["gauges"]}
        volumes = [
            {"key": key, **known.get(key, {"name": key, "tenant": None})}
            for key in sorted(reported | known.keys())
        ]
        result.append(
            {"id": node.pk, "hostname": node.hostname, "volumes": volumes, "points": points}
        )
    return {"window_s": window_s, "resolution": resolution, "nodes": result}


def _volume_names(node_ids: list[UUID]) -> dict[UUID, dict[str, dict[str, Any]]]:
    """People's names for the volumes on each node, by the name the node reports."""
    names: dict[UUID, dict[str, dict[str, Any]]] = defaultdict(dict)
    for pk, name, tenant_id, node_id in Volume.objects.filter(pool__node__in=node_ids).values_list(
        "pk", "name", "tenant", "pool__node"
    ):
        names[node_id][wire_name("v", pk)] = {"name": name, "tenant": tenant_id}
    for pk, deployment, index, tenant_id, node_id in Replica.objects.filter(
        node__in=node_ids, pool__isnull=False
    ).values_list("pk", "deployment__name", "index", "deployment__tenant", "node"):
        names[node_id][wire_name("m", pk)] = {
            "name": f"model of {deployment}#{index}",
            "tenant": tenant_id,
        }
    return names
