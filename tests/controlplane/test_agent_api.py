"""The API agents speak: enrollment, inventory, heartbeats, desired state, status."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from agent.protocol import (
    Heartbeat,
    SignedDesiredState,
    decode_public_key,
    state_tag,
    verify_state,
)
from controlplane.fleet import services as fleet
from controlplane.fleet.models import Deployment, Replica, Revision
from controlplane.inventory.models import AgentReport, Node
from controlplane.inventory.services import create_bootstrap_token, mark_silent_nodes_unreachable
from tests.agent.samples import inventory as sample_inventory
from tests.controlplane.conftest import World, heard

HOST = {
    "hostname": "gpu-17",
    "kernel": "6.8.0",
    "os": "Debian 12",
    "cpu_model": "Xeon",
    "cpu_count": 64,
    "memory_bytes": 2**38,
}


def enroll(token: str, hostname: str = "gpu-17") -> Any:
    body = {
        "schema_version": 1,
        "bootstrap_token": token,
        "hostname": hostname,
        "agent_version": "0.1.0",
        "host": {**HOST, "hostname": hostname},
    }
    return APIClient().post(
        "/api/v1/agent/enroll/", json.dumps(body), content_type="application/json"
    )


def as_node(credential: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Node {credential}")
    return client


@pytest.fixture
def enrolled(db: Any) -> tuple[Node, str]:
    grant = enroll(create_bootstrap_token(name="t").secret).json()
    return Node.objects.get(pk=grant["node_id"]), grant["node_credential"]


def test_enrollment_grants_identity_once(db: Any) -> None:
    token = create_bootstrap_token(name="one").secret
    response = enroll(token)
    assert response.status_code == 201, response.content
    grant = response.json()
    node = Node.objects.get(pk=grant["node_id"])
    assert node.hostname == "gpu-17" and node.status == "pending" and node.cpu_count == 64
    assert grant["queue"] == f"agent.{node.pk}"
    decode_public_key(grant["control_plane_public_key"])  # a usable Ed25519 key

    again = enroll(token, "gpu-18")
    assert again.status_code == 403
    assert "already used" in again.json()["detail"]


def test_expired_and_unknown_tokens_are_refused(db: Any) -> None:
    issued = create_bootstrap_token(name="old")
    issued.obj.expires_at = timezone.now() - timedelta(seconds=1)
    issued.obj.save()
    assert enroll(issued.secret).status_code == 403
    assert enroll("tgb_" + "x" * 40).status_code == 403
    assert not Node.objects.exists()


def test_malformed_messages_get_a_400_naming_the_field(enrolled: tuple[Node, str]) -> None:
    node, credential = enrolled
    body = sample_inventory().model_dump(mode="json")
    body["gpus"][0]["pci_bus_id"] = "not-a-bus-id"
    body["nics"][0]["speed_gbps"] = "fast"
    body["surprise"] = 1
    response = as_node(credential).post(
        "/api/v1/agent/inventory/", json.dumps(body), content_type="application/json"
    )
    assert response.status_code == 400
    errors = response.json()
    assert {"gpus.0.pci_bus_id", "nics.0.speed_gbps", "surprise"} <= set(errors), errors
    assert not node.gpus.exists()
    response = as_node(credential).post(
        "/api/v1/agent/inventory/", "{oops", content_type="application/json"
    )
    assert response.status_code == 400


def test_inventory_replaces_hardware_rows(enrolled: tuple[Node, str]) -> None:
    node, credential = enrolled
    inventory = sample_inventory()
    response = as_node(credential).post(
        "/api/v1/agent/inventory/", inventory.model_dump_json(), content_type="application/json"
    )
    assert response.status_code == 204, response.content
    assert node.gpus.count() == len(inventory.gpus)
    assert node.nics.count() == len(inventory.nics) and node.drives.count() == len(inventory.drives)
    assert node.gpus.count() >= 1
    fewer = inventory.model_copy(update={"gpus": []})
    as_node(credential).post(
        "/api/v1/agent/inventory/", fewer.model_dump_json(), content_type="application/json"
    )
    assert node.gpus.count() == 0


def test_heartbeats_make_nodes_ready_and_silence_makes_them_unreachable(
    enrolled: tuple[Node, str], settings: Any
) -> None:
    node, credential = enrolled
    beat = Heartbeat(
        node_id=node.pk,
        sent_at=datetime.now(UTC),
        agent_version="0.1.1",
        applied_generation=0,
        uptime_s=3.0,
    )
    assert (
        as_node(credential)
        .post("/api/v1/agent/heartbeat/", beat.model_dump_json(), content_type="application/json")
        .status_code
        == 204
    )
    node.refresh_from_db()
    assert node.status == "ready" and node.agent_version == "0.1.1"

    settings.NODE_UNREACHABLE_AFTER_S = 30
    heard(node, timezone.now() - timedelta(seconds=31))
    assert mark_silent_nodes_unreachable() == 1
    node.refresh_from_db()
    assert node.status == "unreachable"

    other = beat.model_copy(update={"node_id": Node.objects.create(hostname="x").pk})
    response = as_node(credential).post(
        "/api/v1/agent/heartbeat/", other.model_dump_json(), content_type="application/json"
    )
    assert response.status_code == 400 and "node_id" in response.json()


def test_agent_endpoints_need_a_node_credential(world: World, client_for: Any) -> None:
    for path in ("heartbeat/", "inventory/", "status/"):
        assert (
            APIClient()
            .post(f"/api/v1/agent/{path}", "{}", content_type="application/json")
            .status_code
            == 401
        )
        # a person's API token is not a node credential
        assert client_for(world.platform).post(f"/api/v1/agent/{path}", {}).status_code in (
            401,
            403,
        )
    assert as_node("tgn_" + "z" * 40).get("/api/v1/agent/desired-state/").status_code == 401


def test_desired_state_and_status_round_trip(enrolled: tuple[Node, str], world: World) -> None:
    node, credential = enrolled
    client = as_node(credential)
    assert client.get("/api/v1/agent/desired-state/").status_code == 204
    Node.objects.filter(pk=node.pk).update(status="ready")
    fleet.create_deployment(
        tenant=world.tenant_a,
        name="chat",
        model_name="chat",
        artifact_uri="synthetic://chat",
        replicas=1,
    )
    body = client.get("/api/v1/agent/desired-state/").json()
    signed = SignedDesiredState.model_validate(body)
    public = decode_public_key(
        enroll(create_bootstrap_token(name="k").secret, "other").json()["control_plane_public_key"]
    )
    state = verify_state(signed, public, node_id=node.pk)
    (worker,) = state.components.workers
    assert state.generation == 1 and worker.model_name == "chat"
    assert worker.port is None  # the agent takes a free one and reports it

    status = {
        "schema_version": 1,
        "node_id": str(node.pk),
        "generation": 1,
        "content_hash": state.content_hash,
        "state": "applied",
        "components": [
            {"kind": "worker", "name": "replica-x", "ok": True, "error": None, "port": 40001},
            {
                "kind": "worker",
                "name": f"replica-{uuid.uuid4()}",
                "ok": True,
                "error": None,
                "port": 40002,
            },
            {
                "kind": "worker",
                "name": f"replica-{worker.replica_id}",
                "ok": True,
                "error": None,
                "port": 40003,
            },
        ],
        "reported_at": datetime.now(UTC).isoformat(),
    }
    assert (
        client.post(
            "/api/v1/agent/status/", json.dumps(status), content_type="application/json"
        ).status_code
        == 204
    )
    revision = Revision.objects.get(node=node, generation=1)
    assert revision.status == "applied" and revision.results[0]["name"] == "replica-x"
    # Where the node's own worker listens; it speaks for no other replica.
    assert dict(Replica.objects.values_list("pk", "port")) == {worker.replica_id: 40003}
    assert AgentReport.objects.get(node=node).applied_generation == 1

    # The same revision delivered twice (pushed and pulled): the second copy is refused as a
    # replay, which must not mark the applied revision rejected.
    replay = {**status, "state": "rejected", "components": [], "rejection_reason": "replayed"}
    response = client.post(
        "/api/v1/agent/status/", json.dumps(replay), content_type="application/json"
    )
    assert response.status_code == 204
    assert Revision.objects.get(node=node, generation=1).status == "applied"


@pytest.fixture
def placed(enrolled: tuple[Node, str], world: World) -> Deployment:
    """A one-replica deployment of tenant A, placed on the enrolled node (made ready)."""
    node, _ = enrolled
    Node.objects.filter(pk=node.pk).update(status="ready")
    return fleet.create_deployment(
        tenant=world.tenant_a,
        name="chat",
        model_name="chat",
        artifact_uri="synthetic://chat",
        replicas=1,
    )


def test_a_pull_naming_the_newest_state_is_answered_not_modified(
    enrolled: tuple[Node, str], placed: Deployment, django_capture_on_commit_callbacks: Any
) -> None:
    _, credential = enrolled
    client = as_node(credential)
    deployment = placed
    first = client.get("/api/v1/agent/desired-state/")
    state = first.json()["state"]
    tag = state_tag(state["generation"], state["content_hash"])
    assert first["ETag"] == tag

    unchanged = client.get("/api/v1/agent/desired-state/", HTTP_IF_NONE_MATCH=f'W/"0-x", {tag}')
    assert unchanged.status_code == 304 and not unchanged.content
    assert unchanged["ETag"] == tag
    assert client.get("/api/v1/agent/desired-state/", HTTP_IF_NONE_MATCH="*").status_code == 304

    with django_capture_on_commit_callbacks(execute=True):
        fleet.update_deployment(deployment, max_batch_size=3)
    changed = client.get("/api/v1/agent/desired-state/", HTTP_IF_NONE_MATCH=tag)
    assert changed.status_code == 200
    assert changed.json()["state"]["generation"] == state["generation"] + 1
    assert changed["ETag"] != tag


def test_tpot_sized_steps_are_set_on_a_deployment_and_reach_its_workers(
    enrolled: tuple[Node, str],
    placed: Deployment,
    world: World,
    client_for: Any,
    django_capture_on_commit_callbacks: Any,
) -> None:
    _, credential = enrolled
    deployment = placed
    state = as_node(credential).get("/api/v1/agent/desired-state/").json()["state"]
    assert "tpot_steps" not in state["components"]["workers"][0]
    api = client_for(world.admin_a)
    assert api.get(f"/api/v1/deployments/{deployment.pk}/").json()["tpot_steps"] is False
    with django_capture_on_commit_callbacks(execute=True):
        changed = api.patch(
            f"/api/v1/deployments/{deployment.pk}/", {"tpot_steps": True}, format="json"
        )
    assert changed.status_code == 200, changed.content
    assert changed.json()["tpot_steps"] is True
    state = as_node(credential).get("/api/v1/agent/desired-state/").json()["state"]
    assert state["components"]["workers"][0]["tpot_steps"] is True
    refused = api.patch(f"/api/v1/deployments/{deployment.pk}/", {"tpot_steps": "often"})
    assert refused.status_code == 400 and "tpot_steps" in refused.json()


def test_bootstrap_tokens_are_for_platform_admins(world: World, client_for: Any) -> None:
    assert (
        client_for(world.admin_a).post("/api/v1/bootstrap-tokens/", {"name": "x"}).status_code
        == 403
    )
    response = client_for(world.platform).post(
        "/api/v1/bootstrap-tokens/", {"name": "rack-7", "uses": 3}
    )
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["token"].startswith("tgb_") and body["uses_left"] == 3
    assert enroll(body["token"]).status_code == 201
