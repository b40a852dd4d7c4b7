"""Iteration-level continuous batching with per-tenant fair queuing and admission control.

One step loop, in one thread, is the only compute: each step spends what its decode
rows leave of the per-step token budget (``max_tokens_per_step`` minus one token per
decode row) on prompt chunks, then decodes one token for every sequence in the batch,
so a long prompt is split over steps (chunked prefill, as in Sarathi-Serve and vLLM)
and never stalls decode, and no second compute thread competes for the cores. It
takes membership changes (prefill, join, leave, park) from a queue between steps and
hands each half step's tokens to the event loop as soon as they exist, without
waiting for it: a step never waits for HTTP work. Admission is an asyncio task that
gives free batch slots to waiting requests, highest priority class first and then by
the policy, and hands their prompts to the step loop up to one step's budget; prompts
not started yet go first in a step, and a prompt completed decodes in the same step,
so an admitted request waits for the step under way plus its own first chunk.

With ``tpot_steps`` on, steps are sized to the tightest TPOT objective (the ``tpot`` SLO
thresholds) of the tenants with requests running or waiting, or with one in the last
steps a request takes on average (rows admitted while a tenant is between requests would
still be decoding at its next). Steps aim at a target that starts at the objective and
moves below it by what the protected tenants' finished requests show (``TpotAim``, one
per objective, fed by the requests that were never paused): steps average their target,
so it is set where 99 in 100 of those requests meet the objective. The step loop
measures a step's cost as a fixed part plus a part per row or prompt token
(``stepcost``), and the prompt time each decode row brings with it (its request's
prompt, spread over the steps it decodes). Rows are admitted while their decode and that
prompt time fit in the target (prompts get a tenth of it at least and half at most), and
prompt chunks are paid from the time steps leave unused, so a chunk runs only when it is
worth its forward call. Past that, admission holds back and rows end on their own; where
the rows' decode alone takes more than the target, rows are paused down to what fits
(lowest priority class first, then the tenant furthest past its weighted share of the
rows, newest first), so one tenant's many rows do not stretch another's time per output
token. A pause is what breaks a request's TPOT, so the rows of the tenants whose
objective steps are sized to are never paused for it, nor preempted for a same-class
tenant without that objective (a looser objective counts as none); its own requests
pause the rows it does not protect first, while its tenant, with one more slot, stays
within its weighted share of the batch size (the cap shrinks for the objective, the
tenant's share does not). A preemption makes room for its one request, not down to the
cap. The throughput given up for it is what the benchmark prints beside it.

The ``fair`` policy is the Virtual Token Counter of Sheng et al., "Fairness in Serving
Large Language Models" (OSDI 2024): every tenant has a counter that advances by the
weighted prompt and output tokens it is served divided by its weight (a prompt is
charged when its request is dispatched, so one admission round shares the free slots by
weight instead of handing them all to the tenant that was behind); the next request
comes from the backlogged tenant with the smallest counter; a tenant that becomes
backlogged is lifted to the smallest counter among active tenants, so idling banks no
credit. With ``preemption`` on, a tenant holding fewer batch slots than its weighted
share may pause the newest request of the tenant past its own share with the most slots
per unit of weight, whatever their counters say (they order who takes free slots; shares
bound who holds them, so a burst of a tenant under its share is not held back to let the
others' counters catch up); the paused request keeps its KV cache and resumes without a
new prefill. A waiting tenant that can neither take a slot nor pause one does not hold
back the next. A higher priority class may pause a lower one's request. ``fcfs`` is
plain arrival order, kept for comparison.

Tenant limits hold under either policy and win over it; a limited tenant's requests wait
in its own queue (429 with Retry-After once that is full) while others are admitted:

- ``max_concurrency``: at most that many of the tenant's requests hold a batch slot
  (being prefilled, joining or decoding). A lowered limit pauses the newest ones.
- ``tokens_per_s`` with ``burst_tokens``: a token bucket of output tokens. It starts
  full, refills continuously at the rate up to its size, and every output token the
  tenant receives (a prefill's first token and each decode token) takes one. A request
  of the tenant is admitted only while the bucket holds one token for each request the
  tenant would then have running (the whole bucket if that is more than it holds), and
  after every step the newest running requests are paused until the bucket holds one
  token for each that is left, so the tenant's share of each decode step is what its
  bucket can pay. Paused requests keep their KV cache and resume without a new prefill.
  Steps the step thread ran before a pause reached it (normally the one under way)
  still deliver their tokens: that debt is paid back before the tenant runs again, so
  over any interval T the tenant receives at most ``burst + rate * T`` tokens plus
  those steps' rows, and its long-run rate is exactly ``rate``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import Counter, deque
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from queue import Empty, SimpleQueue
from typing import Any, Protocol

from dataplane.inference.config import (
    BatchingConfig,
    SchedulingConfig,
    TenantConfig,
)
from dataplane.inference.engine import FINISH_STOP, BatchEngine, EngineSequence
from dataplane.inference.metrics import RequestTiming, TelemetryStats, WorkerMetrics
from dataplane.inference.stepcost import Line, LinearCost

log = logging.getLogger(__name__)

FINISH_ERROR = "error"
# What the event loop tells the step thread: requests to prefill, join, leave or park,
# or None to stop.
# Moves for the next step, a new ``rows_per_call`` (applied between steps), or None: stop.
_Command = list[tuple[str, "GenerationRequest"]] | int | None
_DEFAULT_TENANT = TenantConfig.model_validate({})
# Of the TPOT target, the least and the most that prompt chunks get, whatever they
# were seen to need.
PROMPT_SHARES = (0.1, 0.5)
# Smoothing of the prompt seconds and decode rows a step carries (about a request's
# lifetime of steps).
_LOAD_SMOOTHING = 1 / 64
# Smoothing of the measured seconds per token of a step.
_COST_SMOOTHING = 0.1
# A decode step that moved only the measured costs wakes the state's subscribers once
# a cost is this far (relative) from what they were last woken with: a message per step
# would cost every gateway a read and a parse per token, for a drift routing cannot use.
STATE_COST_DRIFT = 0.1


def _smoothed(previous: float, value: float) -> float:
    """An exponentially weighted mean that starts at its first value."""
    return value if previous == 0.0 else previous + _COST_SMOOTHING * (value - previous)


@dataclass
class _StepReport:
    """One half of a step, for the event loop: its prompt chunks (``completed`` with
    their first tokens, ``failed``), or its decode (``decode_seconds`` set; ``stepped``
    None if the decode failed)."""

    completed: list[GenerationRequest] = field(default_factory=list)
    failed: list[GenerationRequest] = field(default_factory=list)
    prefill_seconds: float | None = None
    prefill_tokens: int = 0
    joined: list[GenerationRequest] = field(default_factory=list)
    parked: list[GenerationRequest] = field(default_factory=list)
    stepped: list[EngineSequence] | None = field(default_factory=list)
    decode_seconds: float | None = None


@dataclass
class _Aside:
    """Prompt work done between a decode's forward calls: tokens, step-clock seconds and
    wall seconds, which the step's decode time leaves out; ``failed``: a start failed,
    and none is tried again before the next step."""

    tokens: int = 0
    seconds: float = 0.0
    wall: float = 0.0
    failed: bool = False


class _LoopClosed(Exception):
    """The event loop a step reports to is closed: the step loop ends."""


class QueueFull(Exception):
    """The tenant's queue is at ``max_queue_len``; retry after ``retry_after_s``."""

    def __init__(self, tenant: str, retry_after_s: int) -> None:
        super().__init__(f"tenant {tenant!r} has too many queued requests")
        self.retry_after_s = retry_after_s


