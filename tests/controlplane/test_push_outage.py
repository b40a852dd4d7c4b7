"""A broker outage during a fleet change: the change commits, the revision waits in the
database for its node to pull it, and the API answers as if nothing went wrong."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from celery import Celery

from controlplane.fleet import services as fleet
from controlplane.fleet.models import Revision
from controlplane.inventory.models import Node
from controlplane.inventory.services import create_bootstrap_token
from tests.controlplane.conftest import World
from tests.controlplane.test_agent_api import as_node, enroll

BODY = {"name": "chat", "model_name": "chat-8b", "artifact_uri": "synthetic://chat"}


@pytest.fixture
def broker_down(monkeypatch: pytest.MonkeyPatch, free_port: int) -> None:
    """Celery pointed at a Redis URL on a port where nothing listens."""
    down = Celery("outage", broker=f"redis://127.0.0.1:{free_port}/0")
    monkeypatch.setattr(fleet, "celery_app", down)


def test_a_deployment_change_during_a_broker_outage_is_stored_for_the_node_to_pull(
    transactional_db: Any,
    world: World,
    client_for: Any,
    broker_down: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    grant = enroll(create_bootstrap_token(name="t").secret).json()
    node = Node.objects.get(pk=grant["node_id"])
    Node.objects.filter(pk=node.pk).update(status="ready")
    client = client_for(world.admin_a)

    with caplog.at_level(logging.WARNING, logger=fleet.__name__):
        created = client.post(
            "/api/v1/deployments/", {**BODY, "tenant": str(world.tenant_a.id)}, format="json"
        )
        assert created.status_code == 201, created.content
        changed = client.patch(
            f"/api/v1/deployments/{created.json()['id']}/", {"max_batch_size": 8}, format="json"
        )
        assert changed.status_code == 200, changed.content

    revisions = list(Revision.objects.filter(node=node).order_by("generation"))
    assert [r.generation for r in revisions] == [1, 2]
    assert revisions[-1].cause == "deployment chat changed"
    assert revisions[-1].document["state"]["components"]["workers"][0]["max_batch_size"] == 8
    warnings = [r for r in caplog.records if r.name == fleet.__name__]
    assert len(warnings) == 2 and all(r.levelno == logging.WARNING for r in warnings)
    assert "1 of 1 new revisions not pushed" in warnings[-1].getMessage()
    assert "pull them" in warnings[-1].getMessage()

    pulled = as_node(grant["node_credential"]).get("/api/v1/agent/desired-state/")
    assert pulled.status_code == 200 and pulled.json() == revisions[-1].document
