"""Read-side queries for storage: what each pool holds, computed in the database."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from django.db.models import BigIntegerField, Model, OuterRef, QuerySet, Subquery, Sum, Value
from django.db.models.functions import Coalesce

from controlplane.storage.models import Artifact, Pool, Volume


@dataclass(frozen=True)
class Occupant:
    """Rows of an app built on storage that take room in pools besides tenants' volumes
    (the fleet's replicas, with their model volumes): `model` has a `pool` foreign key,
    each row takes `size` bytes and belongs to the tenant at `tenant` (field paths)."""

    model: type[Model]
    size: str
    tenant: str


occupants: list[Occupant] = []
"""Filled by those apps at ready(); storage cannot import them."""


def _placed_in_pool() -> Any:
    """Bytes placed in the outer pool: tenants' volumes plus what occupants hold there."""

    def total(queryset: QuerySet[Any], field: str) -> Any:
        rows = (
            queryset.filter(pool=OuterRef("pk")).values("pool").annotate(t=Sum(field)).values("t")
        )
        return Coalesce(Subquery(rows, output_field=BigIntegerField()), Value(0))

    return sum(
        (total(o.model._default_manager.all(), o.size) for o in occupants),
        start=total(Volume.objects.all(), "size_bytes"),
    )


def pools_with_allocation() -> QuerySet[Pool]:
    """Pools annotated with `allocated_bytes`."""
    return Pool.objects.select_related("node").annotate(allocated_bytes=_placed_in_pool())


def volume_allocation(pool_ids: Iterable[Any]) -> dict[Any, int]:
    """Bytes tenants' volumes take in each pool (model volumes are placed with their replicas)."""
    rows = (
        Volume.objects.filter(pool__in=list(pool_ids)).values("pool").annotate(t=Sum("size_bytes"))
    )
    return {row["pool"]: int(row["t"]) for row in rows}


def free_bytes(pool: Pool) -> int | None:
    """What is left in a pool for new volumes; None while its capacity is unknown."""
    capacity = pool.known_capacity_bytes
    if capacity is None:
        return None
    return max(0, capacity - allocated_bytes(pool))


def allocated_bytes(pool: Pool) -> int:
    return int(pools_with_allocation().values_list("allocated_bytes", flat=True).get(pk=pool.pk))


def model_volume_room() -> dict[Any, dict[Any, int]]:
    """Per node, each pool's room for model volumes: its known capacity less tenants' volumes."""
    pools = [p for p in Pool.objects.all() if p.known_capacity_bytes is not None]
    used = volume_allocation(p.pk for p in pools)
    rooms: dict[Any, dict[Any, int]] = {}
    for pool in pools:
        rooms.setdefault(pool.node_id, {})[pool.pk] = max(
            0, (pool.known_capacity_bytes or 0) - used.get(pool.pk, 0)
        )
    return rooms


def volume_nodes(tenant_id: Any) -> QuerySet[Any]:
    """Nodes holding the tenant's own volumes (model volumes not included)."""
    return Volume.objects.filter(tenant_id=tenant_id).values_list("pool__node_id", flat=True)


def nodes_holding(tenant_id: Any) -> set[Any]:
    """Nodes holding any of the tenant's volumes, model volumes included."""
    nodes = set(volume_nodes(tenant_id))
    for o in occupants:
        nodes.update(
            o.model._default_manager.filter(
                pool__isnull=False, **{o.tenant: tenant_id}
            ).values_list("pool__node_id", flat=True)
        )
    return nodes


def artifact_for_node(node: Any, artifact_id: Any) -> Artifact | None:
    """The artifact, if the node runs a replica of a deployment that uses it."""
    return Artifact.objects.filter(pk=artifact_id, deployments__instances__node=node).first()
