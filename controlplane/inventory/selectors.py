"""Read-side queries for inventory; the prefetches keep list views at a fixed query count."""

from __future__ import annotations

from django.db.models import OuterRef, QuerySet, Subquery

from controlplane.inventory.models import Node


def nodes_with_hardware() -> QuerySet[Node]:
    """Nodes with hardware prefetched and their rollout head (newest revision) annotated."""
    from controlplane.fleet.models import Revision  # fleet builds on inventory

    head = Revision.objects.filter(node=OuterRef("pk")).order_by("-generation")
    return (
        Node.objects.select_related("tenant")
        .prefetch_related("gpus", "nics", "drives", "numa_nodes")
        .annotate(
            desired_generation=Subquery(head.values("generation")[:1]),
            head_status=Subquery(head.values("status")[:1]),
        )
    )
