"""Real inference worker processes for tests and benchmarks.

``WorkerProcess`` writes a ``WorkerConfig`` JSON, starts ``python -m dataplane.inference``
on a free loopback port and waits for ``/health``; leaving the context stops it.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

REPO_ROOT = Path(__file__).resolve().parents[3]


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


class WorkerProcess:
    """A worker subprocess serving on 127.0.0.1 until the context exits."""

    def __init__(self, config: dict[str, Any], workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "worker.json"
        self.log_path = workdir / "worker.log"
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.write_config(config)
        self._proc: subprocess.Popen[bytes] | None = None

    def write_config(self, config: dict[str, Any]) -> None:
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(config))
        os.replace(tmp, self.config_path)

    def __enter__(self) -> WorkerProcess:
        log = self.log_path.open("wb")
        self._proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dataplane.inference",
                "--config",
                str(self.config_path),
                "--port",
                str(self.port),
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
                raise RuntimeError(f"worker exited: {self.log_path.read_text()}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"worker did not become healthy: {self.log_path.read_text()}")

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
        """Die at once, as a crash would."""
        assert self._proc is not None, "start the worker first"
        self._proc.kill()
        self._proc.wait()

    def signal_reload(self) -> None:
        assert self._proc is not None, "start the worker first"
        self._proc.send_signal(1)  # SIGHUP

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
