"""The fleet-wide ledger's rules, run against both implementations: in memory, and the
Lua scripts against the real Redis of the test run. Each test uses its own deployment id,
so the Redis counters of one never reach another. Lease and waiting expiry use short
TTLs and wait for the ledger to change its answer, never for a set time."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator

import pytest

from dataplane.gateway.ledger import InProcessLedger, Ledger, RedisLedger, StartRequest
from dataplane.inference.config import TenantConfig

LEASE_TTL = 0.3
BACKLOG_TTL = 0.3


@pytest.fixture(params=["memory", "redis"])
async def ledger(request: pytest.FixtureRequest) -> AsyncIterator[Ledger]:
    if request.param == "memory":
        found: Ledger = InProcessLedger(LEASE_TTL, BACKLOG_TTL)
    else:
        url = os.environ.get("REDIS_URL")
        assert url, "run the tests with ./tailguard test, which starts Redis and sets REDIS_URL"
        found = RedisLedger(url, LEASE_TTL, BACKLOG_TTL, namespace=f"test-{uuid.uuid4().hex}")
    yield found
    await found.close()


@pytest.fixture
def dep() -> str:
    return uuid.uuid4().hex


def tenants(**fields: dict[str, object]) -> dict[str, TenantConfig]:
    return {name: TenantConfig.model_validate(values) for name, values in fields.items()}


def start(tenant: str, cost: float = 10.0, reserve: int = 10, last: bool = True) -> StartRequest:
    return StartRequest(tenant, uuid.uuid4().hex, cost, reserve, last)


async def eventually_starts(
    ledger: Ledger, dep: str, request: StartRequest, table: dict[str, TenantConfig]
) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if (await ledger.try_start(dep, "g1", request, [request.tenant], table)).ok:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the ledger never let the request start")


async def test_concurrency_leases_are_fleet_wide_and_freed(ledger: Ledger, dep: str) -> None:
    table = tenants(a={"max_concurrency": 2})
    first, second, third = start("a"), start("a"), start("a")
    assert (await ledger.try_start(dep, "g1", first, ["a"], table)).ok
    assert (await ledger.try_start(dep, "g2", second, ["a"], table)).ok
    refused = await ledger.try_start(dep, "g1", third, ["a"], table)
    assert (refused.ok, refused.reason) == (False, "concurrency")
    await ledger.finish(dep, "a", first.lease, 0, table["a"])
    assert (await ledger.try_start(dep, "g1", third, ["a"], table)).ok


async def test_a_dead_gateways_leases_expire_and_renewed_ones_do_not(
    ledger: Ledger, dep: str
) -> None:
    table = tenants(a={"max_concurrency": 1})
    held = start("a")
    assert (await ledger.try_start(dep, "g1", held, ["a"], table)).ok
    for _ in range(3):  # renewed: still held after several TTLs' worth of renewals
        await ledger.heartbeat(dep, "g1", [], {"a": [held.lease]})
        assert not (await ledger.try_start(dep, "g2", start("a"), ["a"], table)).ok
        await asyncio.sleep(LEASE_TTL / 3)
    # g1 stops renewing (it died): the lease frees itself.
    await eventually_starts(ledger, dep, start("a"), table)


async def test_token_bucket_reserves_and_refunds(ledger: Ledger, dep: str) -> None:
    table = tenants(a={"tokens_per_s": 1.0, "burst_tokens": 100})
    first = start("a", reserve=60)
    assert (await ledger.try_start(dep, "g1", first, ["a"], table)).ok
    refused = await ledger.try_start(dep, "g1", start("a", reserve=60), ["a"], table)
    assert (refused.ok, refused.reason) == (False, "tokens")
    assert 15 < refused.wait_s <= 21  # 20 tokens short at 1 token/s
    await ledger.finish(dep, "a", first.lease, 50, table["a"])  # used 10 of its 60
    assert (await ledger.try_start(dep, "g1", start("a", reserve=60), ["a"], table)).ok


async def test_a_request_larger_than_the_bucket_waits_for_a_full_bucket(
    ledger: Ledger, dep: str
) -> None:
    table = tenants(a={"tokens_per_s": 1.0, "burst_tokens": 10})
    assert (await ledger.try_start(dep, "g1", start("a", reserve=50), ["a"], table)).ok
    refused = await ledger.try_start(dep, "g1", start("a", reserve=50), ["a"], table)
    assert refused.reason == "tokens" and refused.wait_s > 45  # 40 of debt, then 10


async def test_lower_counter_waiting_at_another_gateway_goes_first(
    ledger: Ledger, dep: str
) -> None:
    table = tenants(a={}, b={})
    # Both run a request (and stay active); a's costs more.
    assert (await ledger.try_start(dep, "g2", start("b", cost=10), ["b"], table)).ok
    assert (await ledger.try_start(dep, "g1", start("a", cost=100), ["a"], table)).ok
    # b waits at g2; a's next request at g1 must let it go first.
    await ledger.heartbeat(dep, "g2", ["b"], {})
    refused = await ledger.try_start(dep, "g1", start("a"), ["a"], table)
    assert (refused.ok, refused.reason) == (False, "fair")
    # b (at g2) goes and passes a; then a may go again.
    assert (await ledger.try_start(dep, "g2", start("b", cost=200, last=False), ["b"], table)).ok
    assert (await ledger.try_start(dep, "g1", start("a"), ["a"], table)).ok


async def test_weights_divide_the_counter(ledger: Ledger, dep: str) -> None:
    table = tenants(a={"weight": 1.0}, b={"weight": 3.0})
    a_started = b_started = 0
    for _ in range(40):
        # Both always waiting (a at g1, b at g2); whoever the ledger lets go, goes.
        ok_a = await ledger.try_start(dep, "g1", start("a", cost=30.0, last=False), ["a"], table)
        ok_b = await ledger.try_start(dep, "g2", start("b", cost=10.0, last=False), ["b"], table)
        a_started += ok_a.ok
        b_started += ok_b.ok
    assert 2.5 <= b_started / a_started <= 3.5


async def test_a_higher_class_waiting_anywhere_holds_a_lower_one_back(
    ledger: Ledger, dep: str
) -> None:
    table = tenants(low={}, high={"priority": 1, "max_concurrency": 1})
    first_high = start("high", last=False)
    assert (await ledger.try_start(dep, "g2", first_high, ["high"], table)).ok
    # high still waits at g2 but is at its concurrency limit: it holds nobody back.
    assert (await ledger.try_start(dep, "g1", start("low"), ["low"], table)).ok
    await ledger.finish(dep, "high", first_high.lease, 0, table["high"])
    refused = await ledger.try_start(dep, "g1", start("low"), ["low"], table)
    assert (refused.ok, refused.reason) == (False, "priority")


async def test_a_dead_gateways_waiting_tenants_stop_holding_others_back(
    ledger: Ledger, dep: str
) -> None:
    table = tenants(low={}, high={"priority": 1})
    await ledger.heartbeat(dep, "g2", ["high"], {})
    assert await ledger.waiting(dep) == {"high"}
    refused = await ledger.try_start(dep, "g1", start("low"), ["low"], table)
    assert refused.reason == "priority"
    await eventually_starts(ledger, dep, start("low"), table)


async def test_an_idle_tenant_banks_no_credit(ledger: Ledger, dep: str) -> None:
    table = tenants(a={}, b={})
    for _ in range(5):
        assert (
            await ledger.try_start(dep, "g1", start("a", cost=100, last=False), ["a"], table)
        ).ok
    # b arrives after idling; it is lifted to a's counter (500), not left at 0, so after
    # one request of its own a may go again.
    lifted = await ledger.try_start(dep, "g1", start("b", cost=100), ["a", "b"], table)
    assert lifted.ok and lifted.counter == pytest.approx(600)
    assert (await ledger.try_start(dep, "g1", start("a", cost=100), ["a"], table)).ok


async def test_charges_advance_the_counter(ledger: Ledger, dep: str) -> None:
    table = tenants(a={}, b={})
    await ledger.heartbeat(dep, "g2", ["a"], {})
    await ledger.charge(dep, {"a": 50.0})
    started = await ledger.try_start(dep, "g1", start("b", cost=0), ["b"], table)
    assert started.ok and started.counter == pytest.approx(50)  # lifted to a's, not past it
    await ledger.charge(dep, {"b": 100.0})
    refused = await ledger.try_start(dep, "g1", start("b", cost=0), ["b"], table)
    assert (refused.ok, refused.reason, refused.counter) == (False, "fair", pytest.approx(150))
