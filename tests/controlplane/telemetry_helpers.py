"""Telemetry batches for control-plane tests, built the way an agent builds them."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from agent.protocol import SeriesSketch, TelemetryBatch, ThresholdCount, UsageCount
from controlplane.core.secrets import digest, new_secret
from controlplane.inventory.models import Node
from dataplane.sketch import LatencySketch


def with_credential(node: Node) -> str:
    """Give `node` a fresh agent credential and return it."""
    credential = new_secret("tgn_")
    node.credential_digest = digest(credential)
    node.save(update_fields=["credential_digest"])
    return credential


def sketch_of(values: list[float]) -> str:
    sketch = LatencySketch()
    for value in values:
        sketch.add(value)
    return base64.b64encode(sketch.to_bytes()).decode()


def one_second(
    node: Node,
    seq: int,
    end: datetime,
    *,
    series: list[SeriesSketch],
    usage: list[UsageCount],
    gauges: dict[str, float],
) -> TelemetryBatch:
    """One second of `node`'s telemetry ending at `end`, as the agent sends it."""
    return TelemetryBatch(
        node_id=node.pk,
        seq=seq,
        interval_start=end - timedelta(seconds=1),
        interval_end=end,
        gauges=gauges,
        series=series,
        counters={},
        usage=usage,
    )


def usage_count(
    tenant_id: Any,
    deployment_id: Any,
    *,
    completed: int,
    failed: int = 0,
    input_tokens: int = 0,
    output_tokens: int = 0,
) -> UsageCount:
    return UsageCount(
        tenant_id=tenant_id,
        deployment_id=deployment_id,
        completed=completed,
        failed=failed,
        rejected=0,
        cancelled=0,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
    )


def batch(
    node: Node,
    seq: int,
    *,
    deployment: Any = None,
    ttft: list[float] = (),  # type: ignore[assignment]
    slo_id: UUID | None = None,
    threshold: float = 0.5,
    end: datetime | None = None,
    gauges: dict[str, float] | None = None,
    output_tokens: int = 0,
) -> TelemetryBatch:
    """One second of telemetry from `node`; with a deployment, its TTFTs and usage."""
    end = end or datetime.now(UTC)
    series, usage = [], []
    if deployment is not None:
        counts = []
        if slo_id is not None:
            good = sum(1 for v in ttft if v <= threshold)
            counts = [
                ThresholdCount(
                    slo_id=slo_id, threshold_seconds=threshold, good=good, total=len(ttft)
                )
            ]
        series.append(
            SeriesSketch(
                tenant_id=deployment.tenant_id,
                deployment_id=deployment.pk,
                metric="ttft",
                sketch=sketch_of(list(ttft)),
                thresholds=counts,
            )
        )
        usage.append(
            usage_count(
                deployment.tenant_id,
                deployment.pk,
                completed=len(ttft),
                input_tokens=10 * len(ttft),
                output_tokens=output_tokens,
            )
        )
    return one_second(
        node,
        seq,
        end,
        series=series,
        usage=usage,
        gauges=gauges if gauges is not None else {"gpu.0.utilization_pct": 50.0},
    )
