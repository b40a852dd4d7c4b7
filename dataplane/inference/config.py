"""The inference worker's configuration: the JSON file the agent writes.

The agent renders one ``WorkerConfig`` per worker from the control plane's desired state
and starts ``python -m dataplane.inference --config PATH``. Rewriting the file (or
sending SIGHUP) applies new keys, tenants and their limits, batching knobs, scheduling
policy and SLO thresholds without dropping requests in flight; the fields under
``RESTART_FIELDS`` need a new process.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SloMetric = Literal["ttft", "tpot", "itl", "e2e", "queue"]
Policy = Literal["fair", "fcfs"]

_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
# How often an idle state stream (GET /v1/internal/state) sends a message anyway.
STATE_HEARTBEAT_S = 0.5
RESTART_FIELDS = ("deployment_id", "served_model_name", "model_dir", "cache_dir", "runtime")


class Frozen(BaseModel):
    """A config model: immutable, unknown fields refused."""

    model_config = ConfigDict(frozen=True, extra="forbid")


def check_hashes(hashes: list[str]) -> list[str]:
    for digest in hashes:
        if not _SHA256_HEX.match(digest):
            raise ValueError("key hashes are lowercase sha256 hex digests (64 characters)")
    return hashes


class TenantConfig(Frozen):
    """A tenant's share of the worker, its limits, and the API keys that name it.

    The limits hold under either policy (the scheduler's module docstring states the exact
    rules); None means unlimited. All of them apply on reload, to requests already
    running too.
    """

    weight: float = Field(
        default=1.0, gt=0, allow_inf_nan=False, description="share of tokens under fair queuing"
    )
    priority: int = Field(default=0, description="higher classes are served first")
    key_sha256: list[str] = Field(default_factory=list, description="sha256 hex of each key")
    max_concurrency: int | None = Field(
        default=None, ge=1, description="requests holding a batch slot at once"
    )
    tokens_per_s: float | None = Field(
        default=None, gt=0, allow_inf_nan=False, description="output tokens per second"
    )
    burst_tokens: int | None = Field(
        default=None,
        ge=1,
        description="token bucket size; default one second's worth of tokens_per_s",
    )

    _hashes = field_validator("key_sha256")(check_hashes)

    @model_validator(mode="after")
    def _burst_needs_rate(self) -> TenantConfig:
        if self.burst_tokens is not None and self.tokens_per_s is None:
            raise ValueError("burst_tokens sizes the tokens_per_s bucket; set tokens_per_s too")
        return self

    @property
    def bucket_tokens(self) -> int:
        """The bucket's capacity: ``burst_tokens``, else one second's worth (at least 1)."""
        if self.burst_tokens is not None:
            return self.burst_tokens
        return max(1, math.ceil(self.tokens_per_s or 0))


def check_keys_name_one_tenant(tenants: Mapping[str, TenantConfig]) -> None:
    """Each key hash names one tenant."""
    seen: dict[str, str] = {}
    for tenant, cfg in tenants.items():
        for digest in cfg.key_sha256:
            if digest in seen:
                raise ValueError(
                    f"key hash {digest[:12]}... names both {seen[digest]!r} and {tenant!r}"
                )
            seen[digest] = tenant


class SloThreshold(Frozen):
    """One latency objective to count exactly: good means value <= threshold."""

    tenant: str
    metric: SloMetric
    threshold_seconds: float = Field(gt=0)


class BatchingConfig(Frozen):
    """Continuous batching knobs."""

    max_batch_size: int = Field(default=32, ge=1, description="sequences decoded together")
    max_tokens_per_step: int = Field(
        default=512, ge=1, description="decode tokens + prompt tokens one step may process"
    )
    max_queue_delay_ms: float = Field(
        default=0.0,
        ge=0,
        description="when idle, wait this long for more arrivals to prefill together",
    )
    max_queue_len: int = Field(
        default=128, ge=1, description="waiting requests per tenant before 429"
    )
    max_rows_per_forward: int = Field(
        default=16,
        ge=0,
        description="decode the batch in forward calls of at most this many rows, grouped "
        "by length (0: one call); on a CPU smaller calls pad less and stay in "
        "cache, on a GPU one call is usually best",
    )


class SchedulingConfig(Frozen):
    """Who goes next: ``fair`` (virtual token counters + priority) or ``fcfs``."""

    policy: Policy = "fair"
    preemption: bool = Field(
        default=True, description="fair policy may pause a running request of an over-served tenant"
    )
    input_token_weight: float = Field(default=1.0, ge=0, allow_inf_nan=False)
    output_token_weight: float = Field(default=2.0, ge=0, allow_inf_nan=False)
    tpot_steps: bool = Field(
        default=False,
        description="size each step to the tightest TPOT SLO threshold of the tenants with "
        "requests running or waiting (held for a mean request's steps after their last): rows "
        "beyond what it leaves beside their prompts' time wait (paused only where their decode "
        "alone overruns it, never those of the tenants it protects), and prompt chunks are "
        "paid from the time steps leave unused",
    )


class RuntimeConfig(Frozen):
    """ONNX Runtime session settings."""

    intra_op_threads: int = Field(default=0, ge=0, description="0 lets ONNX Runtime choose")
    allow_spinning: bool = False
    max_context: int | None = Field(
        default=None,
        ge=1,
        description="longest sequence (prompt + completion) in tokens, and so the length "
        "of every in-place KV slot; None: the model's own (at most 32768 where the KV cache "
        "is written in place); never more than the model's. Longer requests get a 400",
    )


class ServerConfig(Frozen):
    """What each of the data plane's HTTP servers (the worker, the gateway) takes: its
    request size limit, and the keys that may read its internal endpoints."""

    max_request_bytes: int = Field(default=1 << 20, ge=1024)
    stats_key_sha256: list[str] = Field(
        default_factory=list,
        description="keys allowed to read /v1/internal/stats; empty means loopback only",
    )

    _hashes = field_validator("stats_key_sha256")(check_hashes)


class WorkerConfig(ServerConfig):
    """Everything one inference worker process needs."""

    deployment_id: str = Field(min_length=1)
    served_model_name: str = Field(min_length=1)
    model_dir: Path
    cache_dir: Path
    batching: BatchingConfig = BatchingConfig()
    scheduling: SchedulingConfig = SchedulingConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    tenants: dict[str, TenantConfig] = Field(default_factory=dict)
    slo_thresholds: list[SloThreshold] = Field(default_factory=list)
    peer_key_sha256: list[str] = Field(
        default_factory=list,
        description="peer keys: other nodes' gateways reach the worker with one, from anywhere",
    )
    peers_only: bool = Field(
        default=False,
        description="other hosts are served only with a peer key, none while there is none "
        "(the agent's workers); False: any client with a tenant key (a worker run by hand)",
    )

    _peer_hashes = field_validator("peer_key_sha256")(check_hashes)

    @model_validator(mode="after")
    def _keys_name_one_tenant(self) -> WorkerConfig:
        check_keys_name_one_tenant(self.tenants)
        return self

    @classmethod
    def load(cls, path: Path) -> WorkerConfig:
        return cls.model_validate_json(path.read_bytes())

    def restart_fields_changed(self, other: WorkerConfig) -> list[str]:
        """Fields that differ between the two and only take effect in a new process."""
        return [name for name in RESTART_FIELDS if getattr(self, name) != getattr(other, name)]
