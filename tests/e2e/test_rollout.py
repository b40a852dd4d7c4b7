"""Desired state travels for real: control plane -> Celery/Redis -> two agents -> workers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from controlplane.fleet.models import Revision
from controlplane.inventory.models import Node
from controlplane.inventory.services import create_bootstrap_token
from controlplane.tenancy.services import create_tenant, issue_api_token, issue_inference_key
from tests.e2e.stack import TINY_MODEL, running_stack, wait_for


def _nodes_ready(count: int) -> list[Node] | None:
    nodes = list(Node.objects.filter(status="ready").order_by("hostname"))
    return nodes if len(nodes) == count else None


def _applied(generation_of: dict[Any, int]) -> bool:
    return all(
        Revision.objects.filter(node_id=node_id, generation=gen, status="applied").exists()
        for node_id, gen in generation_of.items()
    )


@pytest.mark.e2e
def test_deployment_change_reaches_both_agents(
    transactional_db: Any, tmp_path: Path, free_port: int, django_user_model: Any
) -> None:
    tenant = create_tenant(slug="acme", name="Acme")
    admin = django_user_model.objects.create_user("ops", is_superuser=True)
    token = issue_api_token(user=admin, name="e2e").secret
    key = issue_inference_key(tenant=tenant, name="e2e").secret
    bootstrap = create_bootstrap_token(name="e2e", uses=2).secret
    api = httpx.Client(headers={"Authorization": f"Bearer {token}"}, timeout=30)

    with running_stack(tmp_path, free_port) as stack:
        stack.start_agent("e2e-node-a", bootstrap)
        stack.start_agent("e2e-node-b", bootstrap)
        nodes = wait_for(lambda: _nodes_ready(2), 60, "both agents to enroll and heartbeat")
        wait_for(
            lambda: Node.objects.get(hostname="e2e-node-a").numa_nodes.exists(),
            30,
            "the inventory to land (it is reported beside heartbeats, not before them)",
        )

        response = api.post(
            f"{stack.url}/api/v1/deployments/",
            json={
                "tenant": str(tenant.pk),
                "name": "tiny",
                "model_name": "tiny-chat",
                "artifact_uri": TINY_MODEL,
                "replicas": 2,
                "max_batch_size": 8,
            },
        )
        assert response.status_code == 201, response.text
        deployment_id = response.json()["id"]
        first = {n.pk: 1 for n in nodes}
        wait_for(lambda: _applied(first), 120, "generation 1 applied on both nodes")

        replicas = api.get(
            f"{stack.url}/api/v1/replicas/", params={"deployment": deployment_id}
        ).json()
        assert {r["hostname"] for r in replicas["results"]} == {"e2e-node-a", "e2e-node-b"}
        # each worker really serves, with the tenant's key, and so does the gateway each
        # node's agent runs in front of it: the deployment's endpoints
        endpoints = api.get(f"{stack.url}/api/v1/deployments/{deployment_id}/").json()["endpoints"]
        assert len(endpoints) == 2, endpoints
        workers = [f"http://127.0.0.1:{replica['port']}" for replica in replicas["results"]]
        for url in workers + endpoints:
            completion = httpx.post(
                f"{url}/v1/completions",
                headers={"Authorization": f"Bearer {key}"},
                json={"model": "tiny-chat", "prompt": "hello", "max_tokens": 4, "ignore_eos": True},
                timeout=60,
            )
            assert completion.status_code == 200, completion.text
            assert completion.json()["usage"]["completion_tokens"] == 4

        response = api.patch(
            f"{stack.url}/api/v1/deployments/{deployment_id}/", json={"max_batch_size": 16}
        )
        assert response.status_code == 200, response.text
        wait_for(lambda: _applied({n.pk: 2 for n in nodes}), 60, "generation 2 applied")
        listed = api.get(f"{stack.url}/api/v1/nodes/").json()["results"]
        assert {n["rollout"]["state"] for n in listed} == {"in_sync"}
        assert {n["rollout"]["applied_generation"] for n in listed} == {2}

        # Roll node a back to generation 1: a new generation 3 with generation 1's content.
        head = Revision.objects.get(node__hostname="e2e-node-a", generation=1)
        response = api.post(f"{stack.url}/api/v1/revisions/{head.pk}/rollback/")
        assert response.status_code == 201, response.text
        assert response.json()["generation"] == 3
        assert response.json()["content_hash"] == head.content_hash
        node_a = Node.objects.get(hostname="e2e-node-a")
        wait_for(lambda: _applied({node_a.pk: 3}), 60, "the rollback applied")
        node_a.refresh_from_db()
        assert node_a.pinned and node_a.report.applied_generation == 3
