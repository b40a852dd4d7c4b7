"""Every API error is a JSON 4xx that says what went wrong: deletes others depend on,
unknown URLs, artifacts whose file is gone and filter values the API cannot use."""

from __future__ import annotations

import logging
import re
from typing import Any

import pytest

from controlplane.fleet import services as fleet
from controlplane.inventory.models import Node
from controlplane.tenancy.models import Tenant
from tests.controlplane.alerts_helpers import fire
from tests.controlplane.conftest import World, make_node
from tests.controlplane.storage_helpers import (
    archive_bytes,
    as_node,
    deployed_artifact,
    make_pool,
    ready_node,
)


def test_deleting_a_node_that_still_has_pools_is_a_409_naming_them(
    world: World, client_for: Any
) -> None:
    node = make_node("gpu-a", world.tenant_a)
    make_pool(node, name="models")
    make_pool(node, name="scratch")

    response = client_for(world.platform).delete(f"/api/v1/nodes/{node.pk}/")

    assert response.status_code == 409, response.content
    assert response.json() == {"detail": "Node gpu-a still has 2 pools; remove them first."}
    assert Node.objects.filter(pk=node.pk).exists()


def test_deleting_a_tenant_with_deployments_and_alert_history_is_a_409_naming_them(
    world: World, client_for: Any
) -> None:
    fleet.create_deployment(
        tenant=world.tenant_a, name="chat", model_name="chat", artifact_uri="synthetic://chat"
    )
    fire(world.tenant_a)

    response = client_for(world.platform).delete(f"/api/v1/tenants/{world.tenant_a.pk}/")

    assert response.status_code == 409, response.content
    detail = response.json()["detail"]
    assert detail.startswith("Tenant tenant-a still has ") and detail.endswith("remove them first.")
    assert "1 deployment" in detail and "1 alert" in detail, detail
    assert Tenant.objects.filter(pk=world.tenant_a.pk).exists()


def test_deleting_what_nothing_depends_on_still_works(world: World, client_for: Any) -> None:
    node = make_node("gpu-z")
    response = client_for(world.platform).delete(f"/api/v1/nodes/{node.pk}/")
    assert response.status_code == 204, response.content
    assert not Node.objects.filter(pk=node.pk).exists()


@pytest.mark.parametrize("path", ["/api/v1/no-such-thing/", "/api/nope", "/api/v1/tenants/x/y/"])
def test_unknown_api_urls_are_a_json_404(path: str, world: World, client_for: Any) -> None:
    response = client_for(world.viewer_a).get(path)
    assert response.status_code == 404
    assert response["Content-Type"] == "application/json"
    assert response.json() == {"detail": "Not found."}


def test_unknown_urls_outside_the_api_keep_the_html_page(client: Any, db: Any) -> None:
    response = client.get("/no-such-page/")
    assert response.status_code == 404 and response["Content-Type"].startswith("text/html")


def test_an_artifact_whose_file_is_gone_is_a_410_naming_it_and_logged(
    world: World, client_for: Any, caplog: pytest.LogCaptureFixture
) -> None:
    data = archive_bytes()
    node = ready_node("store-1", world.tenant_a)
    artifact = deployed_artifact(world.tenant_a, node, data)
    artifact.path.unlink()
    downloads = [
        (client_for(world.viewer_a), f"/api/v1/artifacts/{artifact.pk}/download/"),
        (as_node(node), f"/api/v1/agent/artifacts/{artifact.pk}/"),
    ]

    for client, url in downloads:
        caplog.clear()
        with caplog.at_level(logging.ERROR):
            response = client.get(url)
        assert response.status_code == 410, (url, response.status_code)
        detail = response.json()["detail"]
        assert f"artifact tiny ({artifact.pk}) is missing" in detail, detail
        assert [r.levelname for r in caplog.records] == ["ERROR"]
        assert str(artifact.pk) in caplog.records[0].getMessage()

    artifact.path.write_bytes(data[:100])
    response = downloads[0][0].get(downloads[0][1])
    assert response.status_code == 410
    assert f"holds 100 bytes, not {len(data)}" in response.json()["detail"]


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("/api/v1/nodes/?tenant=", "tenant"),
        ("/api/v1/nodes/?tenant=not-a-uuid", "tenant"),
        ("/api/v1/nodes/?hostname=", "hostname"),
        ("/api/v1/nodes/?status=bogus", "status"),
        ("/api/v1/nodes/?maintenance=0", "maintenance"),
        ("/api/v1/replicas/?placed=null", "placed"),
        ("/api/v1/tenants/?is_active=yes", "is_active"),
        ("/api/v1/gpus/?numa_node=0.5", "numa_node"),
        ("/api/v1/memberships/?user=", "user"),
        ("/api/v1/alerts/?state=", "state"),
    ],
)
def test_filter_values_the_api_cannot_use_are_a_400_naming_the_field(
    query: str, field: str, world: World, client_for: Any
) -> None:
    response = client_for(world.platform).get(query)
    assert response.status_code == 400, (query, response.content)
    assert list(response.json()) == [field], response.json()


def test_text_filters_refuse_nul_and_the_schema_says_so(world: World, client_for: Any) -> None:
    """PostgreSQL text cannot hold NUL: a search or text filter holding one is a 400, and
    the schema's pattern tells generated clients not to send it."""
    client = client_for(world.platform)
    for query in ["/api/v1/nodes/?hostname=a%00", "/api/v1/nodes/?search=a%00"]:
        response = client.get(query)
        assert response.status_code == 400, (query, response.content)
        assert "Null characters" in response.content.decode()
    schema = client.get("/api/schema/", HTTP_ACCEPT="application/json").json()
    parameters = {
        p["name"]: p["schema"] for p in schema["paths"]["/api/v1/nodes/"]["get"]["parameters"]
    }
    for name in ["hostname", "search"]:
        assert re.fullmatch(parameters[name]["pattern"], "gpu-a")
        assert not re.fullmatch(parameters[name]["pattern"], "gpu\x00a")


def test_filters_still_take_good_values(world: World, client_for: Any) -> None:
    make_node("gpu-a", world.tenant_a, gpus=1)
    client = client_for(world.platform)
    for query in [
        f"/api/v1/nodes/?tenant={world.tenant_a.pk}&maintenance=false",
        "/api/v1/replicas/?placed=true",
        "/api/v1/gpus/?numa_node=0",
        "/api/v1/tenants/?is_active=True",
    ]:
        response = client.get(query)
        assert response.status_code == 200, (query, response.content)
    nodes = client.get(f"/api/v1/nodes/?tenant={world.tenant_a.pk}").json()["results"]
    assert [n["hostname"] for n in nodes] == ["gpu-a"]


def test_body_booleans_must_be_json_booleans(world: World, client_for: Any) -> None:
    response = client_for(world.platform).patch(
        f"/api/v1/tenants/{world.tenant_a.pk}/", {"is_active": 0}, format="json"
    )
    assert response.status_code == 400 and list(response.json()) == ["is_active"]
