"""The worker supervisor with real worker processes: start, reconfigure, restart, stop."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import socket
import uuid
from pathlib import Path

import httpx
import pytest

from agent.protocol import ArtifactRef, Components, TenantServing, WorkerSpec
from agent.supervisor import ManagedWorker, SupervisorSettings, WorkerSupervisor, render_config

TINY = "synthetic://tiny?layers=1&hidden=64&heads=2&kv_heads=2&vocab=320&max_context=256"
KEY_HASH = "a" * 64


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def spec(port: int, replica: uuid.UUID, max_batch_size: int = 4) -> WorkerSpec:
    return WorkerSpec(
        replica_id=replica,
        deployment_id=uuid.UUID(int=1),
        tenant_id=uuid.UUID(int=2),
        model_name="tiny",
        artifact=ArtifactRef(uri=TINY),
        runtime_options={"intra_op_threads": 1},
        gpu_indices=[],
        port=port,
        max_batch_size=max_batch_size,
        max_tokens_per_step=256,
        max_queue_delay_ms=0,
        max_queue_len=8,
        tenants=[
            TenantServing(tenant_id=uuid.UUID(int=2), weight=1.0, priority=0, key_hashes=[KEY_HASH])
        ],
    )


async def health(port: int) -> dict[str, object]:
    async with httpx.AsyncClient() as http:
        return (await http.get(f"http://127.0.0.1:{port}/health", timeout=5)).json()  # type: ignore[no-any-return]


async def test_workers_follow_the_desired_state(tmp_path: Path) -> None:
    supervisor = WorkerSupervisor(
        SupervisorSettings(
            work_dir=tmp_path, health_interval_s=0.2, backoff_initial_s=0.2, ready_timeout_s=120
        )
    )
    replica, port = uuid.uuid4(), free_port()
    try:
        results = await supervisor.apply(Components(workers=[spec(port, replica)]))
        assert [r.ok for r in results] == [True], results
        worker = supervisor.workers[replica]
        first_pid = worker._process.pid if worker._process else None  # noqa: SLF001
        assert (await health(port))["max_batch_size"] == 4

        # A knob change is a reload of the same process, not a restart.
        results = await supervisor.apply(Components(workers=[spec(port, replica, 8)]))
        assert results[0].ok
        for _ in range(50):
            if (await health(port))["max_batch_size"] == 8:
                break
            await asyncio.sleep(0.1)
        assert (await health(port))["max_batch_size"] == 8
        assert worker._process and worker._process.pid == first_pid  # noqa: SLF001

        # A worker that dies is started again.
        assert first_pid is not None
        os.kill(first_pid, signal.SIGKILL)
        for _ in range(300):
            if worker.restarts and worker._process and worker._process.pid != first_pid:  # noqa: SLF001
                break
            await asyncio.sleep(0.1)
        await worker.wait_ready()
        assert worker.restarts == 1 and (await health(port))["status"] == "ok"

        # Removed from the desired state: stopped, port closed.
        assert await supervisor.apply(Components()) == []
        assert supervisor.workers == {}
        try:
            await health(port)
            raise AssertionError("the removed worker still answers")
        except httpx.TransportError:
            pass
    finally:
        await supervisor.close()


async def test_a_worker_that_cannot_start_is_reported(tmp_path: Path) -> None:
    supervisor = WorkerSupervisor(SupervisorSettings(work_dir=tmp_path, ready_timeout_s=60))
    bad = spec(free_port(), uuid.uuid4()).model_copy(update={"runtime_options": {"threads": 2}})
    try:
        (result,) = await supervisor.apply(Components(workers=[bad]))
        assert not result.ok and "threads" in (result.error or "")
    finally:
        await supervisor.close()


async def test_a_worker_that_keeps_failing_restarts_ever_later_up_to_the_cap(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    crashing = tmp_path / "crashing-python"
    crashing.write_text("#!/bin/sh\nexit 3\n")
    crashing.chmod(0o755)
    settings = SupervisorSettings(
        work_dir=tmp_path, python=str(crashing), backoff_initial_s=0.2, backoff_max_s=0.4
    )
    replica = spec(free_port(), uuid.uuid4())
    config = render_config(replica, Components(workers=[replica]), tmp_path, tmp_path)
    worker = ManagedWorker(replica, config, settings)
    with caplog.at_level(logging.WARNING, logger="agent.supervisor"):
        await worker.start()
        for _ in range(200):
            if worker.restarts >= 4:
                break
            await asyncio.sleep(0.05)
        await worker.stop()
    delays = [float(m) for m in re.findall(r"restarting in ([\d.]+) s", caplog.text)]
    assert worker.restarts >= 4 and len(delays) >= 3
    assert "worker exited (code 3)" in caplog.text
    assert 0.1 <= delays[0] <= 0.2, "about the initial delay, jittered down to half"
    assert all(0.2 <= d <= 0.4 for d in delays[1:]), "twice that, then capped"
