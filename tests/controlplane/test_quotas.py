"""Tenant quotas: placement never exceeds them, the surplus says why, and who may set them."""

from __future__ import annotations

from typing import Any

from controlplane.fleet.models import Replica, Revision
from controlplane.fleet.placement import Quota, plan
from controlplane.inventory.models import Node
from tests.controlplane.conftest import World, make_node
from tests.controlplane.test_placement import (
    OTHER,
    TENANT,
    deployment,
    fresh,
    new_replica,
    placed_on,
    room,
)


def test_gpu_and_replica_quotas_cap_placement_and_name_the_quota() -> None:
    rooms = fresh(room("a"), room("b"))
    quotas = {TENANT: Quota("tenant-a", max_gpus=4)}
    saved, _ = plan([deployment(replicas=3, gpus=2)], rooms, [], new_replica, quotas)
    assert placed_on(saved) == ["a", "b", None]
    assert saved[2].reason == (
        "not placed: tenant quota: tenant-a may use 4 GPUs, 4 in use, this replica needs 2"
    )
    assert saved[2].explanation == {"placed": False, "quota": saved[2].reason[12:]}

    # CPU replicas need no GPUs; the replica cap still counts them. Other tenants are free.
    quotas = {TENANT: Quota("tenant-a", max_gpus=0, max_replicas=1)}
    cpu, theirs = deployment(replicas=2, gpus=0), deployment(replicas=3, gpus=2)
    theirs.tenant_id = OTHER
    saved, _ = plan([cpu, theirs], fresh(room("a"), room("b")), [], new_replica, quotas)
    assert placed_on(saved) == ["a", None, "b", "a", "b"]
    assert (
        saved[1].reason == "not placed: tenant quota: tenant-a may run 1 replica, 1 already placed"
    )


def test_kept_placements_come_first_and_a_lower_quota_unplaces_the_surplus() -> None:
    a, b = room("a"), room("b")
    running = deployment(replicas=2)
    saved, _ = plan([running], fresh(a, b), [], new_replica)
    where = [(r.node.hostname, r.gpu_indices, r.port) for r in saved]

    newcomer = deployment(replicas=1)
    quotas = {TENANT: Quota("tenant-a", max_replicas=2)}
    both, _ = plan([newcomer, running], fresh(a, b), saved, new_replica, quotas)
    assert placed_on(both) == [None, "a", "b"]  # the newcomer waits, running ones stay
    assert "tenant quota: tenant-a may run 2 replicas, 2 already placed" in both[0].reason

    quotas = {TENANT: Quota("tenant-a", max_replicas=1)}
    fewer, _ = plan([running], fresh(a, b), saved, new_replica, quotas)
    assert (fewer[0].node.hostname, fewer[0].gpu_indices, fewer[0].port) == where[0]
    assert fewer[1].node is None
    assert (
        fewer[1].reason == "not placed: tenant quota: tenant-a may run 1 replica, 1 already placed"
    )


BODY = {"name": "chat", "model_name": "chat-8b", "artifact_uri": "synthetic://chat"}


def test_platform_admins_set_quotas_and_tenant_admins_read_them(
    world: World, client_for: Any
) -> None:
    tenant = f"/api/v1/tenants/{world.tenant_a.pk}/"
    admin, platform = client_for(world.admin_a), client_for(world.platform)
    shown = admin.get(tenant).json()
    assert shown["max_gpus"] is None and shown["max_replicas"] is None

    refused = admin.patch(tenant, {"max_gpus": 100}, format="json")
    assert refused.status_code == 403
    assert refused.json() == {"detail": "Only platform admins change tenant quotas."}
    assert admin.patch(tenant, {"name": "Renamed"}, format="json").status_code == 200

    bad = platform.patch(tenant, {"max_gpus": -1, "max_replicas": "many"}, format="json")
    assert bad.status_code == 400
    assert "greater than or equal to 0" in str(bad.json()["max_gpus"])
    assert "valid integer" in str(bad.json()["max_replicas"])

    created = platform.post(
        "/api/v1/tenants/", {"slug": "new", "name": "New", "max_gpus": 8}, format="json"
    )
    assert created.status_code == 201 and created.json()["max_gpus"] == 8, created.content

    set_ = platform.patch(tenant, {"max_gpus": 8, "max_replicas": 4}, format="json")
    assert set_.status_code == 200, set_.content
    assert (set_.json()["max_gpus"], set_.json()["max_replicas"]) == (8, 4)
    assert admin.get(tenant).json()["max_gpus"] == 8


def test_a_deployment_beyond_the_quota_is_accepted_and_the_surplus_waits(
    world: World, client_for: Any
) -> None:
    node = make_node("gpu-q", world.tenant_a, gpus=8)
    Node.objects.filter(pk=node.pk).update(status="ready")
    tenant = f"/api/v1/tenants/{world.tenant_a.pk}/"
    admin, platform = client_for(world.admin_a), client_for(world.platform)
    assert platform.patch(tenant, {"max_gpus": 4}, format="json").status_code == 200

    response = admin.post(
        "/api/v1/deployments/",
        {**BODY, "tenant": str(world.tenant_a.pk), "replicas": 3, "gpus_per_replica": 2},
        format="json",
    )
    assert response.status_code == 201, response.content
    assert response.json()["placed_replicas"] == 2
    deployment = response.json()["id"]
    waiting = admin.get("/api/v1/replicas/", {"deployment": deployment, "placed": False}).json()[
        "results"
    ]
    (surplus,) = waiting
    quota_words = "tenant quota: tenant-a may use 4 GPUs, 4 in use, this replica needs 2"
    assert surplus["reason"] == f"not placed: {quota_words}"
    assert surplus["explanation"] == {"placed": False, "quota": quota_words}

    generation = Revision.objects.filter(node=node).latest("generation").generation
    assert platform.patch(tenant, {"max_gpus": None}, format="json").status_code == 200
    assert Replica.objects.filter(deployment_id=deployment, node=node).count() == 3
    head = Revision.objects.filter(node=node).latest("generation")
    assert head.generation == generation + 1
    assert head.cause == "quota of tenant tenant-a changed"

    assert platform.patch(tenant, {"max_replicas": 1}, format="json").status_code == 200
    replicas = admin.get("/api/v1/replicas/", {"deployment": deployment}).json()["results"]
    assert [r["node"] is not None for r in replicas] == [True, False, False]
    assert replicas[2]["reason"] == (
        "not placed: tenant quota: tenant-a may run 1 replica, 1 already placed"
    )
