"""Re-placement when nodes are lost or drained, and stability when they return."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from django.utils import timezone

from agent.protocol import Heartbeat
from controlplane.fleet import services as fleet
from controlplane.fleet.models import Replica, Revision
from controlplane.fleet.placement import plan
from controlplane.inventory.models import Node
from controlplane.inventory.services import mark_silent_nodes_unreachable, record_heartbeat
from tests.controlplane.conftest import World, heard, make_node
from tests.controlplane.test_placement import OTHER, deployment, fresh, new_replica, placed_on, room


def test_a_lost_nodes_replicas_move_where_room_exists_and_do_not_flap_back() -> None:
    a, b = room("a", 2), room("b", 2)
    d = deployment(replicas=2)
    saved, _ = plan([d], fresh(a, b), [], new_replica)
    assert placed_on(saved) == ["a", "b"]

    a.node.status = "unreachable"
    moved, _ = plan([d], fresh(a, b), saved, new_replica)
    assert placed_on(moved) == ["b", "b"] and moved[0].gpu_indices == [1]
    assert moved[0].reason.startswith(
        "placed on b (moved from a: node is unreachable): GPU 1 (NUMA node unknown)"
    ), moved[0].reason
    assert moved[0].explanation["moved_from"] == {"node": "a", "why": "node is unreachable"}
    before = [(r.node.hostname, r.gpu_indices, r.port, r.reason) for r in moved]

    a.node.status = "ready"
    again, _ = plan([d], fresh(a, b), moved, new_replica)
    assert [(r.node.hostname, r.gpu_indices, r.port, r.reason) for r in again] == before


def test_with_no_room_elsewhere_a_lost_node_keeps_its_replica_until_room_appears() -> None:
    a = room("a", 1)
    d = deployment(replicas=1)
    (replica,), _ = plan([d], fresh(a), [], new_replica)
    port = replica.port

    a.node.status = "unreachable"
    plan([d], fresh(a), [replica], new_replica)
    assert (replica.node.hostname, replica.gpu_indices, replica.port) == ("a", [0], port)
    assert replica.reason == (
        "placed on a, which is unreachable: kept until another node has room "
        "(no other node fits: 1 node is unreachable [a])"
    )
    assert replica.explanation["stranded"] is True

    a.node.status = "ready"  # back before anything moved: it simply stays
    plan([d], fresh(a), [replica], new_replica)
    assert replica.node.hostname == "a"
    assert replica.reason == "placed on a: kept there, the node is back"

    a.node.status = "unreachable"
    b = room("b", 1)
    plan([d], fresh(a, b), [replica], new_replica)  # room appeared elsewhere
    assert replica.node.hostname == "b"
    assert "(moved from a: node is unreachable)" in replica.reason


def test_a_drained_node_is_left_even_with_nowhere_to_go() -> None:
    a = room("a", 1)
    d = deployment(replicas=1)
    (replica,), _ = plan([d], fresh(a), [], new_replica)

    a.node.maintenance = True
    plan([d], fresh(a), [replica], new_replica)
    assert replica.node is None and replica.gpu_indices == [] and replica.port is None
    assert replica.reason == (
        "not placed: left a (node is in maintenance); no node fits (1 node is in maintenance [a])"
    )
    assert replica.explanation["moved_from"] == {"node": "a", "why": "node is in maintenance"}

    a.node.maintenance = False
    plan([d], fresh(a), [replica], new_replica)
    assert replica.node.hostname == "a" and replica.reason.startswith("placed on a: GPU 0")


def test_a_new_dedication_or_gpu_count_invalidates_a_place() -> None:
    a, b = room("a", 4), room("b", 4)
    d = deployment(replicas=1)
    (replica,), _ = plan([d], fresh(a, b), [], new_replica)
    assert replica.node.hostname == "a"

    a.node.tenant_id = OTHER
    plan([d], fresh(a, b), [replica], new_replica)
    assert replica.node.hostname == "b"
    assert "(moved from a: node is dedicated to another tenant)" in replica.reason

    d.gpus_per_replica = 2
    plan([d], fresh(a, b), [replica], new_replica)
    assert replica.node.hostname == "b" and replica.gpu_indices == [0, 1]


def _ready(hostname: str, tenant: Any) -> Node:
    node = make_node(hostname, tenant, gpus=2)
    Node.objects.filter(pk=node.pk).update(status="ready")
    heard(node, timezone.now())
    return node


def _hosts(deployment: Any) -> list[str | None]:
    return [
        r.node.hostname if r.node else None
        for r in Replica.objects.filter(deployment=deployment).select_related("node")
    ]


def test_node_loss_and_drain_re_place_after_commit_and_a_return_does_not_flap(
    world: World, client_for: Any, settings: Any, django_capture_on_commit_callbacks: Any
) -> None:
    a, b = _ready("gpu-a", world.tenant_a), _ready("gpu-b", world.tenant_a)
    d = fleet.create_deployment(
        tenant=world.tenant_a,
        name="chat",
        model_name="chat",
        artifact_uri="synthetic://chat",
        replicas=2,
        gpus_per_replica=1,
    )
    assert _hosts(d) == ["gpu-a", "gpu-b"]

    settings.NODE_UNREACHABLE_AFTER_S = 30
    heard(a, timezone.now() - timedelta(seconds=31))
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        assert mark_silent_nodes_unreachable() == 1
        assert _hosts(d) == ["gpu-a", "gpu-b"]  # nothing moves before the commit
    assert callbacks
    assert _hosts(d) == ["gpu-b", "gpu-b"]
    moved = Replica.objects.get(deployment=d, index=0)
    assert "moved from gpu-a: node is unreachable" in moved.reason
    head_b = Revision.objects.filter(node=b).latest("generation")
    assert head_b.cause == "node unreachable: gpu-a"
    assert len(head_b.document["state"]["components"]["workers"]) == 2
    head_a = Revision.objects.filter(node=a).latest("generation")
    assert head_a.document["state"]["components"]["workers"] == []

    assert fleet.replace_from_nodes([a.pk], why="node unreachable") == []  # idempotent

    beat = Heartbeat(
        node_id=a.pk,
        sent_at=datetime.now(UTC),
        agent_version="0.1.0",
        applied_generation=0,
        uptime_s=1.0,
    )
    record_heartbeat(Node.objects.get(pk=a.pk), beat)  # back: a re-plan, but no flapping
    assert Node.objects.get(pk=a.pk).status == "ready"
    assert _hosts(d) == ["gpu-b", "gpu-b"]
    assert Revision.objects.filter(node=b).latest("generation") == head_b

    platform = client_for(world.platform)
    with django_capture_on_commit_callbacks(execute=True):
        response = platform.patch(f"/api/v1/nodes/{b.pk}/", {"maintenance": True}, format="json")
        assert response.status_code == 200, response.content
    assert _hosts(d) == ["gpu-a", "gpu-a"]
    assert Revision.objects.filter(node=b).latest("generation").cause == "node drained: gpu-b"
    replicas = platform.get("/api/v1/replicas/", {"deployment": str(d.pk)}).json()["results"]
    assert all("moved from gpu-b: node is in maintenance" in r["reason"] for r in replicas)
    assert all(r["explanation"]["moved_from"]["node"] == "gpu-b" for r in replicas)

    with django_capture_on_commit_callbacks(execute=True):
        platform.patch(f"/api/v1/nodes/{b.pk}/", {"maintenance": False}, format="json")
    assert _hosts(d) == ["gpu-a", "gpu-a"]  # a valid placement is kept
