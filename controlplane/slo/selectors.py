"""Read-side queries: exact SLI counts over windows, percentiles, thresholds for nodes.

Every window is answered by one query over the rollups, with the ranges `sli.tile` picked;
several windows of one SLO share one query through filtered aggregates.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from typing import Any
from uuid import UUID

from django.db.models import Q, QuerySet, Sum

from agent.protocol import SloThreshold
from controlplane.fleet import selectors as fleet_selectors
from controlplane.fleet.models import Deployment, Replica
from controlplane.slo.choices import Scope, Sli
from controlplane.slo.models import Slo, SloRevision
from controlplane.slo.sli import Counts, tile
from controlplane.storage.models import Volume
from controlplane.telemetry.choices import LatencyMetric
from controlplane.telemetry.models import CounterRollup, LatencyRollup, SloRollup
from dataplane.sketch import LatencySketch

QUANTILES = {"p50": 0.5, "p90": 0.9, "p99": 0.99, "p999": 0.999}
REPORT_METRICS = (LatencyMetric.TTFT, LatencyMetric.TPOT, LatencyMetric.ITL, LatencyMetric.E2E)


def window_filter(start: datetime, end: datetime, now: datetime) -> Q:
    """Rollup rows that tile [start, end) exactly (see `sli.tile`)."""
    q = Q(pk__in=[])
    for resolution, lo, hi in tile(start, end, now):
        q |= Q(resolution=resolution, bucket__gte=lo, bucket__lt=hi)
    return q


def counted_against(slo: Slo, threshold: float | None) -> QuerySet[SloRollup]:
    """The SLO's own tenant's rows counted against `threshold` (None: availability)."""
    return SloRollup.objects.filter(
        slo_id=slo.pk,
        tenant_id=slo.tenant_id,
        **(
            {"threshold_seconds__isnull": True}
            if threshold is None
            else {"threshold_seconds": threshold}
        ),
    )


def slo_counts(
    slo: Slo,
    windows: Mapping[str, tuple[datetime, datetime]],
    now: datetime,
    revision: SloRevision | None = None,
) -> dict[str, Counts]:
    """Good/total of one SLO revision (default: the one in force) over each named window,
    in one query. Only counts made under the revision's threshold while it was in force
    count, each window cut to that span, and only rows of the SLO's own tenant, whatever a
    node reported."""
    if not windows:
        return {}
    if revision is None:
        threshold, since, until = slo.threshold_seconds, slo.revision_started_at, None
    else:
        threshold, since, until = (
            revision.threshold_seconds,
            revision.counts_from,
            revision.ended_at,
        )
    aggregates: dict[str, Any] = {}
    for i, (start, end) in enumerate(windows.values()):
        start, end = max(start, since or start), min(end, until or end)
        where = window_filter(start, end, now) if start < end else Q(pk__in=[])
        aggregates[f"good{i}"] = Sum("good", filter=where)
        aggregates[f"total{i}"] = Sum("total", filter=where)
    row = counted_against(slo, threshold).aggregate(**aggregates)
    return {
        name: Counts(good=int(row[f"good{i}"] or 0), total=int(row[f"total{i}"] or 0))
        for i, name in enumerate(windows)
    }


def revisions_in_period(slo: Slo, start: datetime, end: datetime) -> list[SloRevision]:
    """The SLO's revisions in force at some point of [start, end), oldest first (the first
    counts as in force from the beginning, see `SloRevision.counts_from`)."""
    return list(
        slo.revisions.filter(Q(number=1) | Q(started_at__lt=end))
        .filter(Q(ended_at__isnull=True) | Q(ended_at__gt=start))
        .order_by("number")
    )


def deployment_totals(slo: Slo, start: datetime, end: datetime, now: datetime) -> dict[Any, int]:
    """Events per deployment of one SLO over a window, under any of its definitions."""
    rows = (
        SloRollup.objects.filter(
            window_filter(start, end, now), slo_id=slo.pk, tenant_id=slo.tenant_id
        )
        .values("deployment_id")
        .annotate(t=Sum("total"))
    )
    return {row["deployment_id"]: int(row["t"] or 0) for row in rows}


def covers(slo: Slo, deployment: Deployment) -> bool:
    """Whether the SLO measures requests served by this deployment, one of those serving the
    SLO's tenant (its own or shared with it)."""
    if slo.sli == Sli.STORAGE_READ:
        return False
    if slo.scope == Scope.DEPLOYMENT:
        return slo.deployment_id == deployment.pk
    if slo.scope == Scope.MODEL:
        return slo.model_name == deployment.model_name
    return True


def deployments_with_replicas(tenant_ids: Iterable[Any]) -> dict[Any, list[Deployment]]:
    """Per tenant, the deployments serving it (own or shared) that have a placed replica."""
    tenant_ids = set(tenant_ids)
    deployments = list(
        Deployment.objects.filter(
            fleet_selectors.serving(tenant_ids),
            pk__in=Replica.objects.filter(node__isnull=False).values("deployment"),
        ).order_by("name")
    )
    served = fleet_selectors.tenants_served(deployments)
    found: dict[Any, list[Deployment]] = {tenant_id: [] for tenant_id in tenant_ids}
    for deployment in deployments:
        for tenant_id in tenant_ids.intersection(served[deployment.pk]):
            found[tenant_id].append(deployment)
    return found


