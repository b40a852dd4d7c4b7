"""Tenants, memberships, API tokens and inference keys through the REST API."""

from __future__ import annotations

import hashlib
from typing import Any

from controlplane.tenancy.models import ApiToken, InferenceKey, Tenant
from tests.controlplane.conftest import World


def test_platform_admin_creates_tenants_others_cannot(world: World, client_for: Any) -> None:
    body = {"slug": "gamma", "name": "Gamma Labs"}
    assert client_for(world.admin_a).post("/api/v1/tenants/", body).status_code == 403
    response = client_for(world.platform).post("/api/v1/tenants/", body)
    assert response.status_code == 201, response.content
    assert Tenant.objects.filter(slug="gamma").exists()


def test_bad_tenant_input_names_the_problem(world: World, client_for: Any) -> None:
    client = client_for(world.platform)
    response = client.post("/api/v1/tenants/", {"slug": "Not A Slug!", "name": "x"})
    assert response.status_code == 400
    assert "slug" in response.json()
    response = client.post("/api/v1/tenants/", {"slug": "ok", "name": "x", "colour": "red"})
    assert response.status_code == 400
    assert response.json() == {"colour": ["Unknown field."]}
    response = client.post("/api/v1/tenants/", {"slug": "tenant-a", "name": "dup"})
    assert response.status_code == 400
    assert "already exists" in response.json()["slug"][0]
    response = client.post("/api/v1/tenants/", "{not json", content_type="application/json")
    assert response.status_code == 400
    assert "JSON parse error" in response.json()["detail"]
    assert Tenant.objects.count() == 2


def test_api_token_is_shown_once_stored_hashed_and_revocable(world: World, client_for: Any) -> None:
    client = client_for(world.admin_a)
    response = client.post("/api/v1/api-tokens/", {"name": "ci"})
    assert response.status_code == 201
    secret = response.json()["token"]
    stored = ApiToken.objects.get(pk=response.json()["id"])
    assert stored.digest == hashlib.sha256(secret.encode()).hexdigest()
    assert secret not in str(stored.__dict__)
    assert "token" not in client.get(f"/api/v1/api-tokens/{stored.pk}/").json()

    from rest_framework.test import APIClient

    fresh = APIClient()
    fresh.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    assert fresh.get("/api/v1/me/").json()["username"] == "admin-a"
    assert client.delete(f"/api/v1/api-tokens/{stored.pk}/").status_code == 204
    assert fresh.get("/api/v1/me/").status_code == 401


def test_inference_keys_per_tenant(world: World, client_for: Any) -> None:
    admin = client_for(world.admin_a)
    response = admin.post(
        "/api/v1/inference-keys/", {"tenant": str(world.tenant_a.id), "name": "prod"}
    )
    assert response.status_code == 201, response.content
    key = response.json()["key"]
    assert key.startswith("tgi_")
    stored = InferenceKey.objects.get(pk=response.json()["id"])
    assert stored.digest == hashlib.sha256(key.encode()).hexdigest()
    assert stored.tenant == world.tenant_a
    viewer = client_for(world.viewer_a)
    assert (
        viewer.post(
            "/api/v1/inference-keys/", {"tenant": str(world.tenant_a.id), "name": "v"}
        ).status_code
        == 400
    )
    assert viewer.delete(f"/api/v1/inference-keys/{stored.pk}/").status_code == 403
    assert admin.delete(f"/api/v1/inference-keys/{stored.pk}/").status_code == 204
    stored.refresh_from_db()
    assert stored.revoked_at is not None
    listed = admin.get("/api/v1/inference-keys/", {"revoked": "false"}).json()["results"]
    assert listed == []


def test_tenant_admin_manages_memberships(world: World, client_for: Any) -> None:
    admin = client_for(world.admin_a)
    body = {"tenant": str(world.tenant_a.id), "user": "admin-b", "role": "viewer"}
    response = admin.post("/api/v1/memberships/", body)
    assert response.status_code == 201, response.content
    membership_id = response.json()["id"]
    assert (
        admin.patch(f"/api/v1/memberships/{membership_id}/", {"role": "owner"}).status_code == 400
    )
    assert (
        admin.patch(f"/api/v1/memberships/{membership_id}/", {"role": "admin"}).json()["role"]
        == "admin"
    )
    response = admin.post("/api/v1/memberships/", {**body, "user": "nobody"})
    assert response.status_code == 400
    assert "user" in response.json()
