"""Folding ingest shards: once a bucket is closed, its rows from every shard become one row
in shard 0, with the same counts and the same merged sketch; open buckets are left alone."""

from __future__ import annotations

import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.db import connection, transaction
from django.db.models import Sum

from controlplane.fleet import services as fleet
from controlplane.telemetry import retention, services
from controlplane.telemetry.models import CounterRollup, LatencyRollup, SloRollup
from controlplane.telemetry.pipeline import store
from controlplane.telemetry.pipeline.merge import Rollups
from dataplane.sketch import LatencySketch
from tests.controlplane.conftest import World, make_node
from tests.controlplane.telemetry_helpers import batch, ttft_slo

NOW = datetime(2026, 3, 1, 12, 30, tzinfo=UTC)
OLD = datetime(2026, 3, 1, 9, 15, 5, tzinfo=UTC)  # every resolution's bucket long closed
RECENT = NOW - timedelta(seconds=30)  # no resolution's bucket closed yet


def totals() -> dict[str, Any]:
    return {
        "slo": SloRollup.objects.values("resolution").annotate(g=Sum("good"), t=Sum("total")),
        "counters": CounterRollup.objects.values("resolution", "name").annotate(v=Sum("value")),
        "latency": LatencyRollup.objects.values("resolution").annotate(n=Sum("count")),
    }


def as_lists(summary: dict[str, Any]) -> dict[str, list[Any]]:
    return {name: sorted(map(str, rows)) for name, rows in summary.items()}


def p90(resolution: int, bucket_of: datetime) -> float | None:
    merged = LatencySketch()
    for row in LatencyRollup.objects.filter(resolution=resolution, bucket__lte=bucket_of):
        merged.merge(LatencySketch.from_bytes(bytes(row.sketch)))
    return merged.quantile(0.9)


def test_closed_buckets_fold_into_shard_zero_and_read_the_same(world: World) -> None:
    slo = ttft_slo(world.tenant_a)
    deployment = fleet.create_deployment(
        tenant=world.tenant_a, name="chat", model_name="chat", artifact_uri="synthetic://chat"
    )
    node = make_node("gpu-1")
    for shard, ttfts in ((0, [0.1, 0.9]), (3, [0.2, 0.3, 0.7]), (7, [0.05, 1.5])):
        for end in (OLD, RECENT):
            one = batch(node, 1, deployment=deployment, ttft=ttfts, slo_id=slo.pk, end=end)
            store.write_rollups(Rollups.of([one], with_gauges=False), shard)
    before = as_lists(totals())
    old_p90 = {r: p90(r, OLD) for r in (10, 60, 3600)}

    folded = retention.fold_shards(NOW)

    assert as_lists(totals()) == before
    assert {r: p90(r, OLD) for r in (10, 60, 3600)} == old_p90
    closed = SloRollup.objects.filter(bucket__lt=NOW - timedelta(hours=2))
    assert set(closed.values_list("shard", flat=True)) == {0}
    assert Counter(closed.values_list("resolution", flat=True)) == {10: 1, 60: 1, 3600: 1}
    old_latency = LatencyRollup.objects.filter(bucket__lt=NOW - timedelta(hours=2))
    assert sorted(old_latency.values_list("resolution", "shard", "count")) == [
        (10, 0, 7),
        (60, 0, 7),
        (3600, 0, 7),
    ]
    # the recent buckets are still open: every shard keeps its rows
    recent = SloRollup.objects.filter(bucket__gte=NOW - timedelta(minutes=5), resolution=10)
    assert sorted(recent.values_list("shard", flat=True)) == [0, 3, 7]
    # 2 shards x 3 resolutions x (latency, slo, and the usage counters)
    counters_per_bucket = CounterRollup.objects.filter(shard=0, resolution=10).count() // 2
    assert folded == 2 * 3 * (2 + counters_per_bucket)
    assert retention.fold_shards(NOW) == 0


def test_a_sketch_folded_from_every_shard_answers_as_one_sketch_of_all_values(world: World) -> None:
    deployment = fleet.create_deployment(
        tenant=world.tenant_a, name="chat", model_name="chat", artifact_uri="synthetic://chat"
    )
    node = make_node("gpu-2")
    values = [0.001 * (i + 1) for i in range(300)]
    whole = LatencySketch()
    for shard in range(1, 16):
        part = values[(shard - 1) * 20 : shard * 20]
        for v in part:
            whole.add(v)
        one = batch(node, 1, deployment=deployment, ttft=part, end=OLD)
        store.write_rollups(Rollups.of([one], with_gauges=False), shard)
    retention.fold_shards(NOW)
    (row,) = LatencyRollup.objects.filter(resolution=10)
    folded = LatencySketch.from_bytes(bytes(row.sketch))
    assert (row.shard, row.count, folded.count) == (0, 300, 300)
    for q in (0.5, 0.9, 0.99):
        assert folded.quantile(q) == pytest.approx(whole.quantile(q), rel=1e-12)


@pytest.mark.django_db(transaction=True)
def test_a_flush_holding_a_shard_is_waited_for_and_nothing_it_adds_is_lost(world: World) -> None:
    slo = ttft_slo(world.tenant_a)
    deployment = fleet.create_deployment(
        tenant=world.tenant_a, name="chat", model_name="chat", artifact_uri="synthetic://chat"
    )
    node = make_node("gpu-3")

    def rollups(ttfts: list[float]) -> Rollups:
        one = batch(node, 1, deployment=deployment, ttft=ttfts, slo_id=slo.pk, end=OLD)
        return Rollups.of([one], with_gauges=False)

    store.write_rollups(rollups([0.1, 0.2]), 3)
    holding, folding_done = threading.Event(), threading.Event()

    def flush() -> None:
        """A flush on shard 3 that commits only once the fold waits for its lock."""
        try:
            with transaction.atomic():
                services.hold_shard(3)
                holding.set()
                with connection.cursor() as cursor:
                    while True:
                        cursor.execute(
                            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                            "AND NOT granted"
                        )
                        if cursor.fetchone()[0]:
                            break
                        assert not folding_done.wait(0.01), "the fold did not wait"
                store.write_rollups(rollups([0.3, 0.9, 1.2]), 3)
        finally:
            connection.close()

    def fold() -> int:
        try:
            holding.wait(30)
            return retention.fold_shards(NOW)
        finally:
            folding_done.set()
            connection.close()

    with ThreadPoolExecutor(2) as pool:
        flushed, folded = pool.submit(flush), pool.submit(fold)
        flushed.result()
        assert folded.result() > 0
    rows = SloRollup.objects.filter(resolution=10)
    assert list(rows.values_list("shard", "good", "total")) == [(0, 3, 5)]
    assert LatencyRollup.objects.get(resolution=10).count == 5
