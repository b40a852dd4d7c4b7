"""Webhook delivery against a real HTTP receiver that verifies every Standard Webhooks
signature: payload shapes, rotation, outages, 410 Gone, Retry-After, giving up, refused
targets, claims and ordering."""

from __future__ import annotations

import email.utils
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.utils import timezone

from controlplane.alerts import services as alerts
from controlplane.alerts.models import Alert, DeliveryAttempt, OutboxMessage
from tests.controlplane.alerts_helpers import (
    PUBLIC_URL,
    Receiver,
    fire,
    make_due,
    make_endpoint,
    receiving,
)
from tests.controlplane.conftest import World


@pytest.fixture(autouse=True)
def _notify_at_once(settings: Any) -> None:
    """Each change is sent as soon as it happens: no group wait or interval to sit out."""
    settings.ALERTS_GROUP_WAIT_S = 0
    settings.ALERTS_GROUP_INTERVAL_S = 0


def _messages(endpoint: Any) -> list[OutboxMessage]:
    return list(OutboxMessage.objects.filter(endpoint=endpoint).order_by("created_at"))


def test_an_alert_fires_and_resolves_once_each_signed_in_alertmanager_v4(world: World) -> None:
    with receiving(Receiver(secrets=[])) as receiver:
        issued = make_endpoint(world.tenant_a, receiver.url, name="am")
        receiver.secrets.append(issued.secret)
        other_tenant = make_endpoint(world.tenant_b, receiver.url, name="b").obj

        alert = fire(world.tenant_a, instance="node-1")
        assert fire(world.tenant_a, instance="node-1").pk == alert.pk  # still firing: no-op
        (firing,) = _messages(issued.obj)
        assert alerts.deliver(firing.pk) == "delivered"
        assert alerts.deliver(firing.pk) == "not due"  # delivered once, not again

        resolved_alert = fire(world.tenant_a, firing=False, instance="node-1")
        assert resolved_alert.pk == alert.pk and resolved_alert.state == "resolved"
        assert fire(world.tenant_a, firing=False, instance="node-1") is None
        firing_msg, resolved = _messages(issued.obj)
        assert alerts.deliver(resolved.pk) == "delivered"

    assert not _messages(other_tenant)
    assert [d.verified_by for d in receiver.deliveries] == [[issued.secret]] * 2
    first, second = (d.body for d in receiver.deliveries)
    assert first["version"] == "4" and first["status"] == "firing"
    assert first["receiver"] == "am"
    assert first["groupKey"] == '{}:{alertname="HighTTFT",instance="node-1"}'
    assert first["commonLabels"] == {"alertname": "HighTTFT", "instance": "node-1"}
    assert first["commonAnnotations"]["summary"] == "HighTTFT is burning the error budget"
    (am_alert,) = first["alerts"]
    assert am_alert["fingerprint"] == alert.fingerprint and len(alert.fingerprint) == 16
    assert am_alert["endsAt"] == "0001-01-01T00:00:00Z"
    assert am_alert["generatorURL"].endswith(f"/api/v1/alerts/{alert.pk}/")
    assert set(am_alert) == {
        "status",
        "labels",
        "annotations",
        "startsAt",
        "endsAt",
        "generatorURL",
        "fingerprint",
    }
    assert (
        second["status"] == "resolved" and second["alerts"][0]["endsAt"] != "0001-01-01T00:00:00Z"
    )
    headers = receiver.deliveries[0].headers
    assert headers["webhook-id"] == firing.webhook_id
    assert headers["webhook-signature"].startswith("v1,")


def test_firing_again_after_resolving_opens_a_new_episode(world: World) -> None:
    with receiving(Receiver(secrets=[])) as receiver:
        issued = make_endpoint(world.tenant_a, receiver.url)
        receiver.secrets.append(issued.secret)
        first = fire(world.tenant_a)
        fire(world.tenant_a, firing=False)
        second = fire(world.tenant_a)
        assert second.pk != first.pk and second.fingerprint == first.fingerprint
        assert Alert.objects.filter(state="firing").count() == 1
        # nothing was sent yet: the waiting message takes every change along, as one
        (message,) = _messages(issued.obj)
        assert alerts.deliver(message.pk) == "delivered"
    (body,) = (d.body for d in receiver.deliveries)
    assert body["status"] == "firing"
    assert [(a["status"], a["startsAt"]) for a in body["alerts"]] == [
        ("resolved", first.starts_at.isoformat().replace("+00:00", "Z")),
        ("firing", second.starts_at.isoformat().replace("+00:00", "Z")),
    ]


