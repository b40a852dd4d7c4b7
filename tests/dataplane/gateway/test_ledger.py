"""The fleet-wide ledger's rules, run against both implementations: in memory, and the
Lua scripts against the real Redis of the test run. Each test uses its own deployment id,
so the Redis counters of one never reach another.

Leases and waiting marks last an hour unless a test is about their expiry. Expiry tests
move the in-process ledger's clock; on Redis (whose own clock decides) they use a TTL
many Redis round trips long and wait for the ledger to change its answer, never for a set
time, so a loaded machine only makes them slower."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import redis.asyncio as aioredis

from dataplane.gateway.ledger import (
    Dues,
    Finished,
    InProcessLedger,
    Ledger,
    RedisLedger,
    Renewal,
    Settlement,
    StartRequest,
)
from dataplane.inference.config import TenantConfig

LONG_TTL = 3600.0
# The TTL of the expiry tests on Redis: a heartbeat and the check after it, two round
# trips, must fit in it however loaded the machine is.
EXPIRY_TTL = 3.0


class Clocked:
    """A ledger and how to let time pass for it."""

    def __init__(self, ledger: Ledger, advance: Callable[[float], Awaitable[None]]) -> None:
        self.ledger = ledger
        self.advance = advance


MakeLedger = Callable[[float, float], Clocked]


@pytest.fixture(params=["memory", "redis"])
async def make_ledger(request: pytest.FixtureRequest) -> AsyncIterator[MakeLedger]:
    made: list[Ledger] = []

    def make(lease_ttl: float, backlog_ttl: float) -> Clocked:
        if request.param == "memory":
            now = [1000.0]

            async def advance(seconds: float) -> None:
                now[0] += seconds

            found: Ledger = InProcessLedger(lease_ttl, backlog_ttl, clock=lambda: now[0])
            made.append(found)
            return Clocked(found, advance)
        url = os.environ.get("REDIS_URL")
        assert url, "run the tests with ./tailguard test, which starts Redis and sets REDIS_URL"
        found = RedisLedger(url, lease_ttl, backlog_ttl, namespace=f"test-{uuid.uuid4().hex}")
        made.append(found)
        return Clocked(found, asyncio.sleep)

    yield make
    for found in made:
        await found.close()


@pytest.fixture
async def ledger(make_ledger: MakeLedger) -> Ledger:
    return make_ledger(LONG_TTL, LONG_TTL).ledger


@pytest.fixture
def dep() -> str:
    return uuid.uuid4().hex


def tenants(**fields: dict[str, object]) -> dict[str, TenantConfig]:
    return {name: TenantConfig.model_validate(values) for name, values in fields.items()}


def start(
    tenant: str, cost: float = 10.0, reserve: int = 10, last: bool = True, share_of: int = 0
) -> StartRequest:
    return StartRequest(tenant, uuid.uuid4().hex, cost, reserve, last, share_of)


def ended(tenant: str, lease: str, refund: int, limits: TenantConfig) -> list[Settlement]:
    return [Settlement([Finished(tenant, lease, refund, limits)])]


async def eventually_starts(
    clocked: Clocked, dep: str, request: StartRequest, table: dict[str, TenantConfig]
) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        decision = await clocked.ledger.try_start(
            dep, "g1", request, {request.tenant: request.reserve}, table
        )
        if decision.ok:
            return
        await clocked.advance(0.1)
    raise AssertionError("the ledger never let the request start")


async def test_concurrency_leases_are_fleet_wide_and_freed(ledger: Ledger, dep: str) -> None:
    table = tenants(a={"max_concurrency": 2})
    first, second, third = start("a"), start("a"), start("a")
    assert (await ledger.try_start(dep, "g1", first, {"a": 10}, table)).ok
    assert (await ledger.try_start(dep, "g2", second, {"a": 10}, table)).ok
    refused = await ledger.try_start(dep, "g1", third, {"a": 10}, table)
    assert (refused.ok, refused.reason) == (False, "concurrency")
    await ledger.settle(dep, ended("a", first.lease, 0, table["a"]))
    assert (await ledger.try_start(dep, "g1", third, {"a": 10}, table)).ok


async def test_a_start_settles_what_is_owed_before_it_decides(ledger: Ledger, dep: str) -> None:
    table = tenants(a={"max_concurrency": 1, "tokens_per_s": 1.0, "burst_tokens": 100}, b={})
    first = start("a", cost=0, reserve=60)
    assert (await ledger.try_start(dep, "g1", first, {"a": 60}, table)).ok
    # a's one lease is freed and 50 of its 60 tokens refunded by the call that starts
    # the next request, which needs both; b's charge counts in the same decision.
    owed = [Settlement([Finished("a", first.lease, 50, table["a"])], {"a": 7.0, "b": 1000.0})]
    second = start("a", cost=0, reserve=80)
    decision = await ledger.try_start(dep, "g1", second, {"a": 80}, table, owed)
    assert decision.ok and decision.counter == pytest.approx(7.0)
    await ledger.heartbeat(dep, "g2", {"b": 10}, {}, {})
    behind = await ledger.try_start(dep, "g2", start("b", cost=0), {"b": 10}, table)
    assert (behind.ok, behind.counter) == (True, pytest.approx(1000.0))


async def test_a_dead_gateways_leases_expire_and_renewed_ones_do_not(
    make_ledger: MakeLedger, dep: str
) -> None:
    clocked = make_ledger(EXPIRY_TTL, LONG_TTL)
    ledger = clocked.ledger
    table = tenants(a={"max_concurrency": 1})
    held = start("a")
    assert (await ledger.try_start(dep, "g1", held, {"a": 10}, table)).ok
    for _ in range(3):  # renewed: still held after more than a TTL of renewals
        await clocked.advance(EXPIRY_TTL / 2)
        await ledger.heartbeat(dep, "g1", {}, {"a": [held.lease]}, table)
        assert not (await ledger.try_start(dep, "g2", start("a"), {"a": 10}, table)).ok
    # g1 stops renewing (it died): the lease frees itself.
    await eventually_starts(clocked, dep, start("a"), table)


async def test_a_lapsed_lease_is_taken_back_under_the_limit_and_lost_over_it(
    make_ledger: MakeLedger, dep: str
) -> None:
    clocked = make_ledger(EXPIRY_TTL, LONG_TTL)
    ledger = clocked.ledger
    table = tenants(a={"max_concurrency": 1})
    stalled = start("a")
    assert (await ledger.try_start(dep, "g1", stalled, {"a": 10}, table)).ok
    # g1 stalls past the TTL, and g2 starts a request in its place.
    taking = start("a")
    await eventually_starts(clocked, dep, taking, table)
    renewal = await ledger.heartbeat(dep, "g1", {}, {"a": [stalled.lease]}, table)
    assert (renewal.regained, renewal.lost) == (set(), {stalled.lease})
    # The lost lease is not counted: g2's request alone holds the limit.
    refused = await ledger.try_start(dep, "g2", start("a"), {"a": 10}, table)
    assert (refused.ok, refused.reason) == (False, "concurrency")
    # Once g2's request ends, a lapsed lease is taken back, and holds the limit again; a
    # live one is renewed and is neither.
    await ledger.settle(dep, ended("a", taking.lease, 0, table["a"]))
    renewal = await ledger.heartbeat(dep, "g1", {}, {"a": [stalled.lease]}, table)
    assert (renewal.regained, renewal.lost) == ({stalled.lease}, set())
    renewal = await ledger.heartbeat(dep, "g1", {}, {"a": [stalled.lease]}, table)
    assert (renewal.regained, renewal.lost) == (set(), set())
    refused = await ledger.try_start(dep, "g2", start("a"), {"a": 10}, table)
    assert (refused.ok, refused.reason) == (False, "concurrency")


async def test_a_renewal_made_before_a_requests_end_never_takes_its_lease_back(
    make_ledger: MakeLedger, dep: str
) -> None:
    """A gateway renews a lease while another call of its is under way, and the
    request ends as that call returns: the renewal finds the lease held (taken back, it
    could take the place of a lapsed lease still in use), and the end frees it. Each
    try is a gateway's first calls, on a ledger of its own."""
    table = tenants(a={"max_concurrency": 1})
    for _ in range(5):
        ledger = make_ledger(LONG_TTL, LONG_TTL).ledger
        request = start("a")
        assert (await ledger.try_start(dep, "g1", request, {}, table)).ok
        ahead = asyncio.ensure_future(ledger.waiting(dep))
        leases = {"a": [request.lease]}
        renewal = asyncio.ensure_future(ledger.heartbeat(dep, "g1", {}, leases, table))
        await ahead
        await ledger.settle(dep, ended("a", request.lease, 0, table["a"]))
        assert await renewal == Renewal()


