"""Deployments shared with other tenants: who may share, who sees what, and how each
sharer's keys, policy and SLO thresholds reach the workers of the shared deployment."""

from __future__ import annotations

from typing import Any

from controlplane.core.choices import Role
from controlplane.fleet import services as fleet
from controlplane.fleet.models import Deployment, Revision
from controlplane.inventory.models import Node
from controlplane.slo.models import Slo
from controlplane.tenancy.models import InferenceKey
from controlplane.tenancy.services import (
    create_tenant,
    issue_inference_key,
    set_membership,
    set_tenant_policy,
)
from tests.controlplane.conftest import World
from tests.controlplane.storage_helpers import ready_node

SLO = {"name": "chat-tpot", "sli": "tpot", "threshold_seconds": 0.02, "objective": 0.99}


def setup(world: World) -> tuple[Node, Deployment]:
    node = ready_node("gpu-a")
    chat = fleet.create_deployment(
        tenant=world.tenant_a, name="chat", model_name="chat", artifact_uri="synthetic://chat"
    )
    return node, chat


def worker(node: Node) -> dict[str, Any]:
    """The node's one worker as its latest revision describes it."""
    head = Revision.objects.filter(node=node).latest("generation")
    (spec,) = head.document["state"]["components"]["workers"]
    return dict(spec)


def served(node: Node) -> dict[str, dict[str, Any]]:
    return {t["tenant_id"]: t for t in worker(node)["tenants"]}


def keys_of(tenant: Any) -> list[str]:
    return sorted(InferenceKey.objects.filter(tenant=tenant).values_list("digest", flat=True))


def url(deployment: Deployment) -> str:
    return f"/api/v1/deployments/{deployment.pk}/"


def test_only_platform_admins_share_and_only_they_see_with_whom(
    world: World, client_for: Any
) -> None:
    node, chat = setup(world)
    issue_inference_key(tenant=world.tenant_a, name="a")
    issue_inference_key(tenant=world.tenant_b, name="b")
    admin_a, platform = client_for(world.admin_a), client_for(world.platform)
    a, b = str(world.tenant_a.pk), str(world.tenant_b.pk)
    assert list(served(node)) == [a]

    refused = admin_a.patch(url(chat), {"shared_with": [b]}, format="json")
    assert refused.status_code == 403
    assert "Only platform admins share" in refused.json()["detail"]
    own = platform.patch(url(chat), {"shared_with": [a]}, format="json")
    assert own.status_code == 400
    assert "serves its own tenant" in own.json()["shared_with"][0]
    unknown = platform.patch(
        url(chat), {"shared_with": ["00000000-0000-0000-0000-000000000000"]}, format="json"
    )
    assert unknown.status_code == 400 and "shared_with" in unknown.json()
    assert list(served(node)) == [a]

    shared = platform.patch(url(chat), {"shared_with": [b]}, format="json")
    assert shared.status_code == 200, shared.content
    assert shared.json()["shared_with"] == [b]
    tenants = served(node)
    assert list(tenants) == [a, b]  # the owner first
    assert tenants[a]["key_hashes"] == keys_of(world.tenant_a)
    assert tenants[b]["key_hashes"] == keys_of(world.tenant_b)
    assert worker(node)["tenant_id"] == a

    shown = admin_a.get(url(chat)).json()
    assert "shared_with" not in shown and shown["name"] == "chat"

    assert platform.patch(url(chat), {"shared_with": []}, format="json").status_code == 200
    assert list(served(node)) == [a]


