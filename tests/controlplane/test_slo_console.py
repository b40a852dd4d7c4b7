"""The SLO console: its snapshot API (tenant scoping, figures equal to the SLI math over the
exact rollups) and its pages in a real browser on seeded data, screenshots included."""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime, timedelta
from typing import Any

import pytest
from django.test import Client
from django.utils import timezone

from controlplane.console import selectors as console
from controlplane.fleet import services as fleet
from controlplane.slo import selectors as slo_selectors
from controlplane.slo.models import Slo, SloRevision
from controlplane.slo.services import create_slo, evaluate, update_slo
from controlplane.slo.sli import burn_rules, duration_label, window_start
from controlplane.telemetry.choices import Resolution
from controlplane.telemetry.models import LatencyRollup, SloRollup
from controlplane.telemetry.pipeline.merge import bucket_of
from dataplane.sketch import LatencySketch
from tests.browser import chromium, screenshot_path, sign_in
from tests.controlplane.conftest import World, give_password, make_node
from tests.controlplane.telemetry_helpers import place


class Rollups:
    """Good/total and TTFT sketches merged into every resolution, as ingest merges them,
    written in one go."""

    def __init__(self) -> None:
        self.counts: dict[tuple[Any, ...], list[int]] = defaultdict(lambda: [0, 0])
        self.sketches: dict[tuple[Any, ...], LatencySketch] = defaultdict(LatencySketch)

    def add(self, slo: Any, deployment: Any, at: datetime, good: int, total: int, ttft: float):
        """Counted against the SLO's threshold as it is now."""
        for resolution in Resolution.values:
            bucket = bucket_of(at, resolution)
            counts = self.counts[(resolution, bucket, slo, slo.threshold_seconds, deployment)]
            counts[0] += good
            counts[1] += total
            sketch = self.sketches[(resolution, bucket, slo.tenant, deployment)]
            for i in range(total):
                sketch.add(ttft * (0.5 + i / total))

    def save(self) -> None:
        SloRollup.objects.bulk_create(
            SloRollup(
                resolution=resolution,
                bucket=bucket,
                slo_id=slo.pk,
                tenant=slo.tenant,
                deployment=deployment,
                metric=slo.sli,
                threshold_seconds=threshold,
                good=good,
                total=total,
            )
            for (resolution, bucket, slo, threshold, deployment), (
                good,
                total,
            ) in self.counts.items()
        )
        LatencyRollup.objects.bulk_create(
            LatencyRollup(
                resolution=resolution,
                bucket=bucket,
                tenant=tenant,
                deployment=deployment,
                metric="ttft",
                count=sketch.count,
                sketch=sketch.to_bytes(),
            )
            for (resolution, bucket, tenant, deployment), sketch in self.sketches.items()
        )


def seed(world: World) -> dict[str, Any]:
    """Tenant A: a TTFT SLO far past its budget (firing), a healthy availability SLO and a
    TPOT SLO with no data; tenant B: one SLO of its own, whose threshold was raised from
    50 ms to 500 ms six hours ago (two revisions: the old one's bad days stay its own)."""
    now = timezone.now()
    chat = fleet.create_deployment(
        tenant=world.tenant_a, name="chat", model_name="chat", artifact_uri="synthetic://chat"
    )
    other = fleet.create_deployment(
        tenant=world.tenant_b, name="search", model_name="search", artifact_uri="synthetic://s"
    )
    place(make_node("gpu-a", world.tenant_a, gpus=2), chat)
    place(make_node("gpu-b", world.tenant_b, gpus=1), other)

    def slo(tenant: Any, name: str, sli: str, threshold: float | None, **kw: Any) -> Any:
        return create_slo(
            tenant=tenant,
            name=name,
            sli=sli,
            threshold_seconds=threshold,
            objective=0.99,
            window="rolling_30d",
            **kw,
        )

    slos = {
        "burning": slo(world.tenant_a, "chat-ttft", "ttft", 0.5, display_name="Chat TTFT p99"),
        "healthy": slo(world.tenant_a, "chat-availability", "availability", None),
        "quiet": slo(world.tenant_a, "chat-tpot", "tpot", 0.05),
        "theirs": slo(world.tenant_b, "search-ttft", "ttft", 0.05),
    }
    rollups = Rollups()
    for hours in range(7, 72):  # tenant B's first definition: mostly missed
        rollups.add(slos["theirs"], other, now - timedelta(hours=hours), 20, 100, 0.1)
    Slo.objects.filter(pk=slos["theirs"].pk).update(created_at=now - timedelta(days=3))
    SloRevision.objects.filter(slo=slos["theirs"]).update(started_at=now - timedelta(days=3))
    # on an hour boundary, so every resolution's buckets fall wholly to one revision
    changed = bucket_of(now - timedelta(hours=6), 3600)
    update_slo(slos["theirs"], threshold_seconds=0.5, now=changed)
    for minutes in range(1, 6 * 60 + 1):
        at = now - timedelta(minutes=minutes - 0.5)
        slow = minutes <= 90  # the last 1.5 h went bad: 40% of requests too slow
        rollups.add(slos["burning"], chat, at, 6 if slow else 10, 10, 0.9 if slow else 0.2)
        rollups.add(slos["healthy"], chat, at, 10, 10, 0.2)
        rollups.add(slos["theirs"], other, at, 10, 10, 0.1)
    for hours in range(7, 72):  # three calm days before
        at = now - timedelta(hours=hours)
        rollups.add(slos["burning"], chat, at, 100, 100, 0.2)
        rollups.add(slos["healthy"], chat, at, 100, 100, 0.2)
    rollups.save()
    evaluate(now=now)
    return {"now": now, "chat": chat, **slos}


