"""The batching loop in-process over the real (small) model."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import random
import time
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from pathlib import Path
from queue import Empty
from typing import Any

import pytest

from dataplane.inference.config import (
    BatchingConfig,
    RuntimeConfig,
    SchedulingConfig,
    SloThreshold,
    TenantConfig,
)
from dataplane.inference.engine import BatchEngine, EngineSequence
from dataplane.inference.kvcache import SlotCache
from dataplane.inference.metrics import RequestTiming, TelemetryStats, WorkerMetrics
from dataplane.inference.runtime import OnnxRuntime
from dataplane.inference.sampling import SamplingParams
from dataplane.inference.scheduler import (
    STATE_COST_DRIFT,
    GenerationRequest,
    QueueFull,
    Scheduler,
    TpotAim,
    _StepReport,
)


@pytest.fixture(scope="module")
def runtime(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> OnnxRuntime:
    return OnnxRuntime(model_dir, tmp_path_factory.mktemp("cache"), RuntimeConfig())


TOKEN_S = 0.001  # what a token computed costs on TokenClock's clock


class TokenClock(BatchEngine):
    """The real engine, with a clock that advances TOKEN_S for every token it computes
    (a decode row or a prompt token), and the sequences of every decode step."""

    def __init__(self, runtime: OnnxRuntime) -> None:
        super().__init__(runtime)
        self.tokens = 0
        self.steps: list[list[EngineSequence]] = []

    def now(self) -> float:
        return self.tokens * TOKEN_S

    def step(
        self,
        leave: Collection[EngineSequence] = (),
        park: Collection[EngineSequence] = (),
        join: Sequence[EngineSequence] = (),
        between: Callable[[], None] | None = None,
    ) -> list[EngineSequence]:
        stepped = super().step(leave, park, join, between)
        self.tokens += len(stepped)
        if stepped:
            self.steps.append(stepped)
        return stepped

    def prefill(
        self,
        sequences: Sequence[EngineSequence],
        max_tokens: int | None = None,
        aside: bool = False,
    ) -> list[EngineSequence]:
        before = sum(s.prefilled for s in sequences)
        complete = super().prefill(sequences, max_tokens, aside)
        self.tokens += sum(s.prefilled for s in sequences) - before
        return complete


class Harness:
    def __init__(
        self,
        runtime: OnnxRuntime,
        thresholds: Sequence[SloThreshold] = (),
        engine: BatchEngine | None = None,
        **knobs: Any,
    ) -> None:
        policy = knobs.pop("policy", "fair")
        self.metrics = WorkerMetrics("synthetic")
        self.scheduler = Scheduler(
            engine or BatchEngine(runtime),
            BatchingConfig(**knobs),
            SchedulingConfig(policy=policy, tpot_steps=bool(thresholds)),
            {},
            self.metrics,
            TelemetryStats("dep", "synthetic", thresholds),
            **({"clock": engine.now} if isinstance(engine, TokenClock) else {}),
        )

    def submit(self, tenant: str, prompt: list[int], tokens: int) -> GenerationRequest:
        request = GenerationRequest(
            tenant=tenant,
            priority=0,
            seq=EngineSequence(
                prompt, SamplingParams(max_new_tokens=tokens, temperature=0.0, ignore_eos=True)
            ),
            timing=RequestTiming(arrival=time.perf_counter(), input_tokens=len(prompt)),
        )
        self.scheduler.submit(request)
        return request

    def steps(self, kind: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "tailguard_engine_step_seconds_count", {"kind": kind}
        )
        return value or 0.0


@pytest.fixture
async def harness_factory(runtime: OnnxRuntime) -> AsyncIterator[Any]:
    tasks: list[asyncio.Task[None]] = []

    def make(**knobs: Any) -> Harness:
        harness = Harness(runtime, **knobs)
        tasks.append(asyncio.create_task(harness.scheduler.run()))
        return harness

    yield make
    for task in tasks:
        task.cancel()


async def finished(request: GenerationRequest) -> None:
    async def wait() -> None:
        while not request.done:
            await request.next_update()

    await asyncio.wait_for(wait(), timeout=30)


def alone(runtime: OnnxRuntime, prompt: list[int], tokens: int) -> list[int]:
    engine = BatchEngine(runtime)
    seq = EngineSequence(
        prompt, SamplingParams(max_new_tokens=tokens, temperature=0.0, ignore_eos=True)
    )
    engine.prefill([seq])
    engine.step(join=[seq])
    while engine.running:
        engine.step()
    return seq.tokens


async def test_victim_preempts_the_aggressor_and_everyone_gets_exact_tokens(
    runtime: OnnxRuntime, harness_factory: Any
) -> None:
    h = harness_factory(max_batch_size=4)
    prompts = [[10 + i, 20 + i, 30 + i] for i in range(12)]
    aggressors = [h.submit("aggressor", p, 120) for p in prompts]
    while len(h.scheduler.running) < 4 or not all(r.output_ids for r in h.scheduler.running):
        await asyncio.sleep(0.001)
    pause = h.scheduler._pause
    paused: list[tuple[GenerationRequest, int]] = []

    def record(request: GenerationRequest) -> None:
        paused.append((request, len(request.output_ids)))
        pause(request)

    setattr(h.scheduler, "_pause", record)  # noqa: B010
    victim = h.submit("victim", [7, 8, 9], 10)
    while not victim.output_ids:
        await asyncio.sleep(0.0005)
    # The victim got its first token while most of the aggressor's backlog still waits,
    # after one running aggressor request was paused (with tokens, to resume later).
    waiting = [r for r in aggressors if r not in h.scheduler.running and not r.done]
    assert len(waiting) >= 7
    assert len(paused) == 1 and paused[0][0] in aggressors and paused[0][1] > 0
    for request in [victim, *aggressors]:
        await finished(request)
    assert victim.output_ids == alone(runtime, [7, 8, 9], 10)
    for prompt, request in zip(prompts, aggressors, strict=True):
        assert request.output_ids == alone(runtime, prompt, 120)
        assert request.finish_reason == "length"


async def test_fcfs_makes_the_victim_wait_for_the_backlog(harness_factory: Any) -> None:
    h = harness_factory(max_batch_size=4, policy="fcfs")
    aggressors = [h.submit("aggressor", [1, 2, 3], 30) for _ in range(12)]
    await asyncio.sleep(0)
    victim = h.submit("victim", [4, 5, 6], 5)
    for request in [*aggressors, victim]:
        await finished(request)
    assert victim.timing.scheduled is not None
    assert all(
        r.timing.scheduled is not None and r.timing.scheduled <= victim.timing.scheduled
        for r in aggressors
    )


async def test_token_budget_spreads_prefills_over_steps(harness_factory: Any) -> None:
    h = harness_factory(max_batch_size=8, max_tokens_per_step=64)
    requests = [h.submit("t", list(range(5, 45)), 4) for _ in range(3)]
    for request in requests:
        await finished(request)
    assert h.steps("prefill") == 3
    roomy = harness_factory(max_batch_size=8, max_tokens_per_step=512)
    requests = [roomy.submit("t", list(range(5, 45)), 4) for _ in range(3)]
    for request in requests:
        await finished(request)
    assert roomy.steps("prefill") == 1


async def test_a_prompt_longer_than_the_step_budget_is_split_over_steps(
    runtime: OnnxRuntime, harness_factory: Any
) -> None:
    h = harness_factory(max_batch_size=4, max_tokens_per_step=64)
    prompt = [5 + i % 250 for i in range(150)]
    request = h.submit("t", prompt, 6)
    await finished(request)
    assert h.steps("prefill") == 3
    assert request.output_ids == alone(runtime, prompt, 6)


def step_once(scheduler: Scheduler) -> None:
    """One admission round and one step, in this thread, in the order the lanes run."""
    scheduler._admit()
    commands, scheduler._early = scheduler._early, []  # read during the last decode
    with contextlib.suppress(Empty):
        while True:
            commands.append(scheduler._commands.get_nowait())
    moves = [move for command in commands if isinstance(command, list) for move in command]
    scheduler._step(moves, scheduler._stepped)


async def test_a_victim_waits_one_step_even_behind_a_long_prompt_under_way(
    runtime: OnnxRuntime,
) -> None:
    h = Harness(runtime, max_batch_size=4, max_tokens_per_step=64)
    long_prompt = [5 + i % 250 for i in range(300)]
    aggressors = [h.submit("aggressor", [1 + i, 2, 3], 30) for i in range(3)]
    aggressors.append(h.submit("aggressor", long_prompt, 5))
    aggressors += [h.submit("aggressor", [4, 5 + i, 6], 8) for i in range(2)]
    while not (aggressors[3].seq.prefilled and all(r.output_ids for r in aggressors[:3])):
        step_once(h.scheduler)
    assert len(h.scheduler.running) == 4
    victim = h.submit("victim", [7, 8, 9, 10, 11], 10)
    under_way = aggressors[3].seq.prefilled
    step_once(h.scheduler)
    # One step: the victim took a slot from the over-share tenant, its whole prompt ran
    # first (and then its first decode), and the long prompt still advanced in the
    # rest of the budget.
    assert len(victim.output_ids) == 2
    assert under_way < aggressors[3].seq.prefilled < len(long_prompt)
    while not all(r.done for r in [victim, *aggressors]):
        step_once(h.scheduler)
    assert victim.output_ids == alone(runtime, [7, 8, 9, 10, 11], 10)
    assert aggressors[3].output_ids == alone(runtime, long_prompt, 5)
    assert aggressors[0].output_ids == alone(runtime, [1, 2, 3], 30)


class ArrivingMidStep(BatchEngine):
    """The real engine; ``arrive`` runs once, in the first gap between a decode's
    forward calls, before the scheduler's own work there."""

    arrive: Callable[[], None] | None = None

    def step(
        self,
        leave: Collection[EngineSequence] = (),
        park: Collection[EngineSequence] = (),
        join: Sequence[EngineSequence] = (),
        between: Callable[[], None] | None = None,
    ) -> list[EngineSequence]:
        def gap() -> None:
            if self.arrive is not None:
                arrive, self.arrive = self.arrive, None
                arrive()
            if between is not None:
                between()

        return super().step(leave, park, join, gap)


