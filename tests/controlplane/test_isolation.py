"""Every endpoint keeps tenants apart: one tenant never reads or changes another's objects."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from controlplane.core.choices import Role
from controlplane.fleet import services as fleet
from controlplane.fleet.models import Replica, Revision
from controlplane.inventory.models import Drive, Nic
from controlplane.tenancy.services import (
    issue_api_token,
    issue_inference_key,
    set_membership,
    set_tenant_policy,
)
from tests.controlplane.alerts_helpers import (
    PUBLIC_URL,
    fire,
    make_attempt,
    make_endpoint,
    make_message,
)
from tests.controlplane.conftest import World, make_node
from tests.controlplane.test_slo_math import make_slo


def _drive(tenant: Any) -> Drive:
    node = make_node(f"drive-host-{tenant.slug}", tenant)
    return Drive.objects.create(node=node, name="nvme0n1", capacity_bytes=2**40)


def _nic(tenant: Any) -> Nic:
    node = make_node(f"nic-host-{tenant.slug}", tenant)
    return Nic.objects.create(node=node, device="mlx5_0", state="active", link_layer="Ethernet")


def _deployment(tenant: Any) -> Any:
    return fleet.create_deployment(
        tenant=tenant,
        name=f"chat-{tenant.slug}",
        model_name="chat",
        artifact_uri="synthetic://chat",
        replicas=1,
    )


def _replica(tenant: Any) -> Replica:
    return _deployment(tenant).instances.get()


def _revision(tenant: Any) -> Revision:
    node = make_node(f"dedicated-{tenant.slug}", tenant)
    node.status = "ready"
    node.save()
    _deployment(tenant)
    return Revision.objects.get(node=node)


@dataclass(frozen=True)
class Endpoint:
    path: str
    make: Callable[[World, Any], Any]  # (world, tenant) -> object owned by that tenant
    patch: dict[str, Any] | None  # a valid change, or None when read-only
    create: Callable[[World, Any], dict[str, Any]] | None  # body naming a tenant, or None


ENDPOINTS = [
    Endpoint("tenants", lambda w, t: t, {"name": "renamed"}, None),
    Endpoint("tenant-policies", lambda w, t: set_tenant_policy(t, weight=2.0), None, None),
    Endpoint(
        "memberships",
        lambda w, t: (
            set_membership(tenant=t, user=w.viewer_a, role=Role.VIEWER)
            if t == w.tenant_b
            else w.viewer_a.memberships.get(tenant=t)
        ),
        {"role": "admin"},
        lambda w, t: {"tenant": str(t.id), "user": "viewer-a", "role": "viewer"},
    ),
    Endpoint(
        "inference-keys",
        lambda w, t: issue_inference_key(tenant=t, name="k").obj,
        None,
        lambda w, t: {"tenant": str(t.id), "name": "mine"},
    ),
    Endpoint(
        "nodes", lambda w, t: make_node(f"node-{t.slug}", t, gpus=1), {"labels": {"a": "b"}}, None
    ),
    Endpoint(
        "gpus", lambda w, t: make_node(f"gpu-host-{t.slug}", t, gpus=1).gpus.get(), None, None
    ),
    Endpoint("nics", lambda w, t: _nic(t), None, None),
    Endpoint(
        "deployments",
        lambda w, t: _deployment(t),
        {"replicas": 2},
        lambda w, t: {
            "tenant": str(t.id),
            "name": "x",
            "model_name": "x",
            "artifact_uri": "synthetic://x",
        },
    ),
    Endpoint("replicas", lambda w, t: _replica(t), None, None),
    Endpoint("revisions", lambda w, t: _revision(t), None, None),
    Endpoint("drives", lambda w, t: _drive(t), None, None),
    Endpoint(
        "webhook-endpoints",
        lambda w, t: make_endpoint(t).obj,
        {"name": "renamed"},
        lambda w, t: {"tenant": str(t.id), "name": "x", "url": PUBLIC_URL},
    ),
    Endpoint("alerts", lambda w, t: fire(t), None, None),
    Endpoint("webhook-messages", lambda w, t: make_message(t), None, None),
    Endpoint("delivery-attempts", lambda w, t: make_attempt(t), None, None),
    Endpoint(
        "slos",
        lambda w, t: make_slo(t, name=f"slo-{t.slug}"),
        {"objective": 0.95},
        lambda w, t: {"tenant": str(t.id), "name": "x", "sli": "availability", "objective": 0.99},
    ),
]


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=lambda e: e.path)
def test_tenant_sees_and_changes_only_its_own(
    endpoint: Endpoint, world: World, client_for: Any
) -> None:
    own = endpoint.make(world, world.tenant_a)
    other = endpoint.make(world, world.tenant_b)
    client = client_for(world.admin_a)
    base = f"/api/v1/{endpoint.path}/"

    listed = {str(row["id"]) for row in client.get(base, {"page_size": 1000}).json()["results"]}
    assert str(own.pk) in listed
    assert str(other.pk) not in listed

    assert client.get(f"{base}{other.pk}/").status_code == 404
    assert client.patch(f"{base}{other.pk}/", endpoint.patch or {}, format="json").status_code in (
        404,
        405,
    )
    assert client.delete(f"{base}{other.pk}/").status_code in (403, 404, 405)
    other.refresh_from_db()  # still there, unchanged

    if endpoint.create:
        response = client.post(base, endpoint.create(world, world.tenant_b), format="json")
        assert response.status_code == 400
        assert "tenant" in response.json()

    platform = client_for(world.platform)
    everything = {
        str(row["id"]) for row in platform.get(base, {"page_size": 1000}).json()["results"]
    }
    assert {str(own.pk), str(other.pk)} <= everything


@pytest.mark.parametrize("endpoint", [e for e in ENDPOINTS if e.patch], ids=lambda e: e.path)
def test_viewer_reads_but_cannot_change(endpoint: Endpoint, world: World, client_for: Any) -> None:
    own = endpoint.make(world, world.tenant_a)
    client = client_for(world.viewer_a)
    assert client.get(f"/api/v1/{endpoint.path}/{own.pk}/").status_code == 200
    response = client.patch(f"/api/v1/{endpoint.path}/{own.pk}/", endpoint.patch, format="json")
    assert response.status_code == 403
    assert "tenant admin" in response.json()["detail"]


def test_api_tokens_are_their_users_alone(world: World, client_for: Any) -> None:
    theirs = issue_api_token(user=world.admin_b, name="b-token").obj
    client = client_for(world.admin_a)
    listed = {row["id"] for row in client.get("/api/v1/api-tokens/").json()["results"]}
    assert str(theirs.pk) not in listed
    assert client.get(f"/api/v1/api-tokens/{theirs.pk}/").status_code == 404
    assert client.delete(f"/api/v1/api-tokens/{theirs.pk}/").status_code == 404
    theirs.refresh_from_db()
    assert theirs.revoked_at is None


def test_me_lists_only_the_callers_memberships(world: World, client_for: Any) -> None:
    body = client_for(world.admin_a).get("/api/v1/me/").json()
    assert body == {
        "username": "admin-a",
        "is_platform_admin": False,
        "memberships": [
            {"tenant": str(world.tenant_a.id), "tenant_slug": "tenant-a", "role": "admin"}
        ],
    }


def test_shared_fleet_nodes_are_platform_admins_alone(world: World, client_for: Any) -> None:
    shared = make_node("shared-1", tenant=None, gpus=2)
    tenant_client = client_for(world.admin_a)
    assert tenant_client.get(f"/api/v1/nodes/{shared.pk}/").status_code == 404
    assert client_for(world.platform).get(f"/api/v1/nodes/{shared.pk}/").status_code == 200


def test_unauthenticated_requests_are_refused(world: World, client_for: Any) -> None:
    import uuid

    from django.urls import reverse
    from rest_framework.test import APIClient

    for path in (
        "tenants",
        "nodes",
        "inference-keys",
        "api-tokens",
        "deployments",
        "replicas",
        "revisions",
        "bootstrap-tokens",
        "pools",
        "volumes",
        "qos-policies",
        "exports",
        "artifacts",
        "slos",
        "slo-reports",
    ):
        response = APIClient().get(f"/api/v1/{path}/")
        assert response.status_code == 401, path
    response = APIClient().get("/api/v1/nodes/", HTTP_AUTHORIZATION="Bearer tg_not-a-token")
    assert response.status_code == 401
    assert "Invalid" in response.json()["detail"]
    # a person's API token is no node credential, even a platform admin's
    artifact = reverse("agent-artifact", args=[uuid.uuid4()])
    assert client_for(world.platform).get(artifact).status_code == 401
