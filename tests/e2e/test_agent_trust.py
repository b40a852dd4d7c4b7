"""Agents refuse desired state they must not trust, fall silent visibly, and catch up after."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import redis

from agent.protocol import queue_name
from controlplane.celery import app as celery_app
from controlplane.fleet import services as fleet
from controlplane.fleet.models import Revision
from controlplane.inventory.models import Node
from controlplane.inventory.services import create_bootstrap_token
from controlplane.tenancy.services import create_tenant
from tests.e2e.stack import TINY_MODEL, running_stack, wait_for


def _push(node: Node, document: dict[str, Any]) -> None:
    queue = queue_name(node.pk)
    celery_app.send_task(fleet.APPLY_TASK, args=[document], queue=queue, routing_key=queue)


def _rejected(node: Node, reason: str) -> bool:
    node.refresh_from_db()
    return node.last_rejection_reason == reason


@pytest.mark.e2e
def test_bad_revisions_are_rejected_and_lost_ones_recovered(
    transactional_db: Any, tmp_path: Path, free_port: int, settings: Any
) -> None:
    tenant = create_tenant(slug="acme", name="Acme")
    bootstrap = create_bootstrap_token(name="e2e").secret
    with running_stack(tmp_path, free_port, NODE_UNREACHABLE_AFTER_S="3") as stack:
        stack.start_agent("trust-node", bootstrap)
        node = wait_for(lambda: Node.objects.filter(status="ready").first(), 60, "the agent")
        deployment = fleet.create_deployment(
            tenant=tenant, name="tiny", model_name="tiny", artifact_uri=TINY_MODEL, replicas=1
        )
        wait_for(
            lambda: Revision.objects.filter(node=node, status="applied").exists(),
            120,
            "generation 1 applied",
        )
        good = Revision.objects.get(node=node, generation=1).document

        tampered = copy.deepcopy(good)
        tampered["state"]["generation"] = 7
        tampered["state"]["components"]["workers"][0]["max_batch_size"] = 256
        _push(node, tampered)
        wait_for(lambda: _rejected(node, "bad_signature"), 30, "the tampered revision rejected")

        unsigned = copy.deepcopy(good)
        unsigned["signature"] = None
        unsigned["state"]["generation"] = 8
        _push(node, unsigned)
        wait_for(lambda: _rejected(node, "unsigned"), 30, "the unsigned revision rejected")

        _push(node, good)  # the very message already applied, sent again
        wait_for(lambda: _rejected(node, "replayed"), 30, "the replayed revision rejected")

        fleet.update_deployment(deployment, max_batch_size=4)
        wait_for(
            lambda: Revision.objects.filter(node=node, generation=2, status="applied").exists(),
            60,
            "generation 2 applied",
        )
        _push(node, good)  # generation 1 is now older than what runs
        wait_for(lambda: _rejected(node, "stale_generation"), 30, "the stale revision rejected")
        node.refresh_from_db()
        assert node.report.applied_generation == 2
        assert "older than applied 2" in node.last_rejection_detail

        # Silence: the node turns unreachable. A change made meanwhile is lost on the wire
        # (its queue is purged), yet the agent catches up by pulling when it returns.
        stack.stop("trust-node")
        wait_for(lambda: Node.objects.get(pk=node.pk).status == "unreachable", 30, "unreachable")
        fleet.update_deployment(deployment, max_batch_size=2)
        redis.Redis.from_url(settings.REDIS_URL).delete(queue_name(node.pk))
        stack.start_agent("trust-node", bootstrap)
        wait_for(lambda: Node.objects.get(pk=node.pk).status == "ready", 60, "ready again")
        wait_for(
            lambda: Revision.objects.filter(node=node, generation=3, status="applied").exists(),
            60,
            "the missed generation 3 applied after the pull",
        )
