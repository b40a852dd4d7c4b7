"""Per-tenant SLO reports: JSON, CSV and PDF from the API, HTML in the console, each only
for the caller's own tenants."""

from __future__ import annotations

import csv
import io
from datetime import datetime, timedelta
from typing import Any

import pytest
from django.test import Client
from django.utils import timezone

from controlplane.slo import reports, services
from controlplane.slo.sli import floor_to
from controlplane.telemetry.choices import Resolution
from controlplane.telemetry.models import LatencyRollup
from dataplane.sketch import LatencySketch
from tests.controlplane.conftest import World
from tests.controlplane.test_slo_math import make_deployment, make_slo, record


@pytest.fixture
def period(world: World, settings: Any) -> tuple[datetime, datetime]:
    """Tenant A: a TTFT SLO with 2% bad events in the last hour (an alert fired), and
    latency sketches; tenant B: an SLO of its own."""
    settings.SLO_ALERT_MIN_EVENTS = 10
    now = timezone.now()
    chat = make_deployment(world.tenant_a, "chat")
    slo = make_slo(
        world.tenant_a, display_name="Chat TTFT <p99>", scope="deployment", deployment=chat
    )
    make_slo(world.tenant_b, name="theirs")
    record(slo, now - timedelta(minutes=30), good=980, total=1000, deployment=chat)
    services.evaluate([slo.pk], now=now)
    sketch = LatencySketch()
    for i in range(1, 1001):
        sketch.add(i / 1000)
    for resolution in Resolution.values:  # as ingest merges it
        LatencyRollup.objects.create(
            resolution=resolution,
            bucket=floor_to(now - timedelta(minutes=30), resolution),
            tenant=world.tenant_a,
            deployment=chat,
            metric="ttft",
            count=1000,
            sketch=sketch.to_bytes(),
        )
    return now - timedelta(hours=2), now + timedelta(minutes=1)


def _query(world: World, start: datetime, end: datetime, **extra: str) -> dict[str, str]:
    return {
        "tenant": str(world.tenant_a.id),
        "from": start.isoformat(),
        "to": end.isoformat(),
        **extra,
    }


def test_json_report(world: World, client_for: Any, period: Any) -> None:
    response = client_for(world.viewer_a).get("/api/v1/slo-reports/", _query(world, *period))
    assert response.status_code == 200, response.content
    report = response.json()
    assert report["tenant"]["slug"] == "tenant-a"
    [slo] = report["slos"]
    assert (slo["name"], slo["good"], slo["total"], slo["objective"]) == ("ttft", 980, 1000, 0.99)
    assert slo["achieved_ratio"] == 0.98 and slo["met"] is False
    assert slo["budget_consumed_ratio"] == pytest.approx(2.0)
    burn = [p["budget_remaining_ratio"] for p in slo["burn"]]
    assert len(burn) == 48 and burn[0] == 1.0 and burn[-1] == pytest.approx(-1.0)
    # a 2x burn: only the slowest ticket, and the budget is spent
    assert {a["alertname"] for a in report["alerts"]} == {
        "SLOBurnRateTicket",
        "SLOErrorBudgetExhausted",
    }
    assert {a["id"] for a in slo["alerts"]} == {a["id"] for a in report["alerts"]}
    [latency] = report["latency"]
    assert (latency["deployment_name"], latency["metric"], latency["count"]) == (
        "chat",
        "ttft",
        1000,
    )
    assert latency["p99"] == pytest.approx(0.99, rel=0.01)
    assert latency["p50"] == pytest.approx(0.5, rel=0.01)


def test_csv_and_pdf_downloads(world: World, client_for: Any, period: Any) -> None:
    client = client_for(world.admin_a)
    response = client.get("/api/v1/slo-reports/", _query(world, *period, format="csv"))
    assert response.status_code == 200, response.content
    assert response["Content-Type"].startswith("text/csv")
    assert response["Content-Disposition"].startswith('attachment; filename="slo-report-tenant-a-')
    rows = list(csv.DictReader(io.StringIO(response.content.decode())))
    slo_row = next(r for r in rows if r["record"] == "slo")
    assert (slo_row["slo"], slo_row["good"], slo_row["total"], slo_row["achieved_ratio"]) == (
        "ttft",
        "980",
        "1000",
        "0.98",
    )
    latency_row = next(r for r in rows if r["record"] == "latency")
    assert (latency_row["deployment"], latency_row["metric"]) == ("chat", "ttft")
    assert float(latency_row["p99"]) == pytest.approx(0.99, rel=0.01)

    response = client.get("/api/v1/slo-reports/", _query(world, *period, format="pdf"))
    assert response.status_code == 200
    assert response["Content-Type"] == "application/pdf"
    assert response.content.startswith(b"%PDF-") and b"%%EOF" in response.content[-64:]


