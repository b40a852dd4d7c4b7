"""The gateway's config file: what it accepts, refuses and changes only on restart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from dataplane.gateway.config import GatewayConfig

DIGEST = "a" * 64


def config(**overrides: Any) -> dict[str, Any]:
    deployment = {
        "deployment_id": "d1",
        "served_model_name": "m",
        "replicas": [{"replica_id": "r1", "base_url": "http://10.0.0.1:8100", "nonce": "n"}],
        "tenants": {"t": {"key_sha256": [DIGEST], "max_concurrency": 4, "tokens_per_s": 100}},
        "slo_thresholds": [
            {"tenant": "t", "metric": "ttft", "threshold_seconds": 0.5},
            {"tenant": "t", "metric": "ttft", "threshold_seconds": 0.2},
            {"tenant": "t", "metric": "tpot", "threshold_seconds": 0.05},
        ],
    }
    return {"gateway_id": "g", "deployments": [deployment], **overrides}


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "gateway.json"
    path.write_text(GatewayConfig.model_validate(config()).model_dump_json())
    loaded = GatewayConfig.load(path)
    assert loaded == GatewayConfig.model_validate(config())
    assert loaded.port == 0 and loaded.counters_url is None


@pytest.mark.parametrize(
    "bad",
    [
        {"counters_url": "memcached://x"},
        {"unknown": 1},
        {"deployments": [config()["deployments"][0]] * 2},
        # A replica is down once its state stream is silent this long: the worker's
        # half-second heartbeat must fit well within it.
        {"health_interval_s": 0.5},
    ],
)
def test_refuses(bad: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        GatewayConfig.model_validate(config(**bad))


def test_one_key_names_one_tenant() -> None:
    raw = config()
    raw["deployments"][0]["tenants"]["u"] = {"key_sha256": [DIGEST]}
    with pytest.raises(ValidationError, match="names both"):
        GatewayConfig.model_validate(raw)


def test_a_model_name_may_repeat_for_other_tenants_only() -> None:
    raw = config()
    theirs = {
        **raw["deployments"][0],
        "deployment_id": "d2",
        "tenants": {"u": {"key_sha256": ["b" * 64]}},
        "slo_thresholds": [],
    }
    GatewayConfig.model_validate({**raw, "deployments": [raw["deployments"][0], theirs]})
    theirs["tenants"]["t"] = raw["deployments"][0]["tenants"]["t"]
    with pytest.raises(ValidationError, match="both serve model 'm' to tenant t"):
        GatewayConfig.model_validate({**raw, "deployments": [raw["deployments"][0], theirs]})


def test_restart_fields() -> None:
    old = GatewayConfig.model_validate(config())
    new = GatewayConfig.model_validate(config(counters_url="redis://h:6379/0", port=8200))
    assert old.restart_fields_changed(new) == ["port", "counters_url"]
