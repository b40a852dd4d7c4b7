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
from typing import Any

import httpx
from tqdm import tqdm

from tests.bench.common import Processes, control_plane_environment, percentile, report


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
    return args


def wait(predicate: Any, timeout: float, what: str, procs: Processes) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}\n{procs.tails()}")
        time.sleep(0.05)


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/api/schema/", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with control_plane_environment() as work, Processes(work) as procs:
        from django.contrib.auth import get_user_model

        from controlplane import processes
        from controlplane.fleet.models import Revision
        from controlplane.inventory.models import Gpu, Node
        from controlplane.inventory.services import create_bootstrap_token
        from controlplane.tenancy.services import create_tenant, issue_api_token

        tenant = create_tenant(slug="bench", name="Bench")
        admin = get_user_model().objects.create_user("bench", is_superuser=True)
        token = issue_api_token(user=admin, name="bench").secret
        bootstrap = create_bootstrap_token(name="bench", uses=args.agents).secret
        url = f"http://127.0.0.1:{args.port}"
        procs.spawn("web", processes.web("127.0.0.1", args.port, args.web_workers))
        wait(lambda: _answers(url), 60, "the control plane", procs)
        procs.spawn(
            "agents",
            [
                sys.executable,
                "-m",
                "agent",
                "--log-level",
                "WARNING",
                "simulate",
                "--count",
                str(args.agents),
                "--control-plane",
                url,
                "--bootstrap-token",
                bootstrap,
                "--state-dir",
                str(work / "agents"),
            ],
        )
        print(f"waiting for {args.agents} simulated agents to enroll...", file=sys.stderr)
        wait(
            lambda: (
                Node.objects.filter(status="ready").count() == args.agents
                and Gpu.objects.count() == 8 * args.agents
            ),
            300,
            "the simulated agents to become ready and report their GPUs",
            procs,
        )

        api = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=120)
        created = api.post(
            "/api/v1/deployments/",
            json={
                "tenant": str(tenant.pk),
                "name": "bench",
                "model_name": "bench",
                "artifact_uri": "synthetic://bench",
                "replicas": args.agents,
                "gpus_per_replica": 1,
            },
        )
        created.raise_for_status()
        deployment = created.json()["id"]
        wait(
            lambda: (
                Revision.objects.filter(status="applied").values("node").distinct().count()
                == args.agents
            ),
            300,
            "the first rollout",
            procs,
        )
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
