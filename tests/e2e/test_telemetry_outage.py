"""Telemetry survives a control-plane outage: the agent buffers on disk and backfills.

A real agent runs a real worker under steady load; the control plane (web and Celery)
is stopped for 30 s and started again. Every request the load generator saw succeed is
then counted exactly once in the rollups, and the node's stored sequence numbers have
no gap and no duplicate.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from django.db.models import Sum

from controlplane.inventory.models import Node
from controlplane.inventory.services import create_bootstrap_token
from controlplane.telemetry.models import CounterRollup, NodeStream
from tests.e2e.stack import deploy_tiny, running_stack, seed_tenant, wait_for

OUTAGE_S = 30


class Load(threading.Thread):
    """Sequential completions against one worker; counts the ones that succeeded."""

    def __init__(self, url: str, key: str) -> None:
        super().__init__(daemon=True)
        self.url, self.key = url, key
        self.succeeded = 0
        self.stopping = threading.Event()

    def run(self) -> None:
        with httpx.Client(headers={"Authorization": f"Bearer {self.key}"}, timeout=30) as http:
            while not self.stopping.is_set():
                response = http.post(
                    f"{self.url}/v1/completions",
                    json={"model": "tiny-chat", "prompt": "hello", "max_tokens": 4},
                )
                if response.status_code == 200:
                    self.succeeded += 1


def completed(deployment_id: str) -> int:
    rows = CounterRollup.objects.filter(
        resolution=10, deployment_id=deployment_id, name="completed"
    )
    return rows.aggregate(n=Sum("value"))["n"] or 0


@pytest.mark.e2e
def test_every_batch_arrives_after_a_30_s_outage(
    transactional_db: Any, tmp_path: Path, free_port: int, django_user_model: Any
) -> None:
    tenant, api, key = seed_tenant(django_user_model, free_port)

    with running_stack(tmp_path, free_port) as stack:
        stack.start_agent("outage-node", create_bootstrap_token(name="e2e").secret)
        node = wait_for(
            lambda: Node.objects.filter(hostname="outage-node", status="ready").first(),
            60,
            "the agent to enroll",
        )
        deployment_id, port = deploy_tiny(api, tenant)
        worker = f"http://127.0.0.1:{port}"
        wait_for(lambda: _healthy(worker), 120, "the worker to serve")

        load = Load(worker, key)
        load.start()
        wait_for(lambda: completed(deployment_id) > 0, 60, "telemetry to flow")

        stack.stop("web")
        stack.stop("celery")
        time.sleep(OUTAGE_S)
        stack.start_control_plane()
        time.sleep(3)
        load.stopping.set()
        load.join(timeout=60)
        assert load.succeeded > 0

        wait_for(
            lambda: completed(deployment_id) == load.succeeded,
            120,
            f"all {load.succeeded} completions to be counted (now {completed(deployment_id)})",
        )
        time.sleep(3)  # nothing more may arrive: each request counted exactly once
        assert completed(deployment_id) == load.succeeded
        stream = NodeStream.objects.get(node=node)
        assert stream.seen_above == []
        assert stream.last_seq == stream.batches, "a sequence number is missing or repeated"
        assert stream.batches >= OUTAGE_S


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False
