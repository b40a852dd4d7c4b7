"""Each node runs a gateway in front of the deployments placed on it, reaching their
replicas on other nodes too where those are reachable, and a deployment's clients are told
where those gateways answer."""

from __future__ import annotations

import hashlib
import io
from datetime import timedelta
from typing import Any

import pytest
from django.core.management import call_command
from django.test import Client
from django.utils import timezone

from agent.protocol import AppliedStatus, ComponentResult
from controlplane.fleet import services
from controlplane.fleet.models import Replica, Revision
from controlplane.inventory.models import Node
from tests.controlplane.conftest import World, make_node

BODY = {"name": "chat", "model_name": "chat-8b", "artifact_uri": "synthetic://chat"}
reported = [timezone.now()]


def report(node: Node, *results: ComponentResult) -> None:
    """The agent's status for the node's newest revision, each later than the last."""
    head = Revision.objects.filter(node=node).order_by("-generation").first()
    assert head is not None
    reported[0] += timedelta(seconds=1)
    status = AppliedStatus(
        node_id=node.pk,
        generation=head.generation,
        content_hash=head.content_hash,
        state="applied" if all(r.ok for r in results) else "failed",
        components=list(results),
        reported_at=reported[0],
    )
    assert services.record_applied_status(node, status)


def worker(replica: Replica, port: int, url: str | None = None) -> ComponentResult:
    return ComponentResult(
        kind="worker", name=f"replica-{replica.pk}", ok=True, error=None, port=port, url=url
    )


def gateway(url: str, port: int = 8080) -> ComponentResult:
    return ComponentResult(kind="gateway", name="gateway", ok=True, error=None, port=port, url=url)


def test_nodes_run_gateways_for_their_deployments_and_clients_see_where(
    world: World, client_for: Any, django_capture_on_commit_callbacks: Any
) -> None:
    node = make_node("gpu-1", world.tenant_a, gpus=1)
    Node.objects.filter(pk=node.pk).update(status="ready")
    idle = make_node("gpu-2", world.tenant_a)
    Node.objects.filter(pk=idle.pk).update(status="ready")
    client = client_for(world.admin_a)
    created = client.post(
        "/api/v1/deployments/", {**BODY, "tenant": str(world.tenant_a.id)}, format="json"
    ).json()
    assert created["endpoints"] == [] and created["url"] is None  # no gateway answered yet
    components = Revision.objects.get(node=node).document["state"]["components"]
    assert components["gateway"] == {}  # any free port, reported
    assert not Revision.objects.filter(node=idle).exists()  # nothing placed: no gateway

    replica = Replica.objects.get(deployment_id=created["id"])
    report(node, worker(replica, 9001), gateway("http://gpu-1.example:8080"))
    shown = client.get(f"/api/v1/deployments/{created['id']}/").json()
    assert shown["endpoints"] == ["http://gpu-1.example:8080"]
    assert shown["url"] == "http://gpu-1.example:8080"  # its one replica is on that node
    listed = client.get("/api/v1/deployments/").json()["results"]
    assert [d["endpoints"] for d in listed] == [["http://gpu-1.example:8080"]]
    assert client_for(world.admin_b).get(f"/api/v1/deployments/{created['id']}/").status_code == 404

    # Only http(s) addresses reach clients; a failed gateway leaves none.
    report(node, worker(replica, 9001), gateway("javascript://alert(1)"))
    assert client.get(f"/api/v1/deployments/{created['id']}/").json()["endpoints"] == []
    report(
        node,
        worker(replica, 9001),
        ComponentResult(kind="gateway", name="gateway", ok=False, error="port taken"),
    )
    assert client.get(f"/api/v1/deployments/{created['id']}/").json()["endpoints"] == []
    report(node, worker(replica, 9001), gateway("http://gpu-1.example:8080"))

    # The node's tenant (dedicated to it) turns its gateway off: a new revision without it.
    other = client_for(world.admin_b)
    assert (
        other.patch(f"/api/v1/nodes/{node.pk}/", {"gateway": False}, format="json").status_code
        == 404
    )
    with django_capture_on_commit_callbacks(execute=True):
        changed = client.patch(f"/api/v1/nodes/{node.pk}/", {"gateway": False}, format="json")
    assert changed.status_code == 200 and changed.json()["gateway"] is False
    head = Revision.objects.filter(node=node).order_by("-generation").first()
    assert head is not None and "gateway" not in head.document["state"]["components"]
    assert client.get(f"/api/v1/deployments/{created['id']}/").json()["endpoints"] == []
    report(node, worker(replica, 9001))  # the agent stopped it
    with django_capture_on_commit_callbacks(execute=True):
        client.patch(f"/api/v1/nodes/{node.pk}/", {"gateway": True}, format="json")
    head = Revision.objects.filter(node=node).order_by("-generation").first()
    assert head is not None and head.document["state"]["components"]["gateway"] == {}