def aggressors_decoding(h: Harness, rows: int) -> list[GenerationRequest]:
    """``rows`` aggressor requests, stepped until every one decodes."""
    aggressors = [h.submit("aggressor", [1 + i, 2, 3], 12) for i in range(rows)]
    while not all(r.output_ids for r in aggressors):
        step_once(h.scheduler)
    return aggressors


def victim_in_next_decode(h: Harness, engine: ArrivingMidStep) -> list[GenerationRequest]:
    """Arms ``engine``: a victim arrives, and is admitted, in the next decode's first gap
    between calls; the list returned holds it once it has."""
    arrived: list[GenerationRequest] = []

    def arrive() -> None:
        arrived.append(h.submit("victim", [7, 8, 9, 10, 11], 10))
        h.scheduler._admit()

    engine.arrive = arrive
    return arrived


async def test_a_prompt_admitted_during_a_decode_starts_between_its_calls(
    runtime: OnnxRuntime,
) -> None:
    """A victim arriving while a two-call decode runs has its first token from that
    step, before its decode ends, and joins the batch at the next step."""
    engine = ArrivingMidStep(runtime, rows_per_call=2)
    h = Harness(runtime, engine=engine, max_batch_size=6, max_tokens_per_step=64)
    aggressors = aggressors_decoding(h, 4)
    arrived = victim_in_next_decode(h, engine)
    reports: list[_StepReport] = []

    def report(outcome: _StepReport) -> None:
        reports.append(outcome)
        h.scheduler._stepped(outcome)

    h.scheduler._step([], report)
    (victim,) = arrived
    assert [r.completed for r in reports[:-1]] == [[victim]] and len(victim.output_ids) == 1
    assert victim.seq not in (reports[-1].stepped or [])
    step_once(h.scheduler)
    assert len(victim.output_ids) == 2  # in the batch from the next step
    while not all(r.done for r in [victim, *aggressors]):
        step_once(h.scheduler)
    assert victim.output_ids == alone(runtime, [7, 8, 9, 10, 11], 10)
    assert aggressors[0].output_ids == alone(runtime, [1, 2, 3], 12)


