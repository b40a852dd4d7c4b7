"""The demo tour's pieces on their own: fitting acme's TPOT threshold to the machine from
what its workers measured, and the receiver that keeps only verified webhooks."""

from __future__ import annotations

import json
import socket
from datetime import timedelta
from typing import Any

import httpx
import pytest
from django.utils import timezone
from standardwebhooks import Webhook

from controlplane import tour
from controlplane.alerts import services as alerts
from controlplane.alerts.models import Alert, OutboxMessage
from controlplane.fleet import services as fleet
from controlplane.fleet.models import Deployment
from controlplane.slo import services
from controlplane.slo.models import Slo, SloStatus
from controlplane.telemetry.choices import Resolution
from controlplane.telemetry.models import CounterRollup, LatencyRollup
from controlplane.telemetry.pipeline.merge import bucket_of
from controlplane.tenancy.models import Tenant
from controlplane.tenancy.services import seed_demo
from dataplane.sketch import LatencySketch


@pytest.fixture
def acme(db: Any) -> Any:
    tenant = seed_demo().tenant
    fleet.create_deployment(
        tenant=tenant, name="chat", model_name="demo-chat", artifact_uri="synthetic://chat"
    )
    tour.seed_tour(tenant, "http://127.0.0.1:9/alerts")
    return tenant


def record_tpot(tenant: Any, seconds: list[float], ago_s: float) -> None:
    """As ingest does: the same sketch merged into every resolution's bucket."""
    sketch = LatencySketch()
    for value in seconds:
        sketch.add(value)
    when = timezone.now() - timedelta(seconds=ago_s)
    for resolution in Resolution:
        row, _ = LatencyRollup.objects.get_or_create(
            resolution=resolution,
            bucket=bucket_of(when, resolution),
            tenant=tenant,
            deployment=Deployment.objects.get(tenant=tenant, name="chat"),
            metric="tpot",
            defaults={"count": 0, "sketch": LatencySketch().to_bytes()},
        )
        merged = LatencySketch.from_bytes(bytes(row.sketch))
        merged.merge(sketch)
        row.count, row.sketch = merged.count, merged.to_bytes()
        row.save()


def test_the_tpot_threshold_is_fitted_to_what_acme_measured_since_the_start(acme: Any) -> None:
    started = timezone.now() - timedelta(seconds=60)
    record_tpot(acme, [0.010] * 40, ago_s=600)  # before the tour: not counted
    record_tpot(acme, [0.001 * (i % 10 + 1) for i in range(30)], ago_s=40)
    assert tour.calibrate_tpot_slo(acme, started) is None  # 30 requests are too few to fit
    record_tpot(acme, [0.001 * (i % 10 + 1) for i in range(30)], ago_s=20)

    fitted = tour.calibrate_tpot_slo(acme, started)
    assert fitted is not None
    p90, threshold = fitted
    assert p90 == pytest.approx(0.009, rel=0.02)  # the DDSketch's 1 % accuracy, not 10 ms
    assert threshold == round(tour.TPOT_HEADROOM * p90, 4)
    slo = Slo.objects.get(tenant=acme, name="chat-tpot")
    assert slo.threshold_seconds == threshold
    assert f"{threshold * 1000:.1f} ms" in slo.display_name
    # the fitted threshold starts the revision the story is told against (the first try,
    # without enough data, started one too: counts from then on, not before)
    assert slo.revision == 3 and slo.revision_started_at is not None
    assert slo.revisions.get(number=2).threshold_seconds == 0.05


def record_tokens(tenant: Any, tokens: int, ago_s: float) -> None:
    """As ingest does: output tokens of ``tenant`` on chat in every resolution's bucket."""
    when = timezone.now() - timedelta(seconds=ago_s)
    chat = Deployment.objects.get(name="chat")
    for resolution in Resolution:
        row, _ = CounterRollup.objects.get_or_create(
            resolution=resolution,
            bucket=bucket_of(when, resolution),
            tenant=tenant,
            deployment=chat,
            name="output_tokens",
        )
        row.value += tokens
        row.save()


