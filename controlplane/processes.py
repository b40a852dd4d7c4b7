"""Command lines of the control plane's own processes, shared by the demo, tests and benches."""

from __future__ import annotations

import sys
from pathlib import Path


def web(host: str, port: int, workers: int = 1) -> list[str]:
    """The ASGI server (HTTP API, console, agent endpoints)."""
    return [
        sys.executable,
        "-m",
        "uvicorn",
        "controlplane.asgi:application",
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--log-level",
        "warning",
    ]


def celery_worker(beat_schedule: Path) -> list[str]:
    """The Celery worker with beat embedded (periodic upkeep such as unreachable nodes)."""
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "controlplane",
        "worker",
        "-B",
        "--pool",
        "solo",
        "--loglevel",
        "warning",
        "-s",
        str(beat_schedule),
    ]


def agent(control_plane: str, bootstrap_token: str, state_dir: Path, hostname: str) -> list[str]:
    """A node agent for this machine."""
    return [
        sys.executable,
        "-m",
        "agent",
        "run",
        "--control-plane",
        control_plane,
        "--bootstrap-token",
        bootstrap_token,
        "--state-dir",
        str(state_dir),
        "--hostname",
        hostname,
    ]


def simulated_nodes(
    control_plane: str, bootstrap_token: str, state_dir: Path, count: int
) -> list[str]:
    """`count` lightweight simulated nodes in one process (scale without hardware)."""
    return [
        sys.executable,
        "-m",
        "agent",
        "--log-level",
        "WARNING",
        "simulate",
        "--count",
        str(count),
        "--control-plane",
        control_plane,
        "--bootstrap-token",
        bootstrap_token,
        "--state-dir",
        str(state_dir),
    ]
