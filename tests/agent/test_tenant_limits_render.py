"""Tenant limits on the wire and in the worker config the agent renders from them."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from pydantic import ValidationError

from agent.protocol import ArtifactRef, Components, TenantServing, WorkerSpec, canonical_json
from agent.supervisor import render_config

TENANT = uuid.UUID(int=2)


def worker(*tenants: TenantServing) -> WorkerSpec:
    return WorkerSpec(
        replica_id=uuid.UUID(int=9),
        deployment_id=uuid.UUID(int=1),
        tenant_id=TENANT,
        model_name="tiny",
        artifact=ArtifactRef(uri="synthetic://tiny"),
        runtime_options={},
        gpu_indices=[],
        port=8001,
        max_batch_size=4,
        max_tokens_per_step=256,
        max_queue_delay_ms=0,
        max_queue_len=8,
        tenants=list(tenants),
    )


def test_limits_reach_the_worker_config_and_unset_ones_stay_off_the_wire() -> None:
    limited = TenantServing(
        tenant_id=TENANT,
        weight=0.5,
        priority=0,
        key_hashes=["a" * 64],
        max_concurrency=2,
        tokens_per_s=40.0,
        burst_tokens=80,
    )
    spec = worker(limited)
    config = render_config(spec, Components(workers=[spec]), Path("/m"), Path("/c"))
    tenant = config.tenants[str(TENANT)]
    assert (tenant.weight, tenant.priority, tenant.key_sha256) == (0.5, 0, ["a" * 64])
    assert (tenant.max_concurrency, tenant.tokens_per_s, tenant.burst_tokens) == (2, 40.0, 80)

    # A tenant without limits is the message earlier agents know, byte for byte.
    plain = TenantServing(tenant_id=TENANT, weight=1.0, priority=1, key_hashes=[])
    assert canonical_json(plain) == (
        b'{"key_hashes":[],"priority":1,"tenant_id":"%s","weight":1.0}' % str(TENANT).encode()
    )
    assert TenantServing.model_validate_json(canonical_json(plain)) == plain
    spec = worker(plain)
    tenant = render_config(spec, Components(workers=[spec]), Path("/m"), Path("/c")).tenants[
        str(TENANT)
    ]
    assert (tenant.max_concurrency, tenant.tokens_per_s, tenant.burst_tokens) == (None, None, None)


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"max_concurrency": 0}, "greater than or equal to 1"),
        ({"tokens_per_s": 0.0}, "greater than 0"),
        ({"burst_tokens": 10}, "set tokens_per_s too"),
    ],
)
def test_bad_limits_are_refused_by_name(fields: dict[str, object], words: str) -> None:
    with pytest.raises(ValidationError, match=words):
        TenantServing.model_validate(
            {"tenant_id": str(TENANT), "weight": 1.0, "priority": 0, "key_hashes": [], **fields}
        )


def test_tpot_sized_steps_reach_the_worker_config_and_stay_off_the_wire_when_off() -> None:
    plain = TenantServing(tenant_id=TENANT, weight=1.0, priority=0, key_hashes=[])
    off = worker(plain)
    assert b"tpot_steps" not in canonical_json(off)
    config = render_config(off, Components(workers=[off]), Path("/m"), Path("/c"))
    assert not config.scheduling.tpot_steps
    on = off.model_copy(update={"tpot_steps": True})
    assert b'"tpot_steps":true' in canonical_json(on)
    assert WorkerSpec.model_validate_json(canonical_json(on)) == on
    config = render_config(on, Components(workers=[on]), Path("/m"), Path("/c"))
    assert config.scheduling.tpot_steps and config.scheduling.policy == "fair"