def test_a_group_carries_only_alerts_with_exactly_its_labels(world: World) -> None:
    """Outside SLOs a group is one label set: an alert with more labels is another group."""
    with receiving(Receiver(secrets=[])) as receiver:
        issued = make_endpoint(world.tenant_a, receiver.url)
        receiver.secrets.append(issued.secret)
        fire(world.tenant_a, instance="node-1")
        fire(world.tenant_a, instance="node-1", disk="nvme0")
        for message in _messages(issued.obj):
            assert alerts.deliver(message.pk) == "delivered"
    bodies = sorted((d.body for d in receiver.deliveries), key=lambda b: len(b["groupLabels"]))
    assert [[a["labels"] for a in b["alerts"]] for b in bodies] == [
        [{"alertname": "HighTTFT", "instance": "node-1"}],
        [{"alertname": "HighTTFT", "instance": "node-1", "disk": "nvme0"}],
    ]


def test_messages_are_written_in_the_transaction_and_sent_after_commit(
    world: World, django_capture_on_commit_callbacks: Any
) -> None:
    make_endpoint(world.tenant_a, name="one")
    make_endpoint(world.tenant_a, name="two")
    make_endpoint(world.tenant_a, name="off", enabled=False)
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        fire(world.tenant_a)
        assert OutboxMessage.objects.count() == 2  # one per enabled endpoint, already there
    assert len(callbacks) == 2  # the delivery tasks go out only once it is committed


def test_slack_and_pagerduty_shapes(world: World) -> None:
    with receiving(Receiver(secrets=[])) as receiver:
        slack = make_endpoint(world.tenant_a, receiver.url, name="slack", format="slack")
        pd = make_endpoint(
            world.tenant_a,
            receiver.url,
            name="pd",
            format="pagerduty",
            routing_key="R0UT1NGKEY0123456789abcdef012345",
        )
        receiver.secrets += [slack.secret, pd.secret]
        alert = fire(world.tenant_a, instance="node-7")
        for firing in (True, False):
            fire(world.tenant_a, firing=firing, instance="node-7")
            for message in OutboxMessage.objects.filter(status="pending"):
                assert alerts.deliver(message.pk) == "delivered"
        assert all("routing_key" not in m.payload for m in OutboxMessage.objects.all())

    assert all(d.verified_by for d in receiver.deliveries)
    slack_firing, slack_resolved = (d.body for d in receiver.deliveries if "blocks" in d.body)
    assert slack_firing["text"].startswith("[FIRING] HighTTFT (page)")
    assert slack_resolved["text"].startswith("[RESOLVED] HighTTFT (page)")
    assert slack_firing["blocks"][0]["type"] == "section"
    trigger, resolve = (d.body for d in receiver.deliveries if "event_action" in d.body)
    assert trigger["routing_key"] == "R0UT1NGKEY0123456789abcdef012345"
    assert trigger["event_action"] == "trigger" and trigger["dedup_key"] == alert.fingerprint
    assert trigger["payload"]["severity"] == "critical"
    assert trigger["payload"]["source"] == "node-7"
    assert trigger["payload"]["custom_details"]["labels"]["alertname"] == "HighTTFT"
    assert resolve == {
        "routing_key": "R0UT1NGKEY0123456789abcdef012345",
        "event_action": "resolve",
        "dedup_key": alert.fingerprint,
    }


def test_during_rotation_both_secrets_verify_and_after_the_grace_only_the_new_one(
    world: World,
) -> None:
    with receiving(Receiver(secrets=[])) as receiver:
        issued = make_endpoint(world.tenant_a, receiver.url)
        old = issued.secret
        new = alerts.rotate_secret(issued.obj).secret
        assert new != old and new.startswith("whsec_")
        receiver.secrets += [old, new]
        fire(world.tenant_a, alertname="One")
        alerts.deliver(OutboxMessage.objects.get().pk)

        # a rotation whose grace period is over: the previous secret no longer signs
        newest = alerts.rotate_secret(issued.obj, now=timezone.now() - timedelta(days=2)).secret
        receiver.secrets.append(newest)
        fire(world.tenant_a, alertname="Two")
        alerts.deliver(OutboxMessage.objects.get(alert__labels__alertname="Two").pk)

    during, after = receiver.deliveries
    assert during.verified_by == [old, new]
    assert len(during.headers["webhook-signature"].split(" ")) == 2
    assert after.verified_by == [newest]
    assert len(after.headers["webhook-signature"].split(" ")) == 1


