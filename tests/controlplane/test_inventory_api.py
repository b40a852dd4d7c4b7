"""Nodes and discovered hardware through the REST API."""

from __future__ import annotations

import json
from typing import Any

from django.db import connection
from django.test.utils import CaptureQueriesContext

from controlplane.inventory.models import Gpu, Node
from controlplane.inventory.services import create_bootstrap_token
from tests.agent.samples import inventory as sample_inventory
from tests.controlplane.conftest import World, make_node
from tests.controlplane.test_agent_api import as_node, enroll


def test_operator_edits_labels_and_maintenance(world: World, client_for: Any) -> None:
    node = make_node("gpu-01", world.tenant_a, gpus=2)
    client = client_for(world.admin_a)
    response = client.patch(
        f"/api/v1/nodes/{node.pk}/",
        {
            "labels": {"zone": "eu-1", "tailguard.io/pool": "h100"},
            "maintenance": True,
            "maintenance_reason": "firmware",
        },
    )
    assert response.status_code == 200, response.content
    node.refresh_from_db()
    assert node.labels == {"zone": "eu-1", "tailguard.io/pool": "h100"}
    assert node.maintenance and node.maintenance_reason == "firmware"
    client.patch(f"/api/v1/nodes/{node.pk}/", {"maintenance": False})
    node.refresh_from_db()
    assert node.maintenance_reason == ""


def test_discovered_facts_are_read_only_and_bad_input_is_named(
    world: World, client_for: Any
) -> None:
    node = make_node("gpu-02", world.tenant_a, gpus=1)
    client = client_for(world.admin_a)
    cases = [
        ({"hostname": "evil"}, "hostname", "read-only"),
        ({"gpus": []}, "gpus", "read-only"),
        ({"flavour": "x"}, "flavour", "Unknown field"),
        ({"labels": ["not", "a", "dict"]}, "labels", "dictionary"),
        ({"labels": {"bad key!": "x"}}, "labels", "invalid"),
        ({"maintenance": "sometimes"}, "maintenance", "valid boolean"),
        ({"tenant": str(world.tenant_b.id)}, "tenant", "does not exist"),
    ]
    for body, field, words in cases:
        response = client.patch(f"/api/v1/nodes/{node.pk}/", body, format="json")
        assert response.status_code == 400, (body, response.content)
        assert words in str(response.json()[field]), (body, response.json())
    node.refresh_from_db()
    assert node.hostname == "gpu-02" and node.labels == {} and node.tenant == world.tenant_a
    assert node.gpus.count() == 1


def test_filters(world: World, client_for: Any) -> None:
    first = make_node("gpu-10", world.tenant_a, gpus=1)
    make_node("gpu-11", world.tenant_a)
    Node.objects.filter(pk=first.pk).update(labels={"zone": "eu-1"}, status="ready")
    client = client_for(world.admin_a)

    def hostnames(**params: Any) -> list[str]:
        return [row["hostname"] for row in client.get("/api/v1/nodes/", params).json()["results"]]

    assert hostnames(label="zone=eu-1") == ["gpu-10"]
    assert hostnames(label="zone") == ["gpu-10"]
    assert hostnames(status="ready") == ["gpu-10"]
    assert hostnames(gpu_name="h100") == ["gpu-10"]
    assert hostnames(search="gpu-11") == ["gpu-11"]
    Node.objects.filter(pk=first.pk).update(labels={"zone": "eu-1", "a__b": "c"})
    assert hostnames(label="a__b=c") == ["gpu-10"]
    assert client.get("/api/v1/nodes/", {"label": "bad key!=1"}).status_code == 400
    assert client.get("/api/v1/nodes/", {"status": "sleeping"}).status_code == 400
    gpus = client.get("/api/v1/gpus/", {"node": str(first.pk)}).json()["results"]
    assert [g["uuid"] for g in gpus] == ["GPU-gpu-10-0"]


def test_listing_1000_nodes_with_8_gpus_is_a_bounded_number_of_queries(
    world: World, client_for: Any
) -> None:
    nodes = Node.objects.bulk_create(
        Node(hostname=f"h{i:04d}", tenant=world.tenant_a) for i in range(1000)
    )
    Gpu.objects.bulk_create(
        Gpu(
            node=n,
            index=g,
            uuid=f"GPU-{n.hostname}-{g}",
            name="H100",
            memory_total_bytes=1,
            pci_bus_id=f"0000:{g:02x}:00.0",
        )
        for n in nodes
        for g in range(8)
    )
    client = client_for(world.admin_a)
    with CaptureQueriesContext(connection) as queries:
        response = client.get("/api/v1/nodes/", {"page_size": 1000})
    body = response.json()
    assert body["count"] == 1000 and len(body["results"]) == 1000
    assert sum(len(row["gpus"]) for row in body["results"]) == 8000
    # auth + membership scope + count + nodes + 4 hardware prefetches, independent of N
    assert len(queries) <= 12, [q["sql"][:120] for q in queries.captured_queries]


def test_reported_pcie_root_ports_are_shown_and_unknown_ones_are_blank(
    world: World, client_for: Any
) -> None:
    token = create_bootstrap_token(name="t", tenant=world.tenant_a).secret
    credential = enroll(token).json()["node_credential"]
    agent = as_node(credential)
    facts = sample_inventory()
    rooted = facts.model_copy(
        update={
            "gpus": [facts.gpus[0].model_copy(update={"pci_root": "0000:15:01.0"})],
            "nics": [facts.nics[0].model_copy(update={"pci_root": "0000:15:01.0"})],
            "drives": [facts.drives[0].model_copy(update={"pci_root": "0000:c0:01.1"})],
        }
    )
    client = client_for(world.admin_a)

    def roots() -> tuple[str, str, str]:
        (node,) = client.get("/api/v1/nodes/").json()["results"]
        return (
            node["gpus"][0]["pci_root"],
            node["nics"][0]["pci_root"],
            node["drives"][0]["pci_root"],
        )

    for body, expected in [
        (rooted.model_dump(mode="json"), ("0000:15:01.0", "0000:15:01.0", "0000:c0:01.1")),
        (facts.model_dump(mode="json"), ("", "", "")),  # an agent that reports no roots
    ]:
        response = agent.post(
            "/api/v1/agent/inventory/", json.dumps(body), content_type="application/json"
        )
        assert response.status_code in (200, 202, 204), response.content
        assert roots() == expected
    gpus = client.get("/api/v1/gpus/").json()["results"]
    assert [g["pci_root"] for g in gpus] == [""]

    body = rooted.model_dump(mode="json")
    body["gpus"][0]["pci_root"] = "pci0000:15"
    response = agent.post(
        "/api/v1/agent/inventory/", json.dumps(body), content_type="application/json"
    )
    assert response.status_code == 400 and "gpus.0.pci_root" in response.json(), response.content