def test_sharers_read_the_deployment_and_its_replicas_but_never_change_them(
    world: World, client_for: Any
) -> None:
    node, chat = setup(world)
    outsider_tenant = create_tenant(slug="tenant-c", name="Tenant C")
    outsider = world.admin_b.__class__.objects.create_user("admin-c", password="x")
    set_membership(tenant=outsider_tenant, user=outsider, role=Role.ADMIN)
    admin_b, admin_c = client_for(world.admin_b), client_for(outsider)
    assert admin_b.get(url(chat)).status_code == 404

    fleet.share_deployment(chat, [world.tenant_b])
    listed = admin_b.get("/api/v1/deployments/").json()["results"]
    assert [d["id"] for d in listed] == [str(chat.pk)]
    assert "shared_with" not in listed[0]
    (replica,) = admin_b.get(f"/api/v1/replicas/?deployment={chat.pk}").json()["results"]
    assert replica["hostname"] == node.hostname and "port" in replica  # once reported

    changed = admin_b.patch(url(chat), {"max_batch_size": 1}, format="json")
    assert changed.status_code == 403
    assert "only its owner's admins change it" in changed.json()["detail"]
    assert admin_b.delete(url(chat)).status_code == 403
    chat.refresh_from_db()
    assert chat.max_batch_size == 32

    assert admin_c.get(url(chat)).status_code == 404
    assert admin_c.get("/api/v1/deployments/").json()["results"] == []
    assert admin_c.get("/api/v1/replicas/").json()["results"] == []


def test_a_sharers_policy_keys_and_slos_roll_out_to_the_shared_workers(
    world: World, client_for: Any
) -> None:
    node, chat = setup(world)
    b = str(world.tenant_b.pk)
    fleet.share_deployment(chat, [world.tenant_b])

    set_tenant_policy(world.tenant_b, max_concurrency=2, tokens_per_s=150.0, priority_class="low")
    limits = served(node)[b]
    assert (limits["max_concurrency"], limits["tokens_per_s"]) == (2, 150.0)
    assert limits["priority"] < served(node)[str(world.tenant_a.pk)]["priority"]

    issue_inference_key(tenant=world.tenant_b, name="late")
    assert served(node)[b]["key_hashes"] == keys_of(world.tenant_b)

    admin_b = client_for(world.admin_b)
    body = {**SLO, "tenant": b, "scope": "deployment", "deployment": str(chat.pk)}
    created = admin_b.post("/api/v1/slos/", body, format="json")
    assert created.status_code == 201, created.content
    head = Revision.objects.filter(node=node).latest("generation")
    (threshold,) = head.document["state"]["components"]["slo_thresholds"]
    assert (threshold["tenant_id"], threshold["deployment_id"]) == (b, str(chat.pk))

    platform = client_for(world.platform)
    kept = platform.patch(url(chat), {"shared_with": []}, format="json")
    assert kept.status_code == 400
    assert "SLO tenant-b/chat-tpot measures this deployment" in kept.json()["shared_with"][0]
    assert list(chat.shared_with.all()) == [world.tenant_b]

    Slo.objects.get(pk=created.json()["id"]).delete()
    assert platform.patch(url(chat), {"shared_with": []}, format="json").status_code == 200
    assert list(served(node)) == [str(world.tenant_a.pk)]
    again = admin_b.post("/api/v1/slos/", body, format="json")
    assert again.status_code == 400 and "deployment" in again.json()


def test_openslo_import_finds_a_shared_deployment_by_name(world: World, client_for: Any) -> None:
    _, chat = setup(world)
    admin_a, admin_b = client_for(world.admin_a), client_for(world.admin_b)
    body = {
        **SLO,
        "tenant": str(world.tenant_a.pk),
        "scope": "deployment",
        "deployment": str(chat.pk),
    }
    original = admin_a.post("/api/v1/slos/", body, format="json").json()
    document = admin_a.get(f"/api/v1/slos/{original['id']}/export/").content
    url = f"/api/v1/slos/import/?tenant={world.tenant_b.pk}"

    unknown = admin_b.post(url, document, content_type="application/yaml")
    assert unknown.status_code == 400
    assert "No deployment named 'chat' serves the tenant." in str(unknown.json())

    fleet.share_deployment(chat, [world.tenant_b])
    imported = admin_b.post(url, document, content_type="application/yaml")
    assert imported.status_code == 201, imported.content
    assert imported.json()["deployment"] == str(chat.pk)
    assert imported.json()["tenant"] == str(world.tenant_b.pk)
