"""Gateway benchmark: its overhead on TTFT, tenant isolation across replicas, throughput.

Starts three real workers (a synthetic model), gateways in front of them with the ledger
in Redis (a throwaway server unless REDIS_URL names one), and drives them with streaming
HTTP clients; every latency is the client's (request sent -> first token chunk).

- overhead: one request at a time, alternately straight to a replica and through a
  gateway in front of that replica alone; TTFT through minus direct, p50 and p99.
- isolation: a victim tenant at a Poisson rate and an aggressor at ten times it, over all
  three replicas: through the gateway with fleet-wide fairness; through a gateway that
  sends every request on at once (each worker's own fair queuing decides); and round
  robin straight to the workers, which queue first come first served. The victim's p99
  TTFT beside its p99 alone.
- throughput: closed-loop streams straight to each replica at once (their sum), then as
  many through the gateway, in alternating rounds, so a change in the machine's other
  load falls on both; the ratio of the totals, and each round's.

    .venv/bin/python -m tests.bench.gateway --quick --json
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from dataplane.inference.synthetic import SyntheticModelSpec, write_synthetic_model
from tests import run as servers
from tests.dataplane.gateway.load import Streamed, stream
from tests.dataplane.gateway.procs import GatewayProcess, gateway_config
from tests.dataplane.inference.procs import WorkerProcess, worker_config

KEYS = {"bench": "bench-key", "victim": "victim-key", "aggressor": "aggressor-key"}
MODEL = SyntheticModelSpec(
    layers=4, hidden=256, heads=8, kv_heads=2, vocab=320, max_context=512, seed=7
)
BATCH = 8
GOALS = (
    ("overhead_p99_ms", "<=", 2.0),
    ("victim_p99_vs_solo_fleet", "<=", 1.5),
    ("throughput_vs_replicas", ">=", 0.95),
)


@dataclass(frozen=True)
class Sizes:
    overhead_requests: int
    output_tokens: int
    victim_rate: float
    isolation_s: float
    throughput_s: float  # each phase of a round
    throughput_rounds: int


QUICK = Sizes(
    overhead_requests=200,
    output_tokens=32,
    victim_rate=4.0,
    isolation_s=12,
    throughput_s=4,
    throughput_rounds=3,
)
FULL = replace(QUICK, overhead_requests=1000, isolation_s=40, throughput_s=8, throughput_rounds=5)


def pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 3)


async def overhead(direct: str, gateway: str, requests: int, tokens: int) -> dict[str, Any]:
    """Alternate direct and gateway requests, one at a time, on warm connections."""
    ttfts: dict[str, list[float]] = {"direct": [], "gateway": []}
    async with httpx.AsyncClient(timeout=60) as client:
        for url in (direct, gateway):  # warm both paths
            await stream(client, url, KEYS["bench"], tokens)
        for _ in range(requests):
            for name, url in (("direct", direct), ("gateway", gateway)):
                found = await stream(client, url, KEYS["bench"], tokens)
                if found.ttft is not None:
                    ttfts[name].append(found.ttft)
    out: dict[str, Any] = {}
    for q in (50, 99):
        via, straight = pct(ttfts["gateway"], q), pct(ttfts["direct"], q)
        out[f"direct_ttft_p{q}_ms"] = ms(straight)
        out[f"gateway_ttft_p{q}_ms"] = ms(via)
        out[f"overhead_p{q}_ms"] = (
            None if via is None or straight is None else round((via - straight) * 1000, 3)
        )
    return out


async def poisson(
    target: Callable[[], str], key: str, rate: float, seconds: float, tokens: int, seed: int
) -> list[Streamed]:
    """Open-loop arrivals at ``rate`` per second for ``seconds``."""
    rng = random.Random(seed)
    results: list[Streamed] = []

    async def one(client: httpx.AsyncClient) -> Streamed:
        sent = time.monotonic()
        try:
            return await stream(client, target(), key, tokens)
        except httpx.TransportError:  # counted as an error, not the end of the run
            return Streamed(sent)

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=512)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        tasks = []
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            tasks.append(asyncio.create_task(one(client)))
            await asyncio.sleep(rng.expovariate(rate))
        results = list(await asyncio.gather(*tasks))
    return results


def victim_summary(victim: list[Streamed], aggressor: list[Streamed]) -> dict[str, Any]:
    ttfts = [r.ttft for r in victim if r.ttft is not None]
    return {
        "victim_p50_ms": ms(pct(ttfts, 50)),
        "victim_p99_ms": ms(pct(ttfts, 99)),
        "victim_requests": len(victim),
        "victim_refused": sum(1 for r in victim if r.status == 429),
        "victim_errors": sum(1 for r in victim if r.status == 0),
        "aggressor_requests": len(aggressor),
        "aggressor_refused": sum(1 for r in aggressor if r.status == 429),
        "aggressor_errors": sum(1 for r in aggressor if r.status == 0),
    }


async def isolation(
    victim_url: Callable[[], str],
    aggressor_url: Callable[[], str],
    sizes: Sizes,
    with_aggressor: bool = True,
) -> dict[str, Any]:
    loops: list[Awaitable[list[Streamed]]] = [
        poisson(
            victim_url, KEYS["victim"], sizes.victim_rate, sizes.isolation_s, sizes.output_tokens, 1
        )
    ]
    if with_aggressor:
        loops.append(
            poisson(
                aggressor_url,
                KEYS["aggressor"],
                10 * sizes.victim_rate,
                sizes.isolation_s,
                sizes.output_tokens,
                2,
            )
        )
    found = await asyncio.gather(*loops)
    return victim_summary(found[0], found[1] if with_aggressor else [])


async def closed(
    urls: list[str], streams: int, seconds: float, tokens: int
) -> tuple[float, int, int]:
    """Output tokens per second of ``streams`` closed loops per URL, every token they
    received (those after the deadline too), and the requests whose connection broke
    (counted as errors, not the end of the run)."""
    deadline = time.monotonic() + seconds
    counted = received = errors = 0
    started = time.monotonic()
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=512)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:

        async def loop(url: str) -> None:
            nonlocal counted, received, errors
            while time.monotonic() < deadline:
                try:
                    found = await stream(client, url, KEYS["bench"], tokens)
                except httpx.TransportError:
                    errors += 1
                    await asyncio.sleep(0.1)  # not a busy loop against a dead server
                    continue
                counted += sum(1 for t in found.token_times if t <= deadline)
                received += len(found.token_times)

        await asyncio.gather(*(loop(url) for url in urls for _ in range(streams)))
    return counted / (min(time.monotonic(), deadline) - started), received, errors


def run(sizes: Sizes, redis_url: str, work: Path, log: Callable[[str], None]) -> dict[str, Any]:
    write_synthetic_model(work / "model", MODEL)
    tenants: dict[str, dict[str, Any]] = {"bench": {}, "victim": {}, "aggressor": {}}
    out: dict[str, Any] = {"replicas": 3, "max_batch_size": BATCH, "model": MODEL.__dict__}
    with ExitStack() as stack:
        workers = {}
        for index in range(3):
            config = worker_config(
                work / "model",
                work / f"cache{index}",
                KEYS,
                batching={"max_batch_size": BATCH, "max_queue_len": 1024},
            )
            workers[f"r{index}"] = stack.enter_context(
                WorkerProcess(config, work / f"worker{index}")
            )

        def gateway(
            name: str,
            replicas: dict[str, WorkerProcess],
            into: list[GatewayProcess] | None = None,
            **deployment: Any,
        ) -> str:
            config = gateway_config(
                name,
                replicas,
                tenants,
                KEYS,
                counters_url=redis_url,
                deployment={
                    "deployment_id": f"bench-{name}",
                    "admission": {"max_queue_len": 4096, "max_wait_s": 120, **deployment},
                },
            )
            process = stack.enter_context(GatewayProcess(config, work / name))
            if into is not None:
                into.append(process)
            return process.base_url

        log("overhead")
        single = gateway("single", {"r0": workers["r0"]})
        out["overhead"] = asyncio.run(
            overhead(workers["r0"].base_url, single, sizes.overhead_requests, sizes.output_tokens)
        )
        fleet_process: list[GatewayProcess] = []
        fleet = gateway("fleet", workers, into=fleet_process)
        passing = gateway("passing", workers, queue_ahead=100_000)
        direct = [w.base_url for w in workers.values()]

        rounds: list[tuple[float, float]] = []  # (replicas' sum, through the gateway)
        forwarded = cpu = busy = direct_errors = gateway_errors = 0
        for index in range(sizes.throughput_rounds):
            log(f"throughput: round {index + 1} of {sizes.throughput_rounds}")
            summed, _, errors = asyncio.run(
                closed(direct, BATCH, sizes.throughput_s, sizes.output_tokens)
            )
            direct_errors += errors
            cpu_before, began = fleet_process[0].cpu_seconds(), time.monotonic()
            through, received, errors = asyncio.run(
                closed([fleet], BATCH * len(direct), sizes.throughput_s, sizes.output_tokens)
            )
            busy += time.monotonic() - began
            # The gateway's CPU time per token it forwarded: admission, the ledger, the
            # workers' state streams and passing the chunks on, all together.
            cpu += fleet_process[0].cpu_seconds() - cpu_before
            forwarded += received
            gateway_errors += errors
            rounds.append((summed, through))
        out["throughput"] = {
            "replicas_sum_tokens_per_s": round(sum(d for d, _ in rounds) / len(rounds), 1),
            "gateway_tokens_per_s": round(sum(g for _, g in rounds) / len(rounds), 1),
            "rounds_vs_replicas": [round(g / d, 3) for d, g in rounds],
            "gateway_tokens_forwarded": forwarded,
            "gateway_cpu_us_per_token": round(cpu / forwarded * 1e6, 1) if forwarded else None,
            # Of the machine's cores, what the gateway took from the replicas' share.
            "gateway_cpu_cores": round(cpu / busy, 3),
            "replicas_errors": direct_errors,
            "gateway_errors": gateway_errors,
        }

        log("isolation: solo")
        isolated: dict[str, Any] = {}
        isolated["solo"] = asyncio.run(isolation(lambda: fleet, lambda: fleet, sizes, False))
        log("isolation: fleet-wide fairness")
        isolated["fleet"] = asyncio.run(isolation(lambda: fleet, lambda: fleet, sizes))
        log("isolation: per-worker fairness only")
        isolated["per_worker"] = asyncio.run(isolation(lambda: passing, lambda: passing, sizes))
        log("isolation: round robin, first come first served")
        for worker in workers.values():
            config = json.loads(worker.config_path.read_text())
            worker.write_config({**config, "scheduling": {"policy": "fcfs"}})
            worker.signal_reload()
        while any(w.health()["policy"] != "fcfs" for w in workers.values()):
            time.sleep(0.1)
        turns = itertools.cycle(direct)
        isolated["round_robin"] = asyncio.run(
            isolation(lambda: next(turns), lambda: next(turns), sizes)
        )
        out["isolation"] = isolated
    solo = isolated["solo"]["victim_p99_ms"] or 0.0
    out["overhead_p50_ms"] = out["overhead"]["overhead_p50_ms"]
    out["overhead_p99_ms"] = out["overhead"]["overhead_p99_ms"]
    for mode in ("fleet", "per_worker", "round_robin"):
        p99 = isolated[mode]["victim_p99_ms"]
        out[f"victim_p99_vs_solo_{mode}"] = round(p99 / solo, 3) if p99 and solo else None
    thr = out["throughput"]
    out["throughput_vs_replicas"] = round(
        thr["gateway_tokens_per_s"] / thr["replicas_sum_tokens_per_s"], 3
    )
    out["gateway_cpu_us_per_token"] = thr["gateway_cpu_us_per_token"]
    out["load_average"] = [round(x, 2) for x in os.getloadavg()]
    out["goals"] = {
        key: {"goal": f"{op} {goal}", "met": _met(out.get(key), op, goal)}
        for key, op, goal in GOALS
    }
    return out


def _met(value: float | None, op: str, goal: float) -> bool:
    return value is not None and (value >= goal if op == ">=" else value <= goal)


def table(out: dict[str, Any]) -> str:
    lines = [
        f"gateway overhead on TTFT: p50 {out['overhead_p50_ms']} ms, p99 {out['overhead_p99_ms']} ms",
        "victim p99 TTFT (x its p99 alone, "
        f"{out['isolation']['solo']['victim_p99_ms']} ms), 10x aggressor, 3 replicas:",
    ]
    for mode in ("fleet", "per_worker", "round_robin"):
        found = out["isolation"][mode]
        lines.append(
            f"  {mode:12} {found['victim_p99_ms']} ms  x{out[f'victim_p99_vs_solo_{mode}']}"
            f"  (victim refused {found['victim_refused']}/{found['victim_requests']}, "
            f"aggressor refused {found['aggressor_refused']}/{found['aggressor_requests']})"
        )
    thr = out["throughput"]
    lines.append(
        f"throughput: gateway {thr['gateway_tokens_per_s']} tok/s vs replicas' sum "
        f"{thr['replicas_sum_tokens_per_s']} tok/s (x{out['throughput_vs_replicas']}; "
        f"rounds {', '.join(f'x{r}' for r in thr['rounds_vs_replicas'])}); "
        f"gateway CPU {out['gateway_cpu_us_per_token']} us per forwarded token "
        f"({thr['gateway_cpu_cores']} of a core); broken "
        f"connections: {thr['gateway_errors']} via the gateway, {thr['replicas_errors']} direct"
    )
    lines.append(f"load average: {out['load_average']}")
    for key, goal in out["goals"].items():
        lines.append(f"goal {key} {goal['goal']}: {'met' if goal['met'] else 'NOT met'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.gateway",
        description=__doc__.splitlines()[0] if __doc__ else None,
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quick", action="store_true", help="about two minutes")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL

    def log(phase: str) -> None:
        print(f"[bench gateway] {phase}", file=sys.stderr, flush=True)

    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tailguard-bench-")))
        redis_url = os.environ.get("REDIS_URL")
        if not redis_url:
            servers.ensure_packages()
            redis_url = stack.enter_context(servers.redis(work))
        out = run(sizes, redis_url, work, log)
    print(json.dumps(out, indent=2) if args.json else table(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