# --- API ---------------------------------------------------------------------------------


def test_the_overview_shows_only_the_callers_slos_worst_first(world: World, client_for) -> None:
    seeded = seed(world)
    body = client_for(world.viewer_a).get("/api/v1/console/slos/").json()
    assert [s["name"] for s in body["slos"]] == ["chat-ttft", "chat-tpot", "chat-availability"]
    assert [s["state"] for s in body["slos"]] == ["exhausted", "no_data", "ok"]
    assert body["counts"] == {"exhausted": 1, "burning": 0, "at_risk": 0, "no_data": 1, "ok": 1}
    burning = body["slos"][0]
    assert burning["budget_remaining_ratio"] < -1  # overspent many times over
    assert {a["alertname"] for a in burning["firing"]} >= {
        "SLOBurnRatePage",
        "SLOErrorBudgetExhausted",
    }
    assert burning["burn_rates"][0]["burning"] is True
    assert len(burning["budget_sparkline"]) == console.SPARK_POINTS

    everyone = client_for(world.platform).get("/api/v1/console/slos/").json()
    assert {s["name"] for s in everyone["slos"]} == {
        s.name for s in seeded.values() if hasattr(s, "sli")
    }
    # a tenant user naming another tenant gets nothing of it
    theirs = client_for(world.viewer_a).get(f"/api/v1/console/slos/?tenant={world.tenant_b.pk}")
    assert theirs.json()["slos"] == []


def test_the_figures_are_the_sli_math_over_the_exact_rollups(world: World) -> None:
    seeded = seed(world)
    slo, now = seeded["burning"], seeded["now"]
    rules = burn_rules(slo.window, now)
    windows = {"slo": (window_start(slo.window, now), now)}
    for rule in rules:
        for length in (rule.long, rule.short):
            windows[duration_label(length)] = (now - length, now)
    counts = slo_selectors.slo_counts(slo, windows, now)

    summary = console.slo_summary(slo, now, [])
    whole = counts["slo"]
    assert (summary["good"], summary["total"]) == (whole.good, whole.total) == (9740, 10100)
    assert summary["achieved_ratio"] == whole.achieved()
    assert summary["budget_remaining_ratio"] == whole.budget_remaining(slo.objective)
    for rule, shown in zip(rules, summary["burn_rates"], strict=True):
        assert shown["factor"] == rule.factor
        assert shown["long_rate"] == counts[duration_label(rule.long)].burn_rate(slo.objective)
        assert shown["short_rate"] == counts[duration_label(rule.short)].burn_rate(slo.objective)
    assert summary["budget_sparkline"][-1]["value"] == whole.budget_remaining(slo.objective)


def test_the_overview_costs_one_query_per_slo(world: World, django_assert_num_queries: Any) -> None:
    seed(world)
    now = timezone.now()
    # memberships, the SLOs, their firing alerts, then each SLO's windows in one query
    with django_assert_num_queries(3 + 3):
        console.slo_overview(world.viewer_a, now)
    with django_assert_num_queries(2 + 4):
        console.slo_overview(world.platform, now)


