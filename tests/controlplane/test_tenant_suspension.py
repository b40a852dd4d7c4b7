"""Suspending a tenant: only platform admins may, its inference keys leave every worker
that serves it (its own deployments and those shared with it), and resuming brings them
back. The admin's tenant form routes suspension and quotas through the same services."""

from __future__ import annotations

from typing import Any

from django.test import Client

from controlplane.fleet import services as fleet
from controlplane.fleet.models import Deployment, Replica
from controlplane.tenancy.services import issue_inference_key, set_tenant_active
from tests.controlplane.conftest import World
from tests.controlplane.test_tenant_policies import head, serve


def keys_by_tenant(node: Any) -> dict[str, list[str]]:
    (worker,) = head(node).document["state"]["components"]["workers"]
    return {entry["tenant_id"]: entry["key_hashes"] for entry in worker["tenants"]}


def test_only_platform_admins_suspend_and_a_suspended_tenants_keys_leave_its_workers(
    world: World, client_for: Any
) -> None:
    node = serve(world.tenant_a, "node-suspend")
    issue_inference_key(tenant=world.tenant_a, name="app")
    url = f"/api/v1/tenants/{world.tenant_a.pk}/"
    admin, platform = client_for(world.admin_a), client_for(world.platform)
    tenant_a = str(world.tenant_a.pk)
    assert len(keys_by_tenant(node)[tenant_a]) == 1

    refused = admin.patch(url, {"is_active": False}, format="json")
    assert refused.status_code == 403
    assert refused.json() == {"detail": "Only platform admins suspend or resume tenants."}
    unchanged = admin.patch(url, {"is_active": True, "name": "Same state"}, format="json")
    assert unchanged.status_code == 200

    suspended = platform.patch(url, {"is_active": False}, format="json")
    assert suspended.status_code == 200 and suspended.json()["is_active"] is False
    assert head(node).cause == "tenant tenant-a suspended"
    assert keys_by_tenant(node) == {tenant_a: []}
    # members still read what the tenant has, but nothing new is made for it
    assert admin.get(url).json()["is_active"] is False
    made = admin.post(
        "/api/v1/deployments/",
        {"tenant": tenant_a, "name": "more", "model_name": "m", "artifact_uri": "synthetic://m"},
        format="json",
    )
    assert made.status_code == 400 and "tenant" in made.json()

    resumed = platform.patch(url, {"is_active": True}, format="json")
    assert resumed.status_code == 200
    assert head(node).cause == "tenant tenant-a resumed"
    assert len(keys_by_tenant(node)[tenant_a]) == 1


def test_a_suspended_sharer_loses_the_shared_worker_and_the_owner_keeps_it(
    world: World,
) -> None:
    node = serve(world.tenant_a, "node-shared")
    (deployment,) = Deployment.objects.filter(tenant=world.tenant_a)
    fleet.share_deployment(deployment, [world.tenant_b])
    issue_inference_key(tenant=world.tenant_a, name="owner")
    issue_inference_key(tenant=world.tenant_b, name="sharer")
    owner, sharer = str(world.tenant_a.pk), str(world.tenant_b.pk)
    before = keys_by_tenant(node)
    assert len(before[owner]) == 1 and len(before[sharer]) == 1

    set_tenant_active(world.tenant_b, False)
    assert keys_by_tenant(node) == {owner: before[owner], sharer: []}
    generation = head(node).generation
    set_tenant_active(world.tenant_b, False)  # already suspended: nothing to push
    assert head(node).generation == generation
    set_tenant_active(world.tenant_b, True)
    assert keys_by_tenant(node) == before


def test_the_admin_form_suspends_and_sets_quotas_through_the_services(world: World) -> None:
    node = serve(world.tenant_a, "node-admin-form")
    issue_inference_key(tenant=world.tenant_a, name="app")
    browser = Client()
    browser.force_login(world.platform)
    change = f"/admin/tenancy/tenant/{world.tenant_a.pk}/change/"
    form = {
        "slug": "tenant-a",
        "name": "Tenant A",
        "description": "",
        "max_gpus": "",
        "max_replicas": "",
        "memberships-TOTAL_FORMS": "0",
        "memberships-INITIAL_FORMS": "0",
    }
    response = browser.post(change, form)  # the is_active box left unticked
    assert response.status_code == 302, response.content
    assert head(node).cause == "tenant tenant-a suspended"
    assert keys_by_tenant(node) == {str(world.tenant_a.pk): []}

    response = browser.post(change, {**form, "is_active": "on", "max_replicas": "0"})
    assert response.status_code == 302, response.content
    (replica,) = Replica.objects.filter(deployment__tenant=world.tenant_a)
    assert replica.node_id is None
    assert (
        replica.reason == "not placed: tenant quota: tenant-a may run 0 replicas, 0 already placed"
    )
    assert head(node).cause == "quota of tenant tenant-a changed"
    world.tenant_a.refresh_from_db()
    assert world.tenant_a.is_active and world.tenant_a.max_replicas == 0
