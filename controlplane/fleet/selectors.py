"""Read-side queries for the fleet: which deployments serve which tenants, and nodes with
their rollout.

A deployment serves its own tenant and the tenants it is shared with. Everything that
asks "may this tenant's requests, SLOs or telemetry name this deployment" asks here.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any
from uuid import UUID

from django.db.models import F, OuterRef, Prefetch, Q, QuerySet, Subquery, Value
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


def with_endpoints(queryset: QuerySet[Deployment]) -> QuerySet[Deployment]:
    """Deployments with their placed replicas and those nodes' reports prefetched, for
    `endpoints` and `client_url` (one query for any number of deployments)."""
    placed = (
        Replica.objects.filter(node__isnull=False)
        .select_related("node__report")
        .only("deployment", "node", "url", "node__gateway", "node__report__gateway_url")
    )
    return queryset.prefetch_related(Prefetch("instances", placed, to_attr="placed"))


def _placed(deployment: Deployment) -> list[Replica]:
    """Read once per deployment instance: `endpoints` and `client_url` share it."""
    placed = getattr(deployment, "placed", None)
    if placed is None:
        placed = deployment.placed = with_endpoints(  # type: ignore[attr-defined]
            Deployment.objects.filter(pk=deployment.pk)
        )[0].placed
    return list(placed)


def _gateway(node: Node) -> str:
    """Where the node's gateway answers; "" where it runs none or none has answered."""
    report = getattr(node, "report", None)
    return report.gateway_url if node.gateway and report is not None else ""


def endpoints(deployment: Deployment) -> list[str]:
    """Where clients send the deployment's requests: the gateways of the nodes it runs on."""
    return sorted({url for replica in _placed(deployment) if (url := _gateway(replica.node))})


def client_url(deployment: Deployment) -> str | None:
    """The deployment's one address: the first of its gateways that reaches every replica
    (its own node's, and those other nodes reported reachable); None while none does."""
    placed = _placed(deployment)
    fronting = sorted({(_gateway(r.node), str(r.node_id)) for r in placed if _gateway(r.node)})
    for url, node_id in fronting:
        if all(str(r.node_id) == node_id or r.url for r in placed):
            return url
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
