"""The worker supervisor with real worker processes: start, reconfigure, restart, stop."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import socket
import uuid
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from agent.protocol import ArtifactRef, Components, TenantServing, WorkerSpec
from agent.supervisor import (
    AdoptedProcess,
    ManagedWorker,
    SupervisorSettings,
    WorkerSupervisor,
    render_config,
)

TINY = "synthetic://tiny?layers=1&hidden=64&heads=2&kv_heads=2&vocab=320&max_context=256"
KEY_HASH = "a" * 64


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def spec(port: int | None, replica: uuid.UUID, max_batch_size: int = 4) -> WorkerSpec:
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


async def test_a_worker_without_a_port_takes_a_free_one_and_answers_as_itself(
    tmp_path: Path,
) -> None:
    supervisor = WorkerSupervisor(SupervisorSettings(work_dir=tmp_path, ready_timeout_s=120))
    replica = uuid.uuid4()
    try:
        (result,) = await supervisor.apply(Components(workers=[spec(None, replica)]))
        assert result.ok and result.port is not None, result
        worker = supervisor.workers[replica]
        answered = await health(result.port)
        assert answered["replica_id"] == str(replica) and answered["nonce"] == worker.nonce
    finally:
        await supervisor.close()


class Impostor:
    """Another installation's process on the port: it answers /health, as someone else."""

    def __init__(self) -> None:
        self.port = free_port()
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Impostor:
        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            body = b'{"status": "ok", "replica_id": "someone-else", "nonce": "n"}'
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                + f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
            writer.close()

        self._server = await asyncio.start_server(answer, "127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()


async def test_a_process_of_another_installation_on_the_port_is_never_taken_for_the_worker(
    tmp_path: Path,
) -> None:
    supervisor = WorkerSupervisor(
        SupervisorSettings(work_dir=tmp_path, ready_timeout_s=20, backoff_initial_s=0.2)
    )
    async with Impostor() as impostor:
        try:
            (result,) = await supervisor.apply(
                Components(workers=[spec(impostor.port, uuid.uuid4())])
            )
            assert not result.ok and "exited" in (result.error or ""), result
        finally:
            await supervisor.close()


async def test_a_restarted_agent_adopts_its_workers_and_no_request_fails_meanwhile(
    tmp_path: Path,
) -> None:
    """The supervisor of an agent that stops with keep_workers leaves the worker serving;
    the next one adopts the same process, while a client keeps sending requests."""
    replica = uuid.uuid4()
    settings = SupervisorSettings(work_dir=tmp_path, ready_timeout_s=120, keep_workers=True)
    components = Components(workers=[spec(None, replica)])
    first = WorkerSupervisor(settings)
    (result,) = await first.apply(components)
    assert result.ok and result.port is not None
    pid = first.workers[replica]._process.pid  # type: ignore[union-attr]  # noqa: SLF001
    url = f"http://127.0.0.1:{result.port}/v1/completions"
    outcomes: list[int] = []
    done = asyncio.Event()

    async def load() -> None:
        async with httpx.AsyncClient(timeout=30) as http:
            while not done.is_set():
                response = await http.post(
                    url,
                    headers={"Authorization": "Bearer not-a-key"},
                    json={"model": "tiny", "prompt": "hi", "max_tokens": 2},
                )
                outcomes.append(response.status_code)

    client = asyncio.create_task(load())
    second = WorkerSupervisor(replace(settings, keep_workers=False))
    try:
        await asyncio.sleep(0.3)
        await first.close()  # the agent stops; its worker does not
        await asyncio.sleep(0.3)
        (adopted,) = await second.apply(components)
        assert adopted.ok and adopted.port == result.port, adopted
        worker = second.workers[replica]
        assert isinstance(worker._process, AdoptedProcess) and worker._process.pid == pid  # noqa: SLF001
        await asyncio.sleep(0.3)
    finally:
        done.set()
        await client
        await second.close()
    # Every request was answered by the worker itself (401: the key is not one of its own).
    assert outcomes and set(outcomes) == {401}, sorted(set(outcomes))
    with pytest.raises(ProcessLookupError):
        for _ in range(100):
            os.kill(pid, 0)
            await asyncio.sleep(0.1)


@pytest.mark.parametrize("change", ["host", "older agent"])
async def test_a_kept_worker_that_cannot_serve_as_now_asked_is_replaced(
    tmp_path: Path, change: str
) -> None:
    """A kept worker is started anew instead of adopted when the next agent lets other
    nodes reach its workers (it listens on loopback), or when its record comes from an
    older agent: its listen address is unknown, and its code may not read today's config."""
    replica = uuid.uuid4()
    settings = SupervisorSettings(work_dir=tmp_path, ready_timeout_s=120, keep_workers=True)
    components = Components(workers=[spec(None, replica)])
    first = WorkerSupervisor(settings)
    (kept,) = await first.apply(components)
    assert kept.ok and kept.url is None  # loopback: nobody else reaches it
    pid = first.workers[replica]._process.pid  # type: ignore[union-attr]  # noqa: SLF001
    await first.close()
    host = "0.0.0.0" if change == "host" else "127.0.0.1"
    if change == "older agent":
        record = tmp_path / "workers" / str(replica) / "process.json"
        old = json.loads(record.read_text())
        record.write_text(json.dumps({k: old[k] for k in ("pid", "nonce", "port", "gpu_indices")}))
    second = WorkerSupervisor(replace(settings, host=host, keep_workers=False))
    try:
        (started,) = await second.apply(components)
        assert started.ok and not isinstance(second.workers[replica]._process, AdoptedProcess)  # noqa: SLF001
        if change == "host":
            assert started.url == f"http://{socket.gethostname()}:{started.port}"
    finally:
        await second.close()
    with pytest.raises(ProcessLookupError):
        for _ in range(100):
            os.kill(pid, 0)
            await asyncio.sleep(0.1)


async def test_a_worker_that_leaves_a_fifo_of_garbage_for_its_announcement_is_restarted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`run/` is the worker's: a FIFO there must not block the agent, nor garbage in it end
    the task that keeps the worker alive. This worker writes into the FIFO, which returns
    only once the agent opened it, and exits; the agent starts it again, every time."""
    hostile = tmp_path / "hostile-python"
    hostile.write_text(
        "#!/bin/sh\n"
        'while [ $# -gt 0 ]; do [ "$1" = --announce ] && announce=$2; shift; done\n'
        'mkfifo "$announce" && echo \'[1]\' > "$announce"\n'
        "exit 3\n"
    )
    hostile.chmod(0o755)
    settings = SupervisorSettings(
        work_dir=tmp_path, python=str(hostile), backoff_initial_s=0.05, backoff_max_s=0.1
    )
    replica = spec(None, uuid.uuid4())
    config = render_config(replica, Components(workers=[replica]), tmp_path, tmp_path)
    worker = ManagedWorker(replica, config, settings)
    with caplog.at_level(logging.WARNING, logger="agent.supervisor"):
        await worker.start()
        async with asyncio.timeout(120):
            while worker.restarts < 3:
                await asyncio.sleep(0.05)
        running = worker._task is not None and not worker._task.done()  # noqa: SLF001
        await worker.stop()
    assert running
    assert "endpoint.json: not a regular file" in caplog.text


def test_only_a_valid_announcement_of_this_start_counts(tmp_path: Path) -> None:
    replica = spec(None, uuid.uuid4())
    config = render_config(replica, Components(workers=[replica]), tmp_path, tmp_path)
    worker = ManagedWorker(replica, config, SupervisorSettings(work_dir=tmp_path))
    worker.nonce = "this-start"
    endpoint = tmp_path / "workers" / str(replica.replica_id) / "run" / "endpoint.json"
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text('{"port": 4242, "nonce": "this-start", "pid": 1}')

    assert worker._announced() is None  # noqa: SLF001  (not yet)
    for garbage in (
        "[1]",
        "{",
        '{"port": "x", "nonce": "this-start", "pid": 1}',
        '{"port": 70000, "nonce": "this-start", "pid": 1}',
        '{"port": 4242, "nonce": "another-start", "pid": 1}',
        '{"port": 4242, "nonce": "this-start", "pid": 1, "pad": "' + "x" * 5000 + '"}',
    ):
        endpoint.write_text(garbage)
        assert worker._announced() is None, garbage  # noqa: SLF001
    endpoint.unlink()
    endpoint.symlink_to(elsewhere)
    assert worker._announced() is None  # noqa: SLF001
    endpoint.unlink()
    os.mkfifo(endpoint)
    assert worker._announced() is None  # noqa: SLF001
    endpoint.unlink()
    endpoint.write_text(elsewhere.read_text())
    assert worker._announced() == 4242  # noqa: SLF001
