"""The batching loop in-process over the real (small) model."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from dataplane.inference.config import (
    BatchingConfig,
    RuntimeConfig,
    SchedulingConfig,
)
from dataplane.inference.engine import BatchEngine, EngineSequence
from dataplane.inference.metrics import RequestTiming, TelemetryStats, WorkerMetrics
from dataplane.inference.runtime import OnnxRuntime
from dataplane.inference.sampling import SamplingParams
from dataplane.inference.scheduler import GenerationRequest, QueueFull, Scheduler


@pytest.fixture(scope="module")
def runtime(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> OnnxRuntime:
    return OnnxRuntime(model_dir, tmp_path_factory.mktemp("cache"), RuntimeConfig())


class Harness:
    def __init__(self, runtime: OnnxRuntime, **knobs: Any) -> None:
        policy = knobs.pop("policy", "fair")
        self.metrics = WorkerMetrics("synthetic")
        self.scheduler = Scheduler(
            BatchEngine(runtime),
            BatchingConfig(**knobs),
            SchedulingConfig(policy=policy),
            {},
            self.metrics,
            TelemetryStats("dep", "synthetic", []),
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
    victim = h.submit("victim", [7, 8, 9], 10)
    while not victim.output_ids:
        await asyncio.sleep(0.0005)
    # The victim got its first token while most of the aggressor's backlog still waits,
    # and one running aggressor request was paused (it has tokens but is queued).
    waiting = [r for r in aggressors if r not in h.scheduler.running and not r.done]
    assert len(waiting) >= 7
    assert any(r.output_ids for r in waiting)
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
