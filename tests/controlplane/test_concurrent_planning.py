"""Fleet changes from several API workers at once: each plans only what it affects, under
row locks, so none is lost and no GPU is given twice; a change reaching many nodes
answers before their revisions are rendered, which happens after commit."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from celery import Celery
from django.db import connection

from controlplane.fleet import services as fleet
from controlplane.fleet import tasks
from controlplane.fleet.models import Deployment, Replica, Revision
from controlplane.inventory.models import Node
from controlplane.tenancy.services import set_tenant_quota
from tests.controlplane.conftest import World, make_node

BODY = {"model_name": "chat-8b", "artifact_uri": "synthetic://chat", "gpus_per_replica": 1}


def _fleet(nodes: int, gpus: int) -> list[Node]:
    made = [make_node(f"gpu-{i}", gpus=gpus) for i in range(nodes)]
    Node.objects.update(status="ready")
    return made


def _at_once(*calls: Callable[[], Any]) -> list[Any]:
    """Run the calls in threads (each its own database connection), released together."""
    start = threading.Barrier(len(calls))

    def run(call: Callable[[], Any]) -> Any:
        try:
            start.wait()
            return call()
        finally:
            connection.close()

    with ThreadPoolExecutor(len(calls)) as pool:
        return [f.result() for f in [pool.submit(run, call) for call in calls]]


def _assert_no_gpu_twice_and_rendered() -> None:
    """Every GPU holds at most one replica, and each node's newest revision runs exactly
    the replicas placed on it."""
    placed = Replica.objects.exclude(node=None)
    gpus = Counter((r.node_id, gpu) for r in placed for gpu in r.gpu_indices)
    assert gpus and max(gpus.values()) == 1, gpus
    for node in Node.objects.all():
        head = Revision.objects.filter(node=node).order_by("-generation").first()
        running = (
            {w["replica_id"] for w in head.document["state"]["components"]["workers"]}
            if head
            else set()
        )
        assert running == {str(r.pk) for r in placed if r.node_id == node.pk}, node.hostname


@pytest.mark.django_db(transaction=True)
def test_two_api_workers_placing_at_once_never_give_a_gpu_twice(
    world: World, client_for: Any
) -> None:
    _fleet(nodes=2, gpus=2)
    clients = [client_for(world.admin_a), client_for(world.admin_b)]
    created = _at_once(
        *(
            lambda c=client, t=tenant, n=name: c.post(
                "/api/v1/deployments/",
                {**BODY, "tenant": str(t.pk), "name": n, "replicas": 2},
                format="json",
            )
            for client, tenant, name in zip(
                clients, (world.tenant_a, world.tenant_b), ("a", "b"), strict=True
            )
        )
    )
    assert [r.status_code for r in created] == [201, 201], [r.content for r in created]
    assert Replica.objects.exclude(node=None).count() == 4  # the fleet's four GPUs, once each
    _assert_no_gpu_twice_and_rendered()


@pytest.mark.django_db(transaction=True)
def test_concurrent_changes_of_two_deployments_both_land(world: World, client_for: Any) -> None:
    _fleet(nodes=3, gpus=2)
    client = client_for(world.admin_a)
    ids = [
        client.post(
            "/api/v1/deployments/",
            {**BODY, "tenant": str(world.tenant_a.pk), "name": name, "replicas": 1},
            format="json",
        ).json()["id"]
        for name in ("a", "b")
    ]
    changed = _at_once(
        lambda: client_for(world.admin_a).patch(
            f"/api/v1/deployments/{ids[0]}/", {"replicas": 3}, format="json"
        ),
        lambda: client_for(world.admin_a).patch(
            f"/api/v1/deployments/{ids[1]}/", {"replicas": 3, "max_batch_size": 8}, format="json"
        ),
    )
    assert [r.status_code for r in changed] == [200, 200]
    assert Replica.objects.exclude(node=None).count() == 6
    b = Deployment.objects.get(pk=ids[1])
    assert (b.replicas, b.max_batch_size) == (3, 8)
    _assert_no_gpu_twice_and_rendered()
    for replica in Replica.objects.filter(deployment=b):
        head = Revision.objects.filter(node=replica.node).order_by("-generation").first()
        workers = head.document["state"]["components"]["workers"]
        assert {w["max_batch_size"] for w in workers if w["deployment_id"] == ids[1]} == {8}


@pytest.mark.django_db(transaction=True)
def test_a_quota_holds_when_its_tenant_changes_two_deployments_at_once(
    world: World, client_for: Any
) -> None:
    _fleet(nodes=2, gpus=4)
    set_tenant_quota(world.tenant_a, max_gpus=3)
    created = _at_once(
        *(
            lambda n=name: client_for(world.admin_a).post(
                "/api/v1/deployments/",
                {**BODY, "tenant": str(world.tenant_a.pk), "name": n, "replicas": 2},
                format="json",
            )
            for name in ("a", "b")
        )
    )
    assert [r.status_code for r in created] == [201, 201]
    assert Replica.objects.exclude(node=None).count() == 3
    assert Replica.objects.filter(node=None, reason__contains="tenant quota").count() == 1
    _assert_no_gpu_twice_and_rendered()


def test_a_change_reaching_many_nodes_answers_before_rendering_them(
    world: World,
    client_for: Any,
    monkeypatch: pytest.MonkeyPatch,
    free_port: int,
    django_capture_on_commit_callbacks: Any,
) -> None:
    nodes = _fleet(nodes=3, gpus=1)
    monkeypatch.setattr(fleet, "INLINE_RENDER_NODES", 2)
    client = client_for(world.admin_a)
    with django_capture_on_commit_callbacks(execute=False) as later:
        created = client.post(
            "/api/v1/deployments/",
            {**BODY, "tenant": str(world.tenant_a.pk), "name": "wide", "replicas": 3},
            format="json",
        )
    assert created.status_code == 201 and created.json()["placed_replicas"] == 3
    assert not Revision.objects.exists()  # committed and answered; rendering comes after
    assert len(later) == 1

    # The task renders them in bulk; a second run finds nothing new to say.
    ids = [str(n.pk) for n in nodes]
    assert tasks.issue_revisions(ids, "deployment wide created") == 3
    assert tasks.issue_revisions(ids, "deployment wide created") == 0

    # With the broker down, the committed change is rendered where it was made.
    monkeypatch.setattr(
        fleet, "celery_app", Celery("down", broker=f"redis://127.0.0.1:{free_port}/0")
    )
    with django_capture_on_commit_callbacks(execute=True):
        changed = client.patch(
            f"/api/v1/deployments/{created.json()['id']}/", {"max_batch_size": 4}, format="json"
        )
    assert changed.status_code == 200
    heads = Revision.objects.filter(generation=2)
    assert heads.count() == 3
    assert {h.document["state"]["components"]["workers"][0]["max_batch_size"] for h in heads} == {4}
