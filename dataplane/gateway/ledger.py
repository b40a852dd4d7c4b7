"""Fleet-wide tenant counters and limits: one ledger shared by every gateway of a deployment.

Every request waits at a gateway until the ledger lets it start. The rules, the same in
both implementations (Redis for several gateways, in-process for one):

- Fairness is the Virtual Token Counter of the worker's scheduler, kept fleet-wide: a
  tenant's counter advances by its weighted prompt tokens when a request starts and its
  weighted output tokens as they stream, divided by its weight. A request may start only
  while no tenant waiting at any gateway (and able to start under its own limits: the
  same concurrency and token tests its own next request would face) is in a higher
  priority class, or in the same class with a lower counter. A tenant that starts waiting
  after being idle is lifted to the lowest counter among active tenants, so idling banks
  no credit.
- ``max_concurrency``: a running request holds a lease that expires ``lease_ttl`` after
  its gateway last renewed it, so the leases of a gateway that died free themselves. A
  lease that lapsed while its gateway lived (stalled, or cut off from the ledger, for
  longer than the TTL) is taken again at the next renewal only while the tenant is under
  its limit; otherwise it is lost, and its gateway ends the request, because the ledger
  may have let another start in its place.
- ``tokens_per_s``: a token bucket of output tokens, starting full. A request reserves
  its ``max_tokens`` when it starts, which it may do while the bucket holds that many (or
  is full, when that is fewer); when it ends, what it did not use is refunded and what it
  produced beyond the reservation is charged (the bucket may go into debt). Over any
  interval T the tenant is sent at most ``burst + rate * T`` tokens plus the reservations
  of the requests running at its ends, and as long as it has waiting requests its rate
  is ``rate``.
- A request sent on while every replica is full (to be given a row the worker pauses
  for it) names the fleet's batch slots (``share_of``): it may start only while its
  tenant holds fewer leases than its weighted share of those slots among the active
  tenants (waiting or holding leases) of its class, as a worker shares its rows.
- Waiting is registered per gateway, with the reservation of the tenant's next request
  there and an expiry, so a dead gateway's waiting tenants stop holding others back.
- A call may be asked again after its answer was lost, and counts once: settlements
  carry ids, applied once (remembered ``SETTLED_TTL_S``), and a start whose lease is
  already held is let through without a second charge. A start that never reached a
  replica is undone, if it happened: lease, reservation and counter advance go back.

Redis runs each decision as one Lua script on Redis's own clock, so gateways on different
hosts agree on time and no decision sees another half made. Both ledgers apply one
gateway's calls in the order it makes them.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections import deque
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

from dataplane.inference.config import TenantConfig

_DEFAULT = TenantConfig.model_validate({})


@dataclass(frozen=True)
class Decision:
    """Whether a request may start; if not, why (``priority``, ``fair``, ``share``,
    ``concurrency`` or ``tokens``) and, for ``tokens``, how long until the bucket holds enough. ``counter``
    is the tenant's virtual counter as the ledger saw it."""

    ok: bool
    reason: str = ""
    wait_s: float = 0.0
    counter: float = 0.0


@dataclass(frozen=True)
class StartRequest:
    """A waiting request asking to start."""

    tenant: str
    lease: str
    cost: float  # weighted prompt tokens / weight: what the counter advances by at start
    reserve: int  # output tokens reserved from the bucket
    last: bool  # the tenant's last request waiting at this gateway
    share_of: int = 0  # the fleet's batch slots, for a request sent on beyond them


@dataclass(frozen=True)
class Finished:
    """A request that ended: its lease is freed, and ``refund`` (the reserved tokens less
    those produced) goes back to its tenant's bucket; a negative one is charged.
    ``held_only``: a start that never reached a replica (its client left while its
    answer was lost, or no replica had room for it any more), undone only if it did
    take the lease: lease freed, reservation refunded and its counter advance (``cost``)
    taken back, so its next start is charged once."""

    tenant: str
    lease: str
    refund: int
    limits: TenantConfig
    held_only: bool = False
    cost: float = 0.0


SETTLED_TTL_S = 300.0
"""How long the ledger remembers a settlement it applied: a call carrying it again within
that time (its first answer lost) changes nothing."""


