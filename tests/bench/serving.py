"""Serving benchmark for the inference worker: throughput, latency and tenant fairness.

Writes a synthetic model, measures the engine alone, then starts real worker processes
and drives them with streaming HTTP clients (closed-loop streams for throughput,
Poisson arrivals for the fairness scenarios). Client-side clocks: TTFT is request sent
-> first streamed chunk, TPOT is (last chunk - first chunk) / (tokens - 1).

    .venv/bin/python -m tests.bench.serving --quick --json
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httptools
import httpx
import numpy as np
from tqdm import tqdm

from dataplane.inference.config import BatchingConfig, RuntimeConfig
from dataplane.inference.engine import BatchEngine, EngineSequence
from dataplane.inference.kvcache import CacheRow, KVCache
from dataplane.inference.model import ModelSpec
from dataplane.inference.runtime import OnnxRuntime
from dataplane.inference.sampling import SamplingParams
from dataplane.inference.synthetic import SyntheticModelSpec, write_synthetic_model
from tests.dataplane.inference.procs import WorkerProcess, worker_config

KEYS = {"bench": "bench-key", "victim": "victim-key", "aggressor": "aggressor-key"}
_COMPLETION_TOKENS = re.compile(rb'"completion_tokens":(\d+)')


@dataclass(frozen=True)
class Sizes:
    prompt_tokens: int
    output_tokens: int
    concurrency: int
    served_s: float
    batch1_s: float
    fairness_s: float
    warmup_s: float
    raw_rounds: int


QUICK = Sizes(
    prompt_tokens=32,
    output_tokens=64,
    concurrency=32,
    served_s=10,
    batch1_s=6,
    fairness_s=9,
    warmup_s=2,
    raw_rounds=4,
)
FULL = replace(QUICK, served_s=40, batch1_s=20, fairness_s=45, warmup_s=3, raw_rounds=12)


@dataclass
class Result:
    """One streamed request as the client saw it."""

    tenant: str
    sent: float
    chunks: list[tuple[float, int]] = field(default_factory=list)  # (time, tokens so far)
    rejected: bool = False

    @property
    def ttft(self) -> float | None:
        return self.chunks[0][0] - self.sent if self.chunks else None

    @property
    def tpot(self) -> float | None:
        if len(self.chunks) < 2 or self.chunks[-1][1] < 2:
            return None
        return (self.chunks[-1][0] - self.chunks[0][0]) / (self.chunks[-1][1] - 1)


class Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection whose streamed responses are parsed by
    httptools (uvicorn's parser). The load generator shares two cores with the worker,
    so it stays this thin: no per-event JSON parsing, no connection pool."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._parser: Any = None
        self._result: Result | None = None
        self._done: asyncio.Future[int] | None = None

    @classmethod
    async def open(cls, base_url: str) -> Connection:
        url = httpx.URL(base_url)
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_connection(cls, url.host, url.port or 80)
        return protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self._parser.feed_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._done is not None and not self._done.done():
            self._done.set_exception(ConnectionError("worker closed the connection"))

    def on_body(self, body: bytes) -> None:
        counts = _COMPLETION_TOKENS.findall(body)
        result = self._result
        if result is not None and counts:
            tokens = int(counts[-1])
            if tokens > (result.chunks[-1][1] if result.chunks else 0):
                result.chunks.append((time.perf_counter(), tokens))

    def on_message_complete(self) -> None:
        if self._done is not None and not self._done.done():
            self._done.set_result(self._parser.get_status_code())

    async def stream(self, key: str, body: dict[str, Any], result: Result) -> int:
        """Send one completion request and record its chunks; returns the status."""
        assert self._transport is not None, "connection not open"
        payload = json.dumps(body).encode()
        self._parser = httptools.HttpResponseParser(self)
        self._result = result
        self._done = asyncio.get_running_loop().create_future()
        self._transport.write(
            b"POST /v1/completions HTTP/1.1\r\nHost: bench\r\n"
            b"Authorization: Bearer " + key.encode() + b"\r\n"
            b"Content-Type: application/json\r\nContent-Length: "
            + str(len(payload)).encode()
            + b"\r\n\r\n"
            + payload
        )
        return await self._done

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


async def stream_one(
    conn: Connection, tenant: str, sizes: Sizes, rng: random.Random, results: list[Result]
) -> None:
    prompt = [rng.randrange(5, 250) for _ in range(sizes.prompt_tokens)]
    body = {
        "model": "synthetic",
        "prompt": prompt,
        "max_tokens": sizes.output_tokens,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    result = Result(tenant=tenant, sent=time.perf_counter())
    results.append(result)
    status = await conn.stream(KEYS[tenant], body, result)
    if status == 429:
        result.rejected = True
    elif status != 200:
        raise RuntimeError(f"worker answered {status}")


async def closed_loop(base_url: str, sizes: Sizes, duration: float) -> list[Result]:
    """``concurrency`` clients each streaming one request after another."""
    results: list[Result] = []
    deadline = time.perf_counter() + duration

    async def client(i: int) -> None:
        rng = random.Random(i)
        conn = await Connection.open(base_url)
        try:
            while time.perf_counter() < deadline:
                await stream_one(conn, "bench", sizes, rng, results)
        finally:
            conn.close()

    tasks = [asyncio.create_task(client(i)) for i in range(sizes.concurrency)]
    await asyncio.sleep(duration)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return results


WARM_REQUESTS = 4
"""Unmeasured victim requests, sent together, before a Poisson phase."""


async def poisson(
    base_url: str, sizes: Sizes, rates: dict[str, float], duration: float, grace: float = 30.0
) -> list[Result]:
    """Open-loop Poisson arrivals per tenant, one connection per request, after
    ``WARM_REQUESTS`` unmeasured ones of the victim (a fresh worker's first forward
    calls are slow; the aggressor's limits, if any, stay untouched); at the end the
    aggressor's requests are dropped and the others get ``grace`` seconds to finish."""
    results: list[Result] = []
    inflight: dict[str, list[asyncio.Task[None]]] = {t: [] for t in rates}

    async def warm(seed: int) -> None:
        conn = await Connection.open(base_url)
        try:
            await stream_one(conn, "victim", sizes, random.Random(-seed), [])
        finally:
            conn.close()

    await asyncio.gather(*(warm(i) for i in range(WARM_REQUESTS)))

    async def one(tenant: str, rng: random.Random) -> None:
        conn = await Connection.open(base_url)
        try:
            await stream_one(conn, tenant, sizes, rng, results)
        finally:
            conn.close()

    async def arrivals(tenant: str, rate: float, seed: int) -> None:
        rng = random.Random(seed)
        deadline = time.perf_counter() + duration
        while True:
            await asyncio.sleep(rng.expovariate(rate))
            if time.perf_counter() >= deadline:
                return
            inflight[tenant].append(asyncio.create_task(one(tenant, rng)))

    await asyncio.gather(*(arrivals(t, r, i) for i, (t, r) in enumerate(rates.items())))
    for task in inflight.get("aggressor", []):
        task.cancel()
    others = [t for tenant, tasks in inflight.items() if tenant != "aggressor" for t in tasks]
    await asyncio.wait_for(asyncio.gather(*others, return_exceptions=True), grace)
    await asyncio.gather(*inflight.get("aggressor", []), return_exceptions=True)
    return results


def window_tokens_per_s(results: list[Result], start: float, end: float) -> float:
    """Tokens whose chunk arrived inside [start, end), per second."""
    tokens = 0
    for result in results:
        previous = 0
        for at, count in result.chunks:
            if start <= at < end:
                tokens += count - previous
            previous = count
    return tokens / (end - start)


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


CONTEXTS = (128, 512, 2048)
"""Context lengths at which a decode step's cost per token is measured."""
STEP_ROWS = (1, 2, 4, 8, 16)
"""Rows at which a decode step's time is measured (and at the serving batch size)."""
CONTEXT_ROWS = 8


def filled_rows(
    runtime: OnnxRuntime, rows: int, context: int, rows_per_call: int = 0
) -> tuple[KVCache, list[CacheRow]]:
    """A cache of the runtime's layout with ``rows`` rows of ``context`` random tokens
    each, in the batch (prompts run in chunks, so no call grows past a few hundred)."""
    cache = runtime.new_cache(rows_per_call)
    rng = np.random.default_rng(1)
    tokens = rng.integers(5, 250, size=(rows, context))
    first = min(context, 256)
    _, started = cache.start([row[:first].tolist() for row in tokens])
    for row, ids in zip(started, tokens, strict=True):
        for at in range(first, context, 256):
            cache.extend(row, ids[None, at : at + 256])
    cache.join(started)
    return cache, started


def decode_bytes_per_token(model_dir: Path, spec: ModelSpec, context: int) -> float:
    """Bytes a decode step reads per token at ``context``: the weights, shared by the
    step's CONTEXT_ROWS rows (every model file but the JSON ones: an upper bound), and the row's own
    keys and values. Attention reads every cached position, so a long context costs its
    reading however little the cache copies; bytes over time says how close a step runs
    to the memory's bandwidth."""
    weights = sum(f.stat().st_size for f in model_dir.iterdir() if f.suffix != ".json")
    per_position = 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim
    return weights / CONTEXT_ROWS + context * per_position * spec.numpy_kv_dtype.itemsize


def decode_step_ms(
    runtime: OnnxRuntime, rows: int, context: int, rows_per_call: int = 0, repeats: int = 30
) -> float:
    """Median milliseconds of a decode step of ``rows`` rows that each hold ``context``
    tokens, over the runtime's own KV cache (as the engine drives it)."""
    cache, held = filled_rows(runtime, rows, context, rows_per_call)
    tokens = np.ones(rows, np.int64)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        cache.decode(held, tokens)
        times.append(time.perf_counter() - started)
    return float(np.median(times) * 1000)


def measure_engine(
    model_dir: Path,
    cache_dir: Path,
    sizes: Sizes,
    runtime_config: RuntimeConfig,
    rows_per_call: int,
) -> dict[str, float]:
    """The runtime's own loop at the serving batch size, without HTTP or asyncio."""
    runtime = OnnxRuntime(model_dir, cache_dir, runtime_config)
    rng = np.random.default_rng(0)
    width = sizes.prompt_tokens + sizes.output_tokens // 2
    counts = [*(r for r in STEP_ROWS if r < sizes.concurrency), sizes.concurrency]
    by_rows = {
        f"decode_step_ms_rows{count}": decode_step_ms(runtime, count, width, rows_per_call)
        for count in counts
    }
    per_token = {
        f"decode_ms_per_token_ctx{context}": decode_step_ms(
            runtime, CONTEXT_ROWS, context, repeats=20
        )
        / CONTEXT_ROWS
        for context in CONTEXTS
    }
    for context in CONTEXTS:
        read = decode_bytes_per_token(model_dir, runtime.spec, context)
        per_token[f"decode_mb_read_per_token_ctx{context}"] = read / 1e6
        seconds = per_token[f"decode_ms_per_token_ctx{context}"] / 1000
        per_token[f"decode_gb_per_s_ctx{context}"] = read / seconds / 1e9

    def sequence(tokens: int, seed: int) -> EngineSequence:
        return EngineSequence(
            rng.integers(5, 250, sizes.prompt_tokens).tolist(),
            SamplingParams(max_new_tokens=tokens, ignore_eos=True, seed=seed),
        )

    # Lock-step: all sequences start and finish together, so no row is ever padded.
    engine = BatchEngine(runtime, rows_per_call)
    produced = 0
    started = time.perf_counter()
    for round_ in range(sizes.raw_rounds):
        seqs = [sequence(sizes.output_tokens, round_ * 1000 + i) for i in range(sizes.concurrency)]
        engine.prefill(seqs)
        engine.step(join=seqs)
        while engine.running:
            engine.step()
        produced += sum(len(s.tokens) for s in seqs)
    lockstep = produced / (time.perf_counter() - started)

    # Staggered, as a busy server runs: a finished sequence is replaced at once, and the
    # first generation's lengths are spread so the batch holds every age at once (rows
    # are padded to the oldest one).
    engine = BatchEngine(runtime, rows_per_call)
    fresh = [
        sequence(1 + i * sizes.output_tokens // sizes.concurrency, i)
        for i in range(sizes.concurrency)
    ]
    steps, produced, started = 0, 0, 0.0
    while steps < (sizes.raw_rounds + 1) * sizes.output_tokens:
        if steps == sizes.output_tokens:
            produced, started = 0, time.perf_counter()
        if fresh:
            engine.prefill(fresh)
            produced += len(fresh)
        produced += len(engine.step(join=fresh))
        steps += 1
        fresh = [
            sequence(sizes.output_tokens, steps * 100 + i)
            for i, s in enumerate(engine.running)
            if s.finish_reason is not None
        ]
    return {
        **per_token,
        **by_rows,
        "raw_engine_tokens_per_s": lockstep,
        "raw_engine_staggered_tokens_per_s": produced / (time.perf_counter() - started),
    }


CAPPED = {"max_concurrency": 2, "tokens_per_s": 150.0, "priority": -1}
"""The aggressor's limits in the capped scenario, as the demo's policy caps its noisy tenant."""


@contextmanager
def worker(
    model_dir: Path,
    workdir: Path,
    name: str,
    limits: dict[str, dict[str, Any]] | None = None,
    **overrides: Any,
) -> Iterator[WorkerProcess]:
    """A worker serving KEYS' tenants, `limits` added to theirs (a TenantConfig's fields)."""
    config = worker_config(model_dir, workdir / "cache", KEYS, **overrides)
    for tenant, extra in (limits or {}).items():
        config["tenants"][tenant].update(extra)
    with WorkerProcess(config, workdir / name) as proc:
        yield proc


def run(
    sizes: Sizes,
    spec: SyntheticModelSpec,
    runtime: RuntimeConfig,
    batching: BatchingConfig,
    progress: tqdm[Any],
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "prompt_tokens": sizes.prompt_tokens,
        "output_tokens": sizes.output_tokens,
        "concurrency": sizes.concurrency,
        "intra_op_threads": runtime.intra_op_threads,
        "max_tokens_per_step": batching.max_tokens_per_step,
        "max_rows_per_forward": batching.max_rows_per_forward,
    }
    with tempfile.TemporaryDirectory(prefix="tailguard-bench-") as tmp:
        workdir = Path(tmp)
        model_dir = workdir / "model"
        progress.set_description("writing model")
        out["model_params"] = write_synthetic_model(model_dir, spec)
        progress.update()

        progress.set_description("engine alone")
        out.update(
            measure_engine(
                model_dir, workdir / "cache", sizes, runtime, batching.max_rows_per_forward
            )
        )
        progress.update()

        batching_json = batching.model_dump()
        runtime_json = runtime.model_dump()
        progress.set_description(f"served, {sizes.concurrency} streams")
        with worker(
            model_dir, workdir, "served", batching=batching_json, runtime=runtime_json
        ) as proc:
            total = sizes.warmup_s + sizes.served_s
            cpu, wall = time.process_time(), time.perf_counter()
            results = asyncio.run(closed_loop(proc.base_url, sizes, total))
            out["client_cpu_share"] = (time.process_time() - cpu) / (time.perf_counter() - wall)
        begin = min(r.sent for r in results) + sizes.warmup_s
        out["served_tokens_per_s"] = window_tokens_per_s(results, begin, begin + sizes.served_s)
        measured = [
            r
            for r in results
            if r.sent >= begin and r.chunks and r.chunks[-1][1] == sizes.output_tokens
        ]
        ttfts = [r.ttft for r in measured if r.ttft is not None]
        tpots = [r.tpot for r in measured if r.tpot is not None]
        out.update(
            ttft_p50_s=percentile(ttfts, 50),
            ttft_p99_s=percentile(ttfts, 99),
            tpot_p50_s=percentile(tpots, 50),
            tpot_p99_s=percentile(tpots, 99),
            served_requests=len(measured),
        )
        progress.update()

        progress.set_description("batch size 1")
        with worker(
            model_dir,
            workdir,
            "batch1",
            runtime=runtime_json,
            batching={**batching_json, "max_batch_size": 1},
        ) as proc:
            results = asyncio.run(
                closed_loop(proc.base_url, sizes, sizes.warmup_s + sizes.batch1_s)
            )
        begin = min(r.sent for r in results) + sizes.warmup_s
        out["batch1_tokens_per_s"] = window_tokens_per_s(results, begin, begin + sizes.batch1_s)
        progress.update()

        # Fairness: the aggressor alone would overload the worker; the victim sends a
        # tenth of the aggressor's rate. Fair queuing keeps the victim's TTFT; its TPOT
        # pays for every aggressor sequence sharing its decode steps, which only the
        # aggressor's limits ("capped") hold back.
        capacity_rps = out["served_tokens_per_s"] / sizes.output_tokens
        victim_rps = 0.13 * capacity_rps
        out["victim_rps"] = victim_rps
        out["aggressor_rps"] = 10 * victim_rps
        both = {"victim": victim_rps, "aggressor": 10 * victim_rps}
        scenarios = [
            ("solo", "fair", {"victim": victim_rps}, {}),
            ("fair", "fair", both, {}),
            ("fcfs", "fcfs", both, {}),
            ("capped", "fair", both, {"aggressor": CAPPED}),
            ("tpot_slo", "fair", both, {}),
        ]
        for label, policy, rates, limits in scenarios:
            progress.set_description(f"victim {label}")
            # The victim's TPOT objective: the goal, 1.5x its solo p99.
            objective = TPOT_GOAL * (out.get("victim_tpot_p99_solo_s") or 0.0)
            thresholds = (
                [{"tenant": "victim", "metric": "tpot", "threshold_seconds": objective}]
                if label == "tpot_slo" and objective > 0
                else []
            )
            with worker(
                model_dir,
                workdir,
                f"victim-{label}",
                limits,
                batching=batching_json,
                runtime=runtime_json,
                scheduling={"policy": policy, "tpot_steps": bool(thresholds)},
                slo_thresholds=thresholds,
            ) as proc:
                results = asyncio.run(poisson(proc.base_url, sizes, rates, sizes.fairness_s))
                cost = proc.health()["decode_cost"]
                if thresholds and cost is not None:
                    out["served_decode_base_ms"] = cost["base_s"] * 1000
                    out["served_decode_per_row_ms"] = cost["per_row_s"] * 1000
            begin = min(r.sent for r in results)
            out[f"tokens_per_s_{label}"] = window_tokens_per_s(
                results, begin, begin + sizes.fairness_s
            )
            victim = [r for r in results if r.tenant == "victim"]
            ttfts = [r.ttft for r in victim if r.ttft is not None]
            tpots = [r.tpot for r in victim if r.tpot is not None]
            out[f"victim_ttft_p99_{label}_s"] = percentile(ttfts, 99)
            out[f"victim_ttft_p50_{label}_s"] = percentile(ttfts, 50)
            out[f"victim_tpot_p99_{label}_s"] = percentile(tpots, 99)
            out[f"victim_tpot_p50_{label}_s"] = percentile(tpots, 50)
            out[f"victim_requests_{label}"] = len(ttfts)
            if "aggressor" in rates:
                out[f"aggressor_rejected_{label}"] = sum(
                    r.rejected for r in results if r.tenant == "aggressor"
                )
            progress.update()

    def ratio(a: str, b: str) -> float | None:
        return out[a] / out[b] if out.get(a) and out.get(b) else None

    out["served_over_raw"] = ratio("served_tokens_per_s", "raw_engine_tokens_per_s")
    out["served_over_raw_staggered"] = ratio(
        "served_tokens_per_s", "raw_engine_staggered_tokens_per_s"
    )
    out["batching_speedup"] = ratio("served_tokens_per_s", "batch1_tokens_per_s")
    out["fair_over_solo"] = ratio("victim_ttft_p99_fair_s", "victim_ttft_p99_solo_s")
    out["fcfs_over_solo"] = ratio("victim_ttft_p99_fcfs_s", "victim_ttft_p99_solo_s")
    out["tpot_fair_over_capped"] = ratio("victim_tpot_p50_fair_s", "victim_tpot_p50_capped_s")
    out["tpot_fair_over_solo"] = ratio("victim_tpot_p99_fair_s", "victim_tpot_p99_solo_s")
    out["tpot_slo_over_solo"] = ratio("victim_tpot_p99_tpot_slo_s", "victim_tpot_p99_solo_s")
    out["tokens_slo_over_fair"] = ratio("tokens_per_s_tpot_slo", "tokens_per_s_fair")
    batch = sizes.concurrency
    engine_steps = {r: out[f"decode_step_ms_rows{r}"] for r in step_rows(out)}
    out["tokens_slo_bound"] = objective_bound(out, engine_steps, batch)
    # The same by the decode cost the worker measured serving the tpot_slo scenario (a
    # fixed part and a part per row, the server's and load generator's work around it
    # included): what the worker sizes its steps by.
    base, per_row = out.get("served_decode_base_ms"), out.get("served_decode_per_row_ms")
    if base is not None and per_row is not None:
        served_steps = {r: base + per_row * r for r in (1, batch)}
        out["tokens_slo_bound_served"] = objective_bound(out, served_steps, batch)
    out["decode_ctx2048_over_ctx128"] = ratio(
        "decode_ms_per_token_ctx2048", "decode_ms_per_token_ctx128"
    )
    return out


def step_rows(out: dict[str, Any]) -> list[int]:
    """The row counts whose decode step the engine measured, fewest first."""
    prefix = "decode_step_ms_rows"
    return sorted(int(key[len(prefix) :]) for key in out if key.startswith(prefix))


def objective_bound(out: dict[str, Any], steps: dict[int, float], batch: int) -> float | None:
    """The most decode throughput steps inside the victim's TPOT objective keep, as a
    share of the full batch's: tokens per second of the most rows whose step (``steps``:
    ms by rows, interpolated linearly between them) fits in the objective, against
    ``batch`` rows'. Prompts take their share of either."""
    solo = out.get("victim_tpot_p99_solo_s")
    if not solo or batch not in steps:
        return None
    objective_ms = TPOT_GOAL * solo * 1000
    rows = sorted(steps)
    ms = [steps[r] for r in rows]
    best = max((r / t for r, t in zip(rows, ms, strict=True) if t <= objective_ms), default=0.0)
    for (r0, t0), (r1, t1) in itertools.pairwise(zip(rows, ms, strict=True)):
        if t0 <= objective_ms < t1:  # the rows a step of exactly the objective holds
            best = max(best, (r0 + (r1 - r0) * (objective_ms - t0) / (t1 - t0)) / objective_ms)
    return best / (batch / steps[batch])


TPOT_GOAL = 1.5
GOALS = (
    ("served_over_raw", ">=", 0.9),
    ("batching_speedup", ">=", 4.0),
    ("fair_over_solo", "<=", 1.5),
    ("tpot_slo_over_solo", "<=", TPOT_GOAL),
    ("tokens_slo_over_fair", ">=", 0.8),
    ("decode_ctx2048_over_ctx128", "<=", 1.3),
)


def side_by_side(out: dict[str, Any]) -> list[str]:
    """The figures to compare, in rows: throughput, latency, the victim per scenario,
    decode cost per token by context, and the load generator's own CPU use."""

    def cell(key: str, scale: float = 1.0) -> str:
        value = out.get(key)
        return f"{value * scale:>10.4g}" if isinstance(value, (int, float)) else f"{'-':>10}"

    scenarios = ("solo", "fair", "fcfs", "capped", "tpot_slo")
    return [
        f"{'tokens/s':24}{'raw b' + str(out.get('concurrency')):>10}{'served':>10}{'batch-1':>10}",
        f"{'':24}"
        + "".join(
            cell(k)
            for k in ("raw_engine_tokens_per_s", "served_tokens_per_s", "batch1_tokens_per_s")
        ),
        f"{'served ms':24}{'TTFT p50':>10}{'TTFT p99':>10}{'TPOT p50':>10}{'TPOT p99':>10}",
        f"{'':24}"
        + "".join(cell(k, 1000) for k in ("ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s")),
        f"{'victim':24}" + "".join(f"{label:>10}" for label in scenarios),
        f"{'  TTFT p99 ms':24}" + "".join(cell(f"victim_ttft_p99_{x}_s", 1000) for x in scenarios),
        f"{'  TPOT p99 ms':24}" + "".join(cell(f"victim_tpot_p99_{x}_s", 1000) for x in scenarios),
        f"{'  all tokens/s':24}" + "".join(cell(f"tokens_per_s_{x}") for x in scenarios),
        f"{'  tpot_slo bound':24}{cell('tokens_slo_bound')} of the full batch's decode "
        "tokens/s, in steps that fit the objective (interpolated)",
        f"{'    as served':24}{cell('tokens_slo_bound_served')} the same, by the decode cost "
        f"the worker measured serving it ({cell('served_decode_base_ms').strip()} ms + "
        f"{cell('served_decode_per_row_ms').strip()} ms per row)",
        f"{'decode step ms':24}" + "".join(f"{str(r) + ' rows':>10}" for r in step_rows(out)),
        f"{'':24}" + "".join(cell(f"decode_step_ms_rows{r}") for r in step_rows(out)),
        f"{'decode ms/token':24}" + "".join(f"{'ctx' + str(c):>10}" for c in CONTEXTS),
        f"{'':24}" + "".join(cell(f"decode_ms_per_token_ctx{c}") for c in CONTEXTS),
        f"{'  MB read per token':24}"
        + "".join(cell(f"decode_mb_read_per_token_ctx{c}") for c in CONTEXTS),
        f"{'  GB/s read':24}" + "".join(cell(f"decode_gb_per_s_ctx{c}") for c in CONTEXTS),
        f"{'load generator CPU':24}{cell('client_cpu_share')} of one core",
    ]


def table(out: dict[str, Any]) -> str:
    lines = [
        f"{key:32} {value:.4g}" if isinstance(value, float) else f"{key:32} {value}"
        for key, value in out.items()
    ]
    lines += ["", *side_by_side(out), ""]
    for key, op, goal in GOALS:
        value = out.get(key)
        met = value is not None and (value >= goal if op == ">=" else value <= goal)
        lines.append(f"goal {key} {op} {goal}: {'met' if met else 'NOT met'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.serving",
        description=__doc__.splitlines()[0] if __doc__ else None,
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quick", action="store_true", help="about two minutes")
    defaults = SyntheticModelSpec()
    parser.add_argument("--layers", type=int, default=defaults.layers)
    parser.add_argument("--hidden", type=int, default=defaults.hidden)
    parser.add_argument("--heads", type=int, default=defaults.heads)
    parser.add_argument("--vocab", type=int, default=defaults.vocab)
    parser.add_argument("--concurrency", type=int, default=None)
    parser.add_argument("--prompt-tokens", type=int, default=None)
    parser.add_argument("--output-tokens", type=int, default=None)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="ONNX Runtime intra-op threads, for the engine alone and the "
        "workers alike (one leaves a core for HTTP on a 2-core box)",
    )
    parser.add_argument("--max-tokens-per-step", type=int, default=512)
    parser.add_argument("--max-rows-per-forward", type=int, default=16)
    args = parser.parse_args(argv)
    base = QUICK if args.quick else FULL
    sizes = Sizes(
        **{
            **base.__dict__,
            **{
                k: v
                for k, v in {
                    "concurrency": args.concurrency,
                    "prompt_tokens": args.prompt_tokens,
                    "output_tokens": args.output_tokens,
                }.items()
                if v is not None
            },
        }
    )
    spec = SyntheticModelSpec(
        layers=args.layers,
        hidden=args.hidden,
        heads=args.heads,
        kv_heads=args.heads,
        vocab=args.vocab,
        max_context=2 * max(CONTEXTS),
    )
    with tqdm(total=10, file=sys.stderr, unit="phase") as progress:
        batching = BatchingConfig(
            max_batch_size=sizes.concurrency,
            max_queue_len=64,
            max_tokens_per_step=args.max_tokens_per_step,
            max_rows_per_forward=args.max_rows_per_forward,
        )
        out = run(sizes, spec, RuntimeConfig(intra_op_threads=args.threads), batching, progress)
    print(json.dumps(out, indent=2) if args.json else table(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
