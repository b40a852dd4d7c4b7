"""Gauges held by an ingestor's GaugeBuffer: written once per closed 10 s bucket with the
same folded stats as writing every flush, folded with what another process wrote, and
never holding back latency sketches, SLO counts or counters."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from controlplane.fleet import services as fleet
from controlplane.telemetry import services
from controlplane.telemetry.models import (
    CounterRollup,
    GaugeRollup,
    LatencyRollup,
    NodeStream,
    SloRollup,
)
from controlplane.telemetry.pipeline.gauges import GAUGE_GRACE, GaugeBuffer
from controlplane.telemetry.pipeline.merge import bucket_of
from tests.controlplane.conftest import make_node
from tests.controlplane.telemetry_helpers import batch, place, ttft_slo

# Committed transactions, as the ingestor's: a buffer takes gauges in once they are.
pytestmark = pytest.mark.django_db(transaction=True)

LATER = timedelta(minutes=1)
"""Past the end of a test's bucket, and of its grace and spread."""
READINGS = [{"gpu.0.utilization_pct": 40.0 + 7 * i, "host.load1": float(i % 3)} for i in range(6)]


@pytest.fixture
def bucket() -> datetime:
    """A 10 s bucket just begun; every buffered call passes the time as `now`, so the bucket
    stays open for as long as a test runs, until the test says it is later."""
    return bucket_of(datetime.now(UTC), 10)


@pytest.fixture
def nodes() -> tuple[Any, Any]:
    return make_node("gpu-buffered"), make_node("gpu-direct")


def readings(
    node: Any, bucket: datetime, first_seq: int = 1, items: list[dict[str, float]] = READINGS
) -> list[Any]:
    """One batch a second inside `bucket`, with the given gauges."""
    return [
        batch(node, first_seq + i, end=bucket + timedelta(seconds=2 + i), gauges=gauges)
        for i, gauges in enumerate(items)
    ]


def row(node: Any, bucket: datetime) -> dict[str, list[float]]:
    return GaugeRollup.objects.get(resolution=10, bucket=bucket, node=node).values


def test_one_bucket_fed_over_many_flushes_is_one_row_with_the_same_stats(
    nodes: tuple[Any, Any],
    bucket: datetime,
) -> None:
    buffered, direct = nodes
    gauges = GaugeBuffer()
    for one in readings(buffered, bucket):
        services.store_batches([one], gauges, now=bucket)
    for one in readings(direct, bucket):
        services.store_batches([one])

    assert not GaugeRollup.objects.filter(node=buffered).exists()  # its bucket is open
    assert NodeStream.objects.get(node=buffered).last_seq == len(READINGS)
    services.store_gauges(gauges, now=bucket)
    assert not GaugeRollup.objects.filter(node=buffered).exists()  # not yet due
    services.store_gauges(gauges, now=bucket + LATER)

    assert row(buffered, bucket) == row(direct, bucket)
    assert row(buffered, bucket)["gpu.0.utilization_pct"] == [
        sum(r["gpu.0.utilization_pct"] for r in READINGS),
        6,
        40.0,
        75.0,
        75.0,
    ]
    assert NodeStream.objects.get(node=buffered).gauges == READINGS[-1]
    assert len(gauges) == 0


def test_a_bucket_written_by_two_ingestors_folds(nodes: tuple[Any, Any], bucket: datetime) -> None:
    """The node reconnects to another process mid-bucket, and one batch comes late."""
    node, direct = nodes
    first, second = GaugeBuffer(), GaugeBuffer()
    batches = readings(node, bucket)
    services.store_batches(batches[:3], first, now=bucket)
    services.store_batches(batches[3:5], second, now=bucket)
    services.store_gauges(second, now=bucket + LATER)
    services.store_gauges(first, now=bucket + LATER)
    services.store_batches(batches[5:], first, now=bucket)  # the row exists: the late one folds in
    services.store_gauges(first, now=bucket + LATER)
    services.store_batches(readings(direct, bucket))

    assert GaugeRollup.objects.filter(node=node).count() == 1
    assert row(node, bucket) == row(direct, bucket)
    # The newest gauges win, whichever process wrote last.
    assert NodeStream.objects.get(node=node).gauges == READINGS[-1]


def test_stale_newest_gauges_do_not_overwrite_those_another_process_stored(
    nodes: tuple[Any, Any],
    bucket: datetime,
) -> None:
    node, _ = nodes
    before, after = GaugeBuffer(), GaugeBuffer()
    batches = readings(node, bucket)
    services.store_batches(batches[:2], before, now=bucket)
    services.store_batches(batches[2:], after, now=bucket)
    services.store_gauges(after, now=bucket + LATER)
    services.store_gauges(before, now=bucket + LATER)
    assert NodeStream.objects.get(node=node).gauges == READINGS[-1]


def test_sketches_slo_counts_and_counters_are_not_deferred(world: Any, bucket: datetime) -> None:
    node = make_node("gpu-slo", gpus=1)
    deployment = fleet.create_deployment(
        tenant=world.tenant_a, name="chat", model_name="chat", artifact_uri="synthetic://chat"
    )
    slo = ttft_slo(world.tenant_a, threshold=0.5).pk
    place(node, deployment)
    gauges = GaugeBuffer()
    stored = services.store_batches(
        [batch(node, 1, deployment=deployment, ttft=[0.1, 0.9], slo_id=slo, end=bucket)],
        gauges,
        now=bucket,
    )

    assert [a.outcome for a in stored.acks] == ["stored"]
    for resolution in (10, 60, 3600):
        assert SloRollup.objects.get(resolution=resolution, slo_id=slo).total == 2
        assert LatencyRollup.objects.get(resolution=resolution, deployment=deployment).count == 2
        completed = CounterRollup.objects.get(
            resolution=resolution, deployment=deployment, name="completed"
        )
        assert completed.value == 2
    assert not GaugeRollup.objects.exists() and len(gauges) == 1
    # Live deltas still carry the batch's gauges at once, the fleet's going out first.
    node_delta = dict(stored.deltas)[f"node:{node.pk}"]
    assert node_delta["point"]["gauges"] == {"gpu.0.utilization_pct": 50.0}
    assert stored.deltas[0][0] == "fleet"


def test_buckets_fall_due_after_their_end_in_an_order_spread_over_nodes(bucket: datetime) -> None:
    gauges = GaugeBuffer()
    nodes = [make_node(f"gpu-{i}") for i in range(20)]
    for node in nodes:
        gauges.add_batches([batch(node, 1, end=bucket + timedelta(seconds=5))])
    bucket_end = bucket + timedelta(seconds=10)
    first_due = gauges.next_due()
    assert first_due is not None and first_due >= bucket_end + GAUGE_GRACE
    assert not gauges.take(bucket_end + GAUGE_GRACE - timedelta(microseconds=1)).buckets
    halfway = gauges.take(bucket_end + GAUGE_GRACE + timedelta(seconds=5))
    assert 0 < len(halfway.buckets) < len(nodes)
    assert set(halfway.latest) == {node_id for _, node_id in halfway.buckets}
    rest = gauges.take(bucket_end + GAUGE_GRACE + timedelta(seconds=10))
    assert len(halfway.buckets) + len(rest.buckets) == len(nodes)
    assert len(gauges) == 0 and gauges.next_due() is None
