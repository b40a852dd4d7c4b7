"""Telemetry benchmark: simulated agents at 1 Hz -> ingest -> a live dashboard client.

    tailguard bench telemetry [--agents 500] [--seconds 60] [--web-processes 1]
                              [--agents-per-process 500] [--json]

Starts throwaway PostgreSQL and Redis, the control plane (uvicorn with `--web-processes`
processes, which ingest side by side, the Redis channel layer, and the Celery worker that
renders the rollout), and `tailguard-agent simulate` processes of at most
`--agents-per-process` agents (one process saturates a core at about 1,000), whose agents
each stream one
TelemetryBatch a second over their WebSocket (GPU gauges, and TTFT/TPOT/ITL/e2e/queue
sketches with exact SLO counts for the replica a deployment placed on every node). A
dashboard client logged in as a platform admin subscribes to the fleet stream; a batch's
end-to-end time is from its emission (its interval_end, on the agent's clock, which is
this machine's) to the client receiving the delta that carries it. Meanwhile a plain HTTP
request (a 401) is timed twice a second: a web process busy ingesting must still answer
the API. Prints the ingest rate over the measured seconds, e2e and HTTP percentiles, and
where the time goes: the
control plane's flush times (from its /metrics), CPU used by each process, the web
processes' CPU-seconds per 1,000 stored batches (capacity per core is its inverse, and
adds up across processes and machines), and the machine's load average (other work on a
shared machine skews every figure).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import time
from typing import Any

import httpx
import websockets
from tqdm import tqdm

from tests.bench.common import (
    Processes,
    control_plane_environment,
    cpu_seconds,
    deploy_everywhere,
    percentile,
    report,
    start_control_plane_worker,
    start_simulated_fleet,
    start_web,
    tree_cpu_seconds,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="tailguard bench telemetry", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--agents", type=int, default=500)
    parser.add_argument("--seconds", type=int, default=60, help="measured seconds")
    parser.add_argument("--warmup", type=int, default=10, help="seconds before measuring")
    parser.add_argument("--port", type=int, default=18766)
    parser.add_argument("--web-processes", type=int, default=1, help="uvicorn processes")
    parser.add_argument(
        "--agents-per-process",
        type=int,
        default=500,
        help="simulated agents per simulator process (one process runs on one core at most)",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if (
        min(args.agents, args.seconds, args.web_processes, args.agents_per_process) < 1
        or args.warmup < 0
    ):
        parser.error(
            "--agents, --seconds, --web-processes and --agents-per-process must be at least 1, "
            "--warmup at least 0"
        )
    return args


def session_cookie() -> str:
    """A logged-in session for a platform admin, as the console's login would make it."""
    from django.contrib.auth import HASH_SESSION_KEY, SESSION_KEY, get_user_model
    from django.contrib.sessions.backends.db import SessionStore

    user = get_user_model().objects.create_user("dashboard", is_superuser=True, is_staff=True)
    session = SessionStore()
    session[SESSION_KEY] = str(user.pk)
    session[HASH_SESSION_KEY] = user.get_session_auth_hash()
    session["_auth_user_backend"] = "django.contrib.auth.backends.ModelBackend"
    session.create()
    return f"sessionid={session.session_key}"


async def watch(url: str, cookie: str, seconds: float, samples: list[float]) -> None:
    """Receive fleet deltas for `seconds`; one sample per node entry: now - its batch's end."""
    uri = url.replace("http://", "ws://") + "/ws/dashboard/"
    headers = {"Cookie": cookie, "Origin": url}
    async with websockets.connect(uri, additional_headers=headers, max_size=2**26) as ws:
        await ws.send(json.dumps({"subscribe": "fleet"}))
        answer = json.loads(await ws.recv())
        if answer.get("type") != "subscribed":
            raise SystemExit(f"the dashboard refused the fleet stream: {answer}")
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                message = json.loads(await asyncio.wait_for(ws.recv(), left))
            except TimeoutError:
                break
            now = time.time()
            samples.extend(now - node["t"] for node in message.get("nodes", ()))


