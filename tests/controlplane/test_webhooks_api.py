"""The webhook API: endpoints with their secrets shown once, rotation, test sends, refused
targets, roles, and the read-only outbox and delivery log."""

from __future__ import annotations

from typing import Any

import pytest
from rest_framework.test import APIClient

from controlplane.alerts import services as alerts
from controlplane.alerts.models import OutboxMessage, WebhookEndpoint
from tests.controlplane.alerts_helpers import (
    PUBLIC_URL,
    Receiver,
    fire,
    make_attempt,
    make_endpoint,
    make_message,
    receiving,
)
from tests.controlplane.conftest import World


@pytest.fixture(autouse=True)
def _notify_at_once(settings: Any) -> None:
    """Each change is sent as soon as it happens: no group wait or interval to sit out."""
    settings.ALERTS_GROUP_WAIT_S = 0
    settings.ALERTS_GROUP_INTERVAL_S = 0


BASE = "/api/v1/webhook-endpoints/"


def _body(world: World, **fields: Any) -> dict[str, Any]:
    return {"tenant": str(world.tenant_a.pk), "name": "ops", "url": PUBLIC_URL, **fields}


def test_create_shows_the_secret_once_and_rotation_shows_the_new_one(
    world: World, client_for: Any
) -> None:
    client = client_for(world.admin_a)
    created = client.post(BASE, _body(world, format="slack"), format="json")
    assert created.status_code == 201, created.json()
    body = created.json()
    assert body["secret"].startswith("whsec_")
    assert body["format"] == "slack" and body["enabled"] and body["pending_messages"] == 0
    shown = client.get(f"{BASE}{body['id']}/").json()
    assert "secret" not in shown and body["secret"] not in str(shown)

    rotated = client.post(f"{BASE}{body['id']}/rotate-secret/")
    assert rotated.status_code == 200
    assert rotated.json()["secret"].startswith("whsec_")
    assert rotated.json()["secret"] != body["secret"]
    endpoint = WebhookEndpoint.objects.get(pk=body["id"])
    assert endpoint.previous_secret == body["secret"]
    assert client.get(f"{BASE}{body['id']}/").json()["previous_secret_expires_at"] is not None


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("http://127.0.0.1:8080/hook", "loopback"),
        ("http://localhost/hook", "loopback"),
        ("http://169.254.169.254/latest/meta-data", "link-local"),
        ("http://10.1.2.3/hook", "private"),
        ("http://[::1]/hook", "loopback"),
        ("http://[fe80::1]/hook", "link-local"),
        ("http://[::ffff:192.168.1.1]/hook", "private"),
    ],
)
def test_private_targets_are_refused_with_a_clear_400(
    world: World, client_for: Any, url: str, kind: str
) -> None:
    response = client_for(world.admin_a).post(BASE, _body(world, url=url), format="json")
    assert response.status_code == 400
    (message,) = response.json()["url"]
    assert f"a {kind} address" in message and "public addresses" in message
    assert not WebhookEndpoint.objects.exists()


def test_only_platform_admins_allow_private_targets(world: World, client_for: Any) -> None:
    url = "http://127.0.0.1:8080/hook"
    refused = client_for(world.admin_a).post(
        BASE, _body(world, url=url, allow_private_targets=True), format="json"
    )
    assert refused.status_code == 400
    assert "platform admins" in refused.json()["allow_private_targets"][0]
    allowed = client_for(world.platform).post(
        BASE, _body(world, url=url, allow_private_targets=True), format="json"
    )
    assert allowed.status_code == 201, allowed.json()
    # and turning the flag off again re-checks the URL
    response = client_for(world.platform).patch(
        f"{BASE}{allowed.json()['id']}/", {"allow_private_targets": False}, format="json"
    )
    assert response.status_code == 400 and "loopback" in response.json()["url"][0]


def test_bad_input_is_a_readable_400(world: World, client_for: Any) -> None:
    client = client_for(world.admin_a)
    cases = [
        (_body(world, format="pagerduty"), "routing_key"),
        (_body(world, routing_key="abc"), "routing_key"),
        (_body(world, url="ftp://93.184.216.34/x"), "url"),
        (_body(world, url="not a url"), "url"),
        (_body(world, url="http://no-such-host.invalid/"), "url"),
        (_body(world, secret="whsec_mine"), "secret"),
        (_body(world, tenant=None), "tenant"),
    ]
    for body, field in cases:
        response = client.post(BASE, body, format="json")
        assert response.status_code == 400, body
        assert field in response.json(), (body, response.json())