async def test_the_redis_ledger_loads_its_scripts_again_after_a_flush(dep: str) -> None:
    """A restarted Redis has no scripts: the calls that found none are sent again once
    the scripts are loaded, and count once."""
    url = os.environ["REDIS_URL"]
    ledger = RedisLedger(url, LONG_TTL, LONG_TTL, namespace=f"test-{uuid.uuid4().hex}")
    admin = aioredis.Redis.from_url(url)
    try:
        table = tenants(a={"max_concurrency": 2})
        assert (await ledger.try_start(dep, "g1", start("a"), {}, table)).ok
        await admin.script_flush()
        assert (await ledger.try_start(dep, "g1", start("a"), {}, table)).ok
        refused = await ledger.try_start(dep, "g1", start("a"), {}, table)
        assert (refused.ok, refused.reason) == (False, "concurrency")
    finally:
        await ledger.close()
        await admin.aclose()


async def test_token_bucket_reserves_and_refunds(ledger: Ledger, dep: str) -> None:
    table = tenants(a={"tokens_per_s": 1.0, "burst_tokens": 100})
    first = start("a", reserve=60)
    assert (await ledger.try_start(dep, "g1", first, {"a": 10}, table)).ok
    refused = await ledger.try_start(dep, "g1", start("a", reserve=60), {"a": 10}, table)
    assert (refused.ok, refused.reason) == (False, "tokens")
    assert 15 < refused.wait_s <= 21  # 20 tokens short at 1 token/s
    await ledger.settle(dep, ended("a", first.lease, 50, table["a"]))  # used 10 of its 60
    assert (await ledger.try_start(dep, "g1", start("a", reserve=60), {"a": 10}, table)).ok


