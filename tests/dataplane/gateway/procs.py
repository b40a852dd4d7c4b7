"""Real gateway processes for tests and benchmarks.

``GatewayProcess`` writes a ``GatewayConfig`` JSON with port 0 and an announce file,
starts ``python -m dataplane.gateway`` and waits until it listens and every replica it
names is up, as its ``/health`` says; leaving the context stops it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx

from tests.dataplane.inference.procs import WorkerProcess, key_hash
from tests.dataplane.procs import ServerProcess


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


class GatewayProcess(ServerProcess):
    """A gateway subprocess on a port of its choosing until the context exits."""

    module = "dataplane.gateway"
    name = "gateway"

    def __init__(self, config: dict[str, Any], workdir: Path) -> None:
        self.announce = workdir / "gateway.endpoint"
        self.base_url = ""
        super().__init__(config, workdir)

    def write_config(self, config: dict[str, Any]) -> None:
        super().write_config({**config, "announce": str(self.announce)})

    def start(self) -> None:
        self.announce.unlink(missing_ok=True)
        super().start()

    def ready(self) -> bool:
        """Listening, and every replica it names up, as its ``/health`` says."""
        if not self.announce.exists():
            return False
        port = json.loads(self.announce.read_text())["port"]
        self.base_url = f"http://127.0.0.1:{port}"
        return self.all_up()

    def all_up(self) -> bool:
        return all(r["up"] for r in self.replicas())

    def replicas(self) -> list[dict[str, Any]]:
        health = httpx.get(f"{self.base_url}/health", timeout=5).json()
        return [r for d in health["deployments"] for r in d["replicas"]]
