"""The gateway end to end: real worker processes (the synthetic model) behind one or two
real gateway processes, the fleet-wide ledger in the test run's Redis.

Load runs for a set time, but nothing asserts a duration or depends on the machine's
speed: concurrency is read from the ledger's own leases, shares are counted over a window
bounded by token counts, and rates are held against the token bucket's own arithmetic.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis

from dataplane.inference.synthetic import SyntheticModelSpec, write_synthetic_model

from ..inference.procs import WorkerProcess, worker_config
from .load import Streamed, closed_loop, stream, tokens_between
from .procs import GatewayProcess, gateway_config

pytestmark = pytest.mark.e2e

KEYS = {name: f"key-{name}" for name in ("a", "b", "c", "hi", "lo")}
BATCH = 4


def redis_url() -> str:
    url = os.environ.get("REDIS_URL")
    assert url, "run the tests with ./tailguard test, which starts Redis and sets REDIS_URL"
    return url


def start_workers(
    stack: ExitStack,
    model_dirs: list[Path],
    workdir: Path,
    tenants: dict[str, dict[str, Any]] | None = None,
) -> dict[str, WorkerProcess]:
    """Workers serving every test key; ``tenants`` adds to some tenants' configs (the
    weights and classes their gateways have, as the agent renders both)."""
    workers = {}
    for index, model in enumerate(model_dirs):
        config = worker_config(
            model, workdir / f"cache{index}", KEYS, batching={"max_batch_size": BATCH}
        )
        for name, fields in (tenants or {}).items():
            config["tenants"][name].update(fields)
        workers[f"r{index}"] = stack.enter_context(
            WorkerProcess(config, workdir / f"worker{index}")
        )
    return workers


@pytest.fixture(scope="module")
def workers(
    model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, WorkerProcess]]:
    with ExitStack() as stack:
        yield start_workers(stack, [model_dir, model_dir], tmp_path_factory.mktemp("workers"))


@pytest.fixture(scope="module")
def slow_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test model's vocabulary and tokenizer with steps of several milliseconds: a
    replica on slower hardware."""
    directory = tmp_path_factory.mktemp("slow-model")
    spec = SyntheticModelSpec(
        layers=6, hidden=512, heads=8, kv_heads=2, vocab=320, max_context=512, seed=7
    )
    write_synthetic_model(directory, spec)
    return directory


def gateways(
    stack: ExitStack,
    workers: dict[str, WorkerProcess],
    tenants: dict[str, dict[str, Any]],
    workdir: Path,
    count: int = 2,
    shared: bool = True,
    **overrides: Any,
) -> list[GatewayProcess]:
    """``count`` gateways sharing a fresh deployment id in the run's Redis (``shared``),
    or with the in-process ledger."""
    deployment = {"deployment_id": f"dep-{uuid.uuid4().hex[:8]}", **overrides.pop("deployment", {})}
    found = []
    for index in range(count):
        config = gateway_config(
            f"g{index}",
            workers,
            tenants,
            KEYS,
            counters_url=redis_url() if shared else None,
            deployment=deployment,
            **overrides,
        )
        found.append(stack.enter_context(GatewayProcess(config, workdir / f"gateway{index}")))
    return found


def run(*loops: Any) -> list[list[Streamed]]:
    async def gather() -> list[list[Streamed]]:
        return list(await asyncio.gather(*loops))

    return asyncio.run(gather())


def max_overlap(results: list[Streamed]) -> int:
    edges = sorted(
        [(r.token_times[0], 1) for r in results if r.token_times]
        + [(r.token_times[-1], -1) for r in results if r.token_times]
    )
    now = best = 0
    for _, step in edges:
        now += step
        best = max(best, now)
    return best