class NoRoomAside(ArrivingMidStep):
    """The real engine, whose starts beside a decode fail (no parking block fits)."""

    attempts = 0

    def prefill(
        self,
        sequences: Sequence[EngineSequence],
        max_tokens: int | None = None,
        aside: bool = False,
    ) -> list[EngineSequence]:
        if aside:
            self.attempts += 1
            raise RuntimeError("injected: no room beside the batch")
        return super().prefill(sequences, max_tokens, aside)


async def test_a_failed_start_during_a_decode_is_left_to_the_next_step(
    runtime: OnnxRuntime,
) -> None:
    """Tried once in a three-call decode, then started by the next step as if it had
    arrived a moment later: not failed."""
    engine = NoRoomAside(runtime, rows_per_call=2)
    h = Harness(runtime, engine=engine, max_batch_size=8, max_tokens_per_step=64)
    aggressors = aggressors_decoding(h, 6)
    arrived = victim_in_next_decode(h, engine)
    step_once(h.scheduler)
    (victim,) = arrived
    assert engine.attempts == 1 and victim.output_ids == [] and not victim.done
    step_once(h.scheduler)
    assert len(victim.output_ids) == 2
    while not all(r.done for r in [victim, *aggressors]):
        step_once(h.scheduler)
    assert victim.output_ids == alone(runtime, [7, 8, 9, 10, 11], 10)


@pytest.mark.parametrize("objective_of", ["aggressor", "victim"])
async def test_a_prompt_admitted_during_a_decode_under_a_tpot_objective_waits_for_it(
    runtime: OnnxRuntime, objective_of: str
) -> None:
    """Steps sized to the aggressor's objective have no time for more; a victim with an
    objective of its own, arriving while none is in force, starts with the next step,
    which its objective sizes, not in the rest of one sized for no one."""
    engine = ArrivingMidStep(runtime, rows_per_call=2)
    h = Harness(
        runtime,
        [SloThreshold(tenant=objective_of, metric="tpot", threshold_seconds=10.0)],
        engine=engine,
        max_batch_size=6,
        max_tokens_per_step=64,
    )
    aggressors_decoding(h, 4)
    assert (h.scheduler._tpot_target is not None) == (objective_of == "aggressor")
    arrived = victim_in_next_decode(h, engine)
    step_once(h.scheduler)
    (victim,) = arrived
    assert victim.output_ids == []
    step_once(h.scheduler)
    assert len(victim.output_ids) == 2  # its prompt, then its first decode, in one step


