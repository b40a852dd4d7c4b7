"""Config push benchmark: a committed deployment change -> applied status on every agent.

    tailguard bench push [--agents 200] [--rounds 5] [--json]

Starts PostgreSQL and Redis (throwaway), the control plane (uvicorn), and one
`tailguard-agent simulate --count N` process whose N agents each enroll, heartbeat,
consume their own Celery queue and apply revisions through the real reconciler
(simulated nodes record their workers instead of starting them). Each round changes
one deployment that has a replica on every node, so every node gets a new signed
revision; a node's push time is from the commit of the change (the creation stamp of
the round's first revision, taken inside the committing transaction) to the moment
the node's applied status is stored. Prints p50/p99 over all nodes of
all rounds, and the worst round's time until the last node reported.
"""

from __future__ import annotations

import argparse
import sys
import time

from tqdm import tqdm

from tests.bench.common import (
    MAX_REPLICAS,
    Processes,
    control_plane_environment,
    deploy_everywhere,
    percentile,
    report,
    start_simulated_fleet,
    start_web,
    wait,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="tailguard bench push", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--agents", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--port", type=int, default=18765)
    parser.add_argument("--web-workers", type=int, default=1, help="uvicorn processes")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.agents < 1 or args.rounds < 1:
        parser.error("--agents and --rounds must be at least 1")
    if args.agents > MAX_REPLICAS:
        parser.error(f"--agents is at most {MAX_REPLICAS}: one deployment changes per round")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with control_plane_environment() as work, Processes(work) as procs:
        from controlplane.fleet.models import Revision

        url = start_web(procs, args.port, args.web_workers)
        start_simulated_fleet(procs, work, url, args.agents, "--telemetry-interval", "0")
        api, (deployment,) = deploy_everywhere(procs, url, args.agents)
        first_generation = Revision.objects.order_by("-generation").values_list(
            "generation", flat=True
        )[0]

        samples: list[float] = []
        applied_at: list[float] = []
        commit: list[float] = []
        rounds: list[float] = []
        for round_no in tqdm(range(args.rounds), desc="push rounds", file=sys.stderr):
            started_wall = time.time()
            response = api.patch(
                f"/api/v1/deployments/{deployment}/", json={"max_batch_size": 64 + round_no}
            )
            response.raise_for_status()
            commit.append(time.time() - started_wall)
            generation = first_generation + round_no + 1
            wait(
                lambda g=generation: (
                    Revision.objects.filter(generation=g, status="applied").count() == args.agents
                ),
                120,
                f"round {round_no}",
                procs,
            )
            rows = Revision.objects.filter(generation=generation).values_list(
                "created_at", "reported_at", "updated_at"
            )
            committed = min(created for created, _, _ in rows).timestamp()
            times = [stored.timestamp() - committed for _, _, stored in rows]
            applied_at.extend(agent.timestamp() - committed for _, agent, _ in rows)
            samples.extend(times)
            rounds.append(max(times))
        report(
            {
                "agents": args.agents,
                "web_workers": args.web_workers,
                "rounds": args.rounds,
                "push_p50_s": round(percentile(samples, 50), 4),
                "push_p99_s": round(percentile(samples, 99), 4),
                "push_all_applied_max_s": round(max(rounds), 4),
                # where the time goes: the API call that plans, signs, commits and sends; the
                # agents applying (their own clock); their status reports being stored
                "api_call_p50_s": round(percentile(commit, 50), 4),
                "agent_applied_p50_s": round(percentile(applied_at, 50), 4),
                "agent_applied_p99_s": round(percentile(applied_at, 99), 4),
            },
            args.json,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
