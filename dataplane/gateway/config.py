"""The gateway's configuration: one JSON file per gateway process, started with
``python -m dataplane.gateway --config PATH`` (by the agent on the nodes the control plane
designates, agent/supervisor.py GatewaySupervisor, or by hand).

Each deployment names its replicas (the workers' base URLs and the nonces their
``/health`` must answer) and its tenants with the same ``TenantConfig`` the workers take:
the same key hashes, weights, priority classes and limits, which the gateway holds
fleet-wide. Rewriting the file (or SIGHUP) applies everything except ``RESTART_FIELDS``.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from dataplane.inference.config import (
    STATE_HEARTBEAT_S,
    Frozen,
    ServerConfig,
    SloThreshold,
    TenantConfig,
    check_keys_name_one_tenant,
)

NONCE_ENV = "TAILGUARD_GATEWAY_NONCE"
"""Carries a start's nonce, which /health answers, as the worker's does."""
RESTART_FIELDS = ("gateway_id", "host", "port", "announce", "counters_url")
# The shortest health interval: two of the worker's state heartbeats.
MIN_HEALTH_INTERVAL_S = 2 * STATE_HEARTBEAT_S


class ReplicaConfig(Frozen):
    """One worker serving the deployment."""

    replica_id: str = Field(min_length=1)
    base_url: str = Field(pattern=r"^https?://", description="e.g. http://10.0.0.5:8100")
    nonce: str | None = Field(
        default=None, description="what the worker's /health must answer; None: not checked"
    )
    peer_key: str | None = Field(
        default=None,
        description="its deployment's peer key, sent with everything sent to the worker: "
        "a worker on another node serves this gateway with it",
    )


class AdmissionConfig(Frozen):
    """How long requests may wait at the gateway, and how much may wait."""

    max_queue_len: int = Field(
        default=128, ge=1, description="requests per tenant waiting at this gateway before 429"
    )
    max_wait_s: float = Field(
        default=30.0, gt=0, description="a request still waiting after this gets 429"
    )
    queue_ahead: int = Field(
        default=0,
        ge=0,
        description="requests a replica may be sent beyond its free batch slots (0: the "
        "gateway holds every request no slot is free for, and orders them fleet-wide)",
    )


class DeploymentRoute(Frozen):
    """A deployment as the gateway serves it."""

    deployment_id: str = Field(min_length=1)
    served_model_name: str = Field(min_length=1)
    replicas: list[ReplicaConfig] = Field(default_factory=list)
    tenants: dict[str, TenantConfig] = Field(default_factory=dict)
    slo_thresholds: list[SloThreshold] = Field(
        default_factory=list,
        description="counted exactly at the gateway; a tenant's tightest ttft threshold is "
        "the objective its admission aims for",
    )
    admission: AdmissionConfig = AdmissionConfig()
    input_token_weight: float = Field(default=1.0, ge=0, allow_inf_nan=False)
    output_token_weight: float = Field(default=2.0, ge=0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _check(self) -> DeploymentRoute:
        ids = [r.replica_id for r in self.replicas]
        if len(ids) != len(set(ids)):
            raise ValueError(f"replica ids repeat in deployment {self.deployment_id!r}")
        check_keys_name_one_tenant(self.tenants)
        return self


class GatewayConfig(ServerConfig):
    """Everything one gateway process needs."""

    gateway_id: str = Field(min_length=1, description="names this gateway's leases")
    host: str = "127.0.0.1"
    port: int = Field(default=0, ge=0, le=65535, description="0: any free port, announced")
    announce: Path | None = Field(
        default=None, description="where to write the bound port, pid and nonce once listening"
    )
    counters_url: str | None = Field(
        default=None,
        pattern=r"^rediss?://",
        description="Redis shared by every gateway of these deployments; None: in-process "
        "counters (one gateway)",
    )
    deployments: list[DeploymentRoute] = Field(default_factory=list)
    worker_key: str | None = Field(
        default=None,
        description="bearer key for the workers' /v1/internal/state (their stats key); None "
        "when they serve it to loopback clients",
    )
    health_interval_s: float = Field(
        default=1.0,
        ge=MIN_HEALTH_INTERVAL_S,
        description="replica health checks and reconnects; a replica whose state stream is "
        "silent this long is down, so this stays well above the worker's state heartbeat "
        f"({STATE_HEARTBEAT_S} s)",
    )
    lease_ttl_s: float = Field(
        default=5.0, gt=0, description="a dead gateway's concurrency leases expire after this"
    )

    @model_validator(mode="after")
    def _models_unique(self) -> GatewayConfig:
        """A request names a model and its key a tenant: deployments may share a model
        name (different tenants' own `chat`), but no tenant may reach two of them."""
        serving: dict[tuple[str, str], str] = {}
        for d in self.deployments:
            for tenant in d.tenants:
                other = serving.setdefault((d.served_model_name, tenant), d.deployment_id)
                if other != d.deployment_id:
                    raise ValueError(
                        f"deployments {other} and {d.deployment_id} both serve model "
                        f"{d.served_model_name!r} to tenant {tenant}"
                    )
        ids = [d.deployment_id for d in self.deployments]
        if len(ids) != len(set(ids)):
            raise ValueError("deployment ids repeat")
        return self

    @classmethod
    def load(cls, path: Path) -> GatewayConfig:
        return cls.model_validate_json(path.read_bytes())

    def restart_fields_changed(self, other: GatewayConfig) -> list[str]:
        """Fields that differ between the two and only take effect in a new process."""
        return [name for name in RESTART_FIELDS if getattr(self, name) != getattr(other, name)]