@dataclass(eq=False)
class GenerationRequest:
    """A request's handle shared by the HTTP handler and the scheduler.

    The scheduler appends delivered tokens to ``output_ids`` (with their timestamps in
    ``timing``) and sets ``finish_reason``; the handler waits on ``next_update``.
    """

    tenant: str
    priority: int
    seq: EngineSequence
    timing: RequestTiming
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    cancelled: bool = False
    # Paused at least once (preempted, or held back by a limit or a TPOT objective).
    paused: bool = False
    _updated: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def done(self) -> bool:
        return self.cancelled or self.finish_reason is not None

    async def next_update(self) -> None:
        """Return once new tokens or a finish have been delivered since the last call."""
        await self._updated.wait()
        self._updated.clear()

    def notify(self) -> None:
        self._updated.set()


class QueuePolicy(Protocol):
    """Order of admission among waiting requests."""

    preempts: bool
    """Whether it may pause a running request for a waiting one (``preempt_for``)."""

    def push(self, request: GenerationRequest, active: Collection[str]) -> None:
        """Queue a request; ``active`` names the tenants with sequences in the batch."""
        ...

    def remove(self, request: GenerationRequest) -> bool: ...

    def requeue(self, request: GenerationRequest) -> None:
        """Put a paused request back at the head of its tenant's line."""
        ...

    def peek(self, skip: Collection[str] = ()) -> GenerationRequest | None:
        """The next request to admit, from tenants not in ``skip``."""
        ...

    def pop(self, skip: Collection[str] = ()) -> GenerationRequest:
        """Dispatch the next request; a fair policy charges its prompt here."""
        ...

    def waiting(self, tenant: str) -> int: ...

    def queued(self) -> list[GenerationRequest]:
        """Every waiting request (any order)."""
        ...

    def __len__(self) -> int: ...

    def drain(self) -> list[GenerationRequest]:
        """Remove and return every waiting request in arrival order."""
        ...

    def charge(self, tenant: str, input_tokens: int, output_tokens: int) -> None: ...

    def preempt_for(
        self,
        candidate: GenerationRequest,
        running: Sequence[GenerationRequest],
        max_batch_size: int,
        keep: Collection[GenerationRequest] = (),
        held: Sequence[GenerationRequest] = (),
    ) -> GenerationRequest | None:
        """A running request to pause so ``candidate`` gets a slot, already queued again
        at the head of its tenant's line; None if nobody should be paused. Requests in
        ``keep`` are paused only for a higher priority class; ``held`` hold slots that
        cannot be paused now (prompts under way, rows joining) and count toward their
        tenants' shares."""
        ...


class FcfsPolicy:
    """Arrival order across all tenants; never preempts."""

    preempts = False

    def __init__(self) -> None:
        self._queue: deque[GenerationRequest] = deque()
        self._per_tenant: Counter[str] = Counter()

    def push(self, request: GenerationRequest, active: Collection[str]) -> None:
        self._queue.append(request)
        self._per_tenant[request.tenant] += 1

    def remove(self, request: GenerationRequest) -> bool:
        try:
            self._queue.remove(request)
        except ValueError:
            return False
        self._per_tenant[request.tenant] -= 1
        return True

    def requeue(self, request: GenerationRequest) -> None:
        self._queue.appendleft(request)
        self._per_tenant[request.tenant] += 1

    def peek(self, skip: Collection[str] = ()) -> GenerationRequest | None:
        return next((r for r in self._queue if r.tenant not in skip), None)

    def pop(self, skip: Collection[str] = ()) -> GenerationRequest:
        request = self.peek(skip)
        if request is None:
            raise IndexError("pop from an empty queue")
        self.remove(request)
        return request

    def waiting(self, tenant: str) -> int:
        return self._per_tenant[tenant]

    def queued(self) -> list[GenerationRequest]:
        return list(self._queue)

    def __len__(self) -> int:
        return len(self._queue)

    def drain(self) -> list[GenerationRequest]:
        drained = list(self._queue)
        self._queue.clear()
        self._per_tenant.clear()
        return drained

    def charge(self, tenant: str, input_tokens: int, output_tokens: int) -> None:
        """Arrival order ignores service received."""

    def preempt_for(
        self,
        candidate: GenerationRequest,
        running: Sequence[GenerationRequest],
        max_batch_size: int,
        keep: Collection[GenerationRequest] = (),
        held: Sequence[GenerationRequest] = (),
    ) -> GenerationRequest | None:
        return None