async def test_a_request_larger_than_the_bucket_waits_for_a_full_bucket(
    ledger: Ledger, dep: str
) -> None:
    table = tenants(a={"tokens_per_s": 1.0, "burst_tokens": 10})
    assert (await ledger.try_start(dep, "g1", start("a", reserve=50), {"a": 10}, table)).ok
    refused = await ledger.try_start(dep, "g1", start("a", reserve=50), {"a": 10}, table)
    assert refused.reason == "tokens" and refused.wait_s > 45  # 40 of debt, then 10


async def test_lower_counter_waiting_at_another_gateway_goes_first(
    ledger: Ledger, dep: str
) -> None:
    table = tenants(a={}, b={})
    # Both run a request (and stay active); a's costs more.
    assert (await ledger.try_start(dep, "g2", start("b", cost=10), {"b": 10}, table)).ok
    assert (await ledger.try_start(dep, "g1", start("a", cost=100), {"a": 10}, table)).ok
    # b waits at g2; a's next request at g1 must let it go first.
    await ledger.heartbeat(dep, "g2", {"b": 10}, {}, {})
    refused = await ledger.try_start(dep, "g1", start("a"), {"a": 10}, table)
    assert (refused.ok, refused.reason) == (False, "fair")
    # b (at g2) goes and passes a; then a may go again.
    assert (
        await ledger.try_start(dep, "g2", start("b", cost=200, last=False), {"b": 10}, table)
    ).ok
    assert (await ledger.try_start(dep, "g1", start("a"), {"a": 10}, table)).ok


async def test_weights_divide_the_counter(ledger: Ledger, dep: str) -> None:
    table = tenants(a={"weight": 1.0}, b={"weight": 3.0})
    a_started = b_started = 0
    for _ in range(40):
        # Both always waiting (a at g1, b at g2); whoever the ledger lets go, goes.
        ok_a = await ledger.try_start(
            dep, "g1", start("a", cost=30.0, last=False), {"a": 10}, table
        )
        ok_b = await ledger.try_start(
            dep, "g2", start("b", cost=10.0, last=False), {"b": 10}, table
        )
        a_started += ok_a.ok
        b_started += ok_b.ok
    assert 2.5 <= b_started / a_started <= 3.5


async def test_a_higher_class_waiting_anywhere_holds_a_lower_one_back(
    ledger: Ledger, dep: str
) -> None:
    table = tenants(low={}, high={"priority": 1, "max_concurrency": 1})
    first_high = start("high", last=False)
    assert (await ledger.try_start(dep, "g2", first_high, {"high": 10}, table)).ok
    # high still waits at g2 but is at its concurrency limit: it holds nobody back.
    assert (await ledger.try_start(dep, "g1", start("low"), {"low": 10}, table)).ok
    await ledger.settle(dep, ended("high", first_high.lease, 0, table["high"]))
    refused = await ledger.try_start(dep, "g1", start("low"), {"low": 10}, table)
    assert (refused.ok, refused.reason) == (False, "priority")