async def test_a_burst_under_its_share_starts_in_one_step(runtime: OnnxRuntime) -> None:
    """Three requests of a tenant under its share arrive at once at a batch the
    aggressor fills: each pauses one of the aggressor's rows, though the first one's
    prompt puts the tenant ahead on the counter and the aggressor, behind, cannot be
    given a row itself. All three have their first token after one step."""
    h = Harness(runtime, max_batch_size=8)
    aggressors = [h.submit("aggressor", [1 + i, 2, 3], 40) for i in range(12)]
    step_once(h.scheduler)
    assert len(h.scheduler.running) == 8
    victims = [h.submit("victim", [7 + i, 8, 9, 10], 5) for i in range(3)]
    step_once(h.scheduler)
    assert all(v.output_ids for v in victims)
    while not all(r.done for r in [*victims, *aggressors]):
        step_once(h.scheduler)
    assert victims[2].output_ids == alone(runtime, [9, 8, 9, 10], 5)
    assert all(len(r.output_ids) == 40 for r in aggressors)


async def test_steps_shrink_to_the_tightest_tpot_objective(runtime: OnnxRuntime) -> None:
    """The victim's TPOT objective is 10 tokens' worth of step: while it runs, the
    aggressor's newest rows wait until the rest decode within it (10 rows), and every
    step still carries the victim; the objective holds for a mean request's steps after
    it is done (rows admitted then would still decode at its next request), then the
    aggressor has the whole batch again."""
    engine = TokenClock(runtime)
    objective = SloThreshold(tenant="victim", metric="tpot", threshold_seconds=10 * TOKEN_S)
    h = Harness(runtime, [objective], engine, max_batch_size=16)
    # The aggressor's requests come in two waves: steps of 4 rows, then of 16, show
    # what a step costs.
    aggressors = [h.submit("aggressor", [1 + i, 2, 3], 60) for i in range(4)]
    while len(engine.steps) < 5:
        step_once(h.scheduler)
    aggressors += [h.submit("aggressor", [1 + i, 2, 3], 60) for i in range(4, 16)]
    while len(engine.steps) < 10:
        step_once(h.scheduler)
    assert len(engine.steps[-1]) == 16
    victim = h.submit("victim", [7, 8, 9], 20)
    while not victim.done:
        step_once(h.scheduler)
    with_victim = [rows for rows in engine.steps if victim.seq in rows]
    assert len(with_victim) == 19  # one token a step after its first
    assert max(len(rows) for rows in with_victim) <= 10
    assert min(len(rows) for rows in with_victim) >= 2  # the aggressor still decodes
    after = len(engine.steps)
    while not all(r.done for r in aggressors):
        step_once(h.scheduler)
    # A mean request is 16.4 steps here (its smoothed output tokens, from 16 and 20).
    assert max(len(rows) for rows in engine.steps[after : after + 16]) <= 10
    assert len(engine.steps[after + 18]) > 10
    assert victim.output_ids == alone(runtime, [7, 8, 9], 20)
    assert aggressors[0].output_ids == alone(runtime, [1, 2, 3], 60)


async def test_rows_the_objective_protects_are_never_paused_for_it(
    runtime: OnnxRuntime,
) -> None:
    """Steps that must shrink to the victim's TPOT objective pause the aggressor's rows,
    even where the victim holds more rows than the aggressor: a pause is what breaks a
    request's TPOT. Every victim request decodes in every step from its first token
    to its last."""
    engine = TokenClock(runtime)
    objective = SloThreshold(tenant="victim", metric="tpot", threshold_seconds=10 * TOKEN_S)
    h = Harness(runtime, [objective], engine, max_batch_size=16)
    aggressors = [h.submit("aggressor", [1 + i, 2, 3], 40) for i in range(4)]
    while len(engine.steps) < 5:  # steps of 4 rows, measured
        step_once(h.scheduler)
    victims = [h.submit("victim", [7 + i, 8, 9], 30) for i in range(8)]
    # Gateways read whose rows are protected, before any of them runs.
    assert h.scheduler.state()["protected"] == ["victim"]
    while not all(r.done for r in victims):
        step_once(h.scheduler)
    for victim in victims:
        steps = [i for i, rows in enumerate(engine.steps) if victim.seq in rows]
        assert steps == list(range(steps[0], steps[0] + 29))  # one token a step after its first
    # The aggressor's rows gave way: steps shrank to the objective.
    victim_seqs = {r.seq for r in victims}
    first = next(i for i, rows in enumerate(engine.steps) if victim_seqs & set(rows))
    after = engine.steps[first + 4 : first + 29]  # once steps of 12 rows are measured
    assert min(sum(s not in victim_seqs for s in rows) for rows in after) == 2
    assert max(len(rows) for rows in after) == 10
    while not all(r.done for r in aggressors):
        step_once(h.scheduler)
    assert aggressors[0].output_ids == alone(runtime, [1, 2, 3], 40)


