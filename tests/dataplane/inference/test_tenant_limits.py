"""Tenant limits on the worker: concurrency caps, output-token buckets, 429s, hot reload,
and a noisy tenant that cannot starve its neighbour while its limits are in force.

In-process tests run the real scheduler over the real (small) model; token buckets run on
a clock that advances a fixed amount per decode step, so every assertion is a count of
tokens, rows or steps, never a duration.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from pathlib import Path
from typing import Any

import openai
import pytest
from pydantic import ValidationError

from dataplane.inference.config import (
    BatchingConfig,
    RuntimeConfig,
    SchedulingConfig,
    TenantConfig,
)
from dataplane.inference.engine import BatchEngine, EngineSequence
from dataplane.inference.metrics import RequestTiming, TelemetryStats, WorkerMetrics
from dataplane.inference.runtime import OnnxRuntime
from dataplane.inference.sampling import SamplingParams
from dataplane.inference.scheduler import GenerationRequest, QueueFull, Scheduler
from dataplane.inference.synthetic import SyntheticModelSpec, write_synthetic_model

from .procs import WorkerProcess, worker_config

STEP_S = 0.01  # the bucket clock advances this much per decode step


@pytest.fixture(scope="module")
def runtime(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> OnnxRuntime:
    return OnnxRuntime(model_dir, tmp_path_factory.mktemp("cache"), RuntimeConfig())


@pytest.fixture(scope="module")
def wider_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Steps of a few milliseconds, so a worker's state can be watched over HTTP between them."""
    directory = tmp_path_factory.mktemp("wider-model")
    spec = SyntheticModelSpec(
        layers=4, hidden=512, heads=8, kv_heads=2, vocab=320, max_context=512, seed=7
    )
    write_synthetic_model(directory, spec)
    return directory