async def test_a_dead_gateways_waiting_tenants_stop_holding_others_back(
    make_ledger: MakeLedger, dep: str
) -> None:
    clocked = make_ledger(LONG_TTL, EXPIRY_TTL)
    ledger = clocked.ledger
    table = tenants(low={}, high={"priority": 1})
    await ledger.heartbeat(dep, "g2", {"high": 10}, {}, {})
    assert await ledger.waiting(dep) == {"high"}
    refused = await ledger.try_start(dep, "g1", start("low"), {"low": 10}, table)
    assert refused.reason == "priority"
    await eventually_starts(clocked, dep, start("low"), table)


async def test_an_idle_tenant_banks_no_credit(ledger: Ledger, dep: str) -> None:
    table = tenants(a={}, b={})
    for _ in range(5):
        assert (
            await ledger.try_start(dep, "g1", start("a", cost=100, last=False), {"a": 10}, table)
        ).ok
    # b arrives after idling; it is lifted to a's counter (500), not left at 0, so after
    # one request of its own a may go again.
    lifted = await ledger.try_start(dep, "g1", start("b", cost=100), {"a": 10, "b": 10}, table)
    assert lifted.ok and lifted.counter == pytest.approx(600)
    assert (await ledger.try_start(dep, "g1", start("a", cost=100), {"a": 10}, table)).ok


async def test_charges_advance_the_counter(ledger: Ledger, dep: str) -> None:
    table = tenants(a={}, b={})
    await ledger.heartbeat(dep, "g2", {"a": 10}, {}, {})
    await ledger.settle(dep, [Settlement(charges={"a": 50.0})])
    started = await ledger.try_start(dep, "g1", start("b", cost=0), {"b": 10}, table)
    assert started.ok and started.counter == pytest.approx(50)  # lifted to a's, not past it
    await ledger.settle(dep, [Settlement(charges={"b": 100.0})])
    refused = await ledger.try_start(dep, "g1", start("b", cost=0), {"b": 10}, table)
    assert (refused.ok, refused.reason, refused.counter) == (False, "fair", pytest.approx(150))


async def test_a_tenant_its_bucket_holds_back_holds_nobody_back(ledger: Ledger, dep: str) -> None:
    # a waits at g2 with a lower counter, but its next request needs 50 tokens and its
    # bucket holds about 10 (refilling at 1 token/s): it could not start, so b may.
    table = tenants(a={"tokens_per_s": 1.0, "burst_tokens": 60}, b={})
    assert (await ledger.try_start(dep, "g2", start("a", cost=1, reserve=50), {"a": 50}, table)).ok
    assert (await ledger.try_start(dep, "g1", start("b", cost=100), {"b": 10}, table)).ok
    await ledger.heartbeat(dep, "g2", {"a": 50}, {}, {})
    refused = await ledger.try_start(dep, "g2", start("a", reserve=50), {"a": 50}, table)
    assert (refused.ok, refused.reason) == (False, "tokens")
    assert (await ledger.try_start(dep, "g1", start("b"), {"b": 10}, table)).ok
    # Once its next request is one its bucket can pay for, a goes first again.
    await ledger.heartbeat(dep, "g2", {"a": 5}, {}, {})
    refused = await ledger.try_start(dep, "g1", start("b"), {"b": 10}, table)
    assert (refused.ok, refused.reason) == (False, "fair")


async def test_going_beyond_the_slots_holds_a_tenant_to_its_weighted_share(
    ledger: Ledger, dep: str
) -> None:
    table = tenants(a={"weight": 1}, b={"weight": 3}, lo={"priority": -1})
    # lo holds leases, but a lower class does not count against the others' shares.
    assert (await ledger.try_start(dep, "g1", start("lo", cost=0), {"lo": 10}, table)).ok
    # a alone (b idle): a share of all 8 slots.
    for _ in range(8):
        beyond = start("a", cost=0, last=False, share_of=8)
        assert (await ledger.try_start(dep, "g1", beyond, {"a": 10}, table)).ok
    refused = await ledger.try_start(dep, "g1", start("a", share_of=8), {"a": 10}, table)
    assert (refused.ok, refused.reason) == (False, "share")
    # b waiting too: b's share is 6, a's 2 (it holds 8: nothing more beyond the slots).
    await ledger.heartbeat(dep, "g2", {"b": 10}, {}, {})
    for _ in range(6):
        assert (
            await ledger.try_start(
                dep, "g2", start("b", cost=0, last=False, share_of=8), {"b": 10}, table
            )
        ).ok
    refused = await ledger.try_start(dep, "g2", start("b", cost=0, share_of=8), {"b": 10}, table)
    assert (refused.ok, refused.reason) == (False, "share")
    # Within the slots (no share_of), only the usual rules apply.
    assert (await ledger.try_start(dep, "g2", start("b", cost=0), {"b": 10}, table)).ok


