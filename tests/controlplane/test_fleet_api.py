"""Deployments, placement explanations, revisions and rollbacks through the REST API."""

from __future__ import annotations

from typing import Any

from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from controlplane.fleet.models import Replica, Revision
from controlplane.inventory.models import Drive, Nic, Node
from tests.controlplane.conftest import World, make_node

BODY = {"name": "chat", "model_name": "chat-8b", "artifact_uri": "synthetic://chat"}


def test_bad_deployments_are_refused_by_field(world: World, client_for: Any) -> None:
    client = client_for(world.admin_a)
    tenant = str(world.tenant_a.id)
    cases = [
        ({"artifact_uri": "https://models.example/chat.tar"}, "artifact_uri", "sha256"),
        (
            {"artifact_uri": "synthetic://x", "artifact_sha256": "ab" * 32},
            "artifact_uri",
            "no sha256",
        ),
        ({"replicas": 1000}, "replicas", "less than or equal to 256"),
        ({"replicas": -1}, "replicas", "greater than or equal to 0"),
        (
            {"runtime_options": {"threads": [1, 2]}},
            "runtime_options",
            "strings, numbers or booleans",
        ),
        ({"node_selector": {"bad key!": "x"}}, "node_selector", "invalid"),
        ({"name": "Not A Slug"}, "name", "lowercase"),
        ({"max_batch_size": 0}, "max_batch_size", "greater than or equal to 1"),
        ({"placement_strategy": "random"}, "placement_strategy", "not a valid choice"),
    ]
    for change, field, words in cases:
        response = client.post(
            "/api/v1/deployments/", {**BODY, "tenant": tenant, **change}, format="json"
        )
        assert response.status_code == 400, (change, response.content)
        assert words in str(response.json()[field]), (change, response.json())
    assert not Revision.objects.exists()


def test_why_here_and_why_not_placed(world: World, client_for: Any) -> None:
    node = make_node("gpu-1", world.tenant_a, gpus=2)
    Node.objects.filter(pk=node.pk).update(status="ready")
    Nic.objects.create(
        node=node, device="mlx5_0", state="active", link_layer="InfiniBand", numa_node=0
    )
    Drive.objects.create(node=node, name="nvme0n1", capacity_bytes=2**40, numa_node=0)
    client = client_for(world.admin_a)
    response = client.post(
        "/api/v1/deployments/",
        {**BODY, "tenant": str(world.tenant_a.id), "replicas": 2, "gpus_per_replica": 2},
        format="json",
    )
    assert response.status_code == 201, response.content
    assert response.json()["placed_replicas"] == 1
    assert response.json()["placement_strategy"] == "spread"
    replicas = client.get("/api/v1/replicas/", {"deployment": response.json()["id"]}).json()[
        "results"
    ]
    placed, unplaced = sorted(replicas, key=lambda r: r["node"] is None)
    assert placed["hostname"] == "gpu-1" and placed["gpu_indices"] == [0, 1]
    assert placed["reason"].startswith(
        "placed on gpu-1: GPUs 0,1 on NUMA 0 with mlx5_0 and nvme0n1 (same NUMA), "
        "NVIDIA H100 80GB HBM3 (80 GiB); spread: 0 replicas of this deployment already there"
    ), placed["reason"]
    explained = placed["explanation"]
    assert (explained["node"], explained["gpus"], explained["numa_nodes"]) == ("gpu-1", [0, 1], [0])
    assert (explained["rdma_nics"], explained["nvme_drives"]) == (["mlx5_0"], ["nvme0n1"])
    assert explained["strategy"] == "spread" and explained["nodes_fit"] == 1
    assert unplaced["node"] is None
    assert unplaced["reason"] == (
        "not placed: no node fits (1 has busy GPUs: 0 of 2 GPUs free, needs 2 [gpu-1])"
    )
    assert unplaced["explanation"] == {
        "placed": False,
        "ruled_out": [
            {"reason": "has busy GPUs: 0 of 2 GPUs free, needs 2", "count": 1, "nodes": ["gpu-1"]}
        ],
    }

    admin = Client()
    admin.force_login(world.platform)
    page = admin.get(f"/admin/fleet/replica/{placed['id']}/change/")
    assert page.status_code == 200
    assert "&quot;rdma_nics&quot;: [" in page.content.decode()
    listing = admin.get("/admin/fleet/replica/", {"q": "busy GPUs"}).content.decode()
    assert "not placed: no node fits" in listing and "placed on gpu-1" not in listing