@pytest.fixture(scope="module")
def wider_runtime(wider_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> OnnxRuntime:
    return OnnxRuntime(wider_model_dir, tmp_path_factory.mktemp("cache"), RuntimeConfig())


class CountingEngine(BatchEngine):
    """The real engine, noting which tenants' rows every decode step served.

    Each step first waits until the event loop has handled the reports of the steps before
    it (and what they woke), as it would on a machine with a core to spare: the counts
    then follow the scheduler's rules, not how far the step thread raced ahead."""

    def __init__(self, runtime: OnnxRuntime, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(runtime)
        self.tenant_of: dict[EngineSequence, str] = {}
        self.rows: list[Counter[str]] = []
        self._loop = loop

    def _caught_up(self) -> None:
        with contextlib.suppress(RuntimeError):  # no loop in this thread: the step thread
            if asyncio.get_running_loop() is self._loop:
                return  # called from the loop itself: nothing can be behind
        done = threading.Event()
        # two hops: past the reports queued before, then past the tasks they woke
        self._loop.call_soon_threadsafe(self._loop.call_soon, done.set)
        while not done.wait(0.1):
            if self._loop.is_closed() or not self._loop.is_running():
                return

    @property
    def steps(self) -> int:
        return len(self.rows)

    def step(
        self,
        leave: Collection[EngineSequence] = (),
        park: Collection[EngineSequence] = (),
        join: Sequence[EngineSequence] = (),
        between: Callable[[], None] | None = None,
    ) -> list[EngineSequence]:
        with contextlib.suppress(RuntimeError):  # a closed loop: the test is over
            self._caught_up()
        stepped = super().step(leave, park, join, between)
        if stepped:
            self.rows.append(Counter(self.tenant_of[seq] for seq in stepped))
        return stepped


class Worker:
    def __init__(
        self, runtime: OnnxRuntime, tenants: dict[str, TenantConfig], policy: str, **knobs: Any
    ) -> None:
        self.engine = CountingEngine(runtime, asyncio.get_running_loop())
        self.scheduler = Scheduler(
            self.engine,
            BatchingConfig(**knobs),
            SchedulingConfig(policy=policy),  # type: ignore[arg-type]
            tenants,
            WorkerMetrics("synthetic"),
            TelemetryStats("dep", "synthetic", []),
            clock=lambda: self.engine.steps * STEP_S,
        )
        self.first_token_step: dict[GenerationRequest, int] = {}

    def submit(
        self, tenant: str, tokens: int, prompt: Sequence[int] = (5, 6, 7)
    ) -> GenerationRequest:
        seq = EngineSequence(
            list(prompt), SamplingParams(max_new_tokens=tokens, temperature=0.0, ignore_eos=True)
        )
        self.engine.tenant_of[seq] = tenant
        request = GenerationRequest(
            tenant=tenant,
            priority=self.scheduler.tenants.get(tenant, TenantConfig()).priority,
            seq=seq,
            timing=RequestTiming(arrival=time.perf_counter(), input_tokens=len(prompt)),
        )
        self.scheduler.submit(request)
        return request

    def running(self, tenant: str) -> int:
        return sum(1 for r in self.scheduler.running if r.tenant == tenant)

    def tokens(self, requests: list[GenerationRequest]) -> int:
        return sum(len(r.output_ids) for r in requests)


@pytest.fixture
async def make_worker(runtime: OnnxRuntime) -> AsyncIterator[Any]:
    tasks: list[asyncio.Task[None]] = []

    def make(
        tenants: dict[str, TenantConfig],
        policy: str = "fair",
        on: OnnxRuntime | None = None,
        **knobs: Any,
    ) -> Worker:
        worker = Worker(on or runtime, tenants, policy, **knobs)
        tasks.append(asyncio.create_task(worker.scheduler.run()))
        return worker

    yield make
    for task in tasks:
        task.cancel()


async def finished(*requests: GenerationRequest) -> None:
    async def wait(request: GenerationRequest) -> None:
        while not request.done:
            await request.next_update()

    await asyncio.wait_for(asyncio.gather(*(wait(r) for r in requests)), timeout=60)


async def watch(worker: Worker, tenant: str, until: list[GenerationRequest]) -> int:
    """The most requests of `tenant` holding a slot at once, looked at between callbacks."""
    most = 0
    while not all(r.done for r in until):
        most = max(most, worker.running(tenant))
        await asyncio.sleep(0)
    return most


def test_limits_validate_and_the_bucket_defaults_to_one_second() -> None:
    assert TenantConfig(tokens_per_s=12.5).bucket_tokens == 13
    assert TenantConfig(tokens_per_s=0.2).bucket_tokens == 1
    assert TenantConfig(tokens_per_s=5, burst_tokens=40).bucket_tokens == 40
    with pytest.raises(ValidationError, match="set tokens_per_s too"):
        TenantConfig(burst_tokens=10)
    for bad in ({"max_concurrency": 0}, {"tokens_per_s": 0}, {"tokens_per_s": float("inf")}):
        with pytest.raises(ValidationError):
            TenantConfig.model_validate(bad)


async def test_a_tenant_capped_at_one_never_runs_two(make_worker: Any) -> None:
    w = make_worker(
        {"capped": TenantConfig(max_concurrency=1), "free": TenantConfig()}, max_batch_size=8
    )
    capped = [w.submit("capped", 25) for _ in range(6)]
    free = [w.submit("free", 25) for _ in range(6)]
    most = await watch(w, "capped", [*capped, *free])
    await finished(*capped, *free)
    assert most == 1
    assert max(rows["capped"] for rows in w.engine.rows) == 1
    assert max(rows["free"] for rows in w.engine.rows) >= 2  # the cap is the tenant's alone
    assert [(len(r.output_ids), r.finish_reason) for r in capped] == [(25, "length")] * 6


async def test_a_metered_tenant_gets_its_rate_of_tokens_per_step(
    make_worker: Any, wider_runtime: OnnxRuntime
) -> None:
    rate, burst = 50.0, 20  # 0.5 tokens per decode step
    w = make_worker(
        {"metered": TenantConfig(tokens_per_s=rate, burst_tokens=burst), "free": TenantConfig()},
        on=wider_runtime,  # steps slow enough that the event loop keeps up with them
        max_batch_size=8,
    )
    metered = [w.submit("metered", 480) for _ in range(4)]
    free = w.submit("free", 480)  # one row in every step: it keeps the clock going
    await finished(free)
    steps, got = w.engine.steps, w.tokens(metered)
    allowed = burst + rate * steps * STEP_S
    # About the bucket's worth: unmetered, its 4 requests would have had 4 tokens a step.
    # Steps the step thread ran before a pause reached it may overdraw the bucket by a
    # few rows; that debt is paid back, so the share stays close to the rate.
    assert 0.85 * allowed <= got <= 1.1 * allowed, (got, allowed, steps)
    assert len(free.output_ids) == 480 and steps >= 479
    assert w.scheduler.buckets["metered"].level > -8  # at most a couple of steps' debt
    for request in metered:
        w.scheduler.cancel(request)


async def test_queue_full_answers_retry_after_from_the_limits(make_worker: Any) -> None:
    w = make_worker(
        {
            "capped": TenantConfig(max_concurrency=1),
            "metered": TenantConfig(tokens_per_s=2.0, burst_tokens=2),
            "free": TenantConfig(),
        },
        max_batch_size=8,
        max_queue_len=3,
    )
    retry_after = {}
    for tenant in ("capped", "metered", "free"):
        hold: list[GenerationRequest] = []
        with pytest.raises(QueueFull) as refused:  # nothing is admitted between submits
            while True:
                hold.append(w.submit(tenant, 400))
        assert len(hold) == 3
        retry_after[tenant] = refused.value.retry_after_s
        for request in hold:
            w.scheduler.cancel(request)
    # Until a request completes the worker assumes 1 s and 16 output tokens per request:
    # 4 requests over 8 slots, over 1 slot, and 4 * 16 tokens less the 2 in the bucket at 2/s.
    assert retry_after == {"free": 1, "capped": 4, "metered": 31}


async def test_limits_follow_reconfiguration_both_ways(make_worker: Any) -> None:
    limited = {"noisy": TenantConfig(max_concurrency=2), "quiet": TenantConfig()}
    w = make_worker(limited, max_batch_size=8)
    batching, scheduling = w.scheduler.batching, w.scheduler.scheduling
    noisy = [w.submit("noisy", 480) for _ in range(8)]
    while w.engine.steps < 20:
        await asyncio.sleep(0.001)
    assert w.running("noisy") == 2

    w.scheduler.reconfigure(
        batching, scheduling, {"noisy": TenantConfig(), "quiet": TenantConfig()}
    )
    mark = w.engine.steps
    while (
        w.engine.steps < mark + 200
        and max((r["noisy"] for r in w.engine.rows[mark:]), default=0) < 8
    ):
        await asyncio.sleep(0.001)  # the policy is gone: the backlog takes every slot
    assert max(rows["noisy"] for rows in w.engine.rows[mark:]) == 8

    w.scheduler.reconfigure(batching, scheduling, limited)  # restored: the newest pause
    assert w.running("noisy") == 2
    mark = w.engine.steps + 2  # a step under way may still carry the paused rows
    while w.engine.steps < mark + 5:
        await asyncio.sleep(0.001)
    assert max(rows["noisy"] for rows in w.engine.rows[mark:]) == 2
    for request in noisy:
        w.scheduler.cancel(request)


@pytest.mark.parametrize("policy", ["fcfs", "fair"])
async def test_a_noisy_tenant_under_its_policy_cannot_starve_its_neighbour(
    make_worker: Any, policy: str
) -> None:
    """The noisy tenant floods; each of the quiet tenant's requests arrives behind that
    backlog. With the noisy tenant's policy in force the quiet one is admitted at once and
    shares its steps with at most the policy's rows of noise; without it, FCFS makes it wait
    for the whole backlog and fair queuing still leaves it in a batch full of noise."""
    rules = {"noisy": TenantConfig(max_concurrency=2, tokens_per_s=100.0), "quiet": TenantConfig()}
    unruled = {"noisy": TenantConfig(), "quiet": TenantConfig()}
    outcomes = {}
    for name, tenants in (("with policy", rules), ("without", unruled)):
        w = make_worker(tenants, policy, max_batch_size=4)
        noisy = [w.submit("noisy", 60 + 5 * (i % 4)) for i in range(16)]
        waits, noise = [], []
        for _ in range(4):
            quiet = w.submit("quiet", 8)
            submitted = w.engine.steps
            await finished(quiet)
            steps = w.engine.rows[submitted:]
            waits.append(sum(1 for r in noisy if r.timing.scheduled is None))
            noise.append(max(rows["noisy"] for rows in steps if rows["quiet"]))
        outcomes[name] = (waits, noise)
        for request in noisy:
            w.scheduler.cancel(request)

    waits, noise = outcomes["with policy"]
    assert min(waits) >= 8  # served while most of the noisy backlog still waits
    assert max(noise) <= 2
    waits, noise = outcomes["without"]
    if policy == "fcfs":
        assert waits[0] == 0  # the first quiet request waited for the whole backlog
    else:
        assert max(noise) >= 3  # admitted at once, but into a batch full of noise


def test_a_worker_process_applies_limits_on_sighup(wider_model_dir: Path, tmp_path: Path) -> None:
    model_dir = wider_model_dir
    keys = {"noisy": "key-noisy-0123456789", "quiet": "key-quiet-0123456789"}
    config = worker_config(model_dir, tmp_path / "cache", keys, batching={"max_queue_len": 2})
    noisy = {**config["tenants"]["noisy"], "max_concurrency": 1, "tokens_per_s": 100.0}
    limited = {**config, "tenants": {**config["tenants"], "noisy": noisy}}
    with WorkerProcess(limited, tmp_path) as proc:
        client = openai.AsyncOpenAI(
            base_url=f"{proc.base_url}/v1", api_key=keys["noisy"], max_retries=0
        )

        async def one() -> str:
            try:
                await client.completions.create(
                    model="synthetic", prompt="go", max_tokens=480, extra_body={"ignore_eos": True}
                )
            except openai.RateLimitError as exc:
                return f"429 after {exc.response.headers['retry-after']}"
            return "200"

        async def polls() -> AsyncIterator[dict[str, Any]]:
            for _ in range(2000):
                yield await asyncio.to_thread(proc.health)
                await asyncio.sleep(0.005)
            raise AssertionError(f"the worker never got there: {proc.health()}")

        async def flood() -> list[asyncio.Task[str]]:
            """Requests one after another until the queue is full: while they are held to
            one at a time (a request paused by the bucket waits in the queue too), the
            third or fourth is refused with a Retry-After for draining one by one."""
            jobs: list[asyncio.Task[str]] = []
            most = 0
            while True:
                job = asyncio.create_task(one())
                async for health in polls():
                    most = max(most, health["running"])
                    if job.done() or health["running"] + health["waiting"] > len(jobs):
                        break
                await asyncio.sleep(0.05)
                if not job.done():
                    jobs.append(job)
                    continue
                refused = job.result()
                assert refused.startswith("429 after "), refused
                assert int(refused.split()[-1]) >= 2  # one at a time, not over 32 slots
                assert most == 1 and len(jobs) in (2, 3)
                return jobs

        async def reload(new: dict[str, Any]) -> None:
            """Rewrite the config and signal; the file watcher may apply it first."""
            before = proc.health()["config_generation"]
            proc.write_config(new)
            proc.signal_reload()
            async for health in polls():
                if health["config_generation"] > before:
                    break

        async def lift(jobs: list[asyncio.Task[str]]) -> list[str]:
            """Remove the noisy tenant's limits: its queued requests run together."""
            await reload(config)
            async for health in polls():
                if health["running"] >= 2:
                    break
            return list(await asyncio.gather(*jobs))

        async def flood_and_lift() -> None:
            """Every request the full queue held is served once the limits are lifted."""
            jobs = await flood()
            assert await lift(jobs) == ["200"] * len(jobs)

        async def scenario() -> None:
            await flood_and_lift()
            await reload(limited)  # restored: one at a time again
            await flood_and_lift()

        asyncio.run(scenario())
