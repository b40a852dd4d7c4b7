"""WorkerStats against a real inference worker process: windows are taken exactly once."""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import httpx
import pytest

from agent.gauges import AppliedComponents, WorkerStats
from agent.protocol import ArtifactRef, Components, SloThreshold, TenantServing, WorkerSpec
from dataplane.inference.synthetic import write_synthetic_model
from tests.agent.samples import DEPLOYMENT, REPLICA, SLO, TENANT
from tests.dataplane.inference.conftest import TEST_MODEL
from tests.dataplane.inference.procs import WorkerProcess, key_hash, worker_config

KEY = "tgi_worker_stats_test_key_0001"


@dataclass
class Running:
    spec: WorkerSpec
    url: str


@dataclass
class Supervised:
    workers: Mapping[uuid.UUID, Running]


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    root = tmp_path_factory.mktemp("worker")
    write_synthetic_model(root / "model", TEST_MODEL)
    config = worker_config(
        root / "model",
        root / "cache",
        {str(TENANT): KEY},
        deployment_id=str(DEPLOYMENT),
        slo_thresholds=[{"tenant": str(TENANT), "metric": "ttft", "threshold_seconds": 30.0}],
    )
    with WorkerProcess(config, root / "run") as proc:
        yield proc


def spec(port: int) -> WorkerSpec:
    return WorkerSpec(
        replica_id=REPLICA,
        deployment_id=DEPLOYMENT,
        tenant_id=TENANT,
        model_name="synthetic",
        artifact=ArtifactRef(uri="synthetic://test"),
        runtime_options={},
        gpu_indices=[],
        port=port,
        max_batch_size=4,
        max_tokens_per_step=64,
        max_queue_delay_ms=0,
        max_queue_len=8,
        tenants=[
            TenantServing(tenant_id=TENANT, weight=1.0, priority=0, key_hashes=[key_hash(KEY)])
        ],
    )


async def test_worker_windows_are_taken_once_and_mapped_to_slo_ids(worker: WorkerProcess) -> None:
    applied = AppliedComponents()
    applied.components = Components(
        slo_thresholds=[
            SloThreshold(
                slo_id=SLO,
                tenant_id=TENANT,
                deployment_id=DEPLOYMENT,
                metric="ttft",
                threshold_seconds=30.0,
            )
        ]
    )
    async with httpx.AsyncClient(timeout=30) as http:
        for _ in range(2):
            response = await http.post(
                f"{worker.base_url}/v1/completions",
                headers={"Authorization": f"Bearer {KEY}"},
                json={
                    "model": "synthetic",
                    "prompt": "count me",
                    "max_tokens": 4,
                    "ignore_eos": True,
                },
            )
            assert response.status_code == 200, response.text
        source = Supervised({REPLICA: Running(spec(worker.port), worker.base_url)})
        collector = WorkerStats(source, applied, http)

        first = await collector.collect({})
        (cursor,) = first.cursors.values() if first.cursors else ()
        assert cursor.endswith(":1")
        ttft = next(s for s in first.series if s.metric == "ttft")
        assert [(c.slo_id, c.good, c.total) for c in ttft.thresholds] == [(SLO, 2, 2)]
        assert [(u.completed, u.failed) for u in first.usage] == [(2, 0)]
        assert set(first.gauges) == {
            f"worker.{DEPLOYMENT}.queue_depth",
            f"worker.{DEPLOYMENT}.running",
        }

        # The batch holding that window was never stored: the same window comes again.
        again = await collector.collect({})
        assert again.cursors == first.cursors and again.usage == first.usage

        # Stored: the next collect continues after it and counts nothing twice.
        after = await collector.collect({str(REPLICA): cursor})
        assert after.cursors == {str(REPLICA): cursor.replace(":1", ":2")}
        assert after.series == [] and after.usage == []

        # A worker that does not answer keeps its cursor and contributes nothing.
        gone = WorkerStats(
            Supervised({REPLICA: Running(spec(worker.port), "http://127.0.0.1:9")}), applied, http
        )
        silent = await gone.collect({str(REPLICA): cursor})
        assert silent.cursors == {str(REPLICA): cursor} and silent.series == []
