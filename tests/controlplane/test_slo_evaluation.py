"""Burn-rate evaluation: the workbook's multi-window alerts fire for the right windows and
resolve, low traffic never pages, exhausted budgets and silent deployments are told, and
the state reaches Prometheus."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest
from django.utils import timezone
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from controlplane.alerts.models import Alert
from controlplane.fleet import services as fleet
from controlplane.inventory.models import Node
from controlplane.slo import services, tasks
from controlplane.slo.metrics import SloCollector
from controlplane.slo.sli import floor_to
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


def _firing(tenant: Any) -> set[tuple[str, str]]:
    return {
        (a.labels["alertname"], a.labels["window"])
        for a in Alert.objects.filter(tenant=tenant, state="firing")
    }


def _hourly(now: datetime, hours: int, good: int, total: int) -> list[tuple[datetime, int, int]]:
    return [(now - timedelta(hours=h, minutes=30), good, total) for h in range(hours)]


def test_a_fast_burn_pages_and_resolves_as_the_short_windows_clear(
    world: World, serving: Any
) -> None:
    now = _now()
    deployment = serving.deployment
    record_many(
        serving,
        [*_hourly(now, 30 * 24 - 1, 100, 100), (now - timedelta(minutes=2), 700, 1000)],
        deployment,
    )
    assert services.evaluate([serving.pk], now=now) == 1
    assert _firing(world.tenant_a) == {
        ("SLOBurnRatePage", "1h"),
        ("SLOBurnRatePage", "6h"),
        ("SLOBurnRateTicket", "1d"),
        ("SLOBurnRateTicket", "3d"),
    }
    page = Alert.objects.get(labels__alertname="SLOBurnRatePage", labels__window="1h")
    assert page.severity == "page"
    assert page.labels == {
        "alertname": "SLOBurnRatePage",
        "tenant": "tenant-a",
        "slo": "ttft",
        "deployment": "chat",
        "window": "1h",
    }
    assert "27.3x" in page.annotations["summary"]
    serving.status.refresh_from_db()
    assert serving.status.burn_rates["5m"] == pytest.approx(30.0)
    assert serving.status.budget_remaining_ratio == pytest.approx(1 - 300 / 729)

    # the same evaluation again changes nothing (and is skipped within the debounce)
    assert services.evaluate([serving.pk], now=now + timedelta(seconds=0.1)) == 0
    assert services.evaluate([serving.pk], now=now + timedelta(seconds=2)) == 1
    assert Alert.objects.filter(tenant=world.tenant_a).count() == 4

    # the burn stopped: ten minutes on, the 5 min window is clean and the fast page resolves
    services.evaluate([serving.pk], now=now + timedelta(minutes=10))
    assert ("SLOBurnRatePage", "1h") not in _firing(world.tenant_a)
    assert ("SLOBurnRatePage", "6h") in _firing(world.tenant_a)
    resolved = Alert.objects.get(labels__window="1h")
    assert resolved.state == "resolved" and resolved.ends_at == now + timedelta(minutes=10)
    # it says the rates it resolved at, not the ones it last fired at
    assert resolved.annotations["summary"] == "SLO ttft burns its error budget under 14.4x again"
    assert "and 0.00x over 5m" in resolved.annotations["description"]
    # forty minutes on, the 30 min window is clean too; tickets wait for their 2 h and 6 h
    services.evaluate([serving.pk], now=now + timedelta(minutes=40))
    assert _firing(world.tenant_a) == {("SLOBurnRateTicket", "1d"), ("SLOBurnRateTicket", "3d")}
    services.evaluate([serving.pk], now=now + timedelta(hours=7))
    assert _firing(world.tenant_a) == set()


def test_a_slow_burn_opens_only_the_slowest_ticket(world: World, serving: Any) -> None:
    now = _now()
    older = [(now - timedelta(days=3, hours=h, minutes=30), 100, 100) for h in range(26 * 24)]
    record_many(serving, [*_hourly(now, 72, 98, 100), *older], serving.deployment)
    services.evaluate([serving.pk], now=now)
    assert _firing(world.tenant_a) == {("SLOBurnRateTicket", "3d")}
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
    assert ("SLOBurnRatePage", "1h") in _firing(world.tenant_a)
    assert ("SLOErrorBudgetExhausted", "30d") in _firing(world.tenant_a)


def test_an_exhausted_budget_is_told_once(world: World, serving: Any) -> None:
    now = _now()
    record_many(serving, _hourly(now, 30 * 24 - 1, 985, 1000), serving.deployment)  # 1.5x
    services.evaluate([serving.pk], now=now)
    assert _firing(world.tenant_a) == {
        ("SLOErrorBudgetExhausted", "30d"),
        ("SLOBurnRateTicket", "3d"),
    }
    exhausted = Alert.objects.get(labels__alertname="SLOErrorBudgetExhausted")
    assert exhausted.severity == "ticket"
    services.evaluate([serving.pk], now=now + timedelta(minutes=1))
    assert Alert.objects.filter(labels__alertname="SLOErrorBudgetExhausted").count() == 1


def test_silence_from_a_deployment_with_replicas_is_told(
    world: World, serving: Any, settings: Any
) -> None:
    settings.SLO_NO_DATA_AFTER_S = 600
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
    services.evaluate(None, now=now)
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