def test_the_detail_snapshot_has_history_alerts_and_changes(world: World, client_for) -> None:
    seeded = seed(world)
    slo = seeded["burning"]
    body = client_for(world.viewer_a).get(f"/api/v1/console/slos/{slo.pk}/?range=21600").json()
    assert body["slo"]["state"] == "exhausted" and body["range_s"] == 21600
    assert body["deployments"] == [{"id": str(seeded["chat"].pk), "name": "chat"}]
    assert len(body["budget"]) == console.CHART_POINTS
    assert body["budget"][0]["value"] is None  # nothing counted 30 days ago: a gap
    assert body["budget"][-1]["value"] == body["slo"]["budget_remaining_ratio"]
    assert set(body["burn"]["series"]) == {"1h", "6h", "1d", "3d"}
    assert [t["factor"] for t in body["burn"]["thresholds"]] == [14.4, 6.0, 3.0, 1.0]
    events = body["events"]
    assert sum(p["total"] for p in events) == 3600 and sum(p["good"] for p in events) == 3240
    assert body["percentiles"] and max(p["p99"] for p in body["percentiles"]) > 0.5
    assert {a["alertname"] for a in body["alerts"]} >= {"SLOBurnRatePage"}
    texts = [c["text"] for c in body["changes"]]
    assert "SLO created" in texts and "placed for a test" not in texts  # names nothing of it
    assert "SLO chat-ttft created" not in texts  # the revisions its creation caused

    # a threshold raised six hours ago: the summary is the new revision's alone, the events
    # show each revision's counts against its own threshold, the change says what changed
    theirs = seeded["theirs"]
    body = client_for(world.platform).get(f"/api/v1/console/slos/{theirs.pk}/?range=259200")
    body = body.json()
    assert (body["slo"]["good"], body["slo"]["total"]) == (3600, 3600)
    assert body["slo"]["state"] == "ok"
    events = body["events"]
    assert sum(p["total"] for p in events) == 6500 + 3600
    assert sum(p["good"] for p in events) == 1300 + 3600
    assert sum(p["total"] for p in events if p["revision"] == 2) == 3600
    assert "revision 2: threshold 500.0 ms (was 50.0 ms)" in [c["text"] for c in body["changes"]]

    # another tenant's SLO is not found, for pages and snapshots alike
    assert client_for(world.admin_a).get(f"/api/v1/console/slos/{theirs.pk}/").status_code == 404
    assert client_for(world.platform).get(f"/api/v1/console/slos/{theirs.pk}/").status_code == 200
    client = Client()
    client.force_login(world.admin_a)
    assert client.get(f"/console/slos/{theirs.pk}/").status_code == 404
    assert client.get(f"/console/slos/{slo.pk}/").status_code == 200


def test_fleet_health_rolls_up_pages_slos_and_nodes(world: World, client_for) -> None:
    seed(world)
    mine = client_for(world.viewer_a).get("/api/v1/console/health/").json()
    assert mine["pages_firing"] >= 1 and mine["slos"] == 3
    assert mine["slo_counts"]["exhausted"] == 1 and mine["nodes"] == 1
    everyone = client_for(world.platform).get("/api/v1/console/health/").json()
    assert everyone["slos"] == 4 and everyone["nodes"] == 2 and everyone["nodes_not_ready"] == 0


def test_the_home_page_is_the_slo_overview_for_tenant_users(world: World) -> None:
    viewer, admin = Client(), Client()
    viewer.force_login(world.viewer_a)
    admin.force_login(world.platform)
    assert viewer.get("/console/").context["page"] == "slos"
    assert admin.get("/console/").context["page"] == "fleet"
    assert viewer.get("/console/fleet/").context["page"] == "fleet"
    assert admin.get("/console/slos/").context["snapshot"] == "/api/v1/console/slos/"


def test_a_deployment_page_names_the_slo_thresholds_that_measure_it(world: World) -> None:
    seeded = seed(world)
    client = Client()
    client.force_login(world.viewer_a)
    context = client.get(f"/console/deployments/{seeded['chat'].pk}/").context
    assert context["thresholds"] == [
        {"metric": "tpot", "seconds": 0.05, "label": "SLO chat-tpot"},
        {"metric": "ttft", "seconds": 0.5, "label": "SLO chat-ttft"},
    ]


def test_the_schema_documents_the_snapshots(world: World, client_for) -> None:
    schema = client_for(world.platform).get("/api/schema/?format=json").json()
    for path in ("/api/v1/console/slos/", "/api/v1/console/slos/{id}/", "/api/v1/console/health/"):
        assert path in schema["paths"], path


# --- pages in a browser -------------------------------------------------------------------


