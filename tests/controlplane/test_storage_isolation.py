"""Every storage endpoint keeps tenants apart: one tenant never reads or changes another's
pools, volumes, QoS policies, exports or artifacts, nor places anything on another's nodes."""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from controlplane.fleet import services as fleet
from controlplane.storage import services as storage
from tests.controlplane.conftest import World
from tests.controlplane.storage_helpers import (
    MIB,
    archive_bytes,
    as_node,
    make_artifact,
    make_pool,
    ready_node,
)

HOST_NQN = "nqn.2014-08.org.nvmexpress:uuid:0a0a0a0a-0000-4000-8000-00000000000a"


def _pool(tenant: Any) -> Any:
    return make_pool(ready_node(f"store-{tenant.slug}", tenant))


def _volume(tenant: Any) -> Any:
    return storage.create_volume(tenant=tenant, name="data", size_bytes=MIB, pool=_pool(tenant))


def _archive_body(tenant: Any) -> dict[str, Any]:
    file = io.BytesIO(archive_bytes())
    file.name = "x.tar"
    return {"tenant": str(tenant.pk), "name": "mine", "file": file}


@dataclass(frozen=True)
class Endpoint:
    path: str
    make: Callable[[Any], Any]  # tenant -> an object that tenant owns
    patch: dict[str, Any] | None  # a valid change, or None when read-only
    create: Callable[[Any], dict[str, Any]] | None  # body naming a tenant, or None
    create_format: str = "json"
    tenant_writes: bool = True  # False: only platform admins change these (403 before lookup)


ENDPOINTS = [
    Endpoint("pools", _pool, {"capacity_bytes": 200 * MIB}, None, tenant_writes=False),
    Endpoint(
        "volumes",
        _volume,
        {"name": "renamed"},
        lambda t: {"tenant": str(t.pk), "name": "x", "size_bytes": MIB},
    ),
    Endpoint(
        "qos-policies",
        lambda t: storage.create_qos_policy(tenant=t, name="gold"),
        {"rw_ios_per_sec": 1000},
        lambda t: {"tenant": str(t.pk), "name": "x"},
    ),
    Endpoint(
        "exports",
        lambda t: storage.create_export(tenant=t, hosts=[HOST_NQN]),
        {"hosts": [HOST_NQN, HOST_NQN.replace("0a0a", "0b0b")]},
        lambda t: {"tenant": str(t.pk), "hosts": [HOST_NQN]},
    ),
    Endpoint("artifacts", make_artifact, None, _archive_body, create_format="multipart"),
]


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=lambda e: e.path)
def test_tenant_sees_and_changes_only_its_own(
    endpoint: Endpoint, world: World, client_for: Any
) -> None:
    own = endpoint.make(world.tenant_a)
    other = endpoint.make(world.tenant_b)
    client = client_for(world.admin_a)
    base = f"/api/v1/{endpoint.path}/"

    listed = {str(row["id"]) for row in client.get(base, {"page_size": 1000}).json()["results"]}
    assert str(own.pk) in listed
    assert str(other.pk) not in listed

    refused = (404, 405) if endpoint.tenant_writes else (403,)
    assert client.get(f"{base}{other.pk}/").status_code == 404
    before = type(other).objects.values().get(pk=other.pk)
    assert (
        client.patch(f"{base}{other.pk}/", endpoint.patch or {}, format="json").status_code
        in refused
    )
    assert client.delete(f"{base}{other.pk}/").status_code in (*refused, 403)
    assert type(other).objects.values().get(pk=other.pk) == before  # still there, unchanged

    if endpoint.create:
        response = client.post(base, endpoint.create(world.tenant_b), format=endpoint.create_format)
        assert response.status_code == 400
        assert "tenant" in response.json()

    platform = client_for(world.platform)
    everything = {
        str(row["id"]) for row in platform.get(base, {"page_size": 1000}).json()["results"]
    }
    assert {str(own.pk), str(other.pk)} <= everything


@pytest.mark.parametrize(
    "endpoint", [e for e in ENDPOINTS if e.patch and e.tenant_writes], ids=lambda e: e.path
)
def test_viewer_reads_but_cannot_change(endpoint: Endpoint, world: World, client_for: Any) -> None:
    own = endpoint.make(world.tenant_a)
    client = client_for(world.viewer_a)
    assert client.get(f"/api/v1/{endpoint.path}/{own.pk}/").status_code == 200
    response = client.patch(f"/api/v1/{endpoint.path}/{own.pk}/", endpoint.patch, format="json")
    assert response.status_code == 403
    assert "tenant admin" in response.json()["detail"]


def test_tenants_change_no_pools_even_on_their_own_nodes(world: World, client_for: Any) -> None:
    pool = _pool(world.tenant_a)
    client = client_for(world.admin_a)
    assert client.get(f"/api/v1/pools/{pool.pk}/").status_code == 200
    response = client.patch(f"/api/v1/pools/{pool.pk}/", {"capacity_bytes": MIB}, format="json")
    assert response.status_code == 403 and "platform admins" in response.json()["detail"]


def test_shared_pools_are_platform_admins_alone_but_take_any_tenants_volumes(
    world: World, client_for: Any
) -> None:
    shared = make_pool(ready_node("shared-store"))
    client = client_for(world.admin_a)
    assert client.get(f"/api/v1/pools/{shared.pk}/").status_code == 404
    response = client.post(
        "/api/v1/volumes/",
        {"tenant": str(world.tenant_a.pk), "name": "data", "size_bytes": MIB},
        format="json",
    )
    assert response.status_code == 201 and response.json()["pool"] == str(shared.pk)


def test_placement_never_uses_another_tenants_dedicated_pool(world: World, client_for: Any) -> None:
    _pool(world.tenant_b)
    response = client_for(world.admin_a).post(
        "/api/v1/volumes/",
        {"tenant": str(world.tenant_a.pk), "name": "data", "size_bytes": MIB},
        format="json",
    )
    assert response.status_code == 400
    assert "No storage pool" in response.json()["size_bytes"][0]


def test_references_to_another_tenants_objects_read_as_unknown(
    world: World, client_for: Any
) -> None:
    client = client_for(world.admin_a)
    theirs = storage.create_qos_policy(tenant=world.tenant_b, name="gold")
    pool = _pool(world.tenant_a)
    response = client.post(
        "/api/v1/volumes/",
        {
            "tenant": str(world.tenant_a.pk),
            "name": "data",
            "size_bytes": MIB,
            "pool": str(pool.pk),
            "qos_policy": str(theirs.pk),
        },
        format="json",
    )
    assert response.status_code == 400 and "does not exist" in str(response.json()["qos_policy"])
    artifact = make_artifact(world.tenant_b)
    assert client.get(f"/api/v1/artifacts/{artifact.pk}/download/").status_code == 404
    response = client.post(
        "/api/v1/deployments/",
        {
            "tenant": str(world.tenant_a.pk),
            "name": "chat",
            "model_name": "chat",
            "artifact": str(artifact.pk),
        },
        format="json",
    )
    assert response.status_code == 400 and "does not exist" in str(response.json()["artifact"])


def test_a_node_fetches_no_artifact_of_a_tenant_it_serves_nothing_for(world: World) -> None:
    ours = make_artifact(world.tenant_a)
    node_b = ready_node("store-b", world.tenant_b)
    make_pool(node_b)
    fleet.create_deployment(
        tenant=world.tenant_b,
        name="chat",
        model_name="chat",
        artifact=make_artifact(world.tenant_b, "theirs"),
    )
    assert as_node(node_b).get(f"/api/v1/agent/artifacts/{ours.pk}/").status_code == 404