class FairPolicy:
    """Priority classes, then weighted virtual token counters (VTC) within a class."""

    def __init__(self, tenants: Mapping[str, TenantConfig], scheduling: SchedulingConfig) -> None:
        self.tenants = tenants
        self._input_weight = scheduling.input_token_weight
        self._output_weight = scheduling.output_token_weight
        self.preempts = scheduling.preemption
        self._queues: dict[str, deque[GenerationRequest]] = {}
        self.counters: dict[str, float] = {}
        # Ties on the counter go to the tenant admitted least recently (round robin).
        self._last_admitted: dict[str, int] = {}
        self._admissions = 0

    def _weight(self, tenant: str) -> float:
        return self.tenants.get(tenant, _DEFAULT_TENANT).weight

    def _backlogged(self) -> list[str]:
        return [tenant for tenant, queue in self._queues.items() if queue]

    def push(self, request: GenerationRequest, active: Collection[str]) -> None:
        tenant = request.tenant
        queue = self._queues.setdefault(tenant, deque())
        counter = self.counters.setdefault(tenant, 0.0)
        if not queue:
            self.counters[tenant] = max(counter, self._lowest_other(tenant, active, counter))
        queue.append(request)

    def _lowest_other(self, tenant: str, active: Collection[str], default: float) -> float:
        """The lowest counter of the other tenants backlogged or ``active``: where a
        tenant coming back to the queue starts at the least, so idling earns no credit."""
        others = {*self._backlogged(), *active} - {tenant}
        return min((self.counters[t] for t in others if t in self.counters), default=default)

    def remove(self, request: GenerationRequest) -> bool:
        queue = self._queues.get(request.tenant)
        if queue is None or request not in queue:
            return False
        queue.remove(request)
        return True

    def requeue(self, request: GenerationRequest) -> None:
        """Put a paused request back at the head of its tenant's queue. Its tenant may
        have no counter here (its requests started under the policy this one replaced,
        at a scheduling change): it gets the lowest of the backlogged tenants'."""
        tenant = request.tenant
        if tenant not in self.counters:
            self.counters[tenant] = self._lowest_other(tenant, (), 0.0)
        self._queues.setdefault(tenant, deque()).appendleft(request)

    def peek(self, skip: Collection[str] = ()) -> GenerationRequest | None:
        best: GenerationRequest | None = None
        best_key: tuple[int, float, int] | None = None
        for tenant, queue in self._queues.items():
            if not queue or tenant in skip:
                continue
            head = queue[0]
            key = (-head.priority, self.counters[tenant], self._last_admitted.get(tenant, -1))
            if best_key is None or key < best_key:
                best, best_key = head, key
        return best

    def pop(self, skip: Collection[str] = ()) -> GenerationRequest:
        """Dispatch the next request and charge its prompt now, so the next pop of the
        same admission round already sees it (a paused request resumes uncharged: its
        prompt is in its cache)."""
        head = self.peek(skip)
        if head is None:
            raise IndexError("pop from an empty queue")
        self._queues[head.tenant].popleft()
        self._admissions += 1
        self._last_admitted[head.tenant] = self._admissions
        if not head.seq.tokens:
            self.charge(head.tenant, len(head.seq.prompt), 0)
        return head

    def waiting(self, tenant: str) -> int:
        return len(self._queues.get(tenant, ()))

    def queued(self) -> list[GenerationRequest]:
        return [r for queue in self._queues.values() for r in queue]

    def __len__(self) -> int:
        return sum(len(queue) for queue in self._queues.values())

    def drain(self) -> list[GenerationRequest]:
        drained = [r for queue in self._queues.values() for r in queue]
        self._queues.clear()
        return sorted(drained, key=lambda r: r.timing.arrival)

    def charge(self, tenant: str, input_tokens: int, output_tokens: int) -> None:
        cost = input_tokens * self._input_weight + output_tokens * self._output_weight
        self.counters[tenant] = self.counters.get(tenant, 0.0) + cost / self._weight(tenant)

    def preempt_for(
        self,
        candidate: GenerationRequest,
        running: Sequence[GenerationRequest],
        max_batch_size: int,
        keep: Collection[GenerationRequest] = (),
        held: Sequence[GenerationRequest] = (),
    ) -> GenerationRequest | None:
        if not self.preempts or not running:
            return None
        victims = [r for r in running if r.priority < candidate.priority]
        if not victims:
            victims = self._over_share(candidate, running, max_batch_size, keep, held)
        if not victims:
            return None
        victim = min(victims, key=lambda r: (r.priority, -(r.timing.scheduled or 0.0)))
        self.requeue(victim)
        return victim

    def _over_share(
        self,
        candidate: GenerationRequest,
        running: Sequence[GenerationRequest],
        max_batch_size: int,
        keep: Collection[GenerationRequest],
        held: Sequence[GenerationRequest],
    ) -> list[GenerationRequest]:
        """Same-class requests not in ``keep`` of the tenant past its weighted slot share
        with the most slots per unit of weight, if the candidate's tenant is under its
        own share (slots counted with ``held``)."""
        peers = [r for r in running if r.priority == candidate.priority]
        free = [r for r in peers if r not in keep]
        slots = Counter(r.tenant for r in [*peers, *held] if r.priority == candidate.priority)
        contenders = {
            *slots,
            *(t for t in self._backlogged() if self._queues[t][0].priority == candidate.priority),
        }
        total_weight = sum(self._weight(t) for t in contenders | {candidate.tenant})

        def share(tenant: str) -> float:
            return max_batch_size * self._weight(tenant) / total_weight

        mine = candidate.tenant
        if slots[mine] + 1 > share(mine):
            return []
        over = [
            t
            for t in slots
            if t != mine and slots[t] > share(t) and any(r.tenant == t for r in free)
        ]
        if not over:
            return []
        target = max(over, key=lambda t: slots[t] / self._weight(t))
        return [r for r in free if r.tenant == target]


def make_policy(scheduling: SchedulingConfig, tenants: Mapping[str, TenantConfig]) -> QueuePolicy:
    if scheduling.policy == "fcfs":
        return FcfsPolicy()
    return FairPolicy(tenants, scheduling)


@dataclass
class TpotAim:
    """Where steps aim under a TPOT objective, as a fraction of it. Steps average their
    target, so a protected tenant's requests spread around it and some land above it.
    After each of its requests that steps alone paced (never paused) the aim moves down
    by ``step`` if the request's TPOT was over the objective and up by ``step * (1 -
    within) / within`` if not: it settles where about the share ``within`` of the
    requests meet the objective, as an SLO on it asks, giving up as little throughput
    as that needs."""

    within: float = 0.99
    step: float = 0.05
    floor: float = 0.5
    value: float = 1.0

    def observe(self, tpot: float, objective: float) -> None:
        if tpot > objective:
            self.value = max(self.floor, self.value * (1 - self.step))
        else:
            rise = self.step * (1 - self.within) / self.within
            self.value = min(1.0, self.value * (1 + rise))


class TokenBucket:
    """A tenant's output-token allowance: ``rate`` per second up to ``capacity``.

    ``level`` may go below zero (debt) by tokens delivered after it ran dry.
    """

    def __init__(self, rate: float, capacity: int, now: float) -> None:
        self.rate = rate
        self.capacity = capacity
        self.level = float(capacity)
        self._at = now

    def refill(self, now: float) -> float:
        """Bring the level up to ``now`` and return it."""
        if now > self._at:
            self.level = min(float(self.capacity), self.level + (now - self._at) * self.rate)
            self._at = now
        return self.level

    def take(self, tokens: int, now: float) -> None:
        self.refill(now)
        self.level -= tokens

    def seconds_until(self, tokens: float, now: float) -> float:
        """How long until the bucket holds ``tokens`` (which may exceed its capacity when
        they are to be paid for over time)."""
        return max(0.0, tokens - self.refill(now)) / self.rate


