"""Rendering after commit: a change that reaches many nodes issues their revisions here."""

from celery import shared_task

from controlplane.fleet import services


@shared_task(name=services.RENDER_TASK)
def issue_revisions(node_ids: list[str], cause: str) -> int:
    """Render, sign, store and push the nodes' revisions; idempotent (an unchanged render
    issues nothing)."""
    return len(services.render_nodes(node_ids, cause=cause))