@dataclass
class Settlement:
    """What one ledger call carries for a gateway: requests that ended and tokens streamed
    (tenant -> weighted output tokens / weight). The ledger applies a settlement once,
    by its id, however often calls whose answers were lost carry it."""

    finished: list[Finished] = field(default_factory=list)
    charges: dict[str, float] = field(default_factory=dict)
    since: float | None = None  # when the oldest of it was owed (time.monotonic)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def __bool__(self) -> bool:
        return bool(self.finished or self.charges)


class Dues:
    """What a gateway owes the ledger for one deployment. It rides on the gateway's next
    call, so under load ending a request or streaming a token costs no round trip of its
    own. Settlements that a failed call carried are carried again as they were, with
    their ids (that call may have been applied), and alone: what is owed meanwhile waits
    for the call after, so however long the ledger is away they stay as few as the calls
    that were under way."""

    def __init__(self) -> None:
        self._fresh = Settlement()
        self._unsure: list[Settlement] = []

    def __bool__(self) -> bool:
        return bool(self._fresh or self._unsure)

    @property
    def since(self) -> float | None:
        """When the oldest of it was owed (time.monotonic); None if nothing is."""
        return min((s.since for s in self._all() if s.since is not None), default=None)

    @property
    def ends(self) -> bool:
        """Whether ended requests are owed."""
        return any(s.finished for s in self._all())

    def _all(self) -> list[Settlement]:
        return [*self._unsure, self._fresh]

    def end(self, finished: Finished) -> None:
        self._fresh.finished.append(finished)
        self._owed()

    def charge(self, tenant: str, amount: float) -> None:
        charges = self._fresh.charges
        charges[tenant] = charges.get(tenant, 0.0) + amount
        self._owed()

    def _owed(self) -> None:
        if self._fresh.since is None:
            self._fresh.since = time.monotonic()

    def take(self) -> list[Settlement]:
        """For one call: the settlements failed calls carried, or else what is owed."""
        if self._unsure:
            taken, self._unsure = self._unsure, []
            return taken
        taken = [self._fresh] if self._fresh else []
        self._fresh = Settlement()
        return taken

    def restore(self, taken: list[Settlement]) -> None:
        """Owe again what a failed call took, to be carried as it was."""
        self._unsure[:0] = taken


@dataclass(frozen=True)
class Renewal:
    """What a renewal found of the leases it was given that had lapsed: ``regained``,
    taken again under the tenant's limit, and ``lost``, which another request may have
    taken. A gateway's calls are applied in the order it makes them, so a request that
    ended after the renewal was sent is settled after it; one settled before it all the
    same (a renewal sent again after a Redis restart) is among them too, and is nothing
    to its gateway any more."""

    regained: frozenset[str] = frozenset()
    lost: frozenset[str] = frozenset()


class Ledger(Protocol):
    """The shared counters of one deployment's tenants."""

    async def try_start(
        self,
        deployment: str,
        gateway: str,
        request: StartRequest,
        waiting: Mapping[str, int],
        tenants: Mapping[str, TenantConfig],
        owed: Sequence[Settlement] = (),
    ) -> Decision:
        """Start ``request`` if the rules allow; ``waiting`` maps the tenants with
        requests waiting at this gateway (the request's own tenant included) to the
        reservation of the next one. ``owed`` is settled first, in the same call. A
        request whose lease is already held was started by a call whose answer was
        lost: it is let start again, and nothing is charged twice."""
        ...

    async def settle(self, deployment: str, owed: Sequence[Settlement]) -> None:
        """Free the ended requests' leases, settle their reservations (and take back
        the counter advance of an undone start) and advance the tenants' counters by
        the tokens streamed; a settlement applied before is skipped."""
        ...

    async def heartbeat(
        self,
        deployment: str,
        gateway: str,
        waiting: Mapping[str, int],
        leases: Mapping[str, Collection[str]],
        tenants: Mapping[str, TenantConfig],
    ) -> Renewal:
        """Renew this gateway's leases (tenant -> lease ids), take back the lapsed ones
        the tenants' ``max_concurrency`` still allows, and set its waiting tenants
        (tenant -> the next request's reservation)."""
        ...

    async def waiting(self, deployment: str) -> set[str]:
        """The tenants with requests waiting at any gateway."""
        ...

    async def close(self) -> None: ...


@dataclass
class _Bucket:
    level: float
    at: float


