"""The alerts API: episodes listed and filtered, read-only, fleet alerts for platform
admins only."""

from __future__ import annotations

from typing import Any

import pytest

from controlplane.alerts import services as alerts
from tests.controlplane.alerts_helpers import fire
from tests.controlplane.conftest import World


@pytest.fixture(autouse=True)
def _notify_at_once(settings: Any) -> None:
    """Each change is sent as soon as it happens: no group wait or interval to sit out."""
    settings.ALERTS_GROUP_WAIT_S = 0
    settings.ALERTS_GROUP_INTERVAL_S = 0


def test_alerts_are_listed_and_filtered_by_state_and_severity(
    world: World, client_for: Any
) -> None:
    page = fire(world.tenant_a, alertname="Page")
    fire(world.tenant_a, alertname="Gone")
    fire(world.tenant_a, alertname="Gone", firing=False)
    ticket = alerts.sync_alert(
        tenant=world.tenant_a,
        labels={"alertname": "Ticket"},
        annotations={},
        severity="ticket",
        firing=True,
    )
    client = client_for(world.viewer_a)

    def names(**params: str) -> set[str]:
        rows = client.get("/api/v1/alerts/", params).json()["results"]
        return {row["labels"]["alertname"] for row in rows}

    assert names() == {"Page", "Gone", "Ticket"}
    assert names(state="firing") == {"Page", "Ticket"}
    assert names(state="resolved") == {"Gone"}
    assert names(severity="ticket") == {"Ticket"}
    assert names(state="firing", severity="page") == {"Page"}
    assert names(alertname="Page") == {"Page"}
    body = client.get(f"/api/v1/alerts/{page.pk}/").json()
    assert body["fingerprint"] == page.fingerprint and body["severity"] == "page"
    response = client.get("/api/v1/alerts/", {"state": "burning"})
    assert response.status_code == 400 and "state" in response.json()
    assert client.patch(f"/api/v1/alerts/{ticket.pk}/", {}, format="json").status_code == 405


def test_the_admin_console_shows_alerts_and_deliveries_without_secrets(
    world: World, client: Any
) -> None:
    from tests.controlplane.alerts_helpers import make_attempt

    attempt = make_attempt(world.tenant_a)
    endpoint = attempt.message.endpoint
    client.force_login(world.platform)
    for path in ("alert", "webhookendpoint", "outboxmessage", "deliveryattempt"):
        page = client.get(f"/admin/alerts/{path}/")
        assert page.status_code == 200, path
    detail = client.get(f"/admin/alerts/webhookendpoint/{endpoint.pk}/change/")
    assert detail.status_code == 200
    assert endpoint.secret not in detail.content.decode()
    assert attempt.message.webhook_id in client.get("/admin/alerts/outboxmessage/").content.decode()
