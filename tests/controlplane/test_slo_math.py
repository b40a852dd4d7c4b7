"""SLI math: window tiling, exact ratios and budgets from hand-built rollups, burn rates,
and percentiles from merged sketches. The helpers here build rollups the way ingest does
(every interval merged into all three resolutions) and are shared by the other SLO tests."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest
from django.db.models import F
from django.utils import timezone

from controlplane.fleet import services as fleet
from controlplane.slo import selectors, services
from controlplane.slo.sli import Counts, burn_rules, ceil_to, floor_to, tile, window_start
from controlplane.telemetry.choices import Resolution
from controlplane.telemetry.models import LatencyRollup, SloRollup
from dataplane.sketch import LatencySketch
from tests.controlplane.conftest import World


def record(slo: Any, at: datetime, good: int, total: int, deployment: Any = None) -> None:
    """Count events into every resolution's bucket holding `at`, as ingest merges a batch."""
    for resolution in Resolution.values:
        row, _ = SloRollup.objects.get_or_create(
            resolution=resolution,
            bucket=floor_to(at, resolution),
            slo_id=slo.pk,
            deployment=deployment,
            defaults={
                "tenant_id": slo.tenant_id,
                "metric": slo.sli,
                "threshold_seconds": slo.threshold_seconds,
            },
        )
        SloRollup.objects.filter(pk=row.pk).update(good=F("good") + good, total=F("total") + total)


def record_many(slo: Any, entries: list[tuple[datetime, int, int]], deployment: Any = None) -> None:
    """`record` for many (at, good, total) at once, into rollups the SLO has none of yet."""
    rows: dict[tuple[int, datetime], list[int]] = {}
    for at, good, total in entries:
        for resolution in Resolution.values:
            row = rows.setdefault((resolution, floor_to(at, resolution)), [0, 0])
            row[0] += good
            row[1] += total
    SloRollup.objects.bulk_create(
        SloRollup(
            resolution=resolution,
            bucket=bucket,
            slo_id=slo.pk,
            deployment=deployment,
            tenant_id=slo.tenant_id,
            metric=slo.sli,
            threshold_seconds=slo.threshold_seconds,
            good=good,
            total=total,
        )
        for (resolution, bucket), (good, total) in rows.items()
    )


def make_deployment(tenant: Any, name: str = "chat", model_name: str = "chat-8b") -> Any:
    return fleet.create_deployment(
        tenant=tenant, name=name, model_name=model_name, artifact_uri=f"synthetic://{name}"
    )


def make_slo(tenant: Any, **fields: Any) -> Any:
    defaults = {
        "name": "ttft",
        "sli": "ttft",
        "threshold_seconds": 0.5,
        "objective": 0.99,
        "window": "rolling_30d",
    }
    return services.create_slo(tenant=tenant, **{**defaults, **fields})


def kept(moment: datetime, now: datetime) -> int:
    age = now - moment
    return 10 if age <= timedelta(days=2) else 60 if age <= timedelta(days=35) else 3600


def test_tiling_is_exact_and_coarsest_first() -> None:
    rng = random.Random(7)
    now = datetime(2026, 5, 20, 13, 47, 33, tzinfo=UTC)
    for _ in range(500):
        start = now - timedelta(seconds=rng.randrange(1, 40 * 86400))
        end = start + timedelta(seconds=rng.randrange(1, 10 * 86400))
        end = min(end, now)
        ranges = tile(start, end, now)
        covered = sorted((lo, hi) for _, lo, hi in ranges)
        for (_, hi), (lo, _) in zip(covered, covered[1:], strict=False):
            assert hi == lo  # contiguous, no overlap
        for resolution, lo, hi in ranges:
            assert lo < hi
            assert floor_to(lo, resolution) == lo and floor_to(hi, resolution) == hi
        # the bucket holding `end` is in, the one holding `start` out, to the finest
        # resolution still kept there (10 s for 2 days, 1 min for 35)
        assert covered[-1][1] == ceil_to(end, kept(end, now))
        assert covered[0][0] == ceil_to(start, kept(start, now))
        # fine rows only at the edges: at most one run of each finer resolution per edge
        assert sum(1 for r, _, _ in ranges if r == 3600) <= 1
        assert sum(1 for r, _, _ in ranges if r == 60) <= 2
        assert sum(1 for r, _, _ in ranges if r == 10) <= 2


def test_calendar_month_and_rolling_windows() -> None:
    now = datetime(2026, 3, 1, 0, 0, 5, tzinfo=UTC)
    assert window_start("calendar_month", now) == datetime(2026, 3, 1, tzinfo=UTC)
    assert window_start("rolling_7d", now) == now - timedelta(days=7)
    # the workbook's 30-day windows scale with the SLO's window
    page_fast = burn_rules("rolling_7d", now)[0]
    assert (page_fast.factor, page_fast.long, page_fast.short) == (
        14.4,
        timedelta(seconds=840),
        timedelta(seconds=70),
    )
    assert burn_rules("rolling_30d", now)[3].long == timedelta(days=3)