@pytest.mark.browser
def test_the_slo_pages_show_state_budget_burn_and_why(
    live_server: Any, world: World, settings: Any
) -> None:
    seeded = seed(world)
    give_password(world.admin_a, "admin-pass", settings)
    give_password(world.platform, "platform-pass", settings)
    burning, quiet = seeded["burning"], seeded["quiet"]

    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1500, "height": 1000})
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        sign_in(page, f"{live_server.url}/console/login/", "admin-a", "admin-pass")

        # the home page: every SLO, worst first
        row = f"#slo-table tr[data-slo='{burning.pk}']"
        page.wait_for_selector(f"{row} .badge:text('budget exhausted')", timeout=10_000)
        states = page.eval_on_selector_all(
            "#slo-table tbody tr", "rows => rows.map(r => r.dataset.state)"
        )
        assert states == ["exhausted", "no_data", "ok"]
        assert page.inner_text(f"#slo-table tr[data-slo='{quiet.pk}'] .badge") == "no data"
        assert (
            "%" in page.inner_text(f"{row} td.budget")
            and page.locator(f"{row} svg.sparkline path").count() == 1
        )
        assert "SLOBurnRatePage".replace("SLO", "") in page.inner_text(row)
        page.screenshot(path=screenshot_path("console-slos"), full_page=True)

        # the detail page: charts with thresholds and change marks, the alerts, the report
        page.click(f"{row} a")
        page.wait_for_selector("#chart-burn[data-version] canvas", timeout=10_000)
        page.wait_for_selector("#slo-alerts td:text('SLOBurnRatePage')")
        assert page.get_attribute("#chart-latency", "data-lines") == "1"
        assert int(page.get_attribute("#chart-budget", "data-marks") or 0) >= 2
        assert page.get_attribute("#chart-burn", "data-lines") == "4"
        assert "9,740 / 10,100" in page.inner_text("#tile-good-total")
        assert "SLO created" in page.inner_text("#slo-changes")
        assert page.get_attribute("#slo-report-link", "href") == (
            f"/console/tenants/{world.tenant_a.pk}/slo-report/"
        )
        page.screenshot(path=screenshot_path("console-slo-detail"), full_page=True)

        page.goto(f"{live_server.url}/console/slos/{quiet.pk}/")
        page.wait_for_selector("#tile-state .badge:text('no data')", timeout=10_000)
        page.screenshot(path=screenshot_path("console-slo-no-data"), full_page=True)

        # the tenant page: its SLOs first, then its deployments
        page.goto(f"{live_server.url}/console/tenants/{world.tenant_a.pk}/")
        page.wait_for_selector(f"{row}", timeout=10_000)
        page.wait_for_selector("#tenant-table :text('chat')")
        slo_y = page.locator("#slo-table").bounding_box()["y"]
        assert slo_y < page.locator("#tenant-table").bounding_box()["y"]
        page.screenshot(path=screenshot_path("console-tenant-slos"), full_page=True)

        # the deployment's latency charts draw the thresholds of the SLOs measuring it
        page.goto(f"{live_server.url}/console/deployments/{seeded['chat'].pk}/")
        page.wait_for_selector("#chart-ttft[data-lines='1'][data-version]", timeout=10_000)
        page.select_option("select.window", "86400")
        page.wait_for_function(
            "Number(document.querySelector('#chart-ttft').dataset.points) > 360", timeout=10_000
        )
        page.screenshot(path=screenshot_path("console-deployment-slo-lines"), full_page=True)

        # the fleet home of a platform admin: the health roll-up above the nodes
        page = browser.new_page(viewport={"width": 1500, "height": 1000})
        page.on("pageerror", lambda error: errors.append(str(error)))
        sign_in(page, f"{live_server.url}/console/login/", "platform", "platform-pass")
        page.wait_for_selector("#health-pages .value", timeout=10_000)
        page.wait_for_selector("#fleet-table :text('gpu-a')")
        assert page.inner_text("#health-nodes .value") == "0 of 2"
        assert page.inner_text("#health-slos .value") == "1 of 4"
        assert (
            page.locator("#fleet-health").bounding_box()["y"]
            < page.locator("#fleet-table").bounding_box()["y"]
        )
        page.screenshot(path=screenshot_path("console-fleet-health"), full_page=True)

        # an SLO with two revisions: the change is listed and marked on its charts
        page.goto(f"{live_server.url}/console/slos/{seeded['theirs'].pk}/")
        page.wait_for_selector("#slo-changes :text('revision 2')", timeout=10_000)
        page.select_option("select.window", "604800")
        page.wait_for_selector("#tile-range-achieved :text('7 d, revision 2')", timeout=10_000)
        assert "100.00 %" in page.inner_text("#tile-range-achieved")
        assert int(page.get_attribute("#chart-burn", "data-marks") or 0) >= 1
        page.screenshot(path=screenshot_path("console-slo-revisions"), full_page=True)
    assert errors == []