def test_a_fixed_gateway_port_is_every_nodes(world: World, client_for: Any, settings: Any) -> None:
    settings.GATEWAY_PORT = 8088
    node = make_node("gpu-1", world.tenant_a, gpus=1)
    Node.objects.filter(pk=node.pk).update(status="ready")
    client_for(world.admin_a).post(
        "/api/v1/deployments/", {**BODY, "tenant": str(world.tenant_a.id)}, format="json"
    )
    components = Revision.objects.get(node=node).document["state"]["components"]
    assert components["gateway"] == {"port": 8088}


def test_render_nodes_brings_every_node_up_to_a_changed_setting(
    world: World, client_for: Any, settings: Any
) -> None:
    node = make_node("gpu-1", world.tenant_a, gpus=1)
    Node.objects.filter(pk=node.pk).update(status="ready")
    client_for(world.admin_a).post(
        "/api/v1/deployments/", {**BODY, "tenant": str(world.tenant_a.id)}, format="json"
    )
    settings.GATEWAY_PORT = 8090  # nothing re-renders on its own
    assert Revision.objects.filter(node=node).count() == 1
    out = io.StringIO()
    call_command("render_nodes", verbosity=0, stdout=out)
    assert out.getvalue().strip() == "1 of 1 nodes got a new revision."
    head = Revision.objects.filter(node=node).order_by("-generation").first()
    assert head is not None and head.document["state"]["components"]["gateway"] == {"port": 8090}
    call_command("render_nodes", verbosity=0, stdout=out)  # nothing changed since: nothing new
    assert Revision.objects.filter(node=node).count() == 2


def components_of(node: Node) -> dict[str, Any]:
    head = Revision.objects.filter(node=node).order_by("-generation").first()
    assert head is not None
    return dict(head.document["state"]["components"])