def test_tpot_and_throughput_are_read_from_settled_buckets_of_both_tenants(acme: Any) -> None:
    """acme's TPOT p90 and both tenants' output tokens per second, over the latest 30 s
    of whole buckets that ended at least 10 s ago (what came since may not have arrived
    from every node yet)."""
    globex = Tenant.objects.get(slug=tour.NOISY_SLUG)
    now = timezone.now()
    start = tour.last_settled_span(now)
    assert start == tour.span_at_or_after(start) and tour.settled(start) <= now
    inside = (now - start).total_seconds() - 5
    record_tpot(acme, [0.001 * (i % 10 + 1) for i in range(30)], ago_s=inside)
    record_tokens(acme, 300, ago_s=inside)
    record_tokens(globex, 600, ago_s=inside)
    for ago_s in (inside - tour.MEASURED_S, inside + 10):  # after the span, and before it
        record_tpot(acme, [0.5] * 30, ago_s=ago_s)
        record_tokens(globex, 5000, ago_s=ago_s)
    p90, rate = tour.tpot_and_throughput(acme, start)
    assert p90 == pytest.approx(0.009, rel=0.02)
    assert rate == (300 + 600) / tour.MEASURED_S


def test_steps_are_sized_to_acme_s_objective_until_the_next_run(acme: Any) -> None:
    assert tour.size_steps_to_tpot(acme) == 0.05  # chat-tpot's seeded threshold
    assert Deployment.objects.get(name="chat").tpot_steps
    tour.seed_tour(acme, "http://127.0.0.1:9/alerts")
    assert not Deployment.objects.get(name="chat").tpot_steps


def test_a_second_run_on_kept_data_starts_a_fresh_story(acme: Any) -> None:
    slo = Slo.objects.get(tenant=acme, name="chat-tpot")
    services.update_slo(slo, threshold_seconds=0.02)
    alerts.sync_alert(
        tenant=acme,
        labels={"alertname": "SLOBurnRatePage", "tenant": acme.slug, "slo": "chat-tpot"},
        annotations={},
        severity="page",
        firing=True,
    )
    SloStatus.objects.filter(slo=slo).update(
        firing={
            "k": {
                "labels": {"alertname": "SLOBurnRatePage", "tenant": acme.slug, "slo": "chat-tpot"},
                "annotations": {},
                "severity": "page",
            }
        },
        budget_remaining_ratio=-25.0,
    )
    tour.seed_tour(acme, "http://127.0.0.1:9/alerts")
    slo.refresh_from_db()
    assert slo.threshold_seconds == 0.05 and slo.revision == 3  # seeded again, anew
    status = SloStatus.objects.get(slo=slo)
    assert status.budget_remaining_ratio == 1.0 and status.firing == {}
    assert not Alert.objects.filter(state="firing").exists()  # the last run's are history
    assert not OutboxMessage.objects.exists()  # and nothing about them goes to this run


def test_the_receiver_keeps_verified_deliveries_and_refuses_the_rest(acme: Any) -> None:
    printed: list[str] = []
    receiver = tour.WebhookReceiver(lambda status, alert: printed.append(status))
    receiver.secret = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    page = {"status": "firing", "labels": {"alertname": "SLOBurnRatePage", "tenant": "acme"}}
    body = json.dumps({"alerts": [page]})
    try:
        signed = Webhook(receiver.secret).sign("msg_1", timezone.now(), body)
        headers = {"webhook-id": "msg_1", "webhook-timestamp": str(int(timezone.now().timestamp()))}
        forged = httpx.post(
            receiver.url, content=body, headers={**headers, "webhook-signature": "v1,AAAA"}
        )
        assert forged.status_code == 401
        assert receiver.received == [] and printed == ["unverified"]
        assert not receiver.got("firing", "SLOBurnRatePage")

        good = httpx.post(
            receiver.url, content=body, headers={**headers, "webhook-signature": signed}
        )
        assert good.status_code == 204
        assert receiver.got("firing", "SLOBurnRatePage")
        assert not receiver.got("firing", "SLOBurnRatePage", since=1)
        assert not receiver.got("resolved", "SLOBurnRatePage")
    finally:
        receiver.close()


def test_stopping_the_load_abandons_the_requests_under_way() -> None:
    """A stop does not wait for answers: here none ever comes, where the client would
    wait its 60 s timeout (the stop's own wait is 30 s)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        listener.settimeout(60)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        load = tour.LoadGenerator((url, "k1", "m"), (url, "k2", "m"), noisy_clients=2)
        load.start()
        held, _ = listener.accept()  # a request is under way
        with held:
            load.stop()
            assert not load._thread.is_alive()
