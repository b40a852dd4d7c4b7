"""Burn-rate evaluation: the workbook's windows fold into one alert per severity, which
fires once and resolves after its hold time; an outage is one notification per SLO and
endpoint; low traffic never pages; exhausted budgets and deployments gone silent (not
idle ones) are told; a changed definition counts only its own events; and the state
reaches Prometheus."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest
from django.utils import timezone
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from controlplane.alerts import services as alerts
from controlplane.alerts.models import Alert, OutboxMessage
from controlplane.fleet import services as fleet
from controlplane.inventory.models import Node
from controlplane.slo import services, tasks
from controlplane.slo.metrics import SloCollector
from controlplane.slo.models import SloRevision
from controlplane.slo.sli import floor_to
from controlplane.telemetry.models import SloRollup
from tests.controlplane.alerts_helpers import Receiver, make_due, make_endpoint, receiving
from tests.controlplane.conftest import World, make_node
from tests.controlplane.test_slo_math import make_deployment, make_slo, record, record_many


@pytest.fixture
def serving(world: World, settings: Any) -> Any:
    """A placed deployment of tenant A and a deployment-scoped TTFT SLO on it (99%, 30 d);
    hourly test traffic is not silence."""
    settings.SLO_NO_DATA_AFTER_S = 12 * 3600
    node = make_node("gpu-a", world.tenant_a)
    Node.objects.filter(pk=node.pk).update(status="ready")
    deployment = make_deployment(world.tenant_a, "chat")
    assert deployment.instances.filter(node=node).exists()
    return make_slo(world.tenant_a, scope="deployment", deployment=deployment)


def _now() -> datetime:
    """An hour ahead of the clock: the SLO and deployment are old enough to expect data."""
    return floor_to(timezone.now(), 60) + timedelta(hours=1, seconds=1)


def _firing(tenant: Any) -> set[str]:
    return {a.labels["alertname"] for a in Alert.objects.filter(tenant=tenant, state="firing")}


def _hourly(now: datetime, hours: int, good: int, total: int) -> list[tuple[datetime, int, int]]:
    return [(now - timedelta(hours=h, minutes=30), good, total) for h in range(hours)]


def test_a_fast_burn_pages_once_and_resolves_after_the_hold(
    world: World, serving: Any, settings: Any
) -> None:
    settings.ALERTS_KEEP_FIRING_FOR_S = 300
    now = _now()
    deployment = serving.deployment
    record_many(
        serving,
        [*_hourly(now, 30 * 24 - 1, 100, 100), (now - timedelta(minutes=2), 700, 1000)],
        deployment,
    )
    assert services.evaluate([serving.pk], now=now) == 1
    # the page windows fold into one page, the ticket windows into one ticket
    assert _firing(world.tenant_a) == {"SLOBurnRatePage", "SLOBurnRateTicket"}
    page = Alert.objects.get(labels__alertname="SLOBurnRatePage")
    assert page.severity == "page"
    assert page.labels == {
        "alertname": "SLOBurnRatePage",
        "tenant": "tenant-a",
        "slo": "ttft",
        "deployment": "chat",
    }
    assert "(threshold 6x)" in page.annotations["summary"]
    assert "14.4x: 27.27x over 1h and 30.00x over 5m" in page.annotations["description"]
    serving.status.refresh_from_db()
    assert serving.status.burn_rates["5m"] == pytest.approx(30.0)
    assert serving.status.budget_remaining_ratio == pytest.approx(1 - 300 / 729)

    # the same evaluation again changes nothing (and is skipped within the debounce)
    assert services.evaluate([serving.pk], now=now + timedelta(seconds=0.1)) == 0
    assert services.evaluate([serving.pk], now=now + timedelta(seconds=2)) == 1
    assert Alert.objects.filter(tenant=world.tenant_a).count() == 2

    # ten minutes on the 5 min window is clean, but the 30 min one still burns: still paged,
    # its annotations updated to what it burns at now
    services.evaluate([serving.pk], now=now + timedelta(minutes=10))
    page.refresh_from_db()
    assert (
        page.state == "firing"
        and "14.4x: 27.27x over 1h and 0.00x over 5m" in (page.annotations["description"])
    )
    # forty minutes on every page window is calm: it keeps firing through the hold time
    services.evaluate([serving.pk], now=now + timedelta(minutes=40))
    assert "SLOBurnRatePage" in _firing(world.tenant_a)
    services.evaluate([serving.pk], now=now + timedelta(minutes=44))
    assert "SLOBurnRatePage" in _firing(world.tenant_a)
    services.evaluate([serving.pk], now=now + timedelta(minutes=45))
    assert _firing(world.tenant_a) == {"SLOBurnRateTicket"}
    page.refresh_from_db()
    assert page.state == "resolved" and page.ends_at == now + timedelta(minutes=45)
    # it says the rates it resolved at, not the ones it last fired at
    assert "under its page thresholds" in page.annotations["summary"]
    assert "and 0.00x over 30m" in page.annotations["description"]
    services.evaluate([serving.pk], now=now + timedelta(hours=7))
    services.evaluate([serving.pk], now=now + timedelta(hours=7, minutes=5))
    assert _firing(world.tenant_a) == set()


def test_a_burn_rate_hovering_at_its_threshold_fires_once_and_resolves_once(
    world: World, serving: Any, settings: Any
) -> None:
    """Two minutes of a burn rate flipping across the page threshold at every evaluation,
    then calm: one firing and one resolved delivery."""
    settings.ALERTS_KEEP_FIRING_FOR_S = 60
    settings.ALERTS_GROUP_WAIT_S = settings.ALERTS_GROUP_INTERVAL_S = 0
    settings.SLO_EVALUATE_DEBOUNCE_S = 0
    start = _now()
    chat = serving.deployment
    with receiving(Receiver(secrets=[])) as receiver:
        issued = make_endpoint(world.tenant_a, receiver.url)
        receiver.secrets.append(issued.secret)
        bad = total = 0

        def step(at: datetime, ratio: float) -> None:
            """Add the events that bring the bad share of everything so far to `ratio`."""
            nonlocal bad, total
            if bad / max(total, 1) < ratio:  # bad events: (bad + b) / (total + b) = ratio
                added = max(1, round((ratio * total - bad) / (1 - ratio)))
                record(serving, at, good=0, total=added, deployment=chat)
                bad, total = bad + added, total + added
            else:  # good events: bad / (total + g) = ratio
                added = max(1, round(bad / ratio - total))
                record(serving, at, good=added, total=added, deployment=chat)
                total += added
            services.evaluate([serving.pk], now=at + timedelta(seconds=1))
            pending = list(OutboxMessage.objects.filter(status="pending"))
            make_due(*pending)
            for message in pending:
                alerts.deliver(message.pk)

        record(serving, start - timedelta(seconds=10), good=80, total=100, deployment=chat)
        bad, total = 20, 100
        for i in range(1, 14):  # 20x and 5x in turn: over and under 14.4x (and 6x)
            step(start + timedelta(seconds=10 * i), 0.2 if i % 2 else 0.05)
        for i in range(14, 26):  # calm: 0.5x
            step(start + timedelta(seconds=10 * i), 0.005)

    page = [
        [a["status"] for a in d.body["alerts"] if a["labels"]["alertname"] == "SLOBurnRatePage"]
        for d in receiver.deliveries
    ]
    assert [p for p in page if p] == [["firing"], ["resolved"]], page
    assert all(d.verified_by for d in receiver.deliveries)
    assert Alert.objects.filter(labels__alertname="SLOBurnRatePage").count() == 1


def test_an_outage_pages_once_per_slo_delivered_once_per_endpoint(
    world: World, serving: Any, settings: Any
) -> None:
    settings.SLO_ALERT_MIN_EVENTS = 10
    tpot = make_slo(
        world.tenant_a,
        name="tpot",
        sli="tpot",
        threshold_seconds=0.05,
        scope="deployment",
        deployment=serving.deployment,
    )
    now = _now()
    with receiving(Receiver(secrets=[])) as receiver:
        for name in ("pager", "chat-ops"):
            issued = make_endpoint(world.tenant_a, receiver.url, name=name)
            receiver.secrets.append(issued.secret)
        for i in range(6):  # a minute of nothing but bad requests, evaluated as it goes
            for slo in (serving, tpot):
                at = now + timedelta(seconds=10 * i)
                record(slo, at, good=0, total=50, deployment=serving.deployment)
            services.evaluate(None, now=now + timedelta(seconds=10 * i + 1))
        pending = list(OutboxMessage.objects.filter(status="pending"))
        make_due(*pending)
        for message in pending:
            alerts.deliver(message.pk)
    assert Alert.objects.filter(labels__alertname="SLOBurnRatePage").count() == 2
    pages = sorted(
        (bool(d.verified_by), d.body["receiver"], d.body["groupLabels"]["slo"])
        for d in receiver.deliveries
        if d.body["groupLabels"]["severity"] == "page"
    )
    assert pages == [
        (True, "chat-ops", "tpot"),
        (True, "chat-ops", "ttft"),
        (True, "pager", "tpot"),
        (True, "pager", "ttft"),
    ]
    for delivery in receiver.deliveries:  # one SLO's page, or apart from it its tickets
        names = [a["labels"]["alertname"] for a in delivery.body["alerts"]]
        assert delivery.body["status"] == "firing"
        assert names == ["SLOBurnRatePage"] or "SLOBurnRatePage" not in names
    assert len(receiver.deliveries) == 2 * 2 * 2  # (page, tickets) x SLOs x endpoints


def test_a_slow_burn_opens_only_the_ticket(world: World, serving: Any) -> None:
    now = _now()
    older = [(now - timedelta(days=3, hours=h, minutes=30), 100, 100) for h in range(26 * 24)]
    record_many(serving, [*_hourly(now, 72, 98, 100), *older], serving.deployment)
    services.evaluate([serving.pk], now=now)
    assert _firing(world.tenant_a) == {"SLOBurnRateTicket"}
    ticket = Alert.objects.get(labels__alertname="SLOBurnRateTicket")
    assert "2.0x over 3d (threshold 1x)" in ticket.annotations["summary"]
    serving.status.refresh_from_db()
    assert serving.status.burn_rates["3d"] == pytest.approx(2.0)


def test_low_traffic_does_not_page(world: World, serving: Any, settings: Any) -> None:
    now = _now()
    record(serving, now - timedelta(minutes=1), good=5, total=10, deployment=serving.deployment)
    settings.SLO_ALERT_MIN_EVENTS = 100
    services.evaluate([serving.pk], now=now)
    assert _firing(world.tenant_a) == set()
    serving.status.refresh_from_db()
    assert serving.status.burn_rates["5m"] == pytest.approx(50.0)  # measured, just not paged

    settings.SLO_ALERT_MIN_EVENTS = 10
    services.evaluate([serving.pk], now=now + timedelta(seconds=10))
    assert {"SLOBurnRatePage", "SLOErrorBudgetExhausted"} <= _firing(world.tenant_a)


def test_an_exhausted_budget_is_told_once(world: World, serving: Any) -> None:
    now = _now()
    record_many(serving, _hourly(now, 30 * 24 - 1, 985, 1000), serving.deployment)  # 1.5x
    services.evaluate([serving.pk], now=now)
    assert _firing(world.tenant_a) == {"SLOErrorBudgetExhausted", "SLOBurnRateTicket"}
    exhausted = Alert.objects.get(labels__alertname="SLOErrorBudgetExhausted")
    assert exhausted.severity == "ticket" and exhausted.labels["window"] == "30d"
    services.evaluate([serving.pk], now=now + timedelta(minutes=1))
    assert Alert.objects.filter(labels__alertname="SLOErrorBudgetExhausted").count() == 1


def test_silence_after_traffic_is_told_and_an_idle_deployment_is_not(
    world: World, serving: Any, settings: Any
) -> None:
    settings.SLO_NO_DATA_AFTER_S = 600
    settings.ALERTS_KEEP_FIRING_FOR_S = 0
    idle = fleet.create_deployment(
        tenant=world.tenant_a,
        name="idle",
        model_name="idle",
        artifact_uri="synthetic://i",
        replicas=0,
    )
    make_slo(world.tenant_a, name="idle-ttft", scope="deployment", deployment=idle)
    now = _now()
    assert tasks.evaluate_all.apply(kwargs={}).get() >= 0  # the beat's entry point
    # chat has replicas but was never used: idle, not silent
    services.evaluate(None, now=now)
    assert not Alert.objects.filter(tenant=world.tenant_a).exists()

    record(serving, now - timedelta(minutes=30), good=3, total=3, deployment=serving.deployment)
    services.evaluate(None, now=now + timedelta(seconds=10))
    no_data = Alert.objects.get(tenant=world.tenant_a, state="firing")
    assert no_data.labels == {
        "alertname": "SLONoData",
        "tenant": "tenant-a",
        "slo": "ttft",
        "deployment": "chat",
        "window": "10m",
    }
    record(serving, now + timedelta(seconds=20), good=3, total=3, deployment=serving.deployment)
    services.evaluate(None, now=now + timedelta(seconds=30))
    no_data.refresh_from_db()
    assert no_data.state == "resolved"


def test_a_threshold_change_starts_a_revision_that_counts_only_its_own_events(
    world: World, serving: Any, settings: Any
) -> None:
    settings.SLO_ALERT_MIN_EVENTS = 10
    now = _now()
    chat = serving.deployment
    record(serving, now - timedelta(minutes=20), good=10, total=100, deployment=chat)  # 0.5 s
    services.evaluate([serving.pk], now=now - timedelta(minutes=10))
    assert "SLOBurnRatePage" in _firing(world.tenant_a)

    changed = now - timedelta(minutes=5)
    services.update_slo(serving, threshold_seconds=2.0, now=changed)
    serving.refresh_from_db()
    assert serving.revision == 2 and serving.revision_started_at == changed
    assert _firing(world.tenant_a) == set()  # the old definition's alerts are history
    # late counts under the old threshold, after the change: neither revision's
    old = SloRollup.objects.filter(threshold_seconds=0.5).first()
    assert old is not None
    record(serving, now - timedelta(minutes=4), good=99, total=100, deployment=chat)
    SloRollup.objects.create(
        resolution=10,
        bucket=floor_to(now - timedelta(minutes=3), 10),
        slo_id=serving.pk,
        deployment=chat,
        tenant=world.tenant_a,
        metric="ttft",
        threshold_seconds=0.5,
        good=0,
        total=500,
    )
    services.evaluate([serving.pk], now=now)
    serving.status.refresh_from_db()
    assert (serving.status.good, serving.status.total) == (99, 100)
    assert serving.status.budget_remaining_ratio == pytest.approx(0.0)
    assert _firing(world.tenant_a) == set() or "SLOBurnRatePage" not in _firing(world.tenant_a)
    first, second = SloRevision.objects.filter(slo=serving).order_by("number")
    assert (first.threshold_seconds, first.ended_at) == (0.5, changed)
    assert (second.threshold_seconds, second.started_at, second.ended_at) == (2.0, changed, None)
    # an objective change alone starts a revision too, with the same threshold
    services.update_slo(serving, objective=0.95, now=now)
    assert SloRevision.objects.filter(slo=serving).count() == 3
    # and so does measuring something else: TTFT counts never pass for TPOT ones
    services.update_slo(serving, sli="tpot", now=now + timedelta(seconds=1))
    assert SloRevision.objects.filter(slo=serving).count() == 4


def test_deleting_an_slo_resolves_its_alerts(world: World, serving: Any, settings: Any) -> None:
    settings.SLO_ALERT_MIN_EVENTS = 1
    now = _now()
    record(serving, now - timedelta(minutes=1), good=0, total=50, deployment=serving.deployment)
    services.evaluate([serving.pk], now=now)
    assert Alert.objects.filter(state="firing").exists()
    services.delete_slo(serving, now=now)
    assert not Alert.objects.filter(state="firing").exists()


def test_the_evaluate_task_debounces(world: World, serving: Any, settings: Any) -> None:
    settings.SLO_EVALUATE_DEBOUNCE_S = 3600
    assert tasks.evaluate.apply(kwargs={"slo_ids": [str(serving.pk)]}).get() == 1
    assert tasks.evaluate.apply(kwargs={"slo_ids": [str(serving.pk)]}).get() == 0


def test_slo_state_for_prometheus(world: World, serving: Any) -> None:
    now = _now()
    record(serving, now - timedelta(minutes=1), good=995, total=1000, deployment=serving.deployment)
    make_slo(world.tenant_b, name="never-evaluated")
    services.evaluate([serving.pk], now=now)
    registry = CollectorRegistry()
    registry.register(SloCollector())
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for sample in family.samples
    }
    a = (("slo", "ttft"), ("tenant", "tenant-a"))
    assert samples[("tailguard_slo_objective_ratio", a)] == 0.99
    never = (("slo", "never-evaluated"), ("tenant", "tenant-b"))
    assert samples[("tailguard_slo_objective_ratio", never)] == 0.99
    assert ("tailguard_slo_achieved_ratio", never) not in samples
    assert samples[("tailguard_slo_achieved_ratio", a)] == 0.995
    assert samples[("tailguard_slo_error_budget_remaining_ratio", a)] == pytest.approx(0.5)
    assert samples[("tailguard_slo_burn_rate", (*a, ("window", "5m")))] == pytest.approx(0.5)
    assert {labels for name, labels in samples if name == "tailguard_slo_burn_rate"} == {
        (*a, ("window", w)) for w in ("5m", "1h", "30m", "6h", "2h", "1d", "3d")
    }
