"""An SLO counts requests where it says it is measured: a real agent runs a worker and the
node's gateway in front of it, and requests sent through the gateway count for both a
gateway-measured and a worker-measured SLO, requests sent to the worker directly only for
the worker-measured one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from django.db.models import Sum

from controlplane.inventory.models import Node
from controlplane.inventory.services import create_bootstrap_token
from controlplane.slo.services import create_slo
from controlplane.telemetry.models import SloRollup
from tests.e2e.stack import complete, deploy_tiny, running_stack, seed_tenant, wait_for

THROUGH_GATEWAY = 6
DIRECT = 4


def events(slo_id: Any) -> int:
    rows = SloRollup.objects.filter(slo_id=slo_id, resolution=10)
    return int(rows.aggregate(n=Sum("total"))["n"] or 0)


@pytest.mark.e2e
def test_slos_count_requests_where_they_are_measured(
    transactional_db: Any, tmp_path: Path, free_port: int, django_user_model: Any
) -> None:
    tenant, api, key = seed_tenant(django_user_model, free_port)
    with running_stack(tmp_path, free_port) as stack:
        stack.start_agent("gateway-node", create_bootstrap_token(name="e2e").secret)
        wait_for(
            lambda: Node.objects.filter(hostname="gateway-node", status="ready").exists(),
            60,
            "the agent to enroll",
        )
        # defined before the deployment, so its worker and gateway start counting them
        slos = {
            where: create_slo(
                tenant=tenant,
                name=f"ttft-{where}",
                sli="ttft",
                threshold_seconds=30.0,
                objective=0.99,
                measured_at=where,
            )
            for where in ("worker", "gateway")
        }
        deployment_id, port = deploy_tiny(api, tenant)
        (endpoint,) = wait_for(
            lambda: api.get(f"/deployments/{deployment_id}/").json()["endpoints"],
            60,
            "the gateway's address",
        )
        for _ in range(THROUGH_GATEWAY):
            complete(endpoint, key)
        for _ in range(DIRECT):
            complete(f"http://127.0.0.1:{port}", key)
        wait_for(
            lambda: (
                events(slos["worker"].pk) >= THROUGH_GATEWAY + DIRECT
                and events(slos["gateway"].pk) >= THROUGH_GATEWAY
            ),
            60,
            "both SLOs' counts",
        )
        assert events(slos["worker"].pk) == THROUGH_GATEWAY + DIRECT
        assert events(slos["gateway"].pk) == THROUGH_GATEWAY  # the direct ones never passed it
