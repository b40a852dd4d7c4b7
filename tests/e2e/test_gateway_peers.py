"""One endpoint serves the whole deployment: two real agents (nodes sharing this machine)
each run a worker of a two-replica deployment and a gateway in front of it. Each gateway
reaches the other node's worker with the deployment's peer key, so a request entering one
node's gateway is served by the other node's worker while its own is stopped."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest

from controlplane.fleet.models import Replica
from controlplane.inventory.models import Node
from controlplane.inventory.services import create_bootstrap_token
from tests.e2e.stack import complete, deploy_tiny, running_stack, seed_tenant, wait_for

NODES = ("peer-a", "peer-b")


def up(gateway: str) -> set[str]:
    """The replicas the gateway has up."""
    try:
        health = httpx.get(f"{gateway}/health", timeout=5).json()
    except httpx.TransportError:
        return set()
    return {r["replica_id"] for d in health["deployments"] for r in d["replicas"] if r["up"]}


@pytest.mark.e2e
def test_each_gateway_serves_the_deployments_replicas_on_every_node(
    transactional_db: Any, tmp_path: Path, free_port: int, django_user_model: Any
) -> None:
    tenant, api, key = seed_tenant(django_user_model, free_port)
    # Both nodes' workers listen on this machine's loopback; advertising it reports them.
    with running_stack(tmp_path, free_port, TAILGUARD_AGENT_WORKER_ADVERTISE="127.0.0.1") as stack:
        token = create_bootstrap_token(name="e2e", uses=len(NODES)).secret
        for hostname in NODES:
            stack.start_agent(hostname, token)
        wait_for(
            lambda: Node.objects.filter(hostname__in=NODES, status="ready").count() == 2,
            60,
            "both agents to enroll",
        )
        deployment_id, _ = deploy_tiny(api, tenant, replicas=2)
        replicas = wait_for(
            lambda: (
                found
                if len(
                    found := list(
                        Replica.objects.filter(deployment_id=deployment_id)
                        .exclude(url="")
                        .select_related("node__report")
                    )
                )
                == 2
                and all(r.node.report.gateway_url for r in found)
                else None
            ),
            180,
            "both nodes to report their worker's address and their gateway",
        )
        assert {r.node.hostname for r in replicas} == set(NODES)  # spread, one per node
        everyone = {str(r.pk) for r in replicas}
        gateways = {r.node.hostname: r.node.report.gateway_url for r in replicas}
        assert sorted(api.get(f"/deployments/{deployment_id}/").json()["endpoints"]) == sorted(
            gateways.values()
        )
        # A new revision gives each gateway the other's replica; it takes it running.
        wait_for(
            lambda: all(up(url) == everyone for url in gateways.values()),
            120,
            "each gateway to have both replicas up",
        )

        # Node a's own worker stops answering: its gateway serves through node b's.
        (mine,) = [r for r in replicas if r.node.hostname == "peer-a"]
        record = tmp_path / "peer-a" / "workers" / str(mine.pk) / "process.json"
        pid = int(json.loads(record.read_text())["pid"])
        os.kill(pid, signal.SIGSTOP)
        try:
            wait_for(
                lambda: up(gateways["peer-a"]) == everyone - {str(mine.pk)},
                60,
                "node a's gateway to mark its own replica down",
            )
            complete(gateways["peer-a"], key)
        finally:
            os.kill(pid, signal.SIGCONT)