def test_pagerduty_routing_key_is_write_only(world: World, client_for: Any) -> None:
    client = client_for(world.admin_a)
    key = "R0UT1NGKEY0123456789abcdef012345"
    created = client.post(BASE, _body(world, format="pagerduty", routing_key=key), format="json")
    assert created.status_code == 201, created.json()
    assert key not in str(created.json())
    assert key not in str(client.get(f"{BASE}{created.json()['id']}/").json())


def test_viewers_read_but_do_not_manage_endpoints(world: World, client_for: Any) -> None:
    endpoint = make_endpoint(world.tenant_a).obj
    viewer = client_for(world.viewer_a)
    assert viewer.get(f"{BASE}{endpoint.pk}/").status_code == 200
    assert viewer.post(BASE, _body(world), format="json").status_code == 400  # not its tenant
    for path in ("rotate-secret/", "test/"):
        response = viewer.post(f"{BASE}{endpoint.pk}/{path}")
        assert response.status_code == 403 and "tenant admin" in response.json()["detail"]
    assert viewer.delete(f"{BASE}{endpoint.pk}/").status_code == 403
    assert client_for(world.admin_a).delete(f"{BASE}{endpoint.pk}/").status_code == 204


def test_disabling_stops_pending_messages_and_enabling_clears_the_reason(
    world: World, client_for: Any
) -> None:
    message = make_message(world.tenant_a)
    client = client_for(world.admin_a)
    url = f"{BASE}{message.endpoint_id}/"
    body = client.patch(url, {"enabled": False}, format="json").json()
    assert body["enabled"] is False and body["disabled_reason"] == "Disabled through the API."
    message.refresh_from_db()
    assert message.status == "failed" and "disabled" in message.last_error
    assert alerts.deliver(message.pk) == "not due"
    response = client.post(f"{url}test/")
    assert response.status_code == 400 and "enable it first" in response.json()["detail"]

    body = client.patch(url, {"enabled": True}, format="json").json()
    assert body["enabled"] is True and body["disabled_reason"] == ""


def test_test_send_goes_through_the_outbox_signed(world: World, client_for: Any) -> None:
    with receiving(Receiver(secrets=[])) as receiver:
        issued = make_endpoint(world.tenant_a, receiver.url)
        receiver.secrets.append(issued.secret)
        response = client_for(world.admin_a).post(f"{BASE}{issued.obj.pk}/test/")
        assert response.status_code == 202
        body = response.json()
        assert body["event"] == "test" and body["status"] == "pending"
        assert alerts.deliver(body["id"]) == "delivered"
    (delivery,) = receiver.verified()
    assert delivery.body["alerts"][0]["labels"] == {"alertname": "TailguardWebhookTest"}
    assert delivery.headers["webhook-id"] == body["webhook_id"]


def test_messages_and_attempts_are_listed_per_endpoint(world: World, client_for: Any) -> None:
    attempt = make_attempt(world.tenant_a)
    other = make_message(world.tenant_a)
    client = client_for(world.viewer_a)
    endpoint = attempt.message.endpoint_id

    listed = client.get("/api/v1/webhook-messages/", {"endpoint": str(endpoint)}).json()
    rows = {m["id"]: m for m in listed["results"]}
    assert set(rows) == {
        str(pk)
        for pk in OutboxMessage.objects.filter(endpoint=endpoint).values_list("pk", flat=True)
    }
    assert rows[str(attempt.message_id)]["attempts"] == 1
    assert str(other.pk) not in rows  # another endpoint's

    attempts = client.get("/api/v1/delivery-attempts/", {"endpoint": str(endpoint)}).json()
    (row,) = attempts["results"]
    assert row["message"] == str(attempt.message_id) and row["endpoint"] == str(endpoint)
    assert row["status_code"] is None and row["error"].startswith("ConnectError")
    assert row["duration_s"] >= 0
    assert client.post("/api/v1/webhook-messages/", {}, format="json").status_code == 405
    empty = client.get("/api/v1/delivery-attempts/", {"endpoint": str(other.endpoint_id)})
    assert empty.json()["count"] == 0


def test_unauthenticated_requests_are_refused(db: Any) -> None:
    for path in ("alerts", "webhook-endpoints", "webhook-messages", "delivery-attempts"):
        assert APIClient().get(f"/api/v1/{path}/").status_code == 401, path


def test_platform_endpoints_are_platform_admins_alone(world: World, client_for: Any) -> None:
    created = client_for(world.platform).post(BASE, _body(world, tenant=None), format="json")
    assert created.status_code == 201, created.json()
    endpoint = created.json()["id"]
    assert client_for(world.admin_a).get(f"{BASE}{endpoint}/").status_code == 404
    fire(None, alertname="FleetDown")
    assert OutboxMessage.objects.get().endpoint_id == WebhookEndpoint.objects.get(pk=endpoint).pk
    assert client_for(world.admin_a).get("/api/v1/webhook-messages/").json()["count"] == 0
