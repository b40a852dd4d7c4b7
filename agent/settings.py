"""Agent settings: defaults, then a TOML file (`--config`), then TAILGUARD_AGENT_* environment
variables, then command-line flags, each overriding the ones before (pydantic-settings)."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

ENV_PREFIX = "TAILGUARD_AGENT_"


class AgentSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="forbid", frozen=True, use_attribute_docstrings=True
    )

    control_plane_url: str = "http://127.0.0.1:8000"
    state_dir: Path = Path("/var/lib/tailguard-agent")
    bootstrap_token: str | None = Field(None, repr=False)
    """Used once, to enroll; kept out of repr so logs never show it."""
    hostname: str = socket.gethostname()
    inventory_interval_s: float = Field(300.0, gt=0)
    resync_interval_s: float = Field(60.0, gt=0)
    """Pull the desired state this often even when no push arrived (level-triggered)."""
    sysfs_root: Path = Path("/sys")
    spdk_rpc_socket: str | None = None
    """spdk_tgt's JSON-RPC socket; set, storage runs on SPDK, unset on the local engine."""
    nvmf_listen_address: str = "0.0.0.0"
    """The address NVMe-oF exports listen on (an RDMA listener needs the port's own address)."""
    nvmf_listen_port: int = Field(4420, gt=0, le=65535)
    """The port they listen on: NVMe-oF's own by default; two targets on one host need two."""
    storage_report_interval_s: float = Field(30.0, gt=0)
    telemetry_interval_s: float = Field(1.0, gt=0)
    """One telemetry batch (gauges, latency sketches, SLO counts, usage) per interval."""
    telemetry_buffer_batches: int = Field(21600, ge=1)
    """Batches kept on disk while the control plane is away (6 h at 1 Hz); beyond it the
    oldest are dropped and counted."""
    metrics_port: int = Field(9810, ge=0, le=65535)
    """The agent's Prometheus endpoint; 0 turns it off."""
    metrics_bind_address: str = "127.0.0.1"
    keep_workers: bool = False
    """Leave inference workers serving when the agent stops, for the next agent to adopt
    (production, with systemd's KillMode=process): an agent restart drops no request."""
    worker_user: str | None = None
    """The account inference workers run as when the agent runs as root (an agent that is
    not root starts them as itself and ignores this). Unset: `tailguard-inference`, which the
    packages create (deploy/systemd/tailguard-agent.sysusers.conf, the agent's image), or
    `nobody` on a host without it, with a warning. A name with no account on the host stops
    the agent with an error naming this setting; `root` keeps workers root."""

    worker_host: Literal["127.0.0.1", "::1", "0.0.0.0", "::"] = "127.0.0.1"
    """The address inference workers listen on. Loopback (the default): they serve this
    node's gateway alone. A wildcard (every interface) lets the gateways of the
    deployment's other nodes reach them too, so any of its gateways serves all of its
    replicas; their live state then takes the deployment's peer key from elsewhere. The
    agent and the node's gateway still reach them over loopback."""
    worker_advertise: str | None = None
    """The host name other nodes reach the workers at; unset: `worker_host`, or this
    machine's name when that is a wildcard. Setting it reports the workers' addresses even
    while they listen on loopback (nodes sharing one machine)."""

    gateway_user: str | None = None
    """The account the node's gateway runs as when the agent runs as root. Unset:
    `tailguard-gateway` (the packages create it), else the workers' account, with a
    warning; `root` keeps it root."""
    gateway_host: str = "127.0.0.1"
    """The address the node's OpenAI gateway listens on (0.0.0.0: every interface), when the
    control plane has it run one."""
    gateway_advertise: str | None = None
    """The host name clients reach the gateway at, shown as the deployment's URL; unset:
    `gateway_host`, or this machine's name when that is a wildcard."""
    gateway_counters_url: str | None = Field(None, pattern=r"^rediss?://", repr=False)
    """Redis shared by every gateway of the fleet, so tenants' limits and shares hold across
    them; unset: the gateway keeps them itself, which holds while one gateway fronts each
    deployment."""

    @field_validator(
        "bootstrap_token",
        "spdk_rpc_socket",
        "worker_user",
        "gateway_user",
        "gateway_advertise",
        "worker_advertise",
        "gateway_counters_url",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        """`TAILGUARD_AGENT_SPDK_RPC_SOCKET=` unsets what the file set."""
        return None if value == "" else value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Only the values `load` merged: the file and the environment differ per call."""
        return (init_settings,)

    @classmethod
    def load(
        cls, path: Path | None = None, env: Mapping[str, str] = os.environ, **flags: Any
    ) -> AgentSettings:
        """The settings from the TOML file at `path`, the TAILGUARD_AGENT_* variables of
        `env` and `flags`; a ValueError names every unknown or malformed setting."""
        if path is not None and not path.is_file():
            raise FileNotFoundError(f"agent settings file {path} not found")
        values = {
            **TomlConfigSettingsSource(cls, toml_file=path)(),
            **_Environment(cls, env)(),
            **flags,
        }
        try:
            return cls(**values)
        except ValidationError as exc:
            raise ValueError(_explain(exc)) from None


class _Environment(EnvSettingsSource):
    """EnvSettingsSource over a given environment rather than always os.environ."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {name.lower(): value for name, value in self._environ.items()}


_EXPECTED = {"float": "a number", "int": "an integer", "string": "a string", "path": "a path"}
"""What a setting must be, by the first word of pydantic's error type (`float_parsing`)."""


def _explain(error: ValidationError) -> str:
    problems = error.errors(include_url=False)
    unknown = sorted(str(p["loc"][0]) for p in problems if p["type"] == "extra_forbidden")
    lines = [f"unknown agent settings: {', '.join(unknown)}"] if unknown else []
    for problem in problems:
        if problem["type"] == "extra_forbidden":
            continue
        name = ".".join(map(str, problem["loc"]))
        expected = _EXPECTED.get(problem["type"].split("_")[0])
        lines.append(
            f"setting {name} must be {expected}, not {problem['input']!r}"
            if expected
            else f"setting {name}: {problem['msg']} (got {problem['input']!r})"
        )
    return "; ".join(lines)