def test_a_receiver_that_is_down_then_failing_gets_every_alert_once_it_returns(
    world: World, free_port: int, settings: Any
) -> None:
    receiver = Receiver(secrets=[], port=free_port, script=[(503, {}), (503, {})])
    issued = make_endpoint(world.tenant_a, receiver.url)
    receiver.secrets.append(issued.secret)
    for name in ("A", "B", "C"):
        fire(world.tenant_a, alertname=name)
    messages = _messages(issued.obj)

    for message in messages:  # nothing listens yet: connection refused
        before = timezone.now()
        assert alerts.deliver(message.pk) == "pending"
        message.refresh_from_db()
        assert message.last_error.startswith("ConnectError")
        delay = (message.next_attempt_at - before).total_seconds()
        assert 0.5 * settings.ALERTS_BACKOFF_BASE_S <= delay <= settings.ALERTS_BACKOFF_BASE_S + 5

    with receiving(receiver):
        for _ in range(3):
            make_due(*messages)
            for message in messages:
                alerts.deliver(message.pk)

    for message in messages:
        message.refresh_from_db()
        assert message.status == "delivered"
    assert receiver.ids() == {m.webhook_id for m in messages}
    attempts = DeliveryAttempt.objects.filter(message__endpoint=issued.obj)
    assert attempts.filter(status_code__isnull=True).count() == 3  # refused connections
    assert attempts.filter(status_code=503).count() == 2
    assert attempts.filter(status_code=200).count() == 3
    assert "ConnectError" in attempts.filter(status_code__isnull=True).first().error


def test_backoff_grows_exponentially_with_jitter(settings: Any) -> None:
    base, cap = settings.ALERTS_BACKOFF_BASE_S, settings.ALERTS_BACKOFF_MAX_S
    for attempts in (1, 2, 3, 6):
        delays = {alerts.backoff(attempts).total_seconds() for _ in range(20)}
        ceiling = min(cap, base * 2 ** (attempts - 1))
        assert all(0.5 * ceiling <= d <= ceiling for d in delays)
        assert len(delays) > 1  # jittered
    assert alerts.backoff(50).total_seconds() <= cap


def test_410_gone_disables_the_endpoint_and_nothing_more_is_sent(world: World) -> None:
    with receiving(Receiver(secrets=[], script=[(410, {})])) as receiver:
        issued = make_endpoint(world.tenant_a, receiver.url)
        fire(world.tenant_a, alertname="A")
        fire(world.tenant_a, alertname="B")
        first, second = _messages(issued.obj)
        assert alerts.deliver(first.pk) == "failed"
        assert alerts.deliver(second.pk) == "not due"
        fire(world.tenant_a, alertname="C")  # after the 410: no message at all

    endpoint = issued.obj
    endpoint.refresh_from_db()
    assert not endpoint.enabled
    assert "410 Gone" in endpoint.disabled_reason
    assert len(receiver.deliveries) == 1
    assert [m.status for m in _messages(endpoint)] == ["failed", "failed"]


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_in_seconds_is_honoured(world: World, status: int) -> None:
    with receiving(Receiver(secrets=[], script=[(status, {"Retry-After": "120"})])) as receiver:
        make_endpoint(world.tenant_a, receiver.url)
        fire(world.tenant_a)
        message = OutboxMessage.objects.get()
        assert alerts.deliver(message.pk) == "pending"
    message.refresh_from_db()
    attempt = DeliveryAttempt.objects.get(message=message)
    assert attempt.status_code == status
    assert message.next_attempt_at == attempt.started_at + attempt.duration + timedelta(seconds=120)


def test_retry_after_as_an_http_date_is_honoured(world: World) -> None:
    when = (datetime.now(UTC) + timedelta(hours=2)).replace(microsecond=0)
    header = email.utils.format_datetime(when, usegmt=True)
    with receiving(Receiver(secrets=[], script=[(503, {"Retry-After": header})])) as receiver:
        make_endpoint(world.tenant_a, receiver.url)
        fire(world.tenant_a)
        message = OutboxMessage.objects.get()
        alerts.deliver(message.pk)
    message.refresh_from_db()
    assert message.next_attempt_at == when


