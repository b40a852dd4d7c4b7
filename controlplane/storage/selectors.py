"""Read-side queries for storage: what each pool holds, computed in the database."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from django.db.models import BigIntegerField, OuterRef, QuerySet, Subquery, Sum, Value
from django.db.models.functions import Coalesce

from controlplane.storage.models import Artifact, Pool, Volume


def _placed_in_pool() -> Any:
    """Bytes placed in the outer pool: tenants' volumes plus replicas' model volumes."""
    from controlplane.fleet.models import Replica  # fleet builds on storage

    def total(queryset: QuerySet[Any], field: str) -> Any:
        rows = (
            queryset.filter(pool=OuterRef("pk")).values("pool").annotate(t=Sum(field)).values("t")
        )
        return Coalesce(Subquery(rows, output_field=BigIntegerField()), Value(0))

    return total(Volume.objects.all(), "size_bytes") + total(
        Replica.objects.all(), "deployment__model_volume_bytes"
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


def artifact_for_node(node: Any, artifact_id: Any) -> Artifact | None:
    """The artifact, if the node runs a replica of a deployment that uses it."""
    return Artifact.objects.filter(pk=artifact_id, deployments__instances__node=node).first()
