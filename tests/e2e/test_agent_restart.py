"""An agent restarted under load (an upgrade, a crash) drops no request: with keep_workers
its inference workers serve on, and the next agent adopts them instead of replacing them."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.privileges import worker_account
from controlplane.fleet.models import Replica
from controlplane.inventory.services import create_bootstrap_token
from tests.agent.unprivileged import process_ids
from tests.e2e.stack import deploy_tiny, running_stack, seed_tenant, wait_for


class Load:
    """One client sending completions back to back until stopped; every status kept."""

    def __init__(self, url: str, key: str) -> None:
        self.statuses: list[int | str] = []
        self._url, self._key = url, key
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=120)

    def _run(self) -> None:
        body = {"model": "tiny-chat", "prompt": "hello", "max_tokens": 8, "ignore_eos": True}
        with httpx.Client(headers={"Authorization": f"Bearer {self._key}"}, timeout=60) as http:
            while not self._stop.is_set():
                try:
                    self.statuses.append(http.post(self._url, json=body).status_code)
                except httpx.TransportError as exc:
                    self.statuses.append(type(exc).__name__)


@pytest.mark.e2e
def test_an_agent_restarted_under_load_fails_no_request(
    transactional_db: Any, tmp_path: Path, free_port: int, django_user_model: Any
) -> None:
    tenant, api, key = seed_tenant(django_user_model, free_port)
    bootstrap = create_bootstrap_token(name="e2e").secret
    try:
        with running_stack(tmp_path, free_port, TAILGUARD_AGENT_KEEP_WORKERS="true") as stack:
            stack.start_agent("e2e-node", bootstrap)
            deployment_id, port = deploy_tiny(api, tenant)
            (endpoint,) = wait_for(
                lambda: api.get(f"/deployments/{deployment_id}/").json()["endpoints"],
                60,
                "the node's gateway",
            )
            gateway = tmp_path / "e2e-node" / "gateway" / "process.json"
            gateway_pid = json.loads(gateway.read_text())["pid"]
            replica = Replica.objects.get(port=port)
            record = tmp_path / "e2e-node" / "workers" / str(replica.pk) / "process.json"
            pid = json.loads(record.read_text())["pid"]
            account = worker_account(None)  # a root agent's worker runs unprivileged
            if account is not None:
                assert process_ids(pid) == (account.uid, account.gid)
            with (
                Load(f"http://127.0.0.1:{port}/v1/completions", key) as load,
                Load(f"{endpoint}/v1/completions", key) as through_gateway,
            ):
                loads = (load, through_gateway)

                def sent() -> int:
                    return min(len(each.statuses) for each in loads)

                wait_for(lambda: sent() >= 3, 60, "the load to run")
                stack.stop("e2e-node")  # SIGTERM; its worker and gateway keep serving
                alone = sent()
                wait_for(lambda: sent() >= alone + 3, 60, "requests, agentless")
                stack.start_agent("e2e-node", bootstrap)
                wait_for(
                    lambda: all(
                        f"adopted {kind} pid" in stack.log("e2e-node")
                        for kind in ("worker", "gateway")
                    ),
                    120,
                    "the new agent to adopt the worker and the gateway",
                )
                adopted = sent()
                wait_for(lambda: sent() >= adopted + 3, 60, "requests, adopted")
            for each in loads:
                assert each.statuses and set(each.statuses) == {200}, each.statuses
            assert json.loads(record.read_text())["pid"] == pid  # one process throughout
            assert json.loads(gateway.read_text())["pid"] == gateway_pid
    finally:  # workers live in sessions of their own: stopping the agents leaves them
        for worker in _started_under(tmp_path):
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker, signal.SIGKILL)


def _started_under(directory: Path) -> list[int]:
    """Processes whose command line names `directory`: this test's workers and gateway,
    whichever agent started them."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if str(directory).encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
    return found