def test_retry_after_is_ignored_on_other_statuses_and_capped(world: World, settings: Any) -> None:
    received = timezone.now()
    assert alerts.retry_at("not a date", received) is None
    assert alerts.retry_at("999999999", received) == received + timedelta(
        seconds=settings.ALERTS_RETRY_AFTER_MAX_S
    )
    with receiving(Receiver(secrets=[], script=[(500, {"Retry-After": "7200"})])) as receiver:
        make_endpoint(world.tenant_a, receiver.url)
        fire(world.tenant_a)
        message = OutboxMessage.objects.get()
        alerts.deliver(message.pk)
    message.refresh_from_db()
    delay = message.next_attempt_at - DeliveryAttempt.objects.get().started_at
    assert delay <= timedelta(seconds=settings.ALERTS_BACKOFF_BASE_S + 5)


def test_delivery_gives_up_after_the_bound_and_says_so(
    world: World, settings: Any, client_for: Any
) -> None:
    settings.ALERTS_MAX_ATTEMPTS = 2
    with receiving(Receiver(secrets=[], script=[(500, {}), (502, {}), (500, {})])) as receiver:
        issued = make_endpoint(world.tenant_a, receiver.url)
        fire(world.tenant_a)
        message = OutboxMessage.objects.get()
        assert alerts.deliver(message.pk) == "pending"
        make_due(message)
        assert alerts.deliver(message.pk) == "dead"
        make_due(message)
        assert alerts.deliver(message.pk) == "not due"
    assert len(receiver.deliveries) == 2
    client = client_for(world.viewer_a)
    body = client.get(f"/api/v1/webhook-messages/{message.pk}/").json()
    assert body["status"] == "dead" and body["attempts"] == 2
    assert body["last_error"].startswith("HTTP 502")
    assert client.get(f"/api/v1/webhook-endpoints/{issued.obj.pk}/").json()["dead_messages"] == 1


def test_a_target_that_turned_private_is_refused_at_send_time(world: World) -> None:
    with receiving(Receiver(secrets=[])) as receiver:
        issued = make_endpoint(world.tenant_a, PUBLIC_URL)
        # its name now resolves to loopback (DNS changed): the row says what DNS would
        type(issued.obj).objects.filter(pk=issued.obj.pk).update(url=receiver.url)
        fire(world.tenant_a)
        message = OutboxMessage.objects.get()
        assert alerts.deliver(message.pk) == "pending"
    assert receiver.deliveries == []
    attempt = DeliveryAttempt.objects.get()
    assert attempt.status_code is None
    assert "Refused to send: 127.0.0.1 resolves to 127.0.0.1, a loopback address" in attempt.error


def test_a_resolve_waits_for_its_trigger_and_a_claim_is_taken_once(world: World) -> None:
    with receiving(Receiver(secrets=[], script=[(500, {})])) as receiver:
        issued = make_endpoint(world.tenant_a, receiver.url)
        fire(world.tenant_a)
        (firing,) = _messages(issued.obj)
        assert alerts.deliver(firing.pk) == "pending"  # 500: retried later
        fire(world.tenant_a, firing=False)
        firing, resolved = _messages(issued.obj)
        assert alerts.deliver(resolved.pk) == "not due"  # its trigger is still pending
        assert alerts.deliver(firing.pk) == "not due"  # not before its time
        assert alerts.deliver(resolved.pk) == "not due"
        make_due(firing)
        assert alerts.deliver(firing.pk) == "delivered"
        assert alerts.deliver(resolved.pk) == "delivered"
    assert [d.body["status"] for d in receiver.deliveries] == ["firing", "firing", "resolved"]


def test_fleet_alerts_go_to_platform_endpoints_only(world: World, client_for: Any) -> None:
    platform = make_endpoint(None, name="platform").obj
    tenant = make_endpoint(world.tenant_a, name="tenant").obj
    alert = fire(None, alertname="NodeUnreachable", node="gpu-1")
    assert alert.tenant_id is None
    assert len(_messages(platform)) == 1 and not _messages(tenant)
    assert client_for(world.admin_a).get(f"/api/v1/alerts/{alert.pk}/").status_code == 404
    assert client_for(world.platform).get(f"/api/v1/alerts/{alert.pk}/").status_code == 200
    assert fire(None, alertname="NodeUnreachable", node="gpu-1").pk == alert.pk


def test_sync_alert_refuses_bad_input(world: World) -> None:
    from django.core.exceptions import ValidationError

    with pytest.raises(ValidationError, match="severity"):
        alerts.sync_alert(
            tenant=world.tenant_a, labels={"a": "b"}, annotations={}, severity="x", firing=True
        )
    with pytest.raises(ValidationError, match="labels"):
        alerts.sync_alert(
            tenant=world.tenant_a, labels={}, annotations={}, severity="page", firing=True
        )