async def test_a_settlement_carried_again_is_applied_once(ledger: Ledger, dep: str) -> None:
    """A call whose answer was lost may have been applied: the gateway carries the same
    settlement again, alone or beside what it owes since."""
    table = tenants(a={"tokens_per_s": 1.0, "burst_tokens": 200}, b={})
    first = start("a", cost=0, reserve=100)
    assert (await ledger.try_start(dep, "g1", first, {"a": 100}, table)).ok
    owed = [Settlement([Finished("a", first.lease, 50, table["a"])], {"b": 7.0})]
    await ledger.settle(dep, owed)
    await ledger.settle(dep, [*owed, Settlement(charges={"b": 1.0})])
    # Bucket: 200 - 100 + 50, not 200; b's counter: 7 + 1, not 15.
    refused = await ledger.try_start(dep, "g1", start("a", reserve=160), {"a": 160}, table)
    assert (refused.ok, refused.reason) == (False, "tokens")
    assert 5 < refused.wait_s <= 10
    await ledger.heartbeat(dep, "g2", {"b": 10}, {}, {})
    started = await ledger.try_start(dep, "g2", start("b", cost=0), {"b": 10}, table, owed)
    assert started.ok and started.counter == pytest.approx(8.0)


async def test_a_start_asked_again_under_its_lease_counts_once(ledger: Ledger, dep: str) -> None:
    """A start whose answer was lost is asked again with the same lease: it is let
    start (its lease is held), with no second lease, reservation or counter advance."""
    table = tenants(a={"max_concurrency": 1, "tokens_per_s": 1.0, "burst_tokens": 100})
    request = start("a", cost=10, reserve=60)
    assert (await ledger.try_start(dep, "g1", request, {"a": 60}, table)).ok
    again = await ledger.try_start(dep, "g1", request, {"a": 60}, table)
    assert (again.ok, again.counter) == (True, pytest.approx(10.0))
    await ledger.settle(dep, ended("a", request.lease, 60, table["a"]))
    # The one lease is freed and the bucket is full again.
    assert (await ledger.try_start(dep, "g1", start("a", reserve=100), {"a": 100}, table)).ok


async def test_an_unsure_start_is_undone_only_if_it_happened(ledger: Ledger, dep: str) -> None:
    table = tenants(a={"max_concurrency": 2, "tokens_per_s": 1.0, "burst_tokens": 100})
    taken = start("a", cost=12.5, reserve=40)
    assert (await ledger.try_start(dep, "g1", taken, {"a": 40}, table)).ok

    def undone(lease: str) -> list[Settlement]:
        return [Settlement([Finished("a", lease, 40, table["a"], held_only=True, cost=12.5)])]

    # Never started: nothing to give back (the bucket stays at 60, the counter at 12.5).
    await ledger.settle(dep, undone(uuid.uuid4().hex))
    refused = await ledger.try_start(dep, "g1", start("a", reserve=70), {"a": 70}, table)
    assert (refused.ok, refused.reason, refused.counter) == (False, "tokens", 12.5)
    # Started: its lease, its 40 tokens and its counter advance come back.
    await ledger.settle(dep, undone(taken.lease))
    for expected in (0.0, 1.0):
        again = start("a", cost=1.0, reserve=50, last=False)
        decision = await ledger.try_start(dep, "g1", again, {"a": 50}, table)
        assert decision.ok and decision.counter == pytest.approx(expected + 1.0)


def test_what_failed_calls_carried_goes_again_alone_and_as_it_was() -> None:
    """However many calls fail while the ledger is away, what they carried stays one
    settlement with one id; what is owed meanwhile goes with the call after it."""
    limits = TenantConfig.model_validate({})
    dues = Dues()
    dues.end(Finished("a", "lease-1", 5, limits))
    (first,) = dues.take()
    for _ in range(49):  # calls fail; tokens stream meanwhile
        dues.restore([first])
        dues.charge("a", 1.0)
        assert dues.take() == [first]
    dues.charge("a", 1.0)
    (after,) = dues.take()
    assert after.id != first.id and after.charges == {"a": 50.0} and not after.finished
    assert not dues
