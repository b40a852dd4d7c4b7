"""Real inference worker processes for tests and benchmarks.

``WorkerProcess`` writes a ``WorkerConfig`` JSON, starts ``python -m dataplane.inference``
on a free loopback port and waits for ``/health``; leaving the context stops it
(``tests/dataplane/procs.py``).
"""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx

from tests.dataplane.procs import ServerProcess


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def worker_config(
    model_dir: Path, cache_dir: Path, tenants: Mapping[str, str | list[str]], **overrides: Any
) -> dict[str, Any]:
    """A config dict serving ``model_dir`` as model "synthetic"; tenants map to keys."""
    config: dict[str, Any] = {
        "deployment_id": "dep-test",
        "served_model_name": "synthetic",
        "model_dir": str(model_dir),
        "cache_dir": str(cache_dir),
        "tenants": {
            name: {"key_sha256": [key_hash(k) for k in ([keys] if isinstance(keys, str) else keys)]}
            for name, keys in tenants.items()
        },
    }
    config.update(overrides)
    return config


class WorkerProcess(ServerProcess):
    """A worker subprocess serving on 127.0.0.1 until the context exits."""

    module = "dataplane.inference"
    name = "worker"

    def __init__(self, config: dict[str, Any], workdir: Path) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        super().__init__(config, workdir)

    def arguments(self) -> list[str]:
        return ["--port", str(self.port)]

    def ready(self) -> bool:
        return httpx.get(f"{self.base_url}/health", timeout=1).status_code == 200

    def health(self) -> dict[str, Any]:
        response = httpx.get(f"{self.base_url}/health", timeout=5)
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        return body

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the Prometheus samples called ``name`` whose labels include ``labels``."""
        text = httpx.get(f"{self.base_url}/metrics", timeout=5).text
        total = 0.0
        for line in text.splitlines():
            if not line.startswith(name) or line.startswith("#"):
                continue
            series, _, value = line.rpartition(" ")
            metric_name, _, label_text = series.partition("{")
            if metric_name != name:
                continue
            if all(f'{k}="{v}"' in label_text for k, v in labels.items()):
                total += float(value)
        return total