def test_each_gateway_of_a_deployment_reaches_its_replicas_on_other_nodes(
    world: World, client_for: Any, django_capture_on_commit_callbacks: Any
) -> None:
    nodes = [make_node(f"gpu-{i}", world.tenant_a, gpus=1) for i in (1, 2)]
    Node.objects.filter(pk__in=[n.pk for n in nodes]).update(status="ready")
    client = client_for(world.admin_a)
    created = client.post(
        "/api/v1/deployments/",
        {**BODY, "replicas": 2, "tenant": str(world.tenant_a.id)},
        format="json",
    ).json()
    a, b = (Replica.objects.get(deployment_id=created["id"], node=n) for n in nodes)
    # No worker is reachable from elsewhere yet: each gateway fronts its own node's.
    assert all(components_of(n)["gateway"] == {} for n in nodes)
    assert all("peer_key_hash" not in w for n in nodes for w in components_of(n)["workers"])

    with django_capture_on_commit_callbacks(execute=True):
        report(nodes[0], worker(a, 9001, "http://gpu-1.example:9001"))
    (peer,) = components_of(nodes[1])["gateway"]["peers"]
    assert peer["deployment_id"] == created["id"]
    assert peer["replicas"] == [{"replica_id": str(a.pk), "url": "http://gpu-1.example:9001"}]
    # Every worker of the deployment takes its peer key; each gateway reads its own with it.
    hashes = {w["peer_key_hash"] for n in nodes for w in components_of(n)["workers"]}
    assert hashes == {hashlib.sha256(peer["key"].encode()).hexdigest()}
    assert components_of(nodes[0])["gateway"]["peers"] == [{**peer, "replicas": []}]
    # Node 2's gateway reaches both replicas: the deployment's one address.
    report(
        nodes[0], worker(a, 9001, "http://gpu-1.example:9001"), gateway("http://gpu-1.example:8080")
    )
    report(nodes[1], worker(b, 9003), gateway("http://gpu-2.example:8080"))
    shown = client.get(f"/api/v1/deployments/{created['id']}/").json()
    assert shown["endpoints"] == ["http://gpu-1.example:8080", "http://gpu-2.example:8080"]
    assert shown["url"] == "http://gpu-2.example:8080"

    # The key lets its holder past the gateways: its node's tenant sees the revision without.
    head = Revision.objects.filter(node=nodes[1]).order_by("-generation").first()
    assert head is not None
    shown = client.get(f"/api/v1/revisions/{head.pk}/").json()["document"]["state"]
    assert shown["components"]["gateway"]["peers"][0]["key"] != peer["key"]
    assert shown["components"]["workers"] == components_of(nodes[1])["workers"]
    by_platform = client_for(world.platform).get(f"/api/v1/revisions/{head.pk}/").json()
    assert by_platform["document"] == head.document

    # A node speaks only for its own replicas, and only http(s) addresses are passed on.
    with django_capture_on_commit_callbacks(execute=True):
        report(nodes[1], worker(a, 9002, "http://elsewhere.example:9002"))
        report(nodes[1], worker(b, 9003, "javascript://alert(1)"))
    assert Replica.objects.get(pk=a.pk).url == "http://gpu-1.example:9001"
    assert Replica.objects.get(pk=b.pk).url == ""
    with django_capture_on_commit_callbacks(execute=True):
        report(nodes[1], worker(b, 9003, "http://gpu-2.example:9003"))
    assert components_of(nodes[0])["gateway"]["peers"][0]["replicas"] == [
        {"replica_id": str(b.pk), "url": "http://gpu-2.example:9003"}
    ]
    shown = client.get(f"/api/v1/deployments/{created['id']}/").json()
    assert shown["url"] == "http://gpu-1.example:8080"  # both reach both: the first

    # Scaled down to one replica: the other node's gateway forgets the one removed.
    with django_capture_on_commit_callbacks(execute=True):
        client.patch(f"/api/v1/deployments/{created['id']}/", {"replicas": 1}, format="json")
    (kept,) = Replica.objects.filter(deployment_id=created["id"])
    assert [p["replicas"] for p in components_of(kept.node)["gateway"]["peers"]] == [[]]


@pytest.mark.parametrize("where", ["api", "admin"])
def test_a_deleted_node_takes_its_replicas_addresses_with_it(
    world: World, client_for: Any, django_capture_on_commit_callbacks: Any, where: str
) -> None:
    nodes = [make_node(f"gpu-{i}", gpus=1) for i in (1, 2, 3)]
    Node.objects.filter(pk__in=[n.pk for n in nodes]).update(status="ready")
    client = client_for(world.platform)
    with django_capture_on_commit_callbacks(execute=True):
        created = client.post(
            "/api/v1/deployments/",
            {**BODY, "replicas": 2, "tenant": str(world.tenant_a.id)},
            format="json",
        ).json()
    placed = list(Replica.objects.filter(deployment_id=created["id"]).select_related("node"))
    for replica in placed:
        with django_capture_on_commit_callbacks(execute=True):
            report(replica.node, worker(replica, 9001, f"http://{replica.node.hostname}:9001"))
    gone, kept = placed
    assert components_of(kept.node)["gateway"]["peers"][0]["replicas"][0]["url"] == (
        f"http://{gone.node.hostname}:9001"
    )
    with django_capture_on_commit_callbacks(execute=True):
        if where == "api":
            assert client.delete(f"/api/v1/nodes/{gone.node_id}/").status_code == 204
        else:
            admin = Client()
            admin.force_login(world.platform)
            deleted = admin.post(f"/admin/inventory/node/{gone.node_id}/delete/", {"post": "yes"})
            assert deleted.status_code == 302, deleted.content[:500]
    moved = Replica.objects.get(pk=gone.pk)
    assert moved.node_id not in (None, gone.node_id) and moved.url == ""  # placed anew
    assert components_of(kept.node)["gateway"]["peers"][0]["replicas"] == []
