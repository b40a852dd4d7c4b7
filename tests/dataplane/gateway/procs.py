"""Real gateway processes for tests and benchmarks.

``GatewayProcess`` writes a ``GatewayConfig`` JSON with port 0 and an announce file,
starts ``python -m dataplane.gateway`` and waits until it listens and every replica it
names is up, as its ``/health`` says; leaving the context stops it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from tests.dataplane.inference.procs import REPO_ROOT, WorkerProcess, key_hash


def gateway_config(
    gateway_id: str,
    workers: dict[str, WorkerProcess],
    tenants: dict[str, dict[str, Any]],
    keys: dict[str, str],
    **overrides: Any,
) -> dict[str, Any]:
    """One deployment, model "synthetic", over ``workers`` (replica id -> process);
    ``tenants`` maps names to TenantConfig fields, ``keys`` names to their keys."""
    deployment: dict[str, Any] = {
        "deployment_id": "dep-test",
        "served_model_name": "synthetic",
        "replicas": [
            {"replica_id": rid, "base_url": worker.base_url} for rid, worker in workers.items()
        ],
        "tenants": {
            name: {**fields, "key_sha256": [key_hash(keys[name])]}
            for name, fields in tenants.items()
        },
    }
    deployment.update(overrides.pop("deployment", {}))
    return {"gateway_id": gateway_id, "deployments": [deployment], **overrides}


class GatewayProcess:
    """A gateway subprocess on a port of its choosing until the context exits."""

    def __init__(self, config: dict[str, Any], workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.config_path = workdir / "gateway.json"
        self.announce = workdir / "gateway.endpoint"
        self.log_path = workdir / "gateway.log"
        self.base_url = ""
        self.write_config(config)
        self._proc: subprocess.Popen[bytes] | None = None

    def write_config(self, config: dict[str, Any]) -> None:
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({**config, "announce": str(self.announce)}))
        os.replace(tmp, self.config_path)

    def __enter__(self) -> GatewayProcess:
        self.start()
        return self

    def start(self) -> None:
        self.announce.unlink(missing_ok=True)
        log = self.log_path.open("ab")
        self._proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dataplane.gateway",
                "--config",
                str(self.config_path),
                "--log-level",
                "warning",
            ],
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"gateway exited: {self.log_path.read_text()}")
            if self.announce.exists():
                port = json.loads(self.announce.read_text())["port"]
                self.base_url = f"http://127.0.0.1:{port}"
                try:
                    if self.all_up():
                        return
                except httpx.HTTPError:
                    pass
            time.sleep(0.1)
        raise RuntimeError(f"gateway did not see its replicas up: {self.log_path.read_text()}")

    def all_up(self) -> bool:
        return all(r["up"] for r in self.replicas())

    def replicas(self) -> list[dict[str, Any]]:
        health = httpx.get(f"{self.base_url}/health", timeout=5).json()
        return [r for d in health["deployments"] for r in d["replicas"]]

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()

    def kill(self) -> None:
        """Die at once, as a crash would: no lease is given back."""
        assert self._proc is not None, "start the gateway first"
        self._proc.send_signal(signal.SIGKILL)
        self._proc.wait()
