"""`tailguard demo`: the whole system on embedded defaults, in the foreground.

Migrates, seeds demo accounts, a bootstrap token, an inference key and a deployment
of a synthetic model, then starts the control plane (ASGI), its Celery worker with
beat, and a node agent for this machine, which enrolls and starts the inference
worker. Prints where to look. Ctrl-C (or SIGTERM) stops every child cleanly.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
from django.conf import settings
from django.core.management import call_command
from django.db import transaction

from controlplane import processes
from controlplane.fleet import services as fleet
from controlplane.fleet.models import Deployment, Replica
from controlplane.inventory.services import create_bootstrap_token
from controlplane.tenancy.models import InferenceKey
from controlplane.tenancy.services import issue_inference_key, revoke, seed_demo

DEMO_MODEL = "synthetic://demo-chat?layers=4&hidden=256&heads=4&kv_heads=4&vocab=1024"


@contextmanager
def _children() -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        yield procs
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


def _wait(
    what: str,
    ready: Callable[[], Any],
    procs: dict[str, subprocess.Popen[bytes]],
    timeout: float = 180,
) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, proc in procs.items():
            if proc.poll() is not None:
                raise SystemExit(
                    f"the {name} process exited with code {proc.returncode}; "
                    f"see {settings.DATA_DIR / 'logs' / name}.log"
                )
        value = ready()
        if value:
            return value
        time.sleep(0.3)
    raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.TransportError:
        return False


@transaction.atomic
def _seed_fleet(tenant: Any) -> str:
    """The demo deployment (idempotent) and a fresh inference key, shown once."""
    for old in InferenceKey.objects.filter(tenant=tenant, name="demo", revoked_at__isnull=True):
        revoke(old)
    key = issue_inference_key(tenant=tenant, name="demo").secret
    if not Deployment.objects.filter(tenant=tenant, name="chat").exists():
        fleet.create_deployment(
            tenant=tenant,
            name="chat",
            model_name="demo-chat",
            artifact_uri=DEMO_MODEL,
            replicas=1,
            runtime_options={"intra_op_threads": 1},
        )
    return key


def run_demo(*, host: str, port: int) -> int:
    data = settings.DATA_DIR
    print(f"Data directory: {data}")
    call_command("migrate", interactive=False, verbosity=0)
    accounts = seed_demo()
    key = _seed_fleet(accounts.tenant)
    bootstrap = create_bootstrap_token(name="demo agent").secret
    for signum in (signal.SIGINT, signal.SIGTERM):  # SIGINT too: it may arrive ignored
        signal.signal(signum, _interrupt)
    try:
        return _run(host, port, accounts, key, bootstrap)
    except KeyboardInterrupt:
        print("Stopped.")
        return 0


def _interrupt(*_: object) -> None:
    """Ctrl-C or SIGTERM, at any stage: unwind, so every started child is stopped."""
    raise KeyboardInterrupt


def _run(host: str, port: int, accounts: Any, key: str, bootstrap: str) -> int:
    base = f"http://{host}:{port}"
    data = settings.DATA_DIR
    logs = data / "logs"
    logs.mkdir(exist_ok=True)
    with _children() as procs:

        def spawn(name: str, argv: list[str]) -> None:
            with open(logs / f"{name}.log", "ab") as log:
                procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)

        spawn("web", processes.web(host, port))
        spawn("celery", processes.celery_worker(data / "celerybeat-schedule"))
        _wait("the control plane", lambda: _answers(f"{base}/api/schema/"), procs)
        spawn("agent", processes.agent(base, bootstrap, data / "agent", socket.gethostname()))
        print(
            "Control plane up; the agent is enrolling and starting the inference worker...",
            flush=True,
        )

        def serving() -> Replica | None:
            replica = (
                Replica.objects.filter(
                    deployment__tenant=accounts.tenant, deployment__name="chat", port__isnull=False
                )
                .select_related("node")
                .first()
            )
            up = replica and _answers(f"http://127.0.0.1:{replica.port}/health")
            return replica if up else None

        replica = _wait("the inference worker", serving, procs, timeout=300)
        worker = f"http://127.0.0.1:{replica.port}"
        print(
            "\nTailguard is up.\n"
            f"  Admin console   {base}/admin/\n"
            f"  REST API        {base}/api/v1/   (docs: {base}/api/docs/)\n"
            f"  Platform operator  {accounts.operator[0]} / {accounts.operator[1]}\n"
            f"  Tenant admin       {accounts.tenant_admin[0]} / {accounts.tenant_admin[1]}"
            f"   (tenant {accounts.tenant.slug})\n"
            f"  API token (tenant admin)  {accounts.api_token}\n"
            f"  Node {replica.node.hostname} runs deployment 'chat' (model demo-chat) at {worker}\n"
            f"  Inference key (tenant {accounts.tenant.slug})  {key}\n"
            f"  Try: curl -H 'Authorization: Bearer {accounts.api_token}' {base}/api/v1/nodes/\n"
            f"       curl {worker}/v1/chat/completions -H 'Authorization: Bearer {key}' "
            "-H 'Content-Type: application/json' "
            '-d \'{"model": "demo-chat", "messages": [{"role": "user", "content": "hi"}]}\'\n'
            f"  Logs: {logs}\n"
            "Press Ctrl-C to stop.",
            flush=True,
        )
        while True:
            for name, proc in procs.items():
                if proc.poll() is not None:
                    print(f"the {name} process exited with code {proc.returncode}; stopping")
                    return 1
            time.sleep(0.5)