async def test_rows_past_the_cap_end_on_their_own_while_their_decode_fits(
    runtime: OnnxRuntime,
) -> None:
    """The aggressor's prompts leave room for fewer rows than it runs, but their decode
    alone fits in the victim's objective: none is paused for the cap, and the victim
    (under its share) takes one row's place, not the cap's."""
    engine = TokenClock(runtime)
    objective = SloThreshold(tenant="victim", metric="tpot", threshold_seconds=10 * TOKEN_S)
    h = Harness(runtime, [objective], engine, max_batch_size=16)
    prompt = list(range(2, 10))
    aggressors = [h.submit("aggressor", [1 + i, *prompt], 60) for i in range(4)]
    while len(engine.steps) < 5:  # steps of 4 rows, then of 9, measured
        step_once(h.scheduler)
    aggressors += [h.submit("aggressor", [1 + i, *prompt], 60) for i in range(4, 9)]
    while len(engine.steps) < 10:
        step_once(h.scheduler)
    victim = h.submit("victim", [7, 8, 9], 10)
    step_once(h.scheduler)
    assert h.scheduler._row_cap() < 9
    with_victim = [rows for rows in engine.steps if victim.seq in rows]
    assert len(with_victim[0]) == 9  # 8 of the aggressor's rows and the victim's
    while not victim.done:
        step_once(h.scheduler)
    assert victim.output_ids == alone(runtime, [7, 8, 9], 10)
    while not all(r.done for r in aggressors):
        step_once(h.scheduler)
    assert all(len(r.output_ids) == 60 for r in aggressors)


async def test_a_protected_burst_claims_rows_up_to_its_share_of_the_batch(
    runtime: OnnxRuntime,
) -> None:
    """The victim's objective holds the rows at 7 of 16. A burst of 6 victim requests
    is more than its share of the 7 rows, but within its share of the batch: each
    pauses a row of the aggressor, and all 6 start at once instead of waiting for rows
    to end."""
    engine = TokenClock(runtime)
    objective = SloThreshold(tenant="victim", metric="tpot", threshold_seconds=10 * TOKEN_S)
    h = Harness(runtime, [objective], engine, max_batch_size=16)
    aggressors = [h.submit("aggressor", [1 + i, 2, 3], 200) for i in range(16)]
    while len(engine.steps) < 10:  # steps of 16 rows, measured
        step_once(h.scheduler)
    victims = [h.submit("victim", [7 + i, 8, 9], 20) for i in range(6)]
    submitted = len(engine.steps)
    while not all(v.output_ids for v in victims):
        step_once(h.scheduler)
    # Their prompts are paid from the time steps leave (6 steps here); held to their
    # share of the 7 rows the cap allows, the last would start after a victim's row
    # ends (24 steps).
    assert h.scheduler._row_cap() == 7
    assert len(engine.steps) - submitted <= 8
    assert sum(1 for r in h.scheduler.running if r.tenant == "aggressor") >= 1
    while not all(r.done for r in [*victims, *aggressors]):
        step_once(h.scheduler)
    assert victims[0].output_ids == alone(runtime, [7, 8, 9], 20)
    assert aggressors[0].output_ids == alone(runtime, [1, 2, 3], 200)


async def test_a_protected_tenant_claims_unprotected_rows_before_anothers(
    runtime: OnnxRuntime,
) -> None:
    """Two tenants share the objective. One holds more than its share of the cap (not
    of the batch); a request of the other takes an aggressor's row, not one of its."""
    engine = TokenClock(runtime)
    objectives = [
        SloThreshold(tenant=name, metric="tpot", threshold_seconds=10 * TOKEN_S)
        for name in ("v1", "v2")
    ]
    h = Harness(runtime, objectives, engine, max_batch_size=16)
    aggressors = [h.submit("aggressor", [1 + i, 2, 3], 200) for i in range(16)]
    while len(engine.steps) < 10:
        step_once(h.scheduler)
    first = [h.submit("v1", [7 + i, 8, 9], 40) for i in range(4)]
    while not all(v.output_ids for v in first):
        step_once(h.scheduler)
    second = h.submit("v2", [5, 8, 9], 40)
    while not second.output_ids:
        step_once(h.scheduler)
    assert not any(v.paused for v in first)
    while not all(r.done for r in [*first, second, *aggressors]):
        step_once(h.scheduler)
    assert second.output_ids == alone(runtime, [5, 8, 9], 40)


CALL_S = 0.005  # what a forward call costs on CallClock's clock, whatever it carries


class CallClock(TokenClock):
    """TokenClock plus a fixed CALL_S for every forward call (a decode step, a prompt
    chunk): the cost of reading the weights, which a step pays however few rows it has."""

    def __init__(self, runtime: OnnxRuntime) -> None:
        super().__init__(runtime)
        self.prompt_calls = 0
        self.budgets: list[int | None] = []  # each prompt call's token budget

    def now(self) -> float:
        return super().now() + (len(self.steps) + self.prompt_calls) * CALL_S

    def prefill(
        self,
        sequences: Sequence[EngineSequence],
        max_tokens: int | None = None,
        aside: bool = False,
    ) -> list[EngineSequence]:
        before = self.tokens
        complete = super().prefill(sequences, max_tokens, aside)
        self.prompt_calls += self.tokens > before
        self.budgets.append(max_tokens)
        return complete


