"""Tenant policies: who reads and writes them, what a bad one is told, and how each one
reaches the desired state of the nodes that serve the tenant or hold its volumes."""

from __future__ import annotations

from typing import Any

from django.test import Client

from controlplane.fleet import services as fleet
from controlplane.fleet.models import Revision
from controlplane.inventory.models import Node
from controlplane.storage import services as storage
from controlplane.tenancy.models import TenantPolicy
from controlplane.tenancy.services import remove_tenant_policy, set_tenant_policy
from tests.controlplane.conftest import World
from tests.controlplane.storage_helpers import make_pool, ready_node

DEFAULTS = {
    "weight": 1.0,
    "priority_class": "normal",
    "max_concurrency": None,
    "tokens_per_s": None,
    "burst_tokens": None,
    "storage_iops": None,
    "storage_mb_s": None,
}
NOISY = {"weight": 0.5, "priority_class": "low", "max_concurrency": 2, "tokens_per_s": 40.0}


def url(tenant: Any) -> str:
    return f"/api/v1/tenants/{tenant.pk}/policy/"


def serve(tenant: Any, hostname: str) -> Node:
    node = ready_node(hostname, tenant)
    fleet.create_deployment(
        tenant=tenant, name="chat", model_name="chat", artifact_uri="synthetic://chat"
    )
    return node


def head(node: Node) -> Revision:
    return Revision.objects.filter(node=node).latest("generation")


def served(node: Node) -> dict[str, Any]:
    """The one tenant entry of the node's one worker, as it travels on the wire."""
    (worker,) = head(node).document["state"]["components"]["workers"]
    (tenant,) = worker["tenants"]
    return dict(tenant)


def test_members_read_platform_admins_write_and_delete_resets(
    world: World, client_for: Any
) -> None:
    admin, viewer, platform = (
        client_for(u) for u in (world.admin_a, world.viewer_a, world.platform)
    )
    shown = viewer.get(url(world.tenant_a)).json()
    assert shown == {
        "id": None,
        "tenant": str(world.tenant_a.pk),
        **DEFAULTS,
        "is_default": True,
        "updated_at": None,
    }

    refused = admin.put(url(world.tenant_a), {"weight": 9.0}, format="json")
    assert refused.status_code == 403
    assert "Only platform admins" in refused.json()["detail"]
    assert admin.delete(url(world.tenant_a)).status_code == 403
    # another tenant's policy does not exist as far as a tenant is concerned
    assert admin.get(url(world.tenant_b)).status_code == 404
    assert admin.patch(url(world.tenant_b), {"weight": 2.0}, format="json").status_code == 404
    assert not TenantPolicy.objects.exists()

    put = platform.put(url(world.tenant_a), {**NOISY, "burst_tokens": 80}, format="json")
    assert put.status_code == 200, put.content
    body = put.json()
    assert {k: body[k] for k in DEFAULTS} == {**DEFAULTS, **NOISY, "burst_tokens": 80}
    assert body["is_default"] is False and body["id"] is not None
    assert viewer.get(url(world.tenant_a)).json() == body

    patched = platform.patch(url(world.tenant_a), {"storage_iops": 5000}, format="json").json()
    assert (patched["storage_iops"], patched["max_concurrency"]) == (5000, 2)
    # PUT is the whole policy: what it leaves out goes back to the default
    whole = platform.put(url(world.tenant_a), {"max_concurrency": 4}, format="json").json()
    assert {k: whole[k] for k in DEFAULTS} == {**DEFAULTS, "max_concurrency": 4}
    assert whole["id"] == body["id"]

    listed = admin.get("/api/v1/tenant-policies/").json()["results"]
    assert [row["id"] for row in listed] == [body["id"]]

    assert platform.delete(url(world.tenant_a)).status_code == 204
    assert viewer.get(url(world.tenant_a)).json()["is_default"] is True
    assert platform.delete(url(world.tenant_a)).status_code == 204  # already the defaults


def test_bad_policies_are_refused_by_field_in_words(world: World, client_for: Any) -> None:
    platform = client_for(world.platform)
    cases = [
        ({"weight": 0}, "weight", "greater than 0"),
        ({"weight": -2.5}, "weight", "greater than 0"),
        ({"weight": 1e7}, "weight", "less than or equal to 1000000"),
        ({"priority_class": "urgent"}, "priority_class", "not a valid choice"),
        ({"max_concurrency": 0}, "max_concurrency", "greater than or equal to 1"),
        ({"tokens_per_s": 0}, "tokens_per_s", "greater than 0"),
        ({"tokens_per_s": "fast"}, "tokens_per_s", "valid number"),
        ({"burst_tokens": 100}, "burst_tokens", "set tokens_per_s too"),
        ({"storage_iops": -1}, "storage_iops", "greater than or equal to 1"),
        ({"storage_mb_s": 0}, "storage_mb_s", "greater than or equal to 1"),
        ({"tenant": str(world.tenant_b.pk)}, "tenant", "read-only"),
        ({"rate": 5}, "rate", "Unknown field"),
    ]
    for body, field, words in cases:
        for method in (platform.put, platform.patch):
            response = method(url(world.tenant_a), body, format="json")
            assert response.status_code == 400, (body, response.content)
            assert words in str(response.json()[field]), (body, response.json())
    # a burst added to a policy that has no rate is refused too (the model's own check)
    set_tenant_policy(world.tenant_a, max_concurrency=3)
    response = platform.patch(url(world.tenant_a), {"burst_tokens": 10}, format="json")
    assert response.status_code == 400
    assert "set tokens_per_s too" in str(response.json()["burst_tokens"])
    assert TenantPolicy.objects.get().burst_tokens is None