def latency_percentiles(
    tenant_id: Any, start: datetime, end: datetime, now: datetime
) -> list[dict[str, Any]]:
    """Per deployment and metric: events and p50/p90/p99/p99.9 from the merged sketches."""
    rows = (
        LatencyRollup.objects.filter(
            window_filter(start, end, now),
            tenant_id=tenant_id,
            deployment__isnull=False,
            metric__in=REPORT_METRICS,
        )
        .values_list("deployment_id", "deployment__name", "metric", "sketch")
        .order_by("deployment__name", "metric")
    )
    merged: dict[tuple[Any, str, str], LatencySketch] = {}
    for deployment_id, name, metric, blob in rows.iterator(chunk_size=2000):
        sketch = LatencySketch.from_bytes(bytes(blob))
        if (deployment_id, name, metric) in merged:
            merged[(deployment_id, name, metric)].merge(sketch)
        else:
            merged[(deployment_id, name, metric)] = sketch
    return [
        {
            "deployment": str(deployment_id),
            "deployment_name": name,
            "metric": metric,
            "count": sketch.count,
            **{label: sketch.quantile(q) for label, q in QUANTILES.items()},
        }
        for (deployment_id, name, metric), sketch in merged.items()
    ]


def output_tokens(deployment_id: Any, start: datetime, end: datetime, now: datetime) -> int:
    """Every tenant's output tokens on a deployment over [start, end), as its workers
    counted them."""
    rows = CounterRollup.objects.filter(
        window_filter(start, end, now), deployment_id=deployment_id, name="output_tokens"
    )
    return int(rows.aggregate(total=Sum("value"))["total"] or 0)


AlertSource = Callable[[Any, datetime, datetime], list[Any]]
"""(tenant id, start, end) -> the tenant's SLO alert episodes firing at some point of
[start, end), oldest first."""

alert_sources: list[AlertSource] = []
"""Filled at ready() by the app that keeps alerts (alerts build on SLOs); none, no alerts."""


def alerts_in_period(tenant_id: Any, start: datetime, end: datetime) -> list[Any]:
    """The tenant's SLO alert episodes that were firing at some point of [start, end)."""
    return [alert for source in alert_sources for alert in source(tenant_id, start, end)]


def unshare_problems(deployment: Deployment, tenant_ids: set[UUID]) -> list[str]:
    """Why the deployment may not stop serving these tenants: their SLOs measure it."""
    return [
        f"SLO {slo.tenant.slug}/{slo.name} measures this deployment; delete it or "
        "rescope it before unsharing."
        for slo in Slo.objects.filter(deployment=deployment, tenant__in=tenant_ids)
        .select_related("tenant")
        .order_by("name")
    ]


def slos_of_tenant(tenant_id: Any) -> QuerySet[Slo]:
    return Slo.objects.filter(tenant_id=tenant_id).select_related("deployment").order_by("name")


def thresholds_for_nodes(
    nodes: Iterable[Any], replicas: Iterable[Replica], served: Mapping[UUID, list[UUID]]
) -> dict[Any, list[SloThreshold]]:
    """What each node's workers count good/total against (two queries for any number of nodes).

    Latency and availability SLOs go to every node running a deployment they cover, one
    threshold per deployment and tenant it serves (`served`, from fleet selectors);
    storage-read SLOs, measured per node, go with no deployment to the nodes holding the
    tenant's volumes or replicas.
    """
    node_ids = [getattr(n, "pk", n) for n in nodes]
    replicas = list(replicas)
    tenant_ids = {t for r in replicas for t in served[r.deployment_id]}
    slos = list(Slo.objects.filter(Q(tenant_id__in=tenant_ids) | Q(sli=Sli.STORAGE_READ)))
    storage_tenants = {s.tenant_id for s in slos if s.sli == Sli.STORAGE_READ}
    holds: set[tuple[Any, Any]] = {(r.node_id, r.deployment.tenant_id) for r in replicas}
    if storage_tenants:
        holds.update(
            Volume.objects.filter(pool__node_id__in=node_ids, tenant_id__in=storage_tenants)
            .values_list("pool__node_id", "tenant_id")
            .distinct()
        )
    wanted: dict[Any, dict[tuple[UUID, UUID | None], SloThreshold]] = defaultdict(dict)
    by_tenant: dict[Any, list[Slo]] = defaultdict(list)
    for slo in slos:
        by_tenant[slo.tenant_id].append(slo)
    for replica in replicas:
        for slo in (s for t in served[replica.deployment_id] for s in by_tenant[t]):
            if covers(slo, replica.deployment):
                wanted[replica.node_id][(slo.pk, replica.deployment_id)] = _threshold(
                    slo, replica.deployment_id
                )
    for node_id, tenant_id in holds:
        for slo in by_tenant[tenant_id]:
            if slo.sli == Sli.STORAGE_READ:
                wanted[node_id][(slo.pk, None)] = _threshold(slo, None)
    return {
        node_id: [t for _, t in sorted(wanted[node_id].items(), key=lambda kv: str(kv[0]))]
        for node_id in node_ids
    }


def _threshold(slo: Slo, deployment_id: UUID | None) -> SloThreshold:
    return SloThreshold(
        slo_id=slo.pk,
        tenant_id=slo.tenant_id,
        deployment_id=deployment_id,
        metric=slo.sli,
        threshold_seconds=slo.threshold_seconds,
        measured_at=slo.measured_at,
    )
