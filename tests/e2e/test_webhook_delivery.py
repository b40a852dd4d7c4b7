"""Webhooks survive a Celery worker killed mid-delivery: messages live in PostgreSQL until
delivered, so after a restart the receiver has every one, each properly signed."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from controlplane import processes
from controlplane.alerts.models import DeliveryAttempt, OutboxMessage
from controlplane.tenancy.services import create_tenant
from tests.controlplane.alerts_helpers import Receiver, fire, make_endpoint, receiving
from tests.e2e.stack import running_stack, wait_for

ALERTS = 5


@pytest.mark.e2e
def test_a_worker_killed_mid_delivery_loses_nothing(
    transactional_db: Any, tmp_path: Path, free_port: int
) -> None:
    tenant = create_tenant(slug="acme", name="Acme")
    hold = threading.Event()
    with (
        receiving(Receiver(secrets=[], hold=hold)) as receiver,
        running_stack(
            tmp_path,
            free_port,
            ALERTS_DELIVERY_TIMEOUT_S="2",  # a claim then lapses after 9 s
            ALERTS_SWEEP_INTERVAL_S="1",
            ALERTS_BACKOFF_BASE_S="1",
        ) as stack,
    ):
        issued = make_endpoint(tenant, receiver.url)  # 127.0.0.1: allowed by the endpoint flag
        receiver.secrets.append(issued.secret)
        for index in range(ALERTS):
            fire(tenant, alertname=f"Burn{index}")  # committed: the deliveries are enqueued
        messages = list(OutboxMessage.objects.filter(endpoint=issued.obj))
        assert len(messages) == ALERTS

        in_flight = wait_for(lambda: receiver.deliveries, 60, "the worker to start a delivery")[0]
        worker = stack.procs.pop("celery")
        stack.kill_group(worker)  # SIGKILL while the receiver still holds the request
        assert not DeliveryAttempt.objects.exists()  # it died before recording anything
        assert OutboxMessage.objects.filter(status="pending").count() == ALERTS

        hold.set()  # the receiver answers at once from now on
        stack.spawn("celery", processes.celery_worker(tmp_path / "beat-schedule"))
        wait_for(
            lambda: OutboxMessage.objects.filter(status="delivered").count() == ALERTS,
            90,
            "every message to be delivered after the restart",
        )

    assert receiver.ids() == {m.webhook_id for m in messages}
    # at least once: the send cut short came again, under the same webhook-id
    ids = [d.headers["webhook-id"] for d in receiver.deliveries]
    assert ids.count(in_flight.headers["webhook-id"]) == 2 and len(ids) == ALERTS + 1
    assert all(d.verified_by == [issued.secret] for d in receiver.deliveries)
    names = {d.body["alerts"][0]["labels"]["alertname"] for d in receiver.deliveries}
    assert names == {f"Burn{index}" for index in range(ALERTS)}