def test_policy_renders_into_the_serving_workers_and_removal_restores_defaults(
    world: World, client_for: Any, django_capture_on_commit_callbacks: Any
) -> None:
    mine, theirs = serve(world.tenant_a, "node-a"), serve(world.tenant_b, "node-b")
    assert served(mine)["weight"] == 1.0 and served(mine)["priority"] == 1
    assert "max_concurrency" not in served(mine)  # unset limits stay off the wire
    before_b = head(theirs).generation

    platform = client_for(world.platform)
    with django_capture_on_commit_callbacks(execute=False) as pushes:
        body = {**NOISY, "priority_class": "high", "burst_tokens": 10}
        assert platform.put(url(world.tenant_a), body, format="json").status_code == 200
    assert len(pushes) == 1  # the revision goes to the node's queue once committed
    assert head(mine).cause == "policy of tenant tenant-a changed"
    entry = served(mine)
    assert {k: entry[k] for k in ("weight", "priority", "max_concurrency")} == {
        "weight": 0.5,
        "priority": 2,
        "max_concurrency": 2,
    }
    assert (entry["tokens_per_s"], entry["burst_tokens"]) == (40.0, 10)
    assert head(theirs).generation == before_b  # other tenants' nodes are left alone

    low = platform.patch(url(world.tenant_a), {"priority_class": "low"}, format="json")
    assert low.status_code == 200 and served(mine)["priority"] == 0
    generation = head(mine).generation
    # an unchanged policy renders the same state: nothing to push
    assert platform.patch(url(world.tenant_a), {"weight": 0.5}, format="json").status_code == 200
    assert head(mine).generation == generation

    assert platform.delete(url(world.tenant_a)).status_code == 204
    assert head(mine).cause == "policy of tenant tenant-a removed"
    assert served(mine) == {
        "tenant_id": str(world.tenant_a.pk),
        "weight": 1.0,
        "priority": 1,
        "key_hashes": [],
    }
    set_tenant_policy(world.tenant_a, **NOISY)  # restoring it protects the neighbour again
    assert served(mine)["max_concurrency"] == 2 and served(mine)["tokens_per_s"] == 40.0


def test_storage_caps_take_the_stricter_limit_per_field(world: World) -> None:
    node = ready_node("store-a", world.tenant_a)
    pool = make_pool(node, name="data")
    loose = storage.create_qos_policy(
        tenant=world.tenant_a, name="loose", rw_ios_per_sec=20000, rw_mbytes_per_sec=50
    )
    strict = storage.create_qos_policy(
        tenant=world.tenant_a, name="strict", rw_ios_per_sec=2000, r_mbytes_per_sec=30
    )
    plain = storage.create_volume(
        tenant=world.tenant_a, name="plain", size_bytes=1 << 20, pool=pool
    )
    a = storage.create_volume(
        tenant=world.tenant_a, name="loose", size_bytes=1 << 20, pool=pool, qos_policy=loose
    )
    b = storage.create_volume(
        tenant=world.tenant_a, name="strict", size_bytes=1 << 20, pool=pool, qos_policy=strict
    )

    def qos() -> dict[str, tuple[int, int, int, int]]:
        rows = head(node).document["state"]["components"]["qos"]
        names = {plain.wire_name: "plain", a.wire_name: "loose", b.wire_name: "strict"}
        return {
            names[q["volume"]]: (
                q["rw_ios_per_sec"],
                q["rw_mbytes_per_sec"],
                q["r_mbytes_per_sec"],
                q["w_mbytes_per_sec"],
            )
            for q in rows
        }

    assert qos() == {"loose": (20000, 50, 0, 0), "strict": (2000, 0, 30, 0)}
    set_tenant_policy(world.tenant_a, storage_iops=5000, storage_mb_s=100)
    assert head(node).cause == "policy of tenant tenant-a changed"
    assert qos() == {
        "plain": (5000, 100, 0, 0),  # no QoS policy: the tenant's caps alone
        "loose": (5000, 50, 0, 0),  # the tenant's IOPS are stricter, the volume's MiB/s
        "strict": (2000, 100, 30, 0),  # the volume's IOPS are stricter; MiB/s was unlimited
    }
    set_tenant_policy(world.tenant_a, storage_iops=None, storage_mb_s=None, max_concurrency=1)
    assert qos() == {"loose": (20000, 50, 0, 0), "strict": (2000, 0, 30, 0)}
    generation = head(node).generation
    remove_tenant_policy(world.tenant_a)  # no storage caps were left: nothing changes here
    assert head(node).generation == generation


def test_admin_edits_go_through_the_service(world: World) -> None:
    node = serve(world.tenant_a, "node-admin")
    browser = Client()
    browser.force_login(world.platform)
    form = {name: "" for name in DEFAULTS} | {"weight": "0.25", "priority_class": "low"}
    response = browser.post(
        "/admin/tenancy/tenantpolicy/add/", {**form, "tenant": str(world.tenant_a.pk)}
    )
    assert response.status_code == 302, response.content
    assert head(node).cause == "policy of tenant tenant-a changed"
    assert (served(node)["weight"], served(node)["priority"]) == (0.25, 0)
    policy = TenantPolicy.objects.get()
    response = browser.post(f"/admin/tenancy/tenantpolicy/{policy.pk}/delete/", {"post": "yes"})
    assert response.status_code == 302
    assert head(node).cause == "policy of tenant tenant-a removed"
