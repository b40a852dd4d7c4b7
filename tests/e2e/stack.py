"""Real processes for end-to-end tests: the control plane (ASGI), its Celery worker with
beat, and node agents, all against the test database and the test Redis."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from django.db import connection

from controlplane import processes
from tests.agent.unprivileged import worker_interpreter

REPO = Path(__file__).resolve().parents[2]


def wait_for(predicate: Callable[[], Any], timeout: float = 60, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


class Stack:
    def __init__(self, tmp: Path, port: int, **env: str) -> None:
        db = connection.settings_dict
        self.url = f"http://127.0.0.1:{port}"
        self.tmp = tmp
        self.env = {
            **os.environ,
            "DATABASE_URL": f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}",
            "PYTHONUNBUFFERED": "1",
            "TAILGUARD_AGENT_METRICS_PORT": "0",  # no fixed port: stacks may run side by side
            **env,
        }
        self.port = port
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def spawn(self, name: str, argv: list[str], **env: str) -> subprocess.Popen[bytes]:
        with open(self.tmp / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(
                argv,
                cwd=REPO,
                env={**self.env, **env},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own group: stopping it stops its children too
            )
        self.procs[name] = proc
        return proc

    def start_control_plane(self) -> None:
        self.spawn("web", processes.web("127.0.0.1", self.port))
        self.spawn("celery", processes.celery_worker(self.tmp / "beat-schedule"))
        wait_for(self._answers, 60, "the control plane to answer")

    def _answers(self) -> bool:
        try:
            return httpx.get(f"{self.url}/api/schema/", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def start_agent(
        self, hostname: str, token: str, control_plane: str | None = None
    ) -> subprocess.Popen[bytes]:
        """An agent of this stack; `control_plane` reaches it another way (e.g. via a proxy).

        It runs on a Python its workers' unprivileged account can run too, when it is root."""
        argv = processes.agent(control_plane or self.url, token, self.tmp / hostname, hostname)
        interpreter = worker_interpreter()
        return self.spawn(hostname, [interpreter.python, *argv[1:]], **interpreter.env)

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        self.kill_group(proc)

    @staticmethod
    def kill_group(proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL a process and whatever it started (Celery's embedded beat, workers)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    def close(self) -> None:
        for name in list(self.procs):
            self.stop(name)


@contextmanager
def running_stack(tmp: Path, port: int, **env: str) -> Iterator[Stack]:
    stack = Stack(tmp, port, **env)
    try:
        stack.start_control_plane()
        yield stack
    finally:
        stack.close()


def seed_tenant(user_model: Any, port: int) -> tuple[Any, httpx.Client, str]:
    """Tenant `acme`, an API client of a platform admin for the stack on `port`, and an
    inference key of the tenant."""
    from controlplane.tenancy.services import create_tenant, issue_api_token, issue_inference_key

    tenant = create_tenant(slug="acme", name="Acme")
    admin = user_model.objects.create_user("ops", is_superuser=True)
    api = httpx.Client(
        headers={"Authorization": f"Bearer {issue_api_token(user=admin, name='e2e').secret}"},
        base_url=f"http://127.0.0.1:{port}/api/v1",
        timeout=30,
    )
    return tenant, api, issue_inference_key(tenant=tenant, name="e2e").secret


TINY_MODEL = "synthetic://tiny?layers=1&hidden=64&heads=2&kv_heads=2&vocab=320&max_context=256"


def deploy_tiny(api: httpx.Client, tenant: Any, replicas: int = 1) -> tuple[str, int]:
    """The tenant's deployment `tiny` of a tiny synthetic model (served as `tiny-chat`): its
    id, and the port its (first) worker listens on once its agent reported it."""
    created = api.post(
        "/deployments/",
        json={
            "tenant": str(tenant.pk),
            "name": "tiny",
            "model_name": "tiny-chat",
            "artifact_uri": TINY_MODEL,
            "replicas": replicas,
        },
    )
    assert created.status_code == 201, created.text
    deployment_id = created.json()["id"]
    port = wait_for(
        lambda: api.get("/replicas/", params={"deployment": deployment_id}).json()["results"][0][
            "port"
        ],
        180,
        "the agent to report where the worker listens",
    )
    return deployment_id, port


def complete(url: str, key: str) -> None:
    """A short completion of `tiny-chat` at `url` that must succeed."""
    response = httpx.post(
        f"{url}/v1/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": "tiny-chat", "prompt": "hello", "max_tokens": 3, "ignore_eos": True},
        timeout=60,
    )
    assert response.status_code == 200, response.text