@dataclass
class _Book:
    counters: dict[str, float] = field(default_factory=dict)
    backlog: dict[tuple[str, str], float] = field(default_factory=dict)  # (tenant, gw) -> expiry
    needs: dict[tuple[str, str], int] = field(default_factory=dict)  # (tenant, gw) -> reserve
    leases: dict[str, dict[str, float]] = field(default_factory=dict)  # tenant -> id -> expiry
    buckets: dict[str, _Bucket] = field(default_factory=dict)
    # Settlements applied: their ids, and (expiry, id) in the order they were applied.
    settled: set[str] = field(default_factory=set)
    settled_until: deque[tuple[float, str]] = field(default_factory=deque)


class InProcessLedger:
    """The ledger for one gateway (the embedded default): the same rules in memory."""

    def __init__(
        self,
        lease_ttl_s: float,
        backlog_ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._lease_ttl = lease_ttl_s
        self._backlog_ttl = backlog_ttl_s
        self._clock = clock
        self._books: dict[str, _Book] = {}

    def _book(self, deployment: str) -> _Book:
        return self._books.setdefault(deployment, _Book())

    @staticmethod
    def _leases(book: _Book, tenant: str, now: float) -> int:
        held = book.leases.get(tenant)
        if not held:
            return 0
        for lease in [k for k, expiry in held.items() if expiry <= now]:
            del held[lease]
        return len(held)

    @staticmethod
    def _level(book: _Book, limits: TenantConfig, tenant: str, now: float) -> float | None:
        if limits.tokens_per_s is None:
            return None
        bucket = book.buckets.get(tenant)
        if bucket is None:
            return float(limits.bucket_tokens)
        return min(
            float(limits.bucket_tokens), bucket.level + (now - bucket.at) * limits.tokens_per_s
        )

    def _backlogged(self, book: _Book, now: float) -> set[str]:
        for key in [k for k, expiry in book.backlog.items() if expiry <= now]:
            del book.backlog[key]
            book.needs.pop(key, None)
        return {tenant for tenant, _ in book.backlog}

    def _active(self, book: _Book, now: float) -> set[str]:
        """Tenants waiting at any gateway or holding leases."""
        held = {t for t in list(book.leases) if self._leases(book, t, now) > 0}
        return self._backlogged(book, now) | held

    @staticmethod
    def _need(book: _Book, tenant: str) -> int:
        """The smallest reservation among the tenant's next requests at any gateway."""
        return min((n for (t, _), n in book.needs.items() if t == tenant), default=1)

    def _register(
        self,
        book: _Book,
        gateway: str,
        waiting: Mapping[str, int],
        now: float,
    ) -> None:
        """Lift newly waiting idle tenants, then make ``waiting`` this gateway's backlog."""
        active = self._active(book, now)
        for tenant in waiting:
            if tenant in active:
                continue
            others = [book.counters.get(t, 0.0) for t in active]
            if others:
                book.counters[tenant] = max(book.counters.get(tenant, 0.0), min(others))
        for key in [k for k in book.backlog if k[1] == gateway]:
            del book.backlog[key]
            book.needs.pop(key, None)
        for tenant, need in waiting.items():
            book.backlog[(tenant, gateway)] = now + self._backlog_ttl
            book.needs[(tenant, gateway)] = need

    async def try_start(
        self,
        deployment: str,
        gateway: str,
        request: StartRequest,
        waiting: Mapping[str, int],
        tenants: Mapping[str, TenantConfig],
        owed: Sequence[Settlement] = (),
    ) -> Decision:
        now = self._clock()
        book = self._book(deployment)
        self._settle(book, owed, now)
        self._register(book, gateway, waiting, now)
        me = request.tenant
        mine = tenants.get(me, _DEFAULT)
        counter = book.counters.get(me, 0.0)
        if book.leases.get(me, {}).get(request.lease, -math.inf) > now:
            return Decision(True, counter=counter)  # started by a call whose answer was lost
        for other in self._backlogged(book, now) - {me}:
            limits = tenants.get(other)
            if limits is None or not self._eligible(book, other, limits, now):
                continue
            if limits.priority > mine.priority:
                return Decision(False, "priority", counter=counter)
            if limits.priority == mine.priority and book.counters.get(other, 0.0) < counter:
                return Decision(False, "fair", counter=counter)
        held = self._leases(book, me, now)
        if request.share_of and held + 1 > self._share(book, me, request.share_of, tenants, now):
            return Decision(False, "share", counter=counter)
        if mine.max_concurrency is not None and held >= mine.max_concurrency:
            return Decision(False, "concurrency", counter=counter)
        level = self._level(book, mine, me, now)
        if level is not None:
            need = min(mine.bucket_tokens, request.reserve)
            if level < need:
                wait = (need - level) / (mine.tokens_per_s or math.inf)
                return Decision(False, "tokens", wait, counter)
            book.buckets[me] = _Bucket(level - request.reserve, now)
        book.leases.setdefault(me, {})[request.lease] = now + self._lease_ttl
        book.counters[me] = counter + request.cost
        if request.last:
            book.backlog.pop((me, gateway), None)
            book.needs.pop((me, gateway), None)
        return Decision(True, counter=counter + request.cost)

    def _share(
        self,
        book: _Book,
        tenant: str,
        slots: int,
        tenants: Mapping[str, TenantConfig],
        now: float,
    ) -> float:
        """The tenant's weighted share of ``slots`` among the active tenants of its class."""
        mine = tenants.get(tenant, _DEFAULT)
        total = mine.weight + sum(
            tenants[t].weight
            for t in self._active(book, now) - {tenant}
            if t in tenants and tenants[t].priority == mine.priority
        )
        return slots * mine.weight / total

    def _eligible(self, book: _Book, tenant: str, limits: TenantConfig, now: float) -> bool:
        """Whether the tenant's own limits let one more of its requests start now."""
        if (
            limits.max_concurrency is not None
            and self._leases(book, tenant, now) >= limits.max_concurrency
        ):
            return False
        level = self._level(book, limits, tenant, now)
        return level is None or level >= min(limits.bucket_tokens, self._need(book, tenant))

    def _settle(self, book: _Book, owed: Sequence[Settlement], now: float) -> None:
        while book.settled_until and book.settled_until[0][0] <= now:
            book.settled.discard(book.settled_until.popleft()[1])
        for settlement in owed:
            if settlement.id in book.settled:
                continue
            book.settled.add(settlement.id)
            book.settled_until.append((now + SETTLED_TTL_S, settlement.id))
            for done in settlement.finished:
                held = book.leases.get(done.tenant, {}).pop(done.lease, None) is not None
                level = self._level(book, done.limits, done.tenant, now)
                if level is not None and done.refund != 0 and (held or not done.held_only):
                    cap = float(done.limits.bucket_tokens)
                    book.buckets[done.tenant] = _Bucket(min(cap, level + done.refund), now)
                if held and done.held_only and done.cost > 0:
                    book.counters[done.tenant] = book.counters.get(done.tenant, 0.0) - done.cost
            for tenant, amount in settlement.charges.items():
                book.counters[tenant] = book.counters.get(tenant, 0.0) + amount

    async def settle(self, deployment: str, owed: Sequence[Settlement]) -> None:
        self._settle(self._book(deployment), owed, self._clock())

    async def heartbeat(
        self,
        deployment: str,
        gateway: str,
        waiting: Mapping[str, int],
        leases: Mapping[str, Collection[str]],
        tenants: Mapping[str, TenantConfig],
    ) -> Renewal:
        now = self._clock()
        book = self._book(deployment)
        regained: set[str] = set()
        lost: set[str] = set()
        for tenant, ids in leases.items():
            self._leases(book, tenant, now)  # the lapsed ones go
            held = book.leases.setdefault(tenant, {})
            limit = tenants.get(tenant, _DEFAULT).max_concurrency
            for lease in ids:
                if lease not in held:
                    if limit is not None and len(held) >= limit:
                        lost.add(lease)
                        continue
                    regained.add(lease)
                held[lease] = now + self._lease_ttl
        self._register(book, gateway, waiting, now)
        return Renewal(frozenset(regained), frozenset(lost))

    async def waiting(self, deployment: str) -> set[str]:
        return self._backlogged(self._book(deployment), self._clock())

    async def close(self) -> None:
        """Nothing to release."""


# A single Redis server: the scripts name their keys in ARGV, so Redis Cluster is not
# supported.
_LUA_COMMON = """
local prefix = ARGV[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local vtc = prefix .. 'vtc'
local backlog = prefix .. 'backlog'
local needs = prefix .. 'need'
local function leases(name)
  local key = prefix .. 'lease:' .. name
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  return redis.call('ZCARD', key)
end
local function level(name, rate, cap)
  if rate < 0 then return nil end
  local b = redis.call('HMGET', prefix .. 'bucket:' .. name, 'level', 'at')
  local lvl, at = tonumber(b[1]), tonumber(b[2])
  if lvl == nil then return cap end
  return math.min(cap, lvl + (now - at) * rate)
end
local function counter(name)
  return tonumber(redis.call('HGET', vtc, name) or '0')
end
local function split(member)
  local cut = string.find(member, '\\t', 1, true)
  return string.sub(member, 1, cut - 1), string.sub(member, cut + 1)
end
local function backlogged()
  local expired = redis.call('ZRANGEBYSCORE', backlog, '-inf', now)
  if #expired > 0 then redis.call('HDEL', needs, unpack(expired)) end
  redis.call('ZREMRANGEBYSCORE', backlog, '-inf', now)
  local set = {}
  for _, member in ipairs(redis.call('ZRANGE', backlog, 0, -1)) do
    local tenant = split(member)
    set[tenant] = true
  end
  return set
end
-- Settle what a gateway owes, read from ARGV[i] on: the seconds an applied settlement
-- is remembered, the number of settlements, then for each its id; the number of ended
-- requests, then (tenant lease refund rate cap held_only cost) for each; the number of
-- tenants charged, then (tenant amount) for each. A settlement applied before is skipped.
-- Returns the index after it.
local function settle(i)
  local ttl, parts = tonumber(ARGV[i]), tonumber(ARGV[i + 1])
  i = i + 2
  for _ = 1, parts do
    local apply = redis.call('SET', prefix .. 'settled:' .. ARGV[i], 1, 'NX', 'EX', ttl)
    local n = tonumber(ARGV[i + 1])
    i = i + 2
    for _ = 1, n do
      if apply then
        local name, refund = ARGV[i], tonumber(ARGV[i + 2])
        local rate, cap = tonumber(ARGV[i + 3]), tonumber(ARGV[i + 4])
        local held = redis.call('ZREM', prefix .. 'lease:' .. name, ARGV[i + 1]) == 1
        local lvl = level(name, rate, cap)
        if lvl ~= nil and refund ~= 0 and (held or ARGV[i + 5] == '0') then
          redis.call('HSET', prefix .. 'bucket:' .. name, 'level', math.min(cap, lvl + refund),
                     'at', now)
        end
        if held and ARGV[i + 5] == '1' and tonumber(ARGV[i + 6]) > 0 then
          redis.call('HINCRBYFLOAT', vtc, name, '-' .. ARGV[i + 6])
        end
      end
      i = i + 7
    end
    n = tonumber(ARGV[i])
    i = i + 1
    for _ = 1, n do
      if apply then redis.call('HINCRBYFLOAT', vtc, ARGV[i], ARGV[i + 1]) end
      i = i + 2
    end
  end
  return i
end
-- The smallest reservation among a tenant's next requests at any gateway.
local function need(name)
  local found = nil
  for _, member in ipairs(redis.call('ZRANGE', backlog, 0, -1)) do
    local tenant = split(member)
    if tenant == name then
      local n = tonumber(redis.call('HGET', needs, member) or '1')
      if found == nil or n < found then found = n end
    end
  end
  return found or 1
end
-- Lift newly waiting idle tenants to the lowest active counter, then make ``waiting``
-- (names, and reservations by name) this gateway's backlog.
local function set_waiting(gw, waiting, reserves, ttl)
  local active = backlogged()
  for _, name in ipairs(redis.call('SMEMBERS', prefix .. 'leased')) do
    if leases(name) > 0 then active[name] = true end
  end
  for _, name in ipairs(waiting) do
    if not active[name] then
      local lowest = nil
      for other in pairs(active) do
        local c = counter(other)
        if lowest == nil or c < lowest then lowest = c end
      end
      if lowest ~= nil and lowest > counter(name) then redis.call('HSET', vtc, name, lowest) end
    end
  end
  for _, member in ipairs(redis.call('ZRANGE', backlog, 0, -1)) do
    local _, owner = split(member)
    if owner == gw then
      redis.call('ZREM', backlog, member)
      redis.call('HDEL', needs, member)
    end
  end
  for _, name in ipairs(waiting) do
    redis.call('ZADD', backlog, now + ttl, name .. '\\t' .. gw)
    redis.call('HSET', needs, name .. '\\t' .. gw, reserves[name])
  end
end
"""

# ARGV: prefix, what is owed (see settle), gw tenant lease cost reserve lease_ttl
# backlog_ttl last share_of nwait (waiting tenant, its reservation)... then per tenant of
# the deployment: name priority weight max_concurrency rate cap (-1 for none).
_TRY_START = (
    _LUA_COMMON
    + """
local i = settle(2)
local gw, me, lease = ARGV[i], ARGV[i + 1], ARGV[i + 2]
local cost, reserve = tonumber(ARGV[i + 3]), tonumber(ARGV[i + 4])
local lease_ttl, backlog_ttl = tonumber(ARGV[i + 5]), tonumber(ARGV[i + 6])
local last, share_of, nwait = ARGV[i + 7] == '1', tonumber(ARGV[i + 8]), tonumber(ARGV[i + 9])
local waiting, reserves = {}, {}
i = i + 10
for _ = 1, nwait do
  waiting[#waiting + 1] = ARGV[i]; reserves[ARGV[i]] = ARGV[i + 1]; i = i + 2
end
local info = {}
while i <= #ARGV do
  info[ARGV[i]] = {prio = tonumber(ARGV[i + 1]), w = tonumber(ARGV[i + 2]),
                   maxc = tonumber(ARGV[i + 3]), rate = tonumber(ARGV[i + 4]),
                   cap = tonumber(ARGV[i + 5])}
  i = i + 6
end
local function eligible(name)
  local cfg = info[name]
  if cfg == nil then return false end
  if cfg.maxc >= 0 and leases(name) >= cfg.maxc then return false end
  local lvl = level(name, cfg.rate, cfg.cap)
  return lvl == nil or lvl >= math.min(cfg.cap, need(name))
end
set_waiting(gw, waiting, reserves, backlog_ttl)
local mine = info[me]
local mine_c = counter(me)
local held = tonumber(redis.call('ZSCORE', prefix .. 'lease:' .. me, lease))
if held ~= nil and held > now then  -- started by a call whose answer was lost
  return {1, '', '0', tostring(mine_c)}
end
for other in pairs(backlogged()) do
  if other ~= me and eligible(other) then
    local p = info[other].prio
    if p > mine.prio then return {0, 'priority', '0', tostring(mine_c)} end
    if p == mine.prio and counter(other) < mine_c then
      return {0, 'fair', '0', tostring(mine_c)}
    end
  end
end
if share_of > 0 then
  local total, counted = mine.w, {[me] = true}
  local function count(name)
    local cfg = info[name]
    if not counted[name] and cfg ~= nil and cfg.prio == mine.prio then
      counted[name] = true
      total = total + cfg.w
    end
  end
  for name in pairs(backlogged()) do count(name) end
  for _, name in ipairs(redis.call('SMEMBERS', prefix .. 'leased')) do
    if leases(name) > 0 then count(name) end
  end
  if leases(me) + 1 > share_of * mine.w / total then
    return {0, 'share', '0', tostring(mine_c)}
  end
end
if mine.maxc >= 0 and leases(me) >= mine.maxc then
  return {0, 'concurrency', '0', tostring(mine_c)}
end
local lvl = level(me, mine.rate, mine.cap)
if lvl ~= nil then
  local need = math.min(mine.cap, reserve)
  if lvl < need then return {0, 'tokens', tostring((need - lvl) / mine.rate), tostring(mine_c)} end
  redis.call('HSET', prefix .. 'bucket:' .. me, 'level', lvl - reserve, 'at', now)
end
redis.call('ZADD', prefix .. 'lease:' .. me, now + lease_ttl, lease)
redis.call('SADD', prefix .. 'leased', me)
redis.call('HINCRBYFLOAT', vtc, me, cost)
if last then
  redis.call('ZREM', backlog, me .. '\\t' .. gw)
  redis.call('HDEL', needs, me .. '\\t' .. gw)
end
return {1, '', '0', tostring(mine_c + cost)}
"""
)

# ARGV: prefix, what is owed (see settle).
_SETTLE = (
    _LUA_COMMON
    + """
settle(2)
return 1
"""
)

# ARGV: prefix gw lease_ttl backlog_ttl nwait (waiting tenant, its reservation)... then
# per tenant: name max_concurrency (-1 for none) n, and its n lease ids. Renews the live
# leases, then takes back lapsed ones while the tenant is under its limit; returns the
# ones taken back and the ones lost.
_HEARTBEAT = (
    _LUA_COMMON
    + """
local gw, lease_ttl, backlog_ttl = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local nwait = tonumber(ARGV[5])
local waiting, reserves = {}, {}
local i = 6
for _ = 1, nwait do
  waiting[#waiting + 1] = ARGV[i]; reserves[ARGV[i]] = ARGV[i + 1]; i = i + 2
end
local regained, lost = {}, {}
while i <= #ARGV do
  local name, maxc, n = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  local key = prefix .. 'lease:' .. name
  local held = leases(name)
  local lapsed = {}
  for j = i + 3, i + 2 + n do
    if redis.call('ZSCORE', key, ARGV[j]) then
      redis.call('ZADD', key, now + lease_ttl, ARGV[j])
    else
      lapsed[#lapsed + 1] = ARGV[j]
    end
  end
  for _, lease in ipairs(lapsed) do
    if maxc >= 0 and held >= maxc then
      lost[#lost + 1] = lease
    else
      redis.call('ZADD', key, now + lease_ttl, lease)
      regained[#regained + 1] = lease
      held = held + 1
    end
  end
  redis.call('SADD', prefix .. 'leased', name)
  i = i + 3 + n
end
set_waiting(gw, waiting, reserves, backlog_ttl)
return {regained, lost}
"""
)


_WAITING = (
    _LUA_COMMON
    + """
local names = {}
for name in pairs(backlogged()) do names[#names + 1] = name end
return names
"""
)


def _waiting_args(waiting: Mapping[str, int]) -> list[str]:
    args = [str(len(waiting))]
    for tenant, reserve in waiting.items():
        args += [tenant, str(reserve)]
    return args


def _owed_args(owed: Sequence[Settlement]) -> list[str]:
    args = [repr(SETTLED_TTL_S), str(len(owed))]
    for settlement in owed:
        args += [settlement.id, str(len(settlement.finished))]
        for done in settlement.finished:
            limits = _limits_args(done.limits)[1:]
            args += [done.tenant, done.lease, str(done.refund), *limits]
            args += [str(int(done.held_only)), repr(done.cost)]
        args.append(str(len(settlement.charges)))
        for tenant, amount in settlement.charges.items():
            args += [tenant, repr(amount)]
    return args


def _limits_args(limits: TenantConfig) -> list[str]:
    rate = limits.tokens_per_s
    return [
        str(limits.max_concurrency if limits.max_concurrency is not None else -1),
        repr(rate if rate is not None else -1.0),
        str(limits.bucket_tokens if rate is not None else 0),
    ]


@dataclass(eq=False)
class _Call:
    """A Redis ledger call waiting for its round trip."""

    script: AsyncScript
    args: list[str]
    answer: asyncio.Future[Any]


class RedisLedger:
    """The ledger in Redis, shared by every gateway that names the same server.

    A gateway's calls go to Redis in the order they are made, one round trip at a time:
    the calls made while one is under way go together in the next (a pipeline). A
    renewal and the settlement of a request that ended after it was sent then cannot
    cross (the ended lease would be taken back, and could take the place of a lapsed
    one still in use), nor can a settlement and an admission, and requests that start
    and end together share a round trip."""

    def __init__(
        self, url: str, lease_ttl_s: float, backlog_ttl_s: float, namespace: str = "tailguard:gw"
    ) -> None:
        self._redis = aioredis.Redis.from_url(url)
        self._lease_ttl = lease_ttl_s
        self._backlog_ttl = backlog_ttl_s
        self._namespace = namespace
        self._try_start = self._redis.register_script(_TRY_START)
        self._settle = self._redis.register_script(_SETTLE)
        self._heartbeat = self._redis.register_script(_HEARTBEAT)
        self._waiting = self._redis.register_script(_WAITING)
        self._loaded = False
        self._calls: list[_Call] = []
        self._sender: asyncio.Task[None] | None = None

    async def _call(self, script: AsyncScript, args: list[str]) -> Any:
        """Queue a call for the next round trip and wait for its answer. A caller that
        leaves before its call was sent takes it out; after, the call is applied and
        its answer lost (the rules make a call asked again count once)."""
        call = _Call(script, args, asyncio.get_running_loop().create_future())
        self._calls.append(call)
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._send())
        return await call.answer

    async def _send(self) -> None:
        while self._calls:
            batch = [call for call in self._calls if not call.answer.done()]
            self._calls = []
            if not batch:
                continue
            try:
                answers = await self._round_trip(batch)
            except BaseException as exc:
                failure = (
                    exc if isinstance(exc, Exception) else ConnectionError("the ledger was closed")
                )
                for call in batch:
                    if not call.answer.done():
                        call.answer.set_exception(failure)
                if not isinstance(exc, Exception):
                    raise
                continue
            for call, answer in zip(batch, answers, strict=True):
                if call.answer.done():
                    continue
                if isinstance(answer, Exception):
                    call.answer.set_exception(answer)
                else:
                    call.answer.set_result(answer)

    async def _round_trip(self, batch: list[_Call]) -> list[Any]:
        """The answers to ``batch``, in one pipeline. The scripts are loaded before the
        first; after a Redis restart they are gone and the calls fail with NOSCRIPT,
        unapplied: the scripts are loaded again and those calls sent again, in order."""
        if not self._loaded:
            await self._load()
        answers = await self._pipeline(batch)
        again = [i for i, answer in enumerate(answers) if isinstance(answer, NoScriptError)]
        if again:
            await self._load()
            resent = await self._pipeline([batch[i] for i in again])
            for i, answer in zip(again, resent, strict=True):
                answers[i] = answer
        return answers

    async def _pipeline(self, batch: list[_Call]) -> list[Any]:
        pipe = self._redis.pipeline(transaction=False)
        for call in batch:
            pipe.evalsha(call.script.sha, 0, *call.args)
        return list(await pipe.execute(raise_on_error=False))

    async def _load(self) -> None:
        pipe = self._redis.pipeline(transaction=False)
        for script in (self._try_start, self._settle, self._heartbeat, self._waiting):
            pipe.script_load(script.script)
        await pipe.execute()
        self._loaded = True

    def _prefix(self, deployment: str) -> str:
        return f"{self._namespace}:{{{deployment}}}:"

    async def try_start(
        self,
        deployment: str,
        gateway: str,
        request: StartRequest,
        waiting: Mapping[str, int],
        tenants: Mapping[str, TenantConfig],
        owed: Sequence[Settlement] = (),
    ) -> Decision:
        table = {request.tenant: _DEFAULT, **tenants}
        args: list[str] = [
            self._prefix(deployment),
            *_owed_args(owed),
            gateway,
            request.tenant,
            request.lease,
            repr(request.cost),
            str(request.reserve),
            repr(self._lease_ttl),
            repr(self._backlog_ttl),
            "1" if request.last else "0",
            str(request.share_of),
            *_waiting_args(waiting),
        ]
        for name, limits in table.items():
            args += [name, str(limits.priority), repr(limits.weight), *_limits_args(limits)]
        ok, reason, wait, counter = await self._call(self._try_start, args)
        return Decision(bool(ok), _text(reason), float(wait), float(counter))

    async def settle(self, deployment: str, owed: Sequence[Settlement]) -> None:
        await self._call(self._settle, [self._prefix(deployment), *_owed_args(owed)])

    async def heartbeat(
        self,
        deployment: str,
        gateway: str,
        waiting: Mapping[str, int],
        leases: Mapping[str, Collection[str]],
        tenants: Mapping[str, TenantConfig],
    ) -> Renewal:
        args = [
            self._prefix(deployment),
            gateway,
            repr(self._lease_ttl),
            repr(self._backlog_ttl),
            *_waiting_args(waiting),
        ]
        for tenant, ids in leases.items():
            limits = tenants.get(tenant, _DEFAULT)
            args += [tenant, _limits_args(limits)[0], str(len(ids)), *ids]
        regained, lost = await self._call(self._heartbeat, args)
        return Renewal(
            frozenset(_text(lease) for lease in regained), frozenset(_text(lease) for lease in lost)
        )

    async def waiting(self, deployment: str) -> set[str]:
        names = await self._call(self._waiting, [self._prefix(deployment)])
        return {_text(name) for name in names}

    async def close(self) -> None:
        if self._sender is not None:
            self._sender.cancel()
            await asyncio.wait([self._sender])
        for call in self._calls:
            if not call.answer.done():
                call.answer.set_exception(ConnectionError("the ledger was closed"))
        self._calls = []
        await self._redis.aclose()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
