"""deploy/prometheus and deploy/grafana: the scrape jobs, and a dashboard that queries only
metrics the control plane's and the agents' /metrics really export."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import uuid4

import httpx
import promql_parser
import pytest
import yaml
from django.test import Client
from django.urls import resolve
from prometheus_client.parser import text_string_to_metric_families

from agent.metrics import AgentCollector, MetricsServer
from agent.settings import AgentSettings
from agent.shipper import open_shipper
from tests.deploy.commands import DEPLOY

# Reserved by the telemetry contract for the SLO work; exported once controlplane.slo
# registers its collector. Names listed here need not appear in /metrics yet.
RESERVED_FOR_SLO = {
    "tailguard_slo_objective_ratio",
    "tailguard_slo_achieved_ratio",
    "tailguard_slo_error_budget_remaining_ratio",
    "tailguard_slo_burn_rate",
}
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
}
# Grafana's own variables, replaced by a duration before the expression is parsed.
GRAFANA_DURATIONS = re.compile(r"\$__(rate_interval|interval|range)\b")


def exported_names(exposition: str) -> set[str]:
    """Every series name a PromQL query may use, including families without samples yet."""
    names = set()
    for family in text_string_to_metric_families(exposition):
        names |= {family.name + suffix for suffix in SUFFIXES.get(family.type, ("",))}
        names |= {sample.name for sample in family.samples}
    return names


@pytest.fixture
def control_plane_names(db: Any, client: Client) -> set[str]:
    response = client.get("/metrics")
    assert response.status_code == 200, response.content
    return exported_names(response.content.decode())


@pytest.fixture
def agent_names(tmp_path: Path) -> Iterator[set[str]]:
    """Scrape a real agent /metrics server fed with one batch's gauges of every kind."""
    shipper = open_shipper(uuid4(), tmp_path, None, [])
    shipper.latest_gauges = {
        "gpu.0.utilization_pct": 50.0,
        "gpu.0.memory_used_bytes": 1e9,
        "gpu.0.power_w": 300.0,
        "gpu.0.temperature_c": 60.0,
        "host.load1": 1.5,
        f"worker.{uuid4()}.queue_depth": 3.0,
    }
    server = MetricsServer(AgentCollector(shipper, lambda: 7), 0, "127.0.0.1")
    try:
        response = httpx.get(f"http://127.0.0.1:{server.port}/metrics")
        assert response.status_code == 200
        yield exported_names(response.text)
    finally:
        server.stop()
        shipper.close()


def dashboard() -> dict[str, Any]:
    return json.loads((DEPLOY / "grafana" / "tailguard.json").read_text())


def panels() -> list[dict[str, Any]]:
    found = []
    for panel in dashboard()["panels"]:
        found += [panel, *panel.get("panels", [])]
    return found


def selectors(expr: str) -> set[str]:
    """Metric names of every vector selector in a PromQL expression (parsed, not grepped)."""
    names: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            assert node.name, f"a selector without a metric name in {expr!r}"
            names.add(node.name)

    promql_parser.walk(promql_parser.parse(GRAFANA_DURATIONS.sub("5m", expr)), visit)
    return names


def dashboard_metric_names() -> set[str]:
    names: set[str] = set()
    for panel in panels():
        for target in panel.get("targets", []):
            names |= selectors(target["expr"])
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((\w+),\s*\w+\)", variable["query"]["query"])
            assert match, variable["query"]
            names.add(match.group(1))
    return names


def test_dashboard_has_the_fleet_gpu_ingest_and_slo_rows() -> None:
    rows = [p["title"] for p in dashboard()["panels"] if p["type"] == "row"]
    assert rows == ["Fleet", "GPUs", "Telemetry ingest", "SLOs"]
    ids = [p["id"] for p in panels()]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


def test_every_query_parses_and_uses_an_exported_metric(
    control_plane_names: set[str], agent_names: set[str]
) -> None:
    used = dashboard_metric_names()
    unknown = used - control_plane_names - agent_names - RESERVED_FOR_SLO
    assert not unknown, f"the dashboard queries metrics nobody exports: {sorted(unknown)}"
    assert used & RESERVED_FOR_SLO, "the SLO row queries the SLO metrics"


def test_dashboard_covers_the_contract(
    control_plane_names: set[str], agent_names: set[str]
) -> None:
    """Each control-plane and agent family of the contract has a panel."""
    families = {n for n in control_plane_names | agent_names if n.startswith("tailguard_")}
    contract = {n for n in families if not n.endswith(("_created", "_sum", "_count"))}
    contract -= {"tailguard_telemetry_flush_seconds"}  # queried through its _bucket series
    missing = contract - dashboard_metric_names()
    assert not missing, f"no panel shows {sorted(missing)}"


def test_selector_extraction_sees_through_functions() -> None:
    expr = 'histogram_quantile(0.99, sum by (le) (rate(x_bucket{a=~"$node"}[$__rate_interval])))'
    assert selectors(expr) == {"x_bucket"}
    with pytest.raises(ValueError):
        selectors("sum(rate(x[5m])")


def test_prometheus_scrapes_the_control_plane_and_every_agent() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"tailguard-controlplane", "tailguard-agent"}
    control_plane = jobs["tailguard-controlplane"]
    assert control_plane["metrics_path"] == "/metrics"
    assert resolve(control_plane["metrics_path"]).url_name == "metrics"
    assert control_plane["static_configs"][0]["targets"] == ["tailguard-web:8000"]
    assert control_plane["authorization"]["type"] == "Bearer", "METRICS_TOKEN is sent"
    agent = jobs["tailguard-agent"]
    assert agent["metrics_path"] == "/metrics"
    (sd_file,) = agent["file_sd_configs"][0]["files"]
    example = json.loads((DEPLOY / "prometheus" / Path(sd_file).name).read_text())
    ports = {t.rpartition(":")[2] for group in example for t in group["targets"]}
    assert ports == {str(AgentSettings().metrics_port)} == {"9810"}
    (relabel,) = agent["relabel_configs"]
    assert re.fullmatch(relabel["regex"], "gpu-node-01:9810").group(1) == "gpu-node-01"
