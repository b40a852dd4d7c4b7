"""Config push benchmark: a committed deployment change -> applied status on every agent.

    tailguard bench push [--agents 200] [--rounds 5] [--agents-per-process 250]
                         [--idle-seconds 10] [--json]

Starts PostgreSQL and Redis (throwaway), the control plane (uvicorn and its Celery
worker), and `tailguard-agent simulate` processes of at most `--agents-per-process`
agents each (a simulator's one Celery consumer names all its queues in every blocking
pop, so its cost per message grows with its agents; real agents consume one queue each).
The agents each enroll, heartbeat, consume their own Celery queue and apply revisions
through the real reconciler (simulated nodes record their workers instead of starting
them). Each holds its telemetry WebSocket open, as a real agent does, and ships a batch
over it only every `SIM_TELEMETRY_INTERVAL_S`, so their heartbeats and status reports
take the way a real agent's do. Each round changes the deployments that hold a replica on every node (one per 256
agents, one API call each), so every node gets a new signed revision; a node's push time
is from the start of the round's first API call to the moment the node's applied status
is stored (the old measure, from the round's first stored revision, is printed beside
it). Prints p50/p99 over all nodes of all rounds, the worst round's time until the last
node reported, the API call's own time, and the CPU-seconds the control plane's
processes (web and worker) spent per pushed revision: capacity per core is its inverse.
The same figure net of what the processes spend with nothing pushed (measured for
`--idle-seconds` first, a whole number of heartbeat intervals; each push restarts an
agent's pull timer, so neither window has pulls) is what a push itself costs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import UTC, datetime

from tqdm import tqdm

from tests.bench.common import (
    Processes,
    control_plane_environment,
    deploy_everywhere,
    percentile,
    report,
    start_control_plane_worker,
    start_simulated_fleet,
    start_web,
    tree_cpu_seconds,
    wait,
)

SIM_TELEMETRY_INTERVAL_S = 3600
"""A batch an hour: none during a run, beyond the one each agent ships as it starts."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="tailguard bench push", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--agents", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--port", type=int, default=18765)
    parser.add_argument("--web-workers", type=int, default=1, help="uvicorn processes")
    parser.add_argument(
        "--agents-per-process", type=int, default=250, help="simulated agents per process"
    )
    parser.add_argument(
        "--idle-seconds",
        type=float,
        default=10.0,
        help="seconds measured with nothing pushed first (heartbeats only); a multiple of "
        "the heartbeat interval (10 s)",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if min(args.agents, args.rounds, args.agents_per_process) < 1:
        parser.error("--agents, --rounds and --agents-per-process must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with control_plane_environment() as work, Processes(work) as procs:
        from controlplane.fleet.models import Replica, Revision

        web = start_web(procs, args.port, args.web_workers)
        worker = start_control_plane_worker(procs, work)
        enrolled_per_min = start_simulated_fleet(
            procs,
            work,
            web,
            args.agents,
            "--telemetry-interval",
            str(SIM_TELEMETRY_INTERVAL_S),
            per_process=args.agents_per_process,
        )
        api, deployments = deploy_everywhere(procs, web, args.agents)
        pushed = Replica.objects.filter(node__isnull=False).count()
        servers = {"web": [procs.procs[0].pid], "worker": [worker.pid]}
        servers["agents"] = [p.pid for p in procs.procs[2:]]

        def cpu_of(name: str) -> float:
            return sum(tree_cpu_seconds(pid) for pid in servers[name])

        # What the fleet costs with nothing pushed (its heartbeats), so the figures per
        # revision can be read net of it too.
        idle_started, idle_before = time.monotonic(), {name: cpu_of(name) for name in servers}
        time.sleep(args.idle_seconds)
        idle_elapsed = time.monotonic() - idle_started
        idle_rate = {name: (cpu_of(name) - idle_before[name]) / idle_elapsed for name in servers}
        pushing_started = time.monotonic()
        cpu_before = {name: cpu_of(name) for name in servers}

        samples: list[float] = []
        since_revision: list[float] = []
        applied_at: list[float] = []
        commit: list[float] = []
        rounds: list[float] = []
        for round_no in tqdm(range(args.rounds), desc="push rounds", file=sys.stderr):
            started_wall = time.time()
            for deployment in deployments:  # one, up to 256 agents: every node changes
                called = time.time()
                response = api.patch(
                    f"/api/v1/deployments/{deployment}/", json={"max_batch_size": 64 + round_no}
                )
                response.raise_for_status()
                commit.append(time.time() - called)
            issued = Revision.objects.filter(
                created_at__gte=datetime.fromtimestamp(started_wall, UTC)
            )
            wait(
                lambda issued=issued: issued.filter(status="applied").count() == pushed,
                120,
                f"round {round_no}",
                procs,
            )
            rows = issued.values_list("created_at", "reported_at", "updated_at")
            first = min(created for created, _, _ in rows).timestamp()
            times = [stored.timestamp() - started_wall for _, _, stored in rows]
            since_revision.extend(stored.timestamp() - first for _, _, stored in rows)
            applied_at.extend(agent.timestamp() - started_wall for _, agent, _ in rows)
            samples.extend(times)
            rounds.append(max(times))
        cpu = {name: cpu_of(name) - cpu_before[name] for name in servers}
        pushing = time.monotonic() - pushing_started
        net = {name: cpu[name] - idle_rate[name] * pushing for name in servers}
        revisions = pushed * args.rounds
        report(
            {
                "agents": args.agents,
                "web_workers": args.web_workers,
                "agents_per_process": args.agents_per_process,
                "rounds": args.rounds,
                "push_p50_s": round(percentile(samples, 50), 4),
                "push_p99_s": round(percentile(samples, 99), 4),
                "push_all_applied_max_s": round(max(rounds), 4),
                "push_since_first_revision_p50_s": round(percentile(since_revision, 50), 4),
                "push_since_first_revision_p99_s": round(percentile(since_revision, 99), 4),
                # where the time goes: the API call that plans and commits; the worker
                # rendering, signing and sending; the agents applying (their own clock);
                # their status reports being stored
                "api_call_p50_s": round(percentile(commit, 50), 4),
                "api_call_max_s": round(max(commit), 4),
                "revisions_per_round": pushed,
                "cpu_s_per_revision": round((cpu["web"] + cpu["worker"]) / revisions, 5),
                # the same split by process; heartbeats (every node's, all along) count too
                "web_cpu_s_per_revision": round(cpu["web"] / revisions, 5),
                "worker_cpu_s_per_revision": round(cpu["worker"] / revisions, 5),
                "agents_cpu_s_per_revision": round(cpu["agents"] / revisions, 5),
                # net of what the same processes spent per second with nothing pushed
                "idle_web_cpu_cores": round(idle_rate["web"], 3),
                "net_cpu_s_per_revision": round((net["web"] + net["worker"]) / revisions, 5),
                "net_web_cpu_s_per_revision": round(net["web"] / revisions, 5),
                "agent_applied_p50_s": round(percentile(applied_at, 50), 4),
                "agent_applied_p99_s": round(percentile(applied_at, 99), 4),
                "enrolled_per_min": round(enrolled_per_min, 1),
                "load_average_1m": round(os.getloadavg()[0], 2),
            },
            args.json,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
