"""Step 2: a node may report only what the control plane placed on it.

What was placed on a node is what its signed revisions said, each in effect from when it
was issued until the next one was, widened by `GRACE` on either side: a replica that moved
away drains its last requests and ships their batches, and clocks differ a little. A batch
is judged against every revision in effect during its interval (a backfill after an outage
against those of its own time):

- latency series, SLO counts and usage only for deployments its workers ran, and only for
  the tenants those workers served;
- SLO counts only for the SLOs, thresholds and metrics the node was told to count;
- node-level series (storage reads) only for tenants it held volumes or replicas of;
- storage gauges only for its own pools and volumes, worker gauges for its own workers.

Anything else rejects the whole batch, so a forged figure never reaches a rollup, an SLO,
an alert or usage.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from uuid import UUID

from django.db.models import OuterRef, Q, Subquery

from agent.protocol import Components, SignedDesiredState, TelemetryBatch
from controlplane.fleet.models import Deployment, Revision
from controlplane.inventory.models import Node
from controlplane.telemetry.choices import RETENTION, Resolution
from controlplane.tenancy.models import Tenant

GRACE = timedelta(minutes=2)
MAX_CLOCK_AHEAD = timedelta(minutes=5)
SCOPED_GAUGES = ("worker", "storage", "pool")
"""Gauge families that belong to one component: `<family>.<name>.<gauge>`."""


@dataclass(frozen=True)
class Allowance:
    """What one revision let a node report."""

    served: frozenset[tuple[UUID, UUID]]
    """(tenant, deployment) of every worker and tenant it served."""
    node_tenants: frozenset[UUID]
    """Tenants of its volumes, replicas and node-level SLOs: node-level series."""
    slos: frozenset[tuple[UUID, UUID, UUID | None, str, float | None]]
    """(slo, tenant, deployment, metric, threshold) it counted against."""
    scopes: frozenset[str]
    """`worker.<deployment>`, `storage.<volume>` and `pool.<pool>` gauge prefixes."""

    @classmethod
    def of(cls, components: Components) -> Allowance:
        workers = components.workers
        return cls(
            served=frozenset((t.tenant_id, w.deployment_id) for w in workers for t in w.tenants),
            node_tenants=frozenset(
                [v.tenant_id for v in components.volumes]
                + [w.tenant_id for w in workers]
                + [s.tenant_id for s in components.slo_thresholds if s.deployment_id is None]
            ),
            slos=frozenset(
                (s.slo_id, s.tenant_id, s.deployment_id, s.metric, s.threshold_seconds)
                for s in components.slo_thresholds
            ),
            scopes=frozenset(
                [f"worker.{w.deployment_id}" for w in workers]
                + [f"storage.{v.name}" for v in components.volumes]
                + [f"pool.{p.name}" for p in components.pools]
            ),
        )

    def __or__(self, other: Allowance) -> Allowance:
        return Allowance(
            self.served | other.served,
            self.node_tenants | other.node_tenants,
            self.slos | other.slos,
            self.scopes | other.scopes,
        )

    def why_not(self, batch: TelemetryBatch) -> str | None:
        """What in `batch` this allowance does not cover, in words; None if all of it is."""
        for series in batch.series:
            tenant, deployment = series.tenant_id, series.deployment_id
            if deployment is None:
                if tenant not in self.node_tenants:
                    return (
                        f"{series.metric} series of tenant {tenant}: the node holds no volume "
                        "or replica of that tenant"
                    )
            elif (tenant, deployment) not in self.served:
                return _not_serving(tenant, deployment)
            for count in series.thresholds:
                metric = "availability" if count.threshold_seconds is None else series.metric
                wanted = (count.slo_id, tenant, deployment, metric, count.threshold_seconds)
                if wanted not in self.slos:
                    return (
                        f"counts for SLO {count.slo_id} ({metric}, threshold "
                        f"{count.threshold_seconds}) of tenant {tenant}: the node was not asked "
                        "to count them"
                    )
        for usage in batch.usage:
            if (usage.tenant_id, usage.deployment_id) not in self.served:
                return _not_serving(usage.tenant_id, usage.deployment_id)
        for key in batch.gauges:
            family = key.partition(".")[0]
            if family in SCOPED_GAUGES and key.rpartition(".")[0] not in self.scopes:
                return f"gauge {key}: no such {family} was placed on the node"
        return None


NOTHING = Allowance(frozenset(), frozenset(), frozenset(), frozenset())


def _not_serving(tenant: UUID, deployment: UUID) -> str:
    return (
        f"deployment {deployment} for tenant {tenant}: no replica of it serving that tenant "
        "was placed on the node"
    )


@dataclass(frozen=True)
class _InEffect:
    start: datetime
    end: datetime | None
    allowance: Allowance


class _Allowances:
    """Revision documents parsed once per process: a revision never changes."""

    MAX = 20_000

    def __init__(self) -> None:
        self._parsed: OrderedDict[UUID, Allowance] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, revision_ids: Iterable[UUID]) -> dict[UUID, Allowance]:
        wanted = set(revision_ids)
        with self._lock:
            found = {pk: self._parsed[pk] for pk in wanted if pk in self._parsed}
        missing = wanted - found.keys()
        if missing:
            for pk, document in Revision.objects.filter(pk__in=missing).values_list(
                "pk", "document"
            ):
                components = SignedDesiredState.model_validate(document).state.components
                found[pk] = Allowance.of(components)
            with self._lock:
                self._parsed.update((pk, found[pk]) for pk in missing)
                while len(self._parsed) > self.MAX:
                    self._parsed.popitem(last=False)
        return found


_allowances = _Allowances()


class Authorizer:
    """Everything one flush is judged against: the clock, the tenants and deployments that
    exist, and what each node's revisions placed on it (a few queries for any flush)."""

    def __init__(self, batches: Sequence[TelemetryBatch], now: datetime) -> None:
        self.now = now
        self._served = _deployment_tenants(batches)
        self._tenants = _known_tenants(batches, self._served)
        self._placed = _in_effect(batches)

    def why_not(self, batch: TelemetryBatch) -> str | None:
        """Why this batch can never be stored, in words the agent logs; None if it can."""
        if batch.interval_end > self.now + MAX_CLOCK_AHEAD:
            return f"interval_end {batch.interval_end.isoformat()} is ahead of the control plane's clock"
        if batch.interval_end < self.now - RETENTION[Resolution.TEN_SECONDS]:
            return f"interval_end {batch.interval_end.isoformat()} is older than the 10 s retention"
        pairs = [(s.tenant_id, s.deployment_id) for s in batch.series]
        pairs += [(u.tenant_id, u.deployment_id) for u in batch.usage]
        for tenant_id, deployment_id in pairs:
            if deployment_id is None:
                if tenant_id not in self._tenants:
                    return f"unknown tenant {tenant_id}"
            elif tenant_id not in self._served.get(deployment_id, ()):
                return f"no deployment {deployment_id} of tenant {tenant_id}"
        return self._allowance(batch).why_not(batch)

    def _allowance(self, batch: TelemetryBatch) -> Allowance:
        """The union of the revisions in effect at some point of the batch's interval."""
        allowance = NOTHING
        for placed in self._placed.get(batch.node_id, ()):
            if placed.start - GRACE <= batch.interval_end and (
                placed.end is None or batch.interval_start <= placed.end + GRACE
            ):
                allowance = (
                    placed.allowance if allowance is NOTHING else allowance | placed.allowance
                )
        return allowance


