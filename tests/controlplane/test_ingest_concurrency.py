"""Several ingesting processes at once: no lock shared by all of them, and still every
batch is stored exactly once, whichever process got it and however often it was resent."""

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
from controlplane.telemetry import services
from controlplane.telemetry.models import CounterRollup, LatencyRollup, NodeStream, SloRollup
from tests.controlplane.conftest import World, make_node
from tests.controlplane.telemetry_helpers import batch, place, ttft_slo

pytestmark = pytest.mark.django_db(transaction=True)


def test_two_flushes_hold_different_shards_without_waiting(world: World) -> None:
    held, release = threading.Event(), threading.Event()

    def first() -> int:
        try:
            with transaction.atomic():
                shard = services.claim_shard()
                held.set()
                release.wait(30)
                return shard
        finally:
            connection.close()

    def second() -> int:
        try:
            held.wait(30)
            with transaction.atomic():
                return services.claim_shard()  # returns at once: no lock is shared by all
        finally:
            release.set()
            connection.close()

    with ThreadPoolExecutor(2) as pool:
        a, b = pool.submit(first), pool.submit(second)
        assert a.result() != b.result()


def test_two_ingesting_processes_never_store_a_batch_twice(world: World) -> None:
    slo = ttft_slo(world.tenant_a)
    deployment = fleet.create_deployment(
        tenant=world.tenant_a,
        name="chat",
        model_name="chat",
        artifact_uri="synthetic://chat",
        replicas=12,
    )
    nodes = [make_node(f"gpu-{i}") for i in range(12)]
    for node in nodes:
        place(node, deployment)
    end = datetime.now(UTC) - timedelta(seconds=30)
    batches = [
        batch(
            node,
            seq,
            deployment=deployment,
            ttft=[0.1, 0.2, 0.9],
            slo_id=slo.pk,
            end=end + timedelta(seconds=seq),
        )
        for node in nodes
        for seq in range(1, 7)
    ]
    services.ingest(batches[::6])  # each node's first: its stream row exists, as in steady state
    batches = [b for b in batches if b.seq > 1]
    start = threading.Barrier(2)

    def ingest(batches: list[Any]) -> list[Any]:
        """One process's flushes of every batch (a reconnect moved each node's resends here)."""
        try:
            start.wait()
            acks = []
            for i in range(0, len(batches), 5):
                flush = batches[i : i + 5]
                acks += [(b.node_id, a) for b, a in zip(flush, services.ingest(flush), strict=True)]
            return acks
        finally:
            connection.close()

    with ThreadPoolExecutor(2) as pool:
        results = [pool.submit(ingest, batches) for _ in range(2)]
        acks = [ack for future in results for ack in future.result()]

    stored = Counter((node, a.seq) for node, a in acks if a.outcome == "stored")
    assert sorted(stored.values()) == [1] * len(batches), stored
    assert Counter(a.outcome for _, a in acks) == {"stored": 60, "duplicate": 60}
    assert set(NodeStream.objects.values_list("batches", flat=True)) == {6}
    assert set(NodeStream.objects.values_list("last_seq", flat=True)) == {6}
    ten = {"resolution": 10, "deployment": deployment}
    slo_counts = SloRollup.objects.filter(resolution=10).aggregate(g=Sum("good"), t=Sum("total"))
    assert slo_counts == {"g": 144, "t": 216}
    assert CounterRollup.objects.filter(name="completed", **ten).aggregate(v=Sum("value")) == {
        "v": 216
    }
    assert LatencyRollup.objects.filter(**ten).aggregate(n=Sum("count")) == {"n": 216}
