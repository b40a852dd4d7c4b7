"""How the fleet answers the apps it builds on: a change there re-plans placement or
re-renders the nodes it reaches. Connected in `FleetConfig.ready()`."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any
from uuid import UUID

from controlplane.fleet import services
from controlplane.inventory.models import Node
from controlplane.storage import selectors as storage_selectors
from controlplane.tenancy.models import Tenant


def inference_keys_changed(sender: Any, *, tenant_id: Any, cause: str, **kwargs: Any) -> None:
    services.reconcile_fleet(cause=cause, tenants=[tenant_id])


def policy_changed(sender: Any, *, tenant: Tenant, cause: str, **kwargs: Any) -> None:
    """Re-render the nodes that serve the tenant and those holding its volumes."""
    services.reconcile_fleet(
        cause=cause, tenants=[tenant.pk], nodes=storage_selectors.volume_nodes(tenant.pk)
    )


def quota_changed(sender: Any, *, tenant: Tenant, **kwargs: Any) -> None:
    services.reconcile_fleet(cause=f"quota of tenant {tenant.slug} changed", quotas=[tenant.pk])


def nodes_changed(sender: Any, *, node_ids: list[Any], why: str, **kwargs: Any) -> None:
    services.replace_from_nodes(node_ids, why=why)


def node_capacity_changed(sender: Any, *, node: Node, cause: str, **kwargs: Any) -> None:
    services.reconcile_if_work_waits(node, cause=cause)


def storage_changed(sender: Any, *, cause: str, nodes: Iterable[UUID], **kwargs: Any) -> None:
    services.reconcile_fleet(cause=cause, nodes=nodes)
