"""Agent settings: a TOML file, overridden by TAILGUARD_AGENT_* environment variables."""

from __future__ import annotations

import os
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

ENV_PREFIX = "TAILGUARD_AGENT_"


@dataclass(frozen=True)
class AgentSettings:
    control_plane_url: str = "http://127.0.0.1:8000"
    state_dir: Path = Path("/var/lib/tailguard-agent")
    bootstrap_token: str | None = None
    hostname: str = socket.gethostname()
    inventory_interval_s: float = 300.0
    resync_interval_s: float = 60.0
    """Pull the desired state this often even when no push arrived (level-triggered)."""
    sysfs_root: Path = Path("/sys")
    spdk_rpc_socket: str | None = None
    """spdk_tgt's JSON-RPC socket; set, storage runs on SPDK, unset on the local engine."""
    nvmf_listen_address: str = "0.0.0.0"
    """The address NVMe-oF exports listen on (an RDMA listener needs the port's own address)."""
    storage_report_interval_s: float = 30.0
    telemetry_interval_s: float = 1.0
    """One telemetry batch (gauges, latency sketches, SLO counts, usage) per interval."""
    telemetry_buffer_batches: int = 21600
    """Batches kept on disk while the control plane is away (6 h at 1 Hz); beyond it the
    oldest are dropped and counted."""
    metrics_port: int = 9810
    """The agent's Prometheus endpoint; 0 turns it off."""
    metrics_bind_address: str = "127.0.0.1"

    @classmethod
    def load(cls, path: Path | None = None, env: Mapping[str, str] = os.environ) -> AgentSettings:
        values: dict[str, object] = {}
        if path is not None:
            with path.open("rb") as handle:
                values.update(tomllib.load(handle))
        for field in fields(cls):
            raw = env.get(ENV_PREFIX + field.name.upper())
            if raw is not None:
                values[field.name] = raw
        known = {f.name: f for f in fields(cls)}
        unknown = set(values) - set(known)
        if unknown:
            raise ValueError(f"unknown agent settings: {', '.join(sorted(unknown))}")
        defaults = cls()
        coerced: dict[str, Any] = {
            name: _coerce(getattr(defaults, name), value, name) for name, value in values.items()
        }
        return replace(defaults, **coerced)


def _coerce(default: object, value: object, name: str) -> object:
    if isinstance(default, Path):
        return Path(str(value))
    if isinstance(default, int):
        try:
            return int(str(value))
        except ValueError:
            raise ValueError(f"setting {name} must be an integer, not {value!r}") from None
    if isinstance(default, float):
        try:
            return float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise ValueError(f"setting {name} must be a number, not {value!r}") from None
    return None if value in ("", None) else str(value)