async def test_steps_under_a_tpot_objective_pay_each_forward_call_once(
    runtime: OnnxRuntime,
) -> None:
    """With a fixed cost per call, the rows allowed are what fits beside it and the
    prompts' share (at most 20 - 5 - 2 token costs: 13 rows), not the 3 that a mean
    cost per token of a one-row step would allow; prompts run whole, paid from the
    time steps leave unused, and steps average the objective."""
    engine = CallClock(runtime)
    objective = SloThreshold(tenant="victim", metric="tpot", threshold_seconds=20 * TOKEN_S)
    h = Harness(runtime, [objective], engine, max_batch_size=32)
    aggressors = [h.submit("aggressor", [1 + i % 200, 2, 3, 4, 5, 6, 7, 8], 40) for i in range(64)]
    for _ in range(6):  # steps of 32 rows, measured
        step_once(h.scheduler)
    victim = h.submit("victim", [7, 8, 9], 30)
    started = engine.now()
    budgets = len(engine.budgets)
    while not victim.done:
        step_once(h.scheduler)
    with_victim = [rows for rows in engine.steps if victim.seq in rows]
    assert len(with_victim) == 29
    assert 8 <= max(len(rows) for rows in with_victim) <= 13
    # Every prompt chunk that ran beside the victim took whole prompts (the victim's of
    # 3 tokens, the aggressor's of 8), never a token or two per call.
    assert engine.budgets[budgets:]
    assert all(b is not None and b >= 3 for b in engine.budgets[budgets:])
    assert all(len(r.seq.prompt) == r.seq.prefilled for r in aggressors if r.seq.prefilled)
    per_step = (engine.now() - started) / (len(with_victim) + 1)
    assert per_step <= 20 * TOKEN_S * 1.1
    while not all(r.done for r in aggressors):
        step_once(h.scheduler)
    assert victim.output_ids == alone(runtime, [7, 8, 9], 30)


async def test_rows_leave_the_time_their_prompts_take(runtime: OnnxRuntime) -> None:
    """Under the same objective, requests with long prompts and short answers get
    fewer rows than ones with short prompts and long answers: each row brings its
    prompt's time, spread over the steps it decodes. Either way steps average the
    objective."""

    def beside_victim(prompt_tokens: int, output_tokens: int) -> tuple[float, float]:
        engine = CallClock(runtime)
        objective = SloThreshold(tenant="victim", metric="tpot", threshold_seconds=20 * TOKEN_S)
        h = Harness(runtime, [objective], engine, max_batch_size=32, max_queue_len=512)
        prompt = list(range(2, prompt_tokens + 1))
        for i in range(400):
            h.submit("aggressor", [1 + i % 200, *prompt], output_tokens)
        victim = h.submit("victim", [7, 8, 9], 300)
        # The first requests, paused when the victim came, resume (without a prompt);
        # then the rows settle on what new requests' prompts cost.
        while len(victim.output_ids) < 150:
            step_once(h.scheduler)
        started, steps = engine.now(), len(engine.steps)
        while not victim.done:
            step_once(h.scheduler)
        rows = [len(r) for r in engine.steps[steps:]]
        return sum(rows) / len(rows), (engine.now() - started) / len(rows)

    long_rows, long_step = beside_victim(prompt_tokens=24, output_tokens=20)
    short_rows, short_step = beside_victim(prompt_tokens=2, output_tokens=80)
    assert short_rows >= 1.8 * long_rows
    assert long_step <= 20 * TOKEN_S * 1.1
    assert short_step <= 20 * TOKEN_S * 1.1


def test_the_tpot_aim_settles_where_99_in_100_requests_meet_the_objective() -> None:
    """Requests spread around the target (lognormal, sigma 0.1, seeded); the aim moves
    after each. Once settled, one request in 100 is over the objective, and the aim sits
    where the spread's 99th percentile meets it (1 / e^(2.326 * 0.1) = 0.79)."""
    rng = random.Random(7)
    aim = TpotAim()
    over: list[bool] = []
    values: list[float] = []
    for _ in range(40_000):
        tpot = aim.value * rng.lognormvariate(0, 0.1)
        over.append(tpot > 1.0)
        aim.observe(tpot, 1.0)
        values.append(aim.value)
    assert 0.007 <= sum(over[20_000:]) / 20_000 <= 0.013
    assert sum(values[20_000:]) / 20_000 == pytest.approx(0.79, abs=0.02)


async def test_steps_aim_below_the_objective_by_what_its_requests_show(
    runtime: OnnxRuntime,
) -> None:
    """Each request of the protected tenant over its objective (a microsecond, which no
    request meets) moves the target steps aim at down by one step of the aim, to its
    floor at most; requests within it (ten seconds) leave the target at the objective,
    and so does a request that was paused (its wait is not the steps')."""

    def targets(threshold: float, requests: int, paused: bool = False) -> list[float]:
        objective = SloThreshold(tenant="victim", metric="tpot", threshold_seconds=threshold)
        h = Harness(runtime, [objective], TokenClock(runtime), max_batch_size=4)
        seen = []
        for _ in range(requests):
            victim = h.submit("victim", [7, 8, 9], 5)
            victim.paused = paused
            while not victim.done:
                step_once(h.scheduler)
            seen.append(h.scheduler.state()["tpot_target_s"])
        return seen

    aim = TpotAim()
    assert targets(1e-6, 16) == pytest.approx(
        [1e-6 * max(aim.floor, (1 - aim.step) ** n) for n in range(1, 17)]
    )
    assert targets(10.0, 3) == [10.0, 10.0, 10.0]
    assert targets(1e-6, 2, paused=True) == [1e-6, 1e-6]