def _in_effect(batches: Sequence[TelemetryBatch]) -> dict[UUID, list[_InEffect]]:
    """Per node, its revisions in effect since the flush's oldest batch began, in order:
    those issued since then, and the one that was current then."""
    if not batches:
        return {}
    node_ids = {b.node_id for b in batches}
    since = min(b.interval_start for b in batches) - GRACE
    current_then = Revision.objects.filter(node=OuterRef("pk"), created_at__lt=since).order_by(
        "-generation"
    )
    first = (
        Node.objects.filter(pk__in=node_ids)
        .annotate(first=Subquery(current_then.values("pk")[:1]))
        .values_list("first", flat=True)
    )
    rows = (
        Revision.objects.filter(
            Q(node_id__in=node_ids, created_at__gte=since) | Q(pk__in=[pk for pk in first if pk])
        )
        .order_by("node_id", "generation")
        .values_list("node_id", "pk", "created_at")
    )
    issued: dict[UUID, list[tuple[UUID, datetime]]] = defaultdict(list)
    for node_id, pk, created in rows:
        issued[node_id].append((pk, created))
    allowances = _allowances.get(pk for revisions in issued.values() for pk, _ in revisions)
    placed: dict[UUID, list[_InEffect]] = {}
    for node_id, revisions in issued.items():
        ends = [created for _, created in revisions[1:]] + [None]
        placed[node_id] = [
            _InEffect(created, end, allowances[pk])
            for (pk, created), end in zip(revisions, ends, strict=True)
        ]
    return placed


def _deployment_tenants(batches: Sequence[TelemetryBatch]) -> dict[UUID, set[UUID]]:
    """The tenants each deployment the batches name serves now: its owner and those it is
    shared with, in one query for the whole flush (a row per share, or one with none)."""
    ids = {s.deployment_id for b in batches for s in b.series if s.deployment_id is not None}
    ids |= {u.deployment_id for b in batches for u in b.usage}
    served: dict[UUID, set[UUID]] = defaultdict(set)
    rows = Deployment.objects.filter(pk__in=ids).order_by()  # no join for the default order
    for pk, owner, sharer in rows.values_list("pk", "tenant_id", "shared_with"):
        served[pk].add(owner)
        if sharer is not None:
            served[pk].add(sharer)
    return dict(served)


def _known_tenants(batches: Sequence[TelemetryBatch], served: dict[UUID, set[UUID]]) -> set[UUID]:
    wanted = {s.tenant_id for b in batches for s in b.series if s.deployment_id is None}
    return set(Tenant.objects.filter(pk__in=wanted).values_list("pk", flat=True)).union(
        *served.values()
    )