def test_changes_issue_new_generations_and_rollback_pins(
    world: World, client_for: Any, django_capture_on_commit_callbacks: Any
) -> None:
    node = make_node("gpu-2", world.tenant_a, gpus=1)
    Node.objects.filter(pk=node.pk).update(status="ready")
    client = client_for(world.admin_a)
    created = client.post(
        "/api/v1/deployments/", {**BODY, "tenant": str(world.tenant_a.id)}, format="json"
    ).json()
    client.patch(f"/api/v1/deployments/{created['id']}/", {"max_batch_size": 8}, format="json")
    client.patch(f"/api/v1/deployments/{created['id']}/", {"max_batch_size": 8}, format="json")
    revisions = client.get("/api/v1/revisions/", {"node": str(node.pk)}).json()["results"]
    assert [r["generation"] for r in revisions] == [2, 1]  # an unchanged render adds nothing
    assert "document" not in revisions[0]

    first = Revision.objects.get(node=node, generation=1)
    viewer = client_for(world.viewer_a)
    assert viewer.post(f"/api/v1/revisions/{first.pk}/rollback/").status_code == 403
    rolled = client.post(f"/api/v1/revisions/{first.pk}/rollback/").json()
    assert rolled["generation"] == 3 and rolled["content_hash"] == first.content_hash
    client.patch(f"/api/v1/deployments/{created['id']}/", {"max_batch_size": 16}, format="json")
    assert Revision.objects.filter(node=node).count() == 3  # pinned: the change waits

    detail = client.get(f"/api/v1/nodes/{node.pk}/").json()["rollout"]
    assert detail["pinned"] and detail["desired_generation"] == 3 and detail["state"] == "pending"
    with django_capture_on_commit_callbacks(execute=True) as replans:
        assert client.post(f"/api/v1/nodes/{node.pk}/release/").json()["rollout"]["pinned"] is False
    assert replans  # the plan is rendered again after the release commits, then pushed
    released = client.get(f"/api/v1/nodes/{node.pk}/").json()
    assert released["rollout"]["pinned"] is False and released["rollout"]["desired_generation"] == 4
    latest = Revision.objects.get(node=node, generation=4)
    assert latest.document["state"]["components"]["workers"][0]["max_batch_size"] == 16


def test_a_change_of_what_workers_are_told_renders_their_nodes_without_planning(
    world: World, client_for: Any
) -> None:
    """Batch sizes, queue limits and runtime options move nothing: the change renders the
    nodes holding the deployment's replicas without reading the fleet's hardware or
    locking its tenant; a change that can move replicas still plans."""
    nodes = [make_node(f"gpu-{i}", world.tenant_a, gpus=1) for i in range(3)]
    Node.objects.update(status="ready")
    client = client_for(world.admin_a)
    created = client.post(
        "/api/v1/deployments/",
        {**BODY, "tenant": str(world.tenant_a.id), "replicas": 2, "gpus_per_replica": 1},
        format="json",
    ).json()
    url = f"/api/v1/deployments/{created['id']}/"
    holding = set(
        Replica.objects.filter(deployment_id=created["id"]).values_list("node_id", flat=True)
    )
    assert len(holding) == 2

    with CaptureQueriesContext(connection) as queries:
        changed = client.patch(
            url, {"max_batch_size": 8, "runtime_options": {"intra_op_threads": 2}}, format="json"
        )
    assert changed.status_code == 200, changed.content
    planning = [
        q["sql"][:120]
        for q in queries
        if '"inventory_gpu"' in q["sql"] or ('"tenancy_tenant"' in q["sql"] and "FOR" in q["sql"])
    ]
    assert planning == [], planning
    heads = Revision.objects.filter(generation=2)
    assert {h.node_id for h in heads} == holding
    for head in heads:
        (worker,) = head.document["state"]["components"]["workers"]
        assert worker["max_batch_size"] == 8
        assert worker["runtime_options"] == {"intra_op_threads": 2}

    # One more replica (with a batch size in the same change) is planned and placed.
    assert client.patch(url, {"replicas": 3, "max_batch_size": 4}, format="json").status_code == 200
    assert Replica.objects.filter(deployment_id=created["id"], node__isnull=False).count() == 3
    third = next(n for n in nodes if n.pk not in holding)
    (worker,) = Revision.objects.get(node=third, generation=1).document["state"]["components"][
        "workers"
    ]
    assert worker["max_batch_size"] == 4
