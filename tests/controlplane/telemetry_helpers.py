"""Telemetry batches for control-plane tests, built the way an agent builds them."""

from __future__ import annotations

import base64
import itertools
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from agent.protocol import SeriesSketch, TelemetryBatch, ThresholdCount, UsageCount
from controlplane.core.secrets import digest, new_secret
from controlplane.fleet.models import Replica
from controlplane.fleet.services import issue_revisions
from controlplane.inventory.choices import NodeStatus
from controlplane.inventory.models import Node
from controlplane.slo.services import create_slo
from dataplane.sketch import LatencySketch


def place(node: Node, *deployments: Any) -> None:
    """Put every replica of `deployments` on `node`, ready, and issue its revision, as
    placement would: a node's telemetry is accepted only for what its revisions placed."""
    Node.objects.filter(pk=node.pk).update(status=NodeStatus.READY)
    used = set(Replica.objects.filter(node=node).values_list("port", flat=True))
    ports = (port for port in itertools.count(20000) if port not in used)
    for replica in Replica.objects.filter(deployment__in=deployments).exclude(node=node):
        replica.node, replica.port = node, next(ports)
        replica.save(update_fields=["node", "port"])
    node.refresh_from_db()
    issue_revisions([node], cause="placed for a test")


def ttft_slo(tenant: Any, threshold: float = 0.5, name: str = "ttft") -> Any:
    """A TTFT SLO of `tenant`; nodes placed afterwards count against its threshold."""
    return create_slo(
        tenant=tenant,
        name=name,
        sli="ttft",
        threshold_seconds=threshold,
        objective=0.99,
        window="rolling_30d",
    )


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