async def test_a_step_publishes_its_live_state_only_when_it_moved(
    runtime: OnnxRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step's prefill half only delivers first tokens: the live state that gateways
    read goes out with its decode half, and only when the occupancy moved or a measured
    cost drifted past ``STATE_COST_DRIFT`` (a message per step would cost every gateway
    a read and a parse per token)."""
    ticks = itertools.count()  # every step the same length on the clock costs are read by
    monkeypatch.setattr(time, "perf_counter", lambda: next(ticks) * 0.001)
    h = Harness(runtime, max_batch_size=4, max_tokens_per_step=64)
    request = h.submit("t", [1, 2, 3], 12)
    published: list[int] = []
    changed = h.scheduler._changed

    def recorded(*occupancy: Any) -> None:
        published.append(len(request.output_ids))
        changed(*occupancy)

    setattr(h.scheduler, "_changed", recorded)  # noqa: B010
    step_once(h.scheduler)  # the prompt runs, then its first decode in the same step
    assert request.output_ids and published == [2]
    for _ in range(4):  # the same row at the same cost per step
        step_once(h.scheduler)
    assert published == [2]
    h.scheduler.step_s *= 1 + 3 * STATE_COST_DRIFT  # the decode got dearer
    step_once(h.scheduler)
    assert published == [2, 7]
    while not request.done:
        step_once(h.scheduler)
    assert published == [2, 7, 12]  # the end, once
    long = h.submit("u", [5 + i % 250 for i in range(200)], 2)
    published.clear()
    while not long.output_ids:  # each chunk moves what is left of the prompt
        step_once(h.scheduler)
    assert len(published) == math.ceil(200 / 64)


async def test_the_live_state_names_prompts_under_way_apart_from_rows(
    runtime: OnnxRuntime,
) -> None:
    """The policy counts a tenant's prompts under way toward its share but never pauses
    one: the state gateways read names them apart from the decoding rows."""
    h = Harness(runtime, max_batch_size=4, max_tokens_per_step=64)
    decoding = h.submit("a", [1, 2, 3], 30)
    step_once(h.scheduler)
    long = h.submit("b", [5 + i % 250 for i in range(300)], 5)
    h.scheduler._admit()
    assert h.scheduler.state()["rows"] == {"a": 1}
    assert h.scheduler.state()["starting"] == {"b": 1}
    step_once(h.scheduler)  # its first chunk
    assert 0 < long.seq.prefilled < 300 and h.scheduler.state()["starting"] == {"b": 1}
    while not long.output_ids:
        step_once(h.scheduler)
    step_once(h.scheduler)
    assert h.scheduler.state()["rows"] == {"a": 1, "b": 1}
    assert h.scheduler.state()["starting"] == {} and not decoding.done


async def test_queue_delay_gathers_arrivals_into_one_prefill(harness_factory: Any) -> None:
    # An idle engine waits for the batch to fill (2) or the delay, whichever comes first.
    h = harness_factory(max_batch_size=2, max_queue_delay_ms=60_000)
    first = h.submit("t", [1, 2, 3], 3)
    await asyncio.sleep(0.05)
    assert not first.output_ids
    second = h.submit("t", [4, 5, 6], 3)
    await finished(first)
    await finished(second)
    assert h.steps("prefill") == 1


async def test_rows_paused_at_a_scheduling_change_queue_under_the_new_policy(
    runtime: OnnxRuntime,
) -> None:
    """A scheduling change makes a new policy while rows run; rows then paused (here by
    a concurrency limit of the same change) go back to its queue, and admission goes
    on (their tenant had no counter under the new policy: admission failed on it)."""
    h = Harness(runtime, max_batch_size=4)
    rows = [h.submit("b", [1, 2, 3], 6) for _ in range(3)]
    step_once(h.scheduler)
    assert len(h.scheduler._in_batch) == 3
    h.scheduler.reconfigure(
        h.scheduler.batching,
        SchedulingConfig(policy="fair", tpot_steps=True),
        {"b": TenantConfig.model_validate({"max_concurrency": 1})},
    )
    assert h.scheduler.policy.waiting("b") == 2
    while not all(r.done for r in rows):
        step_once(h.scheduler)
    assert all(len(r.output_ids) == 6 for r in rows)


async def test_cancel_frees_the_slot_for_the_next_request(harness_factory: Any) -> None:
    h = harness_factory(max_batch_size=1)
    long = h.submit("t", [1, 2, 3], 400)
    queued = h.submit("t", [4, 5, 6], 3)
    while not long.output_ids:
        await long.next_update()
    h.scheduler.cancel(long)
    await finished(queued)
    assert long.cancelled and long.finish_reason is None
    assert len(long.output_ids) < 400 and queued.finish_reason == "length"
    assert h.scheduler.running == []


async def test_per_tenant_queue_bound(harness_factory: Any) -> None:
    h = harness_factory(max_batch_size=1, max_queue_len=2)
    h.submit("a", [1], 50)
    h.submit("a", [1], 50)
    with pytest.raises(QueueFull) as full:
        h.submit("a", [1], 50)
    assert full.value.retry_after_s >= 1
    h.submit("b", [1], 50)


class FailingOnce(BatchEngine):
    """The real engine, whose step after the first partial prefill fails: its decode
    and its prefill both raise."""

    def __init__(self, runtime: OnnxRuntime) -> None:
        super().__init__(runtime)
        self.armed = self.tripped = False

    def step(
        self,
        leave: Collection[EngineSequence] = (),
        park: Collection[EngineSequence] = (),
        join: Sequence[EngineSequence] = (),
        between: Callable[[], None] | None = None,
    ) -> list[EngineSequence]:
        if not self.armed:
            return super().step(leave, park, join, between)

        def broken(rows: object, tokens: object, between: object) -> None:
            raise RuntimeError("injected decode failure")

        setattr(self.cache, "decode", broken)  # noqa: B010
        try:
            return super().step(leave, park, join, between)
        finally:
            delattr(self.cache, "decode")

    def prefill(
        self,
        sequences: Sequence[EngineSequence],
        max_tokens: int | None = None,
        aside: bool = False,
    ) -> list[EngineSequence]:
        if self.armed:
            self.armed = False
            raise RuntimeError("injected prefill failure")
        complete = super().prefill(sequences, max_tokens, aside)
        if not self.tripped and any(0 < s.prefilled < len(s.prompt) for s in sequences):
            self.armed = self.tripped = True
        return complete


async def test_failed_requests_give_their_slots_back(runtime: OnnxRuntime) -> None:
    engine = FailingOnce(runtime)
    cache = engine.cache
    assert isinstance(cache, SlotCache)
    h = Harness(runtime, engine=engine, max_tokens_per_step=8)
    task = asyncio.create_task(h.scheduler.run())
    try:
        decoding = h.submit("t", [1, 2, 3], 400)
        while not decoding.output_ids:
            await decoding.next_update()
        chunked = h.submit("t", list(range(5, 65)), 5)  # a prompt of several steps
        await finished(decoding)
        await finished(chunked)
        assert engine.tripped and decoding.finish_reason == chunked.finish_reason == "error"
        after = h.submit("t", [4, 5, 6], 3)
        await finished(after)
        assert after.output_ids == alone(runtime, [4, 5, 6], 3)
        for _ in range(1000):
            if cache.slots() == [] and not engine.running:
                break
            await asyncio.sleep(0.01)
        assert cache.slots() == []
    finally:
        task.cancel()


async def test_a_request_paused_while_its_batch_fails_is_failed_not_stranded(
    runtime: OnnxRuntime,
) -> None:
    """A row paused by the event loop while its step decodes loses its cache with the
    batch when that decode fails: the request fails, it does not wait to resume."""
    engine = BatchEngine(runtime)
    h = Harness(runtime, engine=engine, max_batch_size=4)
    requests = [h.submit("t", [1 + i, 2, 3], 50) for i in range(2)]
    while not all(r.output_ids for r in requests):
        step_once(h.scheduler)
    paused = requests[1]
    h.scheduler.policy.requeue(paused)
    h.scheduler._pause(paused)  # as _enforce_limits does; the park reaches the next step

    def broken(rows: object, tokens: object) -> None:
        raise RuntimeError("injected decode failure")

    setattr(engine.cache, "decode", broken)  # noqa: B010
    h.scheduler._step([], h.scheduler._stepped)  # the park's step: its decode fails
    delattr(engine.cache, "decode")
    assert paused.done and paused.finish_reason == "error"
    assert requests[0].finish_reason == "error"
    after = h.submit("t", [4, 5, 6], 3)
    while not after.done:
        step_once(h.scheduler)
    assert after.output_ids == alone(runtime, [4, 5, 6], 3)
    assert h.scheduler.running == [] and len(h.scheduler.policy) == 0


async def test_a_new_rows_per_call_reaches_the_engine_between_steps(
    runtime: OnnxRuntime,
) -> None:
    engine = BatchEngine(runtime)
    h = Harness(runtime, engine=engine, max_rows_per_forward=16)
    engine.rows_per_call = 16
    h.scheduler.reconfigure(
        BatchingConfig(max_rows_per_forward=3), h.scheduler.scheduling, h.scheduler.tenants
    )
    assert engine.rows_per_call == 16  # not from the event loop: the step thread applies it
    task = asyncio.create_task(h.scheduler.run())
    try:
        request = h.submit("t", [1, 2, 3], 4)
        await finished(request)
        assert engine.rows_per_call == 3
    finally:
        task.cancel()
