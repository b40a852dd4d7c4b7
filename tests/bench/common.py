"""Shared pieces of the control-plane benchmarks: servers, Django, processes, percentiles."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def control_plane_environment() -> Iterator[Path]:
    """Throwaway PostgreSQL and Redis (unless DATABASE_URL/REDIS_URL name real ones),
    a fresh data directory, and Django set up and migrated against them."""
    from tests import run

    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tailguard-bench-")))
        if not (os.environ.get("DATABASE_URL") and os.environ.get("REDIS_URL")):
            run.ensure_packages()
        if not os.environ.get("DATABASE_URL"):
            os.environ["DATABASE_URL"] = stack.enter_context(run.postgres(work))
        if not os.environ.get("REDIS_URL"):
            os.environ["REDIS_URL"] = stack.enter_context(run.redis(work))
        os.environ["TAILGUARD_DATA_DIR"] = str(work / "data")
        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlplane.settings")
        import django
        from django.core.management import call_command

        django.setup()
        call_command("migrate", verbosity=0)
        yield work


class Processes:
    """Child processes that are stopped, whatever happens, when the block ends."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, name: str, argv: list[str], **env: str) -> subprocess.Popen[bytes]:
        with open(self.logs / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(
                argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env}
            )
        self.procs.append(proc)
        return proc

    def tails(self, lines: int = 15) -> str:
        """The end of every child's log, for an error message."""
        return "\n".join(
            f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
            for log in sorted(self.logs.glob("*.log"))
        )

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


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


def start_web(procs: Processes, port: int, workers: int = 1) -> str:
    """The control plane's ASGI server; returns its URL once it answers."""
    from controlplane import processes

    url = f"http://127.0.0.1:{port}"
    # Several processes share their /metrics counters, as in production (docs/operations.md).
    shared = procs.logs / "web-metrics"
    shutil.rmtree(shared, ignore_errors=True)
    shared.mkdir()
    procs.spawn(
        "web", processes.web("127.0.0.1", port, workers), PROMETHEUS_MULTIPROC_DIR=str(shared)
    )
    wait(lambda: _answers(url), 60, "the control plane", procs)
    return url


def start_simulated_fleet(
    procs: Processes, work: Path, url: str, agents: int, *extra: str, per_process: int = 0
) -> float:
    """`tailguard-agent simulate` with `agents` nodes (in processes of at most `per_process`
    each, 0: one process), spawned after what `procs` holds; returns, once all are ready with
    GPUs, how many enrolled per minute (enrollment, inventory and first heartbeat)."""
    from controlplane import processes
    from controlplane.inventory.models import Gpu, Node
    from controlplane.inventory.services import create_bootstrap_token

    bootstrap = create_bootstrap_token(name="bench", uses=agents).secret
    per_process = per_process or agents
    for index, start in enumerate(range(0, agents, per_process)):
        count = min(per_process, agents - start)
        prefix = ["--prefix", f"sim{index}"] if per_process < agents else []
        procs.spawn(
            "agents" if not prefix else f"agents-{index}",
            [
                *processes.simulated_nodes(url, bootstrap, work / "agents" / str(index), count),
                *extra,
                *prefix,
            ],
        )
    print(f"waiting for {agents} simulated agents to enroll...", file=sys.stderr)
    started = time.monotonic()
    wait(
        lambda: (
            Node.objects.filter(status="ready").count() == agents
            and Gpu.objects.count() == 8 * agents
        ),
        600,
        "the simulated agents to become ready and report their GPUs",
        procs,
    )
    return agents / (time.monotonic() - started) * 60


MAX_REPLICAS = 256
"""A deployment's replica bound; larger fleets get several deployments."""


def deploy_everywhere(procs: Processes, url: str, agents: int) -> tuple[httpx.Client, list[str]]:
    """A tenant and one-GPU deployments with a replica on every node, rolled out; returns
    an API client (platform admin) and the deployments' ids."""
    from django.contrib.auth import get_user_model

    from controlplane.fleet.models import Revision
    from controlplane.tenancy.services import create_tenant, issue_api_token

    tenant = create_tenant(slug="bench", name="Bench")
    admin = get_user_model().objects.create_user("bench", is_superuser=True)
    token = issue_api_token(user=admin, name="bench").secret
    api = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=120)
    ids = []
    for index, start in enumerate(range(0, agents, MAX_REPLICAS)):
        created = api.post(
            "/api/v1/deployments/",
            json={
                "tenant": str(tenant.pk),
                "name": f"bench-{index}",
                "model_name": "bench",
                "artifact_uri": "synthetic://bench",
                "replicas": min(MAX_REPLICAS, agents - start),
                "gpus_per_replica": 1,
            },
        )
        if created.status_code != 201:
            raise SystemExit(f"creating a deployment failed: {created.text}")
        ids.append(created.json()["id"])

    def rolled_out() -> bool:
        return (
            Revision.objects.filter(
                status="applied", document__state__components__workers__0__isnull=False
            )
            .values("node")
            .distinct()
            .count()
            == agents
        )

    wait(rolled_out, 600, "the first rollout", procs)
    return api, ids


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of a process and all its descendants (uvicorn's and Celery's children)."""
    total = cpu_seconds(pid)
    for task in Path(f"/proc/{pid}/task").iterdir():
        children = (task / "children").read_text().split()
        total += sum(tree_cpu_seconds(int(child)) for child in children)
    return total


def start_control_plane_worker(procs: Processes, work: Path) -> Any:
    """The control plane's Celery worker, which renders large rollouts after commit. Without
    beat: a web process saturated on purpose answers heartbeats late, and nodes marked
    unreachable meanwhile would move replicas in the middle of a measurement."""
    from controlplane import processes

    argv = [arg for arg in processes.celery_worker(work / "beat-schedule") if arg != "-B"]
    return procs.spawn("worker", argv)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile: the smallest value with at least q% of values at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def report(results: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(results, indent=2))
        return
    width = max(map(len, results))
    for key, value in results.items():
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        print(f"{key:<{width}}  {shown}")
