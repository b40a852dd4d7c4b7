"""Volumes go only to nodes that take new work: never onto a silent or drained node, whether
placement chooses the pool or the caller names it; the refusal says what to do."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.utils import timezone

from controlplane.inventory.models import Node
from controlplane.inventory.services import mark_silent_nodes_unreachable
from controlplane.storage.models import Volume
from tests.controlplane.conftest import World, heard
from tests.controlplane.storage_helpers import MIB, make_pool, ready_node


def _silence(node: Node, settings: Any) -> None:
    """As the beat task finds it: no heartbeat for longer than NODE_UNREACHABLE_AFTER_S."""
    settings.NODE_UNREACHABLE_AFTER_S = 30
    heard(node, timezone.now() - timedelta(seconds=31))
    assert mark_silent_nodes_unreachable() == 1


def _create(client: Any, world: World, name: str, **fields: Any) -> Any:
    return client.post(
        "/api/v1/volumes/",
        {"tenant": str(world.tenant_a.pk), "name": name, "size_bytes": MIB, **fields},
        format="json",
    )


def test_volumes_are_never_placed_on_unreachable_or_drained_nodes(
    world: World, client_for: Any, settings: Any
) -> None:
    silent = make_pool(ready_node("store-silent", world.tenant_a), capacity=900 * MIB)
    drained = make_pool(ready_node("store-drained", world.tenant_a), capacity=800 * MIB)
    ready = make_pool(ready_node("store-ready", world.tenant_a), capacity=10 * MIB)
    _silence(silent.node, settings)
    platform = client_for(world.platform)
    response = platform.patch(
        f"/api/v1/nodes/{drained.node_id}/",
        {"maintenance": True, "maintenance_reason": "replacing an NVMe drive"},
        format="json",
    )
    assert response.status_code == 200, response.content
    client = client_for(world.admin_a)

    # placement passes over the roomier pools of the silent and the drained node
    response = _create(client, world, "auto")
    assert response.status_code == 201, response.content
    assert response.json()["pool"] == str(ready.pk)

    # a named pool is refused the same way, saying why and what to do instead
    response = _create(client, world, "named", pool=str(silent.pk))
    assert response.status_code == 400
    [text] = response.json()["pool"]
    assert text.startswith(
        "Pool models takes no new volumes: node store-silent is unreachable (no heartbeat since "
    ), text
    assert "Choose a pool on a ready node, or leave pool out" in text
    response = _create(client, world, "named", pool=str(drained.pk))
    assert response.status_code == 400
    assert response.json()["pool"] == [
        "Pool models takes no new volumes: node store-drained is in maintenance: replacing an "
        "NVMe drive. Choose a pool on a ready node, or leave pool out to place the volume where "
        "there is room."
    ]

    # with the last ready node drained, placement names every node it passed over
    response = platform.patch(
        f"/api/v1/nodes/{ready.node_id}/", {"maintenance": True}, format="json"
    )
    assert response.status_code == 200, response.content
    response = _create(client, world, "nowhere")
    assert response.status_code == 400
    [text] = response.json()["size_bytes"]
    assert (
        "Pools on these nodes take no new volumes: node store-drained is in maintenance: "
        "replacing an NVMe drive; node store-ready is in maintenance; node store-silent is "
        "unreachable (no heartbeat since " in text
    ), text
    assert text.endswith(
        "Bring a node back (or out of maintenance), or add a pool on a ready node."
    ), text
    assert list(Volume.objects.values_list("name", flat=True)) == ["auto"]


def test_a_pool_on_a_node_whose_agent_never_reported_takes_no_volumes(
    world: World, client_for: Any
) -> None:
    node = ready_node("store-new", world.tenant_a)
    pool = make_pool(node)
    Node.objects.filter(pk=node.pk).update(status="pending")
    response = _create(client_for(world.admin_a), world, "data", pool=str(pool.pk))
    assert response.status_code == 400
    assert (
        "node store-new is pending: its agent has not sent a heartbeat yet"
        in response.json()["pool"][0]
    )
