"""Periodic inventory upkeep (Celery beat)."""

from celery import shared_task

from controlplane.inventory import services


@shared_task(name="inventory.mark_silent_nodes_unreachable")
def mark_silent_nodes_unreachable() -> int:
    return services.mark_silent_nodes_unreachable()