async def probe_http(url: str, seconds: float, samples: list[float]) -> None:
    """Time a plain HTTP request (an agent endpoint refusing a missing credential: a 401
    that touches no table) twice a second, as any API client would see the web process."""
    deadline = time.monotonic() + seconds
    async with httpx.AsyncClient(timeout=120) as http:
        while time.monotonic() < deadline:
            started = time.monotonic()
            response = await http.post(f"{url}/api/v1/agent/heartbeat/")
            if response.status_code != 401:
                raise SystemExit(f"the HTTP probe got {response.status_code}, not 401")
            samples.append(time.monotonic() - started)
            await asyncio.sleep(max(0.0, 0.5 - (time.monotonic() - started)))


def flush_stats(url: str) -> tuple[float, float]:
    """(count, sum) of the control plane's telemetry flush-time histogram, over every web
    process (they share their counters)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    found = {
        name: float(value)
        for name, value in re.findall(
            r"^tailguard_telemetry_flush_seconds_(count|sum) (\S+)$", text, re.M
        )
    }
    return found.get("count", 0.0), found.get("sum", 0.0)


def stored_batches() -> int:
    from django.db.models import Sum

    from controlplane.telemetry.models import NodeStream

    return NodeStream.objects.aggregate(n=Sum("batches"))["n"] or 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with control_plane_environment() as work, Processes(work) as procs:
        url = start_web(procs, args.port, args.web_processes)
        start_control_plane_worker(procs, work)
        enrolled_per_min = start_simulated_fleet(
            procs,
            work,
            url,
            args.agents,
            "--telemetry-interval",
            "1",
            per_process=args.agents_per_process,
        )
        deploy_everywhere(procs, url, args.agents)
        cookie = session_cookie()
        for _ in tqdm(range(args.warmup), desc="warm-up", unit="s", file=sys.stderr):
            time.sleep(1)

        web, agents = procs.procs[0].pid, [p.pid for p in procs.procs[2:]]

        def agents_cpu() -> float:
            return sum(cpu_seconds(pid) for pid in agents)

        cpu_before = {"web": tree_cpu_seconds(web), "agents": agents_cpu()}
        flushes_before, flush_sum_before = flush_stats(url)
        batches_before, started = stored_batches(), time.monotonic()
        samples: list[float] = []
        http_samples: list[float] = []
        with tqdm(total=args.seconds, desc="measuring", unit="s", file=sys.stderr) as bar:

            async def tick() -> None:
                for _ in range(args.seconds):
                    await asyncio.sleep(1)
                    bar.update(1)

            async def both() -> None:
                await asyncio.gather(
                    watch(url, cookie, args.seconds, samples),
                    probe_http(url, args.seconds, http_samples),
                    tick(),
                )

            asyncio.run(both())
        elapsed = time.monotonic() - started
        batches = stored_batches() - batches_before
        flushes, flush_sum = flush_stats(url)
        flushes -= flushes_before
        flush_sum -= flush_sum_before
        cpu = {
            "web": (tree_cpu_seconds(web) - cpu_before["web"]) / elapsed,
            "agents": (agents_cpu() - cpu_before["agents"]) / elapsed,
        }
        if not samples:
            raise SystemExit(f"the dashboard client received no deltas\n{procs.tails()}")
        results: dict[str, Any] = {
            "agents": args.agents,
            "web_processes": args.web_processes,
            "seconds": round(elapsed, 1),
            "ingest_batches_per_s": round(batches / elapsed, 1),
            "offered_batches_per_s": args.agents,
            "e2e_p50_s": round(percentile(samples, 50), 4),
            "e2e_p99_s": round(percentile(samples, 99), 4),
            "e2e_max_s": round(max(samples), 4),
            "e2e_samples": len(samples),
            "http_p50_s": round(percentile(http_samples, 50), 4),
            "http_p99_s": round(percentile(http_samples, 99), 4),
            "http_max_s": round(max(http_samples), 4),
            # where the time goes
            "flushes_per_s": round(flushes / elapsed, 2),
            "batches_per_flush": round(batches / flushes, 1) if flushes else 0,
            "flush_mean_s": round(flush_sum / flushes, 4) if flushes else 0,
            "web_cpu_cores": round(cpu["web"], 2),
            "web_cpu_s_per_1000_batches": round(cpu["web"] * elapsed / batches * 1000, 3)
            if batches
            else 0,
            "agents_cpu_cores": round(cpu["agents"], 2),
            "agent_processes": len(agents),
            "load_average_1m": round(os.getloadavg()[0], 2),
            "enrolled_per_min": round(enrolled_per_min, 1),
        }
        report(results, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
