"""Read-side queries for the fleet: which deployments serve which tenants, and nodes with
their rollout.

A deployment serves its own tenant and the tenants it is shared with. Everything that
asks "may this tenant's requests, SLOs or telemetry name this deployment" asks here.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any, NamedTuple
from uuid import UUID

from django.db.models import F, OuterRef, Q, QuerySet, Subquery, Value
from django.db.models.functions import Coalesce

from controlplane.core.scoping import readable_tenant_ids
from controlplane.fleet.models import Deployment, Replica, Revision
from controlplane.inventory.models import Node

Shares = Deployment.shared_with.through


def serving(tenant_ids: Iterable[Any], field: str = "") -> Q:
    """Deployments (reached through `field`, a FK path to one; "" for Deployment itself)
    that serve any of the tenants: their own and those shared with them.

    The shared ones come from a subquery, not a join, so annotations stay uncounted twice.
    """
    tenant_ids = list(tenant_ids)
    prefix = f"{field}__" if field else ""
    shared = Shares.objects.filter(tenant__in=tenant_ids).values("deployment")
    return Q(**{f"{prefix}tenant__in": tenant_ids}) | Q(**{f"{field or 'pk'}__in": shared})


def tenants_served(deployments: Iterable[Deployment]) -> dict[UUID, list[UUID]]:
    """Each deployment's tenants, its owner first and then the sharers in a stable order."""
    deployments = list(deployments)
    served: dict[UUID, list[UUID]] = {d.pk: [d.tenant_id] for d in deployments}
    shares: dict[UUID, list[UUID]] = defaultdict(list)
    for deployment_id, tenant_id in (
        Shares.objects.filter(deployment__in=served)
        .order_by("tenant_id")
        .values_list("deployment_id", "tenant_id")
    ):
        shares[deployment_id].append(tenant_id)
    for deployment_id, tenants in shares.items():
        served[deployment_id] += [t for t in tenants if t not in served[deployment_id]]
    return served


def visible(queryset: QuerySet[Any], user: Any, field: str = "") -> QuerySet[Any]:
    """Cut `queryset` down to what serves the user's tenants (everything for platform admins)."""
    tenant_ids = readable_tenant_ids(user)
    return queryset if tenant_ids is None else queryset.filter(serving(tenant_ids, field))


class Placed(NamedTuple):
    """A placed replica as the deployment's addresses need it."""

    node_id: UUID
    url: str
    """Where other nodes' gateways reach it; "" where they do not."""
    gateway: str
    """Where its node's gateway answers; "" where it runs none or none has answered."""


def attach_addresses(deployments: Iterable[Deployment]) -> None:
    """Read the placed replicas of these deployments for `endpoints` and `client_url`, as
    plain rows, in one query for any number of deployments (a list page, or the one a
    response shows: a deployment on a thousand nodes costs a thousand tuples)."""
    deployments = list(deployments)
    found: dict[UUID, list[Placed]] = {d.pk: [] for d in deployments}
    rows = Replica.objects.filter(deployment__in=list(found), node__isnull=False).values_list(
        "deployment_id", "node_id", "url", "node__gateway", "node__report__gateway_url"
    )
    for deployment_id, node_id, url, fronted, gateway_url in rows:
        found[deployment_id].append(Placed(node_id, url, (fronted and gateway_url) or ""))
    for deployment in deployments:
        deployment.placed = found[deployment.pk]


def _placed(deployment: Deployment) -> list[Placed]:
    if not hasattr(deployment, "placed"):
        attach_addresses([deployment])
    placed: list[Placed] = deployment.placed
    return placed


def endpoints(deployment: Deployment) -> list[str]:
    """Where clients send the deployment's requests: the gateways of the nodes it runs on."""
    return sorted({r.gateway for r in _placed(deployment) if r.gateway})


def client_url(deployment: Deployment) -> str | None:
    """The deployment's one address: the first of its gateways that reaches every replica
    (its own node's, and those other nodes reported reachable); None while none does."""
    placed = _placed(deployment)
    for gateway, node_id in sorted({(r.gateway, str(r.node_id)) for r in placed if r.gateway}):
        if all(str(r.node_id) == node_id or r.url for r in placed):
            return gateway
    return None


def nodes_with_rollout() -> QuerySet[Node]:
    """Nodes with hardware prefetched, their rollout head (newest revision) and their agent's
    last report (heartbeat time, applied generation) annotated; the prefetches keep list
    views at a fixed query count."""
    head = Revision.objects.filter(node=OuterRef("pk")).order_by("-generation")
    return (
        Node.objects.select_related("tenant")
        .prefetch_related("gpus", "nics", "drives", "numa_nodes")
        .annotate(
            desired_generation=Subquery(head.values("generation")[:1]),
            head_status=Subquery(head.values("status")[:1]),
            last_heartbeat_at=F("report__last_heartbeat_at"),
            applied_generation=Coalesce(F("report__applied_generation"), Value(0)),
        )
    )