def test_counts_math() -> None:
    assert Counts(0, 0).budget_remaining(0.99) == 1.0
    assert Counts(0, 0).achieved() is None
    assert Counts(0, 0).burn_rate(0.99) == 0.0
    counts = Counts(good=9_950, total=10_000)  # 50 bad of 100 allowed
    assert counts.achieved() == 0.995
    assert counts.budget_remaining(0.99) == pytest.approx(0.5)
    assert counts.burn_rate(0.99) == pytest.approx(0.5)
    assert Counts(good=9_700, total=10_000).burn_rate(0.99) == pytest.approx(3.0)
    assert Counts(good=9_700, total=10_000).budget_remaining(0.99) == pytest.approx(-2.0)


def test_exact_ratio_from_rollups_at_every_resolution(world: World) -> None:
    """Windows of any alignment, answered from mixed resolutions, equal a brute-force sum
    over the 10 s buckets."""
    slo = make_slo(world.tenant_a)
    now = floor_to(timezone.now(), 3600) + timedelta(hours=1, seconds=3)
    rng = random.Random(1)
    events: dict[datetime, tuple[int, int]] = {}
    t = now - timedelta(hours=3, seconds=20)
    while t <= now:
        total = rng.randrange(0, 40)
        good = rng.randrange(0, total + 1)
        if total:
            events[floor_to(t, 10)] = (good, total)
        t += timedelta(seconds=10)
    record_many(slo, [(b, g, n) for b, (g, n) in events.items()])
    for _ in range(40):
        start = now - timedelta(seconds=rng.randrange(1, 3 * 3600 + 30))
        end = start + timedelta(seconds=rng.randrange(1, 3 * 3600))
        end = min(end, now)
        counts = selectors.slo_counts(slo, {"w": (start, end)}, now)["w"]
        inside = [v for b, v in events.items() if ceil_to(start, 10) <= b < ceil_to(end, 10)]
        assert counts == Counts(sum(g for g, _ in inside), sum(n for _, n in inside))
        if counts.total:
            assert counts.achieved() == sum(g for g, _ in inside) / sum(n for _, n in inside)


def test_budget_is_exactly_full_at_the_start_of_a_window(world: World) -> None:
    monthly = make_slo(world.tenant_a, name="monthly", window="calendar_month")
    new = make_slo(world.tenant_a, name="new")
    month = datetime(2026, 3, 1, tzinfo=UTC)
    for minute in range(1, 120):  # a bad February's last two hours
        record(monthly, month - timedelta(minutes=minute), good=0, total=10)
    now = month + timedelta(seconds=5)
    counts = selectors.slo_counts(monthly, {"slo": (window_start(monthly.window, now), now)}, now)
    assert counts["slo"] == Counts(0, 0)
    assert counts["slo"].budget_remaining(monthly.objective) == 1.0
    # the calendar month edge: March's first events count, February's never
    record(monthly, month + timedelta(seconds=12), good=99, total=100)
    now = month + timedelta(minutes=30)
    whole = selectors.slo_counts(monthly, {"slo": (window_start(monthly.window, now), now)}, now)
    assert whole["slo"] == Counts(99, 100)
    assert whole["slo"].budget_remaining(0.99) == pytest.approx(0.0)
    # an SLO created now has no events yet: exactly 100%
    assert services.evaluate([new.pk]) == 1
    new.status.refresh_from_db()
    assert new.status.budget_remaining_ratio == 1.0
    assert new.status.achieved_ratio is None


def test_burn_rate_over_lookbacks(world: World) -> None:
    slo = make_slo(world.tenant_a)
    now = floor_to(timezone.now(), 60) + timedelta(seconds=1)
    record(slo, now - timedelta(minutes=50), good=1000, total=1000)
    record(slo, now - timedelta(minutes=2), good=950, total=1000)
    counts = selectors.slo_counts(
        slo,
        {"1h": (now - timedelta(hours=1), now), "5m": (now - timedelta(minutes=5), now)},
        now,
    )
    assert counts["1h"].burn_rate(0.99) == pytest.approx(2.5)
    assert counts["5m"].burn_rate(0.99) == pytest.approx(5.0)


def test_percentiles_from_merged_sketches_within_one_percent(world: World) -> None:
    deployment = make_deployment(world.tenant_a)
    now = floor_to(timezone.now(), 60) + timedelta(seconds=5)
    rng = np.random.default_rng(3)
    everything: list[float] = []
    for minute in range(1, 31):
        sketch = LatencySketch()
        samples = np.concatenate(
            [rng.lognormal(-1.6, 0.4, 300), rng.lognormal(0.0, 0.6, 12)]
        ).tolist()
        for value in samples:
            sketch.add(value)
        everything += samples
        bucket = floor_to(now - timedelta(minutes=minute), 60)
        LatencyRollup.objects.create(
            resolution=60,
            bucket=bucket,
            tenant=world.tenant_a,
            deployment=deployment,
            metric="ttft",
            count=len(samples),
            sketch=sketch.to_bytes(),
        )
    start = now - timedelta(minutes=31)
    rows = selectors.latency_percentiles(world.tenant_a.pk, start, now, now)
    assert [(r["deployment_name"], r["metric"], r["count"]) for r in rows] == [
        ("chat", "ttft", len(everything))
    ]
    ordered = sorted(everything)
    for name, q in selectors.QUANTILES.items():
        exact = ordered[int(q * (len(ordered) - 1))]
        assert rows[0][name] == pytest.approx(exact, rel=0.01), name