def test_bad_periods_and_formats_are_json_400s(world: World, client_for: Any, period: Any) -> None:
    client = client_for(world.admin_a)
    start, end = period
    cases = [
        ({"from": "yesterday"}, "from", "ISO 8601"),
        ({"from": end.isoformat(), "to": start.isoformat()}, "from", "before"),
        ({"from": (end - timedelta(days=500)).isoformat()}, "from", "at most 400 days"),
        ({"format": "xml"}, "format", "json, csv, pdf"),
        ({"format": "csv", "to": "2026-02-30"}, "detail", "day is out of range"),
        ({"tenant": "acme"}, "tenant", "UUID"),
    ]
    for change, field, words in cases:
        response = client.get("/api/v1/slo-reports/", {**_query(world, start, end), **change})
        assert response.status_code == 400, (change, response.content)
        assert response["Content-Type"] == "application/json"
        assert words in str(response.json()[field]), (change, response.json())
    assert client.get("/api/v1/slo-reports/", {"from": start.isoformat()}).status_code == 400


@pytest.mark.parametrize("fmt", ["json", "csv", "pdf"])
def test_reports_keep_tenants_apart(world: World, client_for: Any, period: Any, fmt: str) -> None:
    theirs = {**_query(world, *period, format=fmt), "tenant": str(world.tenant_b.id)}
    assert client_for(world.admin_a).get("/api/v1/slo-reports/", theirs).status_code == 404
    assert client_for(world.viewer_a).get("/api/v1/slo-reports/", theirs).status_code == 404
    mine = client_for(world.admin_b).get("/api/v1/slo-reports/", theirs)
    assert mine.status_code == 200
    platform = client_for(world.platform)
    assert platform.get("/api/v1/slo-reports/", theirs).status_code == 200
    if fmt == "json":
        assert [s["name"] for s in mine.json()["slos"]] == ["theirs"]
        assert mine.json()["alerts"] == [] and mine.json()["latency"] == []
    assert Client().get("/api/v1/slo-reports/", theirs).status_code == 401


def test_console_report_page(world: World, period: Any) -> None:
    start, end = period
    client = Client()
    page = f"/console/tenants/{world.tenant_a.id}/slo-report/"
    assert client.get(page).status_code == 302  # to the login page
    client.force_login(world.viewer_a)
    response = client.get(page, {"from": start.isoformat(), "to": end.isoformat()})
    assert response.status_code == 200
    html = response.content.decode()
    assert "Chat TTFT &lt;p99&gt;" in html and "<p99>" not in html
    assert "<svg" in html and "<polyline" in html
    assert "98.000%" in html and "99.000%" in html
    assert "SLOErrorBudgetExhausted" in html
    assert "format=pdf" in html and "format=csv" in html
    assert client.get(page, {"from": "soon"}).status_code == 400
    assert "ISO 8601" in client.get(page, {"from": "soon"}).content.decode()
    assert client.get(f"/console/tenants/{world.tenant_b.id}/slo-report/").status_code == 404
    client.force_login(world.platform)
    assert client.get(f"/console/tenants/{world.tenant_b.id}/slo-report/").status_code == 200


def test_a_report_spanning_a_threshold_change_reports_each_revision_apart(
    world: World,
) -> None:
    """A report spanning a threshold change: counts made under the old threshold are never relabelled by a
    new one, and each revision's achieved, consumed and remaining budget agree."""
    now = timezone.now()
    chat = make_deployment(world.tenant_a, "chat")
    slo = make_slo(world.tenant_a, name="tpot", sli="tpot", threshold_seconds=0.008)
    record(slo, now - timedelta(minutes=50), good=700, total=1000, deployment=chat)
    changed = now - timedelta(minutes=30)
    services.update_slo(slo, threshold_seconds=0.122, now=changed)
    slo.refresh_from_db()
    record(slo, now - timedelta(minutes=20), good=998, total=1000, deployment=chat)

    report = reports.build(world.tenant_a, now - timedelta(hours=1), now, now)
    (tpot,) = report["slos"]
    old, new = tpot["revisions"]
    assert (old["revision"], old["threshold_seconds"], old["good"], old["total"]) == (
        1,
        0.008,
        700,
        1000,
    )
    assert (new["revision"], new["threshold_seconds"], new["good"], new["total"]) == (
        2,
        0.122,
        998,
        1000,
    )
    assert old["to"] == new["from"] == changed.isoformat()
    for part in (old, new):
        assert part["bad"] == part["total"] - part["good"]
        assert part["budget_consumed_ratio"] == pytest.approx(part["bad"] / part["allowed_bad"])
        assert part["budget_remaining_ratio"] == pytest.approx(1 - part["budget_consumed_ratio"])
    assert new["budget_consumed_ratio"] == pytest.approx(0.2)
    assert tpot["threshold_seconds"] == 0.122 and tpot["achieved_ratio"] == 0.998  # the latest
    assert "allowed bad events = (1 - objective) x events" in report["budget_note"]
    assert {p["revision"] for p in tpot["burn"]} == {1, 2}
    rows = list(csv.DictReader(io.StringIO(reports.to_csv(report))))
    assert [(r["revision"], r["good"]) for r in rows if r["record"] == "slo"] == [
        ("1", "700"),
        ("2", "998"),
    ]
    assert reports.to_pdf(report).startswith(b"%PDF")
