"""Read-side queries for inventory; the prefetches keep list views at a fixed query count."""

from __future__ import annotations

from django.db.models import QuerySet

from controlplane.inventory.models import Node


def nodes_with_hardware() -> QuerySet[Node]:
    return Node.objects.select_related("tenant").prefetch_related(
        "gpus", "nics", "drives", "numa_nodes"
    )