class Scheduler:
    """The batching loop: owns the waiting queue, the batch's membership and delivery.

    The step thread runs one step after another (decode rows, then prompt chunks under
    the step's token budget); sequences join and leave between steps, as the event loop
    queues them. Admission, in the event loop, gives free slots to waiting requests
    (pausing a running request when the policy says so) and queues their prompts for
    the step loop; a prompt completed in a step delivers its first token and joins the
    batch at the next.
    """

    def __init__(
        self,
        engine: BatchEngine,
        batching: BatchingConfig,
        scheduling: SchedulingConfig,
        tenants: Mapping[str, TenantConfig],
        metrics: WorkerMetrics,
        stats: TelemetryStats,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._engine = engine
        self.batching = batching
        self.scheduling = scheduling
        self.tenants = dict(tenants)
        self.policy = make_policy(scheduling, self.tenants)
        self._metrics = metrics
        self._stats = stats
        # Token buckets and the cost of a step's token run on `clock` (seconds); tests
        # pass one that counts steps or tokens.
        self._clock = clock
        self.buckets: dict[str, TokenBucket] = {}
        self._set_buckets()
        # Requests holding a batch slot: being prefilled, joining, or in the batch.
        self.running: list[GenerationRequest] = []
        self._prefilling: list[GenerationRequest] = []
        self._in_batch: list[GenerationRequest] = []
        self._joining: list[GenerationRequest] = []
        self._pausing: list[GenerationRequest] = []
        self._owners: dict[EngineSequence, GenerationRequest] = {}
        self._admission = asyncio.Event()
        self._commands: SimpleQueue[_Command] = SimpleQueue()
        self._step_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="step")
        # Owned by the step thread: prompts under way; commands read during a decode, for
        # the next step; prompts completed during a decode, which join at the next.
        self._chunking: list[GenerationRequest] = []
        self._early: list[_Command] = []
        self._ready: list[GenerationRequest] = []
        # What a step's decode rows and its prompt tokens cost, fit by the step thread,
        # and the time steps left unused under a TPOT objective, which pays for prompt
        # chunks (the step thread's own).
        self._decode_cost = LinearCost()
        self._prompt_cost = LinearCost()
        self._slack = 0.0
        # Smoothed prompt seconds and decode rows per step (written by the step thread,
        # read by the event loop): the prompt time each row brings with it, as requests
        # end and new ones start.
        self._prompt_load = 0.0
        self._rows_load = 0.0
        self._load_steps = 0
        # Steps taken (counted by the event loop), and the TPOT objectives in force: per
        # tenant, its tightest and the step until which it holds.
        self._steps = 0
        self._objectives: dict[str, tuple[float, int]] = {}
        # The tightest TPOT objective in force, and what steps aim at under it (set by
        # the event loop).
        self._tpot_objective: float | None = None
        self._aims: dict[float, TpotAim] = {}  # by objective
        self._tpot_target: float | None = None
        self._mean_e2e = 1.0
        self._mean_output_tokens = 16.0
        # When admission should look again for requests held back by a bucket.
        self._refill_wait: float | None = None
        # The live state that gateways route by: smoothed decode step seconds and prompt
        # seconds per token (0 until measured), and one event per subscriber, set on
        # every change, so a subscriber sends at most one message per change it sees.
        self.step_s = 0.0
        self.prefill_token_s = 0.0
        self._watchers: set[asyncio.Event] = set()
        # Counts the state's changes, so a message built once serves every subscriber.
        self.version = 0
        # What subscribers were last woken with: who holds and waits for the batch, and
        # the measured costs.
        self._woken: tuple[Any, ...] = ()
        self._woken_costs = (0.0, 0.0, 0.0)

    # -- live state ---------------------------------------------------------------------

    def watch(self) -> asyncio.Event:
        """An event set whenever the state changes; the subscriber clears it."""
        event = asyncio.Event()
        self._watchers.add(event)
        return event

    def unwatch(self, event: asyncio.Event) -> None:
        self._watchers.discard(event)

    def _moved(self) -> None:
        """The state moved where no subscriber need be woken for it (the change that
        follows moments later wakes them); a message built from now on is built anew."""
        self.version += 1

    def _changed(self, occupancy: tuple[Any, ...] | None = None) -> None:
        """Wake the subscribers (``occupancy``: the state's, if already read)."""
        self._moved()
        self._woken = self._occupancy() if occupancy is None else occupancy
        self._woken_costs = self._costs()
        for event in self._watchers:
            event.set()

    def _occupancy(self) -> tuple[Any, ...]:
        """The live state apart from the measured costs, as far as a step can move it
        (a prompt's chunks move what is left of it)."""
        return (
            tuple(r.tenant for r in self._in_batch),
            tuple(r.tenant for r in self._joining),
            tuple((r.tenant, r.seq.prefilled) for r in self._prefilling),
            len(self.running),
            len(self.policy),
            self._row_cap(),
            self._tpot_target,
            tuple(self._objectives),
        )

    def _costs(self) -> tuple[float, float, float]:
        return (self.step_s, self.prefill_token_s, self._mean_e2e)

    def _stepped_changed(self) -> None:
        """A decode step's change: subscribers are woken when the occupancy moved or a
        cost drifted past ``STATE_COST_DRIFT``; otherwise the next message carries it."""
        drifted = any(
            abs(now - then) > STATE_COST_DRIFT * then
            for now, then in zip(self._costs(), self._woken_costs, strict=True)
        )
        occupancy = self._occupancy()
        if drifted or occupancy != self._woken:
            self._changed(occupancy)
        else:
            self._moved()

    @property
    def decode_cost(self) -> Line | None:
        """A decode step's seconds by its rows, as the step loop measured them while
        serving (what steps under a TPOT objective are sized by); None until measured."""
        return self._decode_cost.line

    def state(self) -> dict[str, Any]:
        """What a gateway needs to predict a new request's TTFT here: the work queued
        ahead of it per priority class, the batch's occupancy (and who holds it) and the
        measured costs."""
        queued: dict[int, list[int]] = {}
        for request in self.policy.queued():
            entry = queued.setdefault(request.priority, [0, 0])
            entry[0] += 1
            entry[1] += 0 if request.seq.tokens else len(request.seq.prompt)
        started = sum(max(0, len(r.seq.prompt) - r.seq.prefilled) for r in self._prefilling)
        cap = self._row_cap()
        return {
            "running": len(self.running),
            # Decoding rows per tenant (those a waiting request may be given by pausing
            # one), the rows allowed now, whether the policy pauses at all, and the
            # tenants whose rows the TPOT objective protects from the others: what a
            # gateway reads to send a tenant under its share ahead of a full batch.
            "rows": dict(Counter(r.tenant for r in self._in_batch)),
            # Slots of prompts under way and rows joining, per tenant: not paused, but
            # counted toward their tenants' shares as the policy counts them.
            "starting": dict(Counter(r.tenant for r in [*self._prefilling, *self._joining])),
            "row_cap": cap,
            "protected": sorted(t for t in self._objectives if self._protected(t)),
            # What steps aim at under the TPOT objective (None without one).
            "tpot_target_s": self._tpot_target,
            "preempts": self.policy.preempts,
            "max_batch_size": self.batching.max_batch_size,
            "free_slots": max(0, cap - len(self.running)),
            "queued": [
                {"priority": priority, "requests": count, "prompt_tokens": tokens}
                for priority, (count, tokens) in sorted(queued.items(), reverse=True)
            ],
            "prefill_tokens": started,
            "max_tokens_per_step": self.batching.max_tokens_per_step,
            "step_s": self.step_s,
            "prefill_token_s": self.prefill_token_s,
            "mean_e2e_s": self._mean_e2e,
        }

    # -- called from request handlers ------------------------------------------------

    def submit(self, request: GenerationRequest) -> None:
        """Queue a request or raise QueueFull (the handler answers 429)."""
        waiting = self.policy.waiting(request.tenant)
        if waiting >= self.batching.max_queue_len:
            self._metrics.count(request.tenant, "rejected")
            self._stats.count_rejected(request.tenant)
            raise QueueFull(request.tenant, self._retry_after(request.tenant, waiting))
        self.policy.push(request, {r.tenant for r in self.running})
        if self.scheduling.tpot_steps:
            # Its TPOT objective is in force from now: rows whose decode alone overruns
            # it pause before the step that starts its prompt.
            self._enforce_limits()
        self._admission.set()
        self._changed()

    def _retry_after(self, tenant: str, waiting: int) -> int:
        """Whole seconds until the tenant's queue has drained by one request: its requests
        run at most ``max_concurrency`` at a time and take tokens at its bucket's rate."""
        limits = self.tenants.get(tenant, _DEFAULT_TENANT)
        lanes = min(self.batching.max_batch_size, limits.max_concurrency or math.inf)
        seconds = (waiting + 1) * self._mean_e2e / lanes
        bucket = self.buckets.get(tenant)
        if bucket is not None:
            tokens = (waiting + 1) * self._mean_output_tokens
            seconds = max(seconds, bucket.seconds_until(tokens, self._clock()))
        return max(1, math.ceil(seconds))

    def cancel(self, request: GenerationRequest) -> None:
        """The client went away: free its queue entry or batch slot and KV right away."""
        if request.done:
            return
        request.cancelled = True
        self._release(request)
        self._metrics.count(request.tenant, "cancelled")
        self._stats.count_cancelled(request.tenant)
        request.notify()

    def stop(self, request: GenerationRequest) -> None:
        """The handler matched a stop string: finished (and measured), not cancelled."""
        if request.done:
            return
        self._release(request)
        request.finish_reason = FINISH_STOP
        self._finish(request)
        request.notify()

    def _release(self, request: GenerationRequest) -> None:
        """Take a request out of the queue or its slot; the engine drops its row (and
        so its KV, paused or not) at the next step."""
        if self.policy.remove(request):
            if request.seq.tokens:  # paused: the engine still holds its cache row
                self._commands.put([("leave", request)])
        elif request in self.running:
            self.running.remove(request)
            for holder in (self._prefilling, self._joining, self._in_batch):
                if request in holder:
                    holder.remove(request)
            self._commands.put([("leave", request)])
        self._owners.pop(request.seq, None)
        self._admission.set()
        self._changed()

    def reconfigure(
        self,
        batching: BatchingConfig,
        scheduling: SchedulingConfig,
        tenants: Mapping[str, TenantConfig],
    ) -> None:
        """Apply new knobs between steps; waiting and running requests carry over."""
        self.batching = batching
        self._commands.put(batching.max_rows_per_forward)
        self.tenants = dict(tenants)
        self._set_buckets()
        if scheduling != self.scheduling:
            old = self.policy.drain()
            self.scheduling = scheduling
            self.policy = make_policy(scheduling, self.tenants)
            active = {r.tenant for r in self.running}
            for request in old:
                self.policy.push(request, active)
        elif isinstance(self.policy, FairPolicy):
            self.policy.tenants = self.tenants
        self._enforce_limits()
        self._admission.set()
        self._changed()

    def _set_buckets(self) -> None:
        """A bucket per rate-limited tenant; one whose rate and size did not change keeps
        its level, a new or changed one starts full, an unlimited tenant has none."""
        now = self._clock()
        buckets = {}
        for tenant, limits in self.tenants.items():
            if limits.tokens_per_s is None:
                continue
            bucket = self.buckets.get(tenant)
            if bucket is None or (bucket.rate, bucket.capacity) != (
                limits.tokens_per_s,
                limits.bucket_tokens,
            ):
                bucket = TokenBucket(limits.tokens_per_s, limits.bucket_tokens, now)
            buckets[tenant] = bucket
        self.buckets = buckets

    def _may_start(self, tenant: str, now: float) -> bool:
        """Whether the tenant's limits let one more of its requests hold a slot."""
        limits = self.tenants.get(tenant, _DEFAULT_TENANT)
        running = sum(1 for r in self.running if r.tenant == tenant)
        if limits.max_concurrency is not None and running >= limits.max_concurrency:
            return False
        bucket = self.buckets.get(tenant)
        if bucket is None:
            return True
        need = min(bucket.capacity, running + 1)
        if bucket.refill(now) >= need:
            return True
        wait = bucket.seconds_until(need, now)
        self._refill_wait = wait if self._refill_wait is None else min(self._refill_wait, wait)
        return False

    def _enforce_limits(self) -> None:
        """Pause the newest running requests of every tenant over its concurrency limit
        or holding more than its bucket can pay one token each for the next step."""
        now = self._clock()
        for tenant, limits in self.tenants.items():
            bucket = self.buckets.get(tenant)
            allowed = limits.max_concurrency or math.inf
            if bucket is not None:
                allowed = min(allowed, max(0, math.floor(bucket.refill(now))))
            excess = sum(1 for r in self.running if r.tenant == tenant) - allowed
            if excess <= 0:
                continue
            mine = [r for r in self._in_batch if r.tenant == tenant]
            mine.sort(key=lambda r: r.timing.scheduled or 0.0, reverse=True)
            for victim in mine[: int(excess)]:
                self.policy.requeue(victim)
                self._pause(victim)
        self._set_tpot_target()
        # Past the cap, admission holds back and rows end on their own; rows are paused
        # only where their decode alone overruns the target, down to what fits in it.
        target, line = self._tpot_target, self._decode_cost.line
        if target is None or line is None:
            return
        for _ in range(len(self.running) - max(1, line.most_within(target))):
            row = self._row_to_pause()
            if row is None:
                break
            self.policy.requeue(row)
            self._pause(row)

    def _row_to_pause(self, top: int | None = None) -> GenerationRequest | None:
        """The row that waits first when steps must shrink: of the rows the TPOT
        objective does not protect (a pause is what breaks a request's TPOT), and of no
        class above ``top``, the lowest priority class, then the tenant furthest past its
        weighted share of the rows, then the newest."""
        rows = Counter(r.tenant for r in self.running)

        def key(r: GenerationRequest) -> tuple[int, float, float]:
            weight = self.tenants.get(r.tenant, _DEFAULT_TENANT).weight
            return (r.priority, -rows[r.tenant] / weight, -(r.timing.scheduled or 0.0))

        unprotected = [
            r
            for r in self._in_batch
            if not self._protected(r.tenant) and (top is None or r.priority <= top)
        ]
        return min(unprotected, key=key, default=None)

    def _claims_row(self, request: GenerationRequest) -> bool:
        """Whether a request of a tenant the TPOT objective protects may pause a row it
        does not protect (before the policy pauses any, which counts shares of the cap
        and could take another protected tenant's): while its tenant, with one more
        slot, stays within its weighted share of the batch size among the tenants of
        its class holding slots or waiting. The row cap shrinks for the objective; the
        tenant's share does not shrink with it, or a burst of its requests would wait
        for rows to end."""
        if not (self.policy.preempts and self._protected(request.tenant)):
            return False
        tenant, priority = request.tenant, request.priority
        peers = {r.tenant for r in [*self.running, *self.policy.queued()] if r.priority == priority}

        def weight(name: str) -> float:
            return self.tenants.get(name, _DEFAULT_TENANT).weight

        total = sum(weight(t) for t in peers | {tenant})
        held = sum(1 for r in self.running if r.tenant == tenant)
        return held + 1 <= self.batching.max_batch_size * weight(tenant) / total

    def _pause(self, victim: GenerationRequest) -> None:
        """Take a request (already queued again) out of the batch; its KV is kept."""
        victim.paused = True
        self._in_batch.remove(victim)
        self.running.remove(victim)
        self._pausing.append(victim)
        self._commands.put([("park", victim)])

    def _take_tokens(self, tenant: str, tokens: int) -> None:
        bucket = self.buckets.get(tenant)
        if bucket is not None:
            bucket.take(tokens, self._clock())

    def close(self) -> None:
        self._commands.put(None)
        self._step_pool.shutdown(wait=False, cancel_futures=True)

    # -- admission (event loop) and the step loop (its own thread) --------------------

    async def run(self) -> None:
        """Batch forever (until the task is cancelled)."""
        await asyncio.gather(self._admission_lane(), self._step_lane())

    async def _admission_lane(self) -> None:
        while True:
            self._admission.clear()
            delay = self.batching.max_queue_delay_ms / 1000.0
            if delay > 0 and not self.running and len(self.policy):
                # Idle engine: give more arrivals a moment to share the prefill.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._fill_batch(), delay)
            self._admit()
            # Again after the next step, an arrival, a cancel, or a bucket's refill.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._admission.wait(), self._refill_wait)

    async def _fill_batch(self) -> None:
        while len(self.policy) < self.batching.max_batch_size:
            self._admission.clear()
            await self._admission.wait()

    def _admit(self) -> None:
        """Give free slots to waiting requests (pausing others to make room where the
        policy says so) and hand them to the step loop: new prompts up to one step's
        prompt budget beside those not yet started (one over it if it is the only one),
        so an admitted prompt's first chunk runs in the next step (under a TPOT
        objective, in the first step whose spare time pays for it)."""
        rows = self._row_cap()
        slots = rows - len(self.running)
        starting = sum(len(r.seq.prompt) for r in self._prefilling if not r.seq.prefilled)
        budget = self._token_budget(len(self._in_batch) + len(self._joining)) - starting
        moves: list[tuple[str, GenerationRequest]] = []
        now = time.perf_counter()
        clock = self._clock()
        self._refill_wait = None
        # Tenants passed over in this round: still being paused, or held by their limits.
        skip: set[str] = set()
        while (head := self.policy.peek(skip)) is not None:
            if head in self._pausing or not self._may_start(head.tenant, clock):
                skip.add(head.tenant)
                continue
            cost = 0 if head.seq.tokens else len(head.seq.prompt)
            if cost and cost > budget and starting > 0:  # a resumed row has no prompt to wait on
                break
            if slots <= 0:
                # The rows the TPOT objective protects are not given up for a tenant
                # it does not protect, and a tenant it protects claims the others' rows
                # first; the row paused makes room for the head alone (rows past the
                # cap end on their own).
                victim = self._row_to_pause(head.priority) if self._claims_row(head) else None
                if victim is not None:
                    self.policy.requeue(victim)
                else:
                    keep = (
                        []
                        if self._protected(head.tenant)
                        else [r for r in self._in_batch if self._protected(r.tenant)]
                    )
                    held = [*self._prefilling, *self._joining]
                    victim = self.policy.preempt_for(head, self._in_batch, rows, keep, held)
                if victim is None:
                    # Nothing to pause for this tenant: another may still be owed a row.
                    skip.add(head.tenant)
                    continue
                self._pause(victim)
                self._moved()
                slots = 1
                continue
            self.policy.pop(skip)
            if head.timing.scheduled is None:
                head.timing.scheduled = now
            self.running.append(head)
            self._owners[head.seq] = head
            slots -= 1
            if cost:
                self._prefilling.append(head)
                moves.append(("prefill", head))
                budget -= cost
                starting += cost
            else:
                self._joining.append(head)
                moves.append(("join", head))
                budget -= 1  # it decodes in the next step too
        if moves:
            self._commands.put(moves)
            self._moved()

    async def _step_lane(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._step_pool, self._step_loop, loop)
        finally:
            self._commands.put(None)

    def _step_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """The step thread: step while there is work, sleep on the command queue
        otherwise; each step's outcome goes to the event loop as a callback, so a step
        never waits for HTTP work."""
        while True:
            commands, self._early = self._early, []
            if not (commands or self._engine.running or self._chunking or self._ready):
                commands.append(self._commands.get())
            with contextlib.suppress(Empty):
                while True:
                    commands.append(self._commands.get_nowait())
            if None in commands:
                return
            for command in commands:
                if isinstance(command, int):
                    self._engine.rows_per_call = command
            moves = [move for command in commands if isinstance(command, list) for move in command]

            def report(outcome: _StepReport) -> None:
                try:
                    loop.call_soon_threadsafe(self._stepped, outcome)
                except RuntimeError as closed:  # nobody is listening any more
                    raise _LoopClosed from closed

            try:
                self._step(moves, report)
            except _LoopClosed:
                return

    def _step(
        self,
        moves: list[tuple[str, GenerationRequest]],
        report: Callable[[_StepReport], None],
    ) -> None:
        """One step: prompt chunks in what the step's token budget leaves beside its
        decode rows, then membership changes and a decode token for every row in the
        batch; each half's outcome goes to ``report`` as soon as it is done.

        Prompts not started yet get the budget first, in admission order, and run before
        the decode, so a request admitted now waits for the step under way and its own
        first chunk, never for someone's long prompt or a decode; a prompt under way takes
        what is left. A prompt completed in this step has its first token at once and
        decodes in the same step.
        """
        kinds: dict[str, list[GenerationRequest]] = {
            "join": [],
            "leave": [],
            "park": [],
            "prefill": [],
        }
        for kind, request in moves:
            kinds[kind].append(request)
        leave = {r.seq for r in kinds["leave"]}
        park = kinds["park"]
        parking = {r.seq for r in park}
        join = [r for r in [*self._ready, *kinds["join"]] if r.seq not in leave]
        self._ready = []
        chunking = [r for r in [*self._chunking, *kinds["prefill"]] if r.seq not in leave]
        chunking.sort(key=lambda r: r.seq.prefilled > 0)
        staying = [s for s in self._engine.running if s not in leave and s not in parking]
        decoding = len(join) + sum(1 for s in staying if s.finish_reason is None)
        # The rows this step decodes, counting every waiting prompt as one that completes
        # now and decodes too: the budget must hold them.
        rows = decoding + len(chunking)
        target = self._tpot_target
        spare = None
        if target is not None and decoding:  # rows to protect
            # This step's own time left under the target, plus what earlier steps left.
            line = self._decode_cost.line
            decode = line.seconds(rows) if line is not None else 0.0
            spare = self._slack + max(0.0, target - decode)
        completed: list[GenerationRequest] = []
        failed: list[GenerationRequest] = []
        prefill_seconds = None
        prefill_tokens = 0
        # The first waiting prompt's next chunk: what the bank saves up for.
        first = self._step_budget(rows, chunking[:1])
        budget = self._budget(rows, spare, chunking, first)
        started, clock_started = time.perf_counter(), self._clock()
        if budget:
            before = sum(r.seq.prefilled for r in chunking)
            try:
                done = set(self._engine.prefill([r.seq for r in chunking], budget))
            except Exception:
                log.exception("prefill failed; failing its requests")
                failed, chunking = chunking, []
            else:
                prefill_tokens = sum(r.seq.prefilled for r in chunking) - before
                completed = [r for r in chunking if r.seq in done]
                chunking = [r for r in chunking if r.seq not in done]
            prefill_seconds = time.perf_counter() - started
            report(
                _StepReport(
                    completed=completed,
                    failed=failed,
                    prefill_seconds=prefill_seconds,
                    prefill_tokens=prefill_tokens,
                )
            )
        prefilled, clock_prefilled = time.perf_counter(), self._clock()
        prompt_seconds = clock_prefilled - clock_started
        self._prompt_cost.observe(prefill_tokens, prompt_seconds)
        self._chunking = chunking
        join += completed
        aside = _Aside()

        def between() -> None:
            if target is None and not aside.failed:  # (a TPOT objective's steps: no time)
                self._start_aside(rows, prefill_tokens, aside, report)

        stepped: list[EngineSequence] | None
        try:
            stepped = self._engine.step(leave, parking, [r.seq for r in join], between)
        except _LoopClosed:
            raise
        except Exception:
            log.exception("decode step failed; failing the batch")
            self._engine.reset()
            stepped = None
        decode_seconds = self._clock() - clock_prefilled - aside.seconds
        decoded = len(stepped or ())
        self._decode_cost.observe(decoded, decode_seconds)
        self._load_steps += 1
        weight = max(1 / self._load_steps, _LOAD_SMOOTHING)
        self._prompt_load += weight * (prompt_seconds + aside.seconds - self._prompt_load)
        self._rows_load += weight * (decoded - self._rows_load)
        if target is None:
            self._slack = 0.0
        else:
            # Steps bank the time they leave unused, up to what the cap allows (one
            # target while no prompt waits), and a step that ran over leaves a debt (up
            # to one target). Steps that leave less than the prompts' share still earn
            # it, so prompts progress even where the target cannot be met.
            earned = max(target - decode_seconds, self._prompt_time(decoded, target))
            self._slack = min(
                self._slack_cap(target, first),
                max(-target, self._slack + earned - prompt_seconds),
            )
        report(
            _StepReport(
                joined=join,
                parked=park,
                stepped=stepped,
                decode_seconds=time.perf_counter() - prefilled - aside.wall,
            )
        )

    def _start_aside(
        self,
        rows: int,
        spent: int,
        aside: _Aside,
        report: Callable[[_StepReport], None],
    ) -> None:
        """Between a decode's forward calls: prompts admitted while it runs start now,
        whole and within what the step's token budget left (``spent`` of it before the
        decode), so a new request waits for one call of the step under way, not all of
        it. They join the batch at the next step; the other commands read here wait for
        it too. Under ``tpot_steps``, a tenant with a TPOT objective starts with the next
        step, which the objective sizes: started here, its first gap would carry the rest
        of a step sized for no one."""
        with contextlib.suppress(Empty):
            while True:
                self._early.append(self._commands.get_nowait())
        if None in self._early:
            return
        moves = [move for command in self._early if isinstance(command, list) for move in command]
        leaving = {r.seq for kind, r in moves if kind == "leave"}
        new = [r for kind, r in moves if kind == "prefill" and not r.seq.prefilled]
        # Identical prompts (a request's n choices) share one row, which would fork into
        # the blocks being decoded: they start together in the next step.
        copies = Counter(tuple(r.seq.prompt) for r in new)
        room = self._token_budget(rows) - spent - aside.tokens
        picked: list[GenerationRequest] = []
        for request in new:
            if request.seq in leaving or copies[tuple(request.seq.prompt)] > 1:
                continue
            if (
                self.scheduling.tpot_steps
                and self._stats.tightest(request.tenant, "tpot") is not None
            ):
                continue
            if len(request.seq.prompt) <= room:
                picked.append(request)
                room -= len(request.seq.prompt)
        if not picked:
            return
        taken = {id(r) for r in picked}
        self._early = [
            [m for m in command if id(m[1]) not in taken] if isinstance(command, list) else command
            for command in self._early
        ]
        started, clock_started = time.perf_counter(), self._clock()
        try:
            done = set(self._engine.prefill([r.seq for r in picked], aside=True))
        except Exception:
            # Its rows are freed and nothing of it kept: the next step tries them again,
            # as it would have without this start (a parking block may not fit beside
            # the batch on a device).
            log.exception("prefill beside a decode failed; leaving it to the next step")
            self._early.append([("prefill", r) for r in picked])
            aside.failed = True
            return
        completed = [r for r in picked if r.seq in done]
        tokens = sum(len(r.seq.prompt) for r in completed)
        seconds = self._clock() - clock_started
        self._prompt_cost.observe(tokens, seconds)
        wall = time.perf_counter() - started
        aside.tokens += tokens
        aside.seconds += seconds
        aside.wall += wall
        self._ready += completed
        report(_StepReport(completed=completed, prefill_seconds=wall, prefill_tokens=tokens))

    def _budget(
        self, rows: int, spare: float | None, chunking: Sequence[GenerationRequest], first: int
    ) -> int:
        """Prompt tokens for this step after ``rows`` decode rows, of those ``chunking``
        still needs (``first`` of them its first prompt's): the step's token budget (one
        token at least, so every prompt progresses).

        Under a TPOT objective with rows to protect (``spare`` seconds: this step's
        unused time plus what earlier steps banked), only what ``spare`` pays for,
        and nothing until it pays for the first prompt's whole chunk (as far as the
        step's budget goes) and for at least as much prompt work as the forward call
        costs by itself: a prompt waits a few steps rather than run one token per call,
        and steps average the target however the prompts fall.
        """
        budget = self._step_budget(rows, chunking)
        line = self._prompt_cost.line
        if spare is None or line is None or not budget:
            return budget
        needed = max(first, min(budget, self._worth(line)))
        affordable = min(budget, line.most_within(spare))
        return affordable if affordable >= needed else 0

    def _step_budget(self, rows: int, chunking: Sequence[GenerationRequest]) -> int:
        """The prompt tokens ``chunking`` still needs, up to what a step of ``rows``
        decode rows leaves of its token budget (one token at least)."""
        pending = sum(len(r.seq.prompt) - r.seq.prefilled for r in chunking)
        return min(pending, self._token_budget(rows))

    def _token_budget(self, rows: int) -> int:
        """Prompt tokens a step of ``rows`` decode rows leaves (one token at least)."""
        return max(1, self.batching.max_tokens_per_step - rows)

    def _worth(self, line: Line) -> int:
        """The smallest chunk worth its forward call: as much prompt work as the call's
        fixed part."""
        worth = math.ceil(line.base / line.per_unit) if line.per_unit > 0 else 1
        return max(1, min(worth, self.batching.max_tokens_per_step))

    def _slack_cap(self, target: float, first: int) -> float:
        """The most time steps may bank for prompts: one target, or where that is
        more, what the first waiting prompt's next chunk of ``first`` tokens (0: none
        waits) or the smallest chunk worth its call costs, so that one can always be
        paid for."""
        line = self._prompt_cost.line
        if line is None:
            return target
        return max(target, line.seconds(max(first, self._worth(line))))

    def _row_cap(self) -> int:
        """Requests that may hold a slot: the batch size, or fewer where their decode
        rows and the prompt time they bring would take more than the TPOT target."""
        cap = self.batching.max_batch_size
        target, line = self._tpot_target, self._decode_cost.line
        if target is not None and line is not None:
            while cap > 1 and line.seconds(cap) + self._prompt_time(cap, target) > target:
                cap -= 1
        return cap

    def _prompt_time(self, rows: int, target: float) -> float:
        """What prompt chunks are due in a step of ``rows`` decode rows under ``target``:
        the prompt seconds each row was seen to bring (its request's prompt, spread over
        the steps it decodes), within ``PROMPT_SHARES`` of the target."""
        per_row = self._prompt_load / max(1.0, self._rows_load)
        least, most = PROMPT_SHARES
        return min(most * target, max(least * target, rows * per_row))

    def _protected(self, tenant: str) -> bool:
        """Whether the TPOT objective steps are sized to is the tenant's own."""
        held = self._objectives.get(tenant)
        objective = self._tpot_objective
        return held is not None and objective is not None and held[0] <= objective

    def _set_tpot_target(self) -> None:
        """The tightest TPOT objective of the tenants with requests running or waiting,
        or with one in the last steps a request takes on average (rows admitted while a
        tenant is between requests would still be decoding when its next one comes),
        and the target steps aim at under it. The hold counts steps, not time: an idle
        worker keeps it until steps resume."""
        if not self.scheduling.tpot_steps:
            self._tpot_objective = self._tpot_target = None
            self._objectives = {}
            return
        until = self._steps + math.ceil(self._mean_output_tokens)
        for tenant in {r.tenant for r in [*self.running, *self.policy.queued()]}:
            objective = self._stats.tightest(tenant, "tpot")
            if objective is not None:
                self._objectives[tenant] = (objective, until)
        self._objectives = {
            tenant: held for tenant, held in self._objectives.items() if held[1] >= self._steps
        }
        objective = min((t for t, _ in self._objectives.values()), default=None)
        self._tpot_objective = objective
        if objective is None:
            self._tpot_target = None
        else:
            self._tpot_target = objective * self._aims.setdefault(objective, TpotAim()).value

    def _stepped(self, report: _StepReport) -> None:
        """Half a step's outcome, in the event loop: deliver its tokens and charge them;
        ``stepped`` None means the decode failed and the batch is gone."""
        if report.decode_seconds is not None:
            self._steps += 1
        self._pausing = [r for r in self._pausing if r not in report.parked]
        for request in report.joined:
            if request in self._joining:
                self._joining.remove(request)
                self._in_batch.append(request)
        for request in report.completed:
            if request in self._prefilling:
                self._prefilling.remove(request)
                self._joining.append(request)
        stepped = report.stepped
        if stepped is None:
            # The batch is gone, with the rows of requests paused while it decoded (their
            # park had not reached the step yet): those cannot resume.
            lost = [r for r in self._pausing if r.seq.row is None]
            self._fail([*self._in_batch, *report.joined, *report.parked, *lost])
            stepped = []
        self._fail(report.failed)
        if stepped and report.decode_seconds is not None:  # (a prefill half steps none)
            self._metrics.step_seconds.labels("decode").observe(report.decode_seconds)
            self.step_s = _smoothed(self.step_s, report.decode_seconds)
        if report.prefill_seconds is not None:
            self._metrics.step_seconds.labels("prefill").observe(report.prefill_seconds)
            if report.prefill_tokens:
                per_token = report.prefill_seconds / report.prefill_tokens
                self.prefill_token_s = _smoothed(self.prefill_token_s, per_token)
        now = time.perf_counter()
        served: Counter[str] = Counter()
        for seq in [*stepped, *(r.seq for r in report.completed)]:
            owner = self._owners.get(seq)
            if owner is not None:
                served[owner.tenant] += 1
                self._deliver(owner, now)
        for tenant, tokens in served.items():
            self.policy.charge(tenant, 0, tokens)
            self._take_tokens(tenant, tokens)
        if report.decode_seconds is None and not report.failed:
            # A prefill half: its first tokens are out; limits, admission and the live
            # state that gateways read follow with the decode half, moments later.
            self._moved()
            return
        self._enforce_limits()
        self._metrics.running.set(len(self.running))
        self._metrics.waiting.set(len(self.policy))
        self._admission.set()
        self._stepped_changed()

    def _deliver(self, request: GenerationRequest, now: float) -> None:
        if request.done:
            return
        # The step thread may be appending the next step's token meanwhile: read the
        # finish first, since it is set only after the last token is appended.
        finish_reason = request.seq.finish_reason
        for token in request.seq.tokens[len(request.output_ids) :]:
            request.output_ids.append(token)
            request.timing.token_times.append(now)
        if finish_reason is not None:
            request.finish_reason = finish_reason
            self._finish(request)
        request.notify()

    def _finish(self, request: GenerationRequest) -> None:
        self.policy.remove(request)
        for holder in (self.running, self._in_batch, self._joining, self._prefilling):
            if request in holder:
                holder.remove(request)
        self._owners.pop(request.seq, None)
        self._admission.set()
        self._changed()
        timing = request.timing
        self._metrics.count(request.tenant, request.finish_reason or FINISH_ERROR)
        if request.finish_reason == FINISH_ERROR:
            return
        self._metrics.observe_request(request.tenant, timing)
        self._stats.record(request.tenant, timing)
        # What steps aim at learns from the requests it alone paced: a paused one's
        # TPOT holds its wait (its tenant's own limits, a higher class).
        objective = self._tpot_objective
        if (
            objective is not None
            and timing.tpot is not None
            and not request.paused
            and self._protected(request.tenant)
        ):
            self._aims[objective].observe(timing.tpot, objective)
        if timing.e2e is not None:
            self._mean_e2e = 0.9 * self._mean_e2e + 0.1 * timing.e2e
        self._mean_output_tokens = 0.9 * self._mean_output_tokens + 0.1 * len(request.output_ids)

    def _fail(self, requests: list[GenerationRequest]) -> None:
        """Fail requests; the engine drops any cache row one still holds (a prompt under
        way, a paused or a parked sequence) at the next step."""
        leave = [("leave", r) for r in requests if r.seq.row is not None]
        if leave:
            self._commands.put(leave)
        for request in requests:
            if not request.done:
                request.finish_reason = FINISH_ERROR
                self._finish(request)
                request.notify()