class RunningWatch:
    """Follows the workers' own state streams: how many requests run on all of them."""

    def __init__(self, workers: dict[str, WorkerProcess]) -> None:
        self._urls = {name: w.base_url for name, w in workers.items()}
        self._events: list[tuple[float, str, int]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._clients: list[httpx.Client] = []
        self._threads = [
            threading.Thread(target=self._follow, args=(name, url), daemon=True)
            for name, url in self._urls.items()
        ]

    def _follow(self, name: str, url: str) -> None:
        with contextlib.suppress(httpx.HTTPError), httpx.Client(timeout=30) as client:
            with client.stream("GET", f"{url}/v1/internal/state") as response:
                with self._lock:
                    self._clients.append(client)
                for line in response.iter_lines():
                    if self._stop.is_set():
                        return
                    if line:
                        running = json.loads(line)["running"]
                        with self._lock:
                            self._events.append((time.monotonic(), name, running))

    def __enter__(self) -> RunningWatch:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        with self._lock:
            clients = list(self._clients)
        for client in clients:  # ends a read waiting for the next message
            with contextlib.suppress(Exception):
                client.close()
        for thread in self._threads:
            thread.join(timeout=30)

    def summary(self, limit: int) -> tuple[float, int, float]:
        """Time-weighted mean of the total while any ran, its peak, and the share of
        that time it spent above ``limit``."""
        with self._lock:
            events = sorted(self._events)
        if not events:
            return 0.0, 0, 0.0
        now: dict[str, int] = {}
        busy = weighted = above = 0.0
        peak = 0
        for (t, name, running), later in zip(events, [*events[1:], events[-1]], strict=True):
            now[name] = running
            total = sum(now.values())
            peak = max(peak, total)
            if total:
                span = later[0] - t
                busy += span
                weighted += total * span
                above += span if total > limit else 0.0
        if not busy:
            return 0.0, peak, 0.0
        return weighted / busy, peak, above / busy


class LeaseWatch:
    """Polls the ledger's own count of a tenant's live leases in Redis: what the
    fleet-wide concurrency limit holds exactly, however loaded the machine."""

    def __init__(self, deployment: str, tenant: str) -> None:
        self._key = f"tailguard:gw:{{{deployment}}}:lease:{tenant}"
        self._redis = redis.Redis.from_url(redis_url())
        self.counts: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            seconds, micros = self._redis.time()
            now = seconds + micros / 1e6
            self.counts.append(int(self._redis.zcount(self._key, f"({now}", "+inf")))
            time.sleep(0.005)

    def __enter__(self) -> LeaseWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self._redis.close()


def test_openai_surface_and_measurement(workers: dict[str, WorkerProcess], tmp_path: Path) -> None:
    with ExitStack() as stack:
        (gateway,) = gateways(  # one gateway: the in-process ledger, the default
            stack,
            workers,
            {"a": {}},
            tmp_path,
            count=1,
            shared=False,
            deployment={
                "slo_thresholds": [{"tenant": "a", "metric": "ttft", "threshold_seconds": 30}]
            },
        )
        client = openai.OpenAI(base_url=f"{gateway.base_url}/v1", api_key=KEYS["a"], max_retries=0)
        completion = client.completions.create(
            model="synthetic", prompt="Hello", max_tokens=6, extra_body={"ignore_eos": True}
        )
        assert completion.usage is not None and completion.usage.completion_tokens == 6
        chunks = list(
            client.chat.completions.create(
                model="synthetic",
                messages=[{"role": "user", "content": "Hi"}],
                max_tokens=5,
                stream=True,
                extra_body={"ignore_eos": True},
            )
        )
        assert len([c for c in chunks if c.choices]) == 5
        assert [m.id for m in client.models.list()] == ["synthetic"]
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="other", prompt="x", max_tokens=1)
        stranger = openai.OpenAI(base_url=f"{gateway.base_url}/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            stranger.models.list()
        with pytest.raises(openai.BadRequestError):  # the replica's own 400, passed on
            client.completions.create(model="synthetic", prompt="x", max_tokens=100_000)
        # The gateway records a request once its stream has ended, which the client may
        # see first.
        deadline = time.monotonic() + 120
        while completed(gateway) < 2:
            assert time.monotonic() < deadline, "the gateway never recorded both requests"
            time.sleep(0.05)
        stats = httpx.get(f"{gateway.base_url}/v1/internal/stats", timeout=5).json()
        slo = [s for s in stats["slo"] if s["metric"] == "ttft"]
        assert slo == [
            {
                "tenant": "a",
                "deployment_id": stats["deployment_id"],
                "metric": "ttft",
                "threshold_seconds": 30,
                "good": 2,
                "total": 2,
            }
        ]
        assert {s["metric"] for s in stats["sketches"]} >= {"ttft", "tpot", "queue", "e2e"}
        (totals,) = stats["requests"]
        assert (totals["completed"], totals["output_tokens"]) == (2, 11)
        # where it routed them (the 400 was routed too), and the TTFT it predicts there now
        replicas = stats["replicas"]
        assert sum(r["routed"] for r in replicas) == 3
        assert all(r["up"] and r["inflight"] == 0 for r in replicas), replicas
        assert all(0 < r["predicted_ttft_s"] < 60 for r in replicas), replicas
        assert {r["transport"] for r in replicas} == {"mux"}  # the workers offer one


def test_fleet_wide_concurrency_limit_and_a_gateway_restart(
    workers: dict[str, WorkerProcess], tmp_path: Path
) -> None:
    limit = 3
    with ExitStack() as stack:
        deployment = f"dep-{uuid.uuid4().hex[:8]}"
        first, second = gateways(
            stack,
            workers,
            {"a": {"max_concurrency": limit}},
            tmp_path,
            # A live gateway renews its leases every quarter of this: long enough that a
            # busy machine's stalls do not let one lapse under a running request (which
            # would end it, see below); short enough for the dead gateway's to expire here.
            lease_ttl_s=3.0,
            deployment={"deployment_id": deployment},
        )
        with RunningWatch(workers) as watch, LeaseWatch(deployment, "a") as leases:
            results = run(
                closed_loop(first.base_url, KEYS["a"], 6, 5.0, 100),
                closed_loop(second.base_url, KEYS["a"], 6, 5.0, 100),
            )
        everything = results[0] + results[1]
        assert all(r.status == 200 and len(r.token_times) == 100 for r in everything)
        # The ledger's live leases (each held from before a request is sent until after
        # its answer ended): never above the limit, and the limit reached.
        assert max(leases.counts) == limit, sorted(set(leases.counts))
        _, peak, _ = watch.summary(limit)
        assert peak >= 1  # the replicas ran the requests

        # The first gateway dies holding leases; the second's streams carry on, and once
        # the dead one's leases expire the second has the whole limit.
        async def scenario() -> tuple[Streamed, int]:
            async with httpx.AsyncClient(timeout=60) as client:
                started = [asyncio.Event() for _ in range(3)]
                on_first = [
                    asyncio.create_task(
                        stream(client, first.base_url, KEYS["a"], 400, first_token=started[i])
                    )
                    for i in range(2)
                ]
                on_second = asyncio.create_task(
                    stream(client, second.base_url, KEYS["a"], 400, first_token=started[2])
                )
                for event in started:
                    await event.wait()
                await asyncio.to_thread(first.kill)
                await asyncio.gather(*on_first, return_exceptions=True)
                survivor = await on_second
                # Until the dead gateway's leases expire only one more may run at once.
                deadline = time.monotonic() + 15
                overlap = 0
                while overlap < limit and time.monotonic() < deadline:
                    batch = await asyncio.gather(
                        *(stream(client, second.base_url, KEYS["a"], 60) for _ in range(limit))
                    )
                    overlap = max_overlap(list(batch))
                return survivor, overlap

        survivor, overlap = asyncio.run(scenario())
        assert (survivor.status, len(survivor.token_times), survivor.error) == (200, 400, None)
        assert overlap == limit
        first.start()  # restarts and serves again
        assert asyncio.run(one(first.base_url, "a")).status == 200


def test_a_gateway_stalled_past_its_leases_ends_the_request_another_took_the_place_of(
    model_dir: Path, tmp_path: Path
) -> None:
    """A gateway that could not renew a lease in time (stopped here, as a long stall or a
    cut to Redis would) finds, when it wakes, that another gateway started a request in
    its request's place: it ends its own with an error rather than run over the limit.
    The replica, silent to it only while it was stopped, is not marked down."""
    with ExitStack() as stack:
        # The worker paces tenant a at 20 tokens/s, so the stalled stream (20 s long) is
        # still running when its gateway wakes, however loaded the machine; and its
        # bucket goes to the older request, so the second one (holding the lease in the
        # first's place) cannot end before it either.
        (replica,) = start_workers(
            stack, [model_dir], tmp_path, {"a": {"tokens_per_s": 20.0, "burst_tokens": 5}}
        ).values()
        deployment = f"dep-{uuid.uuid4().hex[:8]}"
        first, second = gateways(
            stack,
            {"r0": replica},
            {"a": {"max_concurrency": 1}},
            tmp_path,
            # Twice the health interval: the stall is at least this long, and the state
            # stream's silence over it is read as the gateway's, not the replica's.
            lease_ttl_s=2.0,
            health_interval_s=1.0,
            deployment={"deployment_id": deployment},
        )
        ledger = redis.Redis.from_url(redis_url())
        stack.callback(ledger.close)
        key = f"tailguard:gw:{{{deployment}}}:lease:a"

        def live() -> set[bytes]:
            seconds, micros = ledger.time()
            return set(ledger.zrangebyscore(key, f"({seconds + micros / 1e6}", "+inf"))

        async def scenario() -> tuple[Streamed, Streamed]:
            async with httpx.AsyncClient(timeout=120) as client:
                started = asyncio.Event()
                stalled = asyncio.create_task(
                    stream(client, first.base_url, KEYS["a"], 400, first_token=started)
                )
                waiting = asyncio.create_task(started.wait())
                await asyncio.wait([waiting, stalled], return_when=asyncio.FIRST_COMPLETED)
                assert started.is_set(), stalled.result()
                held = live()
                assert len(held) == 1
                first.pause()
                try:
                    taking = asyncio.create_task(stream(client, second.base_url, KEYS["a"], 3))
                    # The first gateway's lease lapses, and the second starts its request.
                    deadline = time.monotonic() + 60
                    while not live() - held and time.monotonic() < deadline:
                        await asyncio.sleep(0.05)
                    assert live() - held, "the second gateway never started its request"
                finally:
                    first.resume()
                return await stalled, await taking

        stalled, taking = asyncio.run(scenario())
        replicas_seen = first.replicas()
    assert stalled.error is not None and stalled.error["code"] == "lease_lost", stalled.error
    assert stalled.done and len(stalled.token_times) < 400
    assert (taking.status, len(taking.token_times), taking.error) == (200, 3, None)
    assert [r["up"] for r in replicas_seen] == [True]


async def one(base_url: str, tenant: str) -> Streamed:
    async with httpx.AsyncClient(timeout=60) as client:
        return await stream(client, base_url, KEYS[tenant], 3)


def test_fleet_wide_token_rate(workers: dict[str, WorkerProcess], tmp_path: Path) -> None:
    rate, burst, streams, max_tokens = 100.0, 20, 10, 5
    with ExitStack() as stack:
        first, second = gateways(
            stack, workers, {"a": {"tokens_per_s": rate, "burst_tokens": burst}}, tmp_path
        )
        results = run(
            closed_loop(first.base_url, KEYS["a"], 8, 10.0, max_tokens),
            closed_loop(second.base_url, KEYS["a"], 2, 10.0, max_tokens),
        )
    everything = results[0] + results[1]
    assert all(r.status == 200 for r in everything)
    # The window starts once the first burst is spent, and ends at the last token.
    times = sorted(t for r in everything for t in r.token_times)
    start, end = times[burst + streams * max_tokens], times[-1]
    tokens = tokens_between(everything, start, end + 1)
    # The bucket's own arithmetic: over the window, ``rate`` per second, give or take
    # what the requests running at its two ends had reserved; within 5 %.
    slack = 2 * streams * max_tokens
    assert tokens <= 1.05 * rate * (end - start) + slack, (tokens, end - start)
    assert tokens >= 0.95 * rate * (end - start) - slack, (tokens, end - start)


def test_weighted_shares_with_most_traffic_at_one_gateway(model_dir: Path, tmp_path: Path) -> None:
    weights = {"a": {"weight": 1}, "b": {"weight": 3}}
    with ExitStack() as stack:
        workers = start_workers(stack, [model_dir, model_dir], tmp_path, weights)
        first, second = gateways(stack, workers, weights, tmp_path)
        # 21 of the 26 streams enter the first gateway; the replicas have 8 slots. Each
        # tenant has more streams than its share of slots, so both always have requests
        # waiting somewhere and the shares are the counters' (a tenant with none waiting
        # cedes its turn, as it should: a free slot never idles).
        results = run(
            closed_loop(first.base_url, KEYS["a"], 10, 14.0, 40),
            closed_loop(first.base_url, KEYS["b"], 11, 14.0, 40),
            closed_loop(second.base_url, KEYS["b"], 5, 14.0, 40),
        )
    # A window bounded by token counts (from the 20th to the 90th percentile of every
    # token streamed), so the load of the machine sets its length, not the shares.
    times = sorted(t for found in results for r in found for t in r.token_times)
    start, end = times[len(times) // 5], times[len(times) * 9 // 10]
    a_tokens = tokens_between(results[0], start, end)
    b_tokens = tokens_between(results[1] + results[2], start, end)
    assert abs(b_tokens / a_tokens - 3.0) <= 0.3, (a_tokens, b_tokens)


def test_a_tenant_under_its_share_is_not_held_behind_full_replicas(
    workers: dict[str, WorkerProcess], tmp_path: Path
) -> None:
    """Every slot of both replicas runs one of b's long streams. c's short request goes
    ahead and is served, first token to last, while all of b's still stream: a worker
    pauses one of b's rows for it, instead of c waiting for one of them to end. (c is
    served nowhere else in this module, so the workers' own counters, which they weigh
    too, have it no further ahead than b.)"""
    with ExitStack() as stack:
        (gateway,) = gateways(stack, workers, {"b": {}, "c": {}}, tmp_path, count=1)

        async def scenario() -> tuple[Streamed, list[Streamed]]:
            limits = httpx.Limits(max_connections=None)
            async with httpx.AsyncClient(timeout=120, limits=limits) as client:
                running = [asyncio.Event() for _ in range(2 * BATCH)]
                long = [
                    asyncio.create_task(
                        stream(client, gateway.base_url, KEYS["b"], 400, first_token=event)
                    )
                    for event in running
                ]
                for event, task in zip(running, long, strict=True):
                    await asyncio.wait(
                        [asyncio.create_task(event.wait()), task],
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                    assert event.is_set(), task.result()
                short = await stream(client, gateway.base_url, KEYS["c"], 4)
                return short, list(await asyncio.gather(*long))

        short, long = asyncio.run(scenario())
    assert short.status == 200 and len(short.token_times) == 4
    assert all(r.status == 200 and len(r.token_times) == 400 for r in long)
    assert short.token_times[-1] < min(r.token_times[-1] for r in long)


def test_priority_classes_shed_the_lower_one_first(
    workers: dict[str, WorkerProcess], tmp_path: Path
) -> None:
    with ExitStack() as stack:
        first, second = gateways(
            stack,
            workers,
            {"hi": {"priority": 1}, "lo": {}},
            tmp_path,
            deployment={
                "slo_thresholds": [
                    {"tenant": "lo", "metric": "ttft", "threshold_seconds": 0.05},
                    {"tenant": "hi", "metric": "ttft", "threshold_seconds": 0.05},
                ]
            },
        )
        # More high-class streams than the replicas have slots: the high class always
        # waits, so the low class cannot meet its objective and is refused.
        hi, lo = run(
            closed_loop(first.base_url, KEYS["hi"], 12, 4.0, 30),
            closed_loop(second.base_url, KEYS["lo"], 4, 4.0, 30),
        )
    assert hi and all(r.status == 200 and len(r.token_times) == 30 for r in hi)
    refused = [r for r in lo if r.status == 429]
    assert refused and all(r.retry_after and int(r.retry_after) >= 1 for r in refused)


def test_a_slower_replica_gets_proportionally_fewer_requests(
    model_dir: Path, slow_model_dir: Path, tmp_path: Path
) -> None:
    with ExitStack() as stack:
        replicas = start_workers(stack, [model_dir, slow_model_dir], tmp_path)
        (gateway,) = gateways(stack, replicas, {"a": {}}, tmp_path, count=1)
        run(closed_loop(gateway.base_url, KEYS["a"], 10, 5.0, 30))
        routed = {name: routed_to(gateway, name) for name in replicas}
        step = {
            name: w.metric("tailguard_engine_step_seconds_sum", kind="decode")
            / max(1, w.metric("tailguard_engine_step_seconds_count", kind="decode"))
            for name, w in replicas.items()
        }
    fast, slow = routed["r0"], routed["r1"]
    assert 0 < slow < fast
    # In proportion to their speed (per decode step), within a factor of two.
    expected = step["r0"] / step["r1"]
    assert expected / 2 <= slow / fast <= expected * 2, (routed, step)


def completed(gateway: GatewayProcess) -> float:
    text = httpx.get(f"{gateway.base_url}/metrics", timeout=5).text
    return sum(
        float(line.rpartition(" ")[2])
        for line in text.splitlines()
        if line.startswith("tailguard_gateway_requests_total") and 'outcome="completed"' in line
    )


def routed_to(gateway: GatewayProcess, replica: str) -> float:
    text = httpx.get(f"{gateway.base_url}/metrics", timeout=5).text
    for line in text.splitlines():
        if line.startswith("tailguard_gateway_routed_total") and f'replica="{replica}"' in line:
            return float(line.rpartition(" ")[2])
    return 0.0


def test_a_replica_killed_mid_stream(slow_model_dir: Path, tmp_path: Path) -> None:
    with ExitStack() as stack:
        replicas = start_workers(stack, [slow_model_dir, slow_model_dir], tmp_path)
        (gateway,) = gateways(stack, replicas, {"a": {}}, tmp_path, count=1)

        async def scenario() -> tuple[list[Streamed], list[Streamed]]:
            async with httpx.AsyncClient(timeout=60) as client:
                started = [asyncio.Event() for _ in range(6)]
                streams = [
                    asyncio.create_task(
                        stream(client, gateway.base_url, KEYS["a"], 300, first_token=event)
                    )
                    for event in started
                ]
                for event in started:
                    await event.wait()
                await asyncio.to_thread(replicas["r0"].kill)
                cut = await asyncio.gather(*streams)
                after = await asyncio.gather(
                    *(stream(client, gateway.base_url, KEYS["a"], 5) for _ in range(6))
                )
                return list(cut), list(after)

        cut, after = asyncio.run(scenario())
        health = {r["replica_id"]: r["up"] for r in gateway.replicas()}
    failed = [r for r in cut if r.error is not None]
    assert failed and all(r.done and r.error["code"] == "replica_failed" for r in failed)
    assert all(len(r.token_times) == 300 for r in cut if r.error is None)
    assert all(r.status == 200 and len(r.token_times) == 5 for r in after)
    assert health == {"r0": False, "r1": True}
