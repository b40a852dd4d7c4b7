"""An agent running as root starts its workers as an unprivileged account that can serve
and can read none of the agent's secrets; an account that does not exist is an error."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from agent import cli
from agent.enroll import IDENTITY_FILE, Identity
from agent.privileges import WorkerUserError, worker_account
from agent.protocol import (
    ArtifactRef,
    Components,
    PoolSpec,
    TenantServing,
    VolumeSpec,
    WorkerSpec,
)
from agent.staging import ModelStager
from agent.storage import storage_spec
from agent.supervisor import SupervisorSettings, WorkerSupervisor
from dataplane.inference.synthetic import SyntheticModelSpec, write_synthetic_model
from dataplane.storage.local import LocalEngine
from tests.agent.unprivileged import (
    ACCOUNT,
    NOBODY,
    Interpreter,
    needs_root,
    process_ids,
    reachable_tmp,
    worker_interpreter,
)
from tests.dataplane.storage.range_server import RangeServer

TINY = "synthetic://tiny?layers=1&hidden=64&heads=2&kv_heads=2&vocab=320&max_context=256"
KEY = "tg-worker-user-key"

pytestmark = needs_root


@pytest.fixture
def interpreter(monkeypatch: pytest.MonkeyPatch) -> Interpreter:
    """A Python nobody can run, with what its workers need in the agent's environment."""
    found = worker_interpreter()
    for name, value in found.env.items():
        monkeypatch.setenv(name, value)
    return found


@pytest.fixture
def tmp() -> Iterator[Path]:
    with reachable_tmp() as path:
        yield path


def spec(
    replica: uuid.UUID, artifact: ArtifactRef | None = None, volume: str | None = None
) -> WorkerSpec:
    return WorkerSpec(
        replica_id=replica,
        deployment_id=uuid.UUID(int=1),
        tenant_id=uuid.UUID(int=2),
        model_name="tiny",
        artifact=artifact or ArtifactRef(uri=TINY),
        volume=volume,
        runtime_options={"intra_op_threads": 1},
        gpu_indices=[],
        port=None,
        max_batch_size=4,
        max_tokens_per_step=256,
        max_queue_delay_ms=0,
        max_queue_len=8,
        tenants=[
            TenantServing(
                tenant_id=uuid.UUID(int=2),
                weight=1.0,
                priority=0,
                key_hashes=[hashlib.sha256(KEY.encode()).hexdigest()],
            )
        ],
    )


def as_nobody(python: str, code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [python, "-c", code, *args],
        env=os.environ,
        user=ACCOUNT.uid,
        group=ACCOUNT.gid,
        extra_groups=[],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_a_root_agent_runs_its_worker_as_the_worker_user(
    interpreter: Interpreter, tmp: Path
) -> None:
    """Under systemd's UMask=0077 and a 0700 state directory, as in production: the worker
    runs as nobody, serves a completion, and cannot list the state directory or read the
    node credential."""
    state, python = tmp / "state", interpreter.python
    account = worker_account("nobody")
    assert account is not None and account.uid == NOBODY.pw_uid
    umask = os.umask(0o077)
    supervisor = WorkerSupervisor(
        SupervisorSettings(work_dir=state, python=python, account=account, ready_timeout_s=120)
    )
    replica = uuid.uuid4()
    try:
        Identity(uuid.uuid4(), "tgn_secret", "key", "agent.x", "memory://", 5.0).save(state)
        account.probe(python, state)
        (result,) = await supervisor.apply(Components(workers=[spec(replica)]))
        assert result.ok and result.port is not None, result
        process = supervisor.workers[replica]._process  # noqa: SLF001
        assert process is not None
        assert process_ids(process.pid) == (NOBODY.pw_uid, NOBODY.pw_gid)

        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{result.port}") as http:
            assert (await http.get("/health")).json()["status"] == "ok"
            completion = await http.post(
                "/v1/completions",
                headers={"Authorization": f"Bearer {KEY}"},
                json={"model": "tiny", "prompt": "hi", "max_tokens": 2},
                timeout=60,
            )
        assert completion.status_code == 200, completion.text
        assert completion.json()["usage"]["completion_tokens"] == 2

        peek = as_nobody(
            python,
            "import os, sys\n"
            "for attempt in (lambda: os.listdir(sys.argv[1]), lambda: open(sys.argv[2]).read()):\n"
            "    try:\n"
            "        attempt()\n"
            "        print('reached')\n"
            "    except PermissionError:\n"
            "        print('denied')\n",
            str(state),
            str(state / IDENTITY_FILE),
        )
        assert peek.stdout.split() == ["denied", "denied"], peek
    finally:
        os.umask(umask)
        await supervisor.close()


def test_an_unknown_worker_user_is_an_error_naming_the_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(WorkerUserError, match="setting worker_user: .*'no-such-worker'"):
        worker_account("no-such-worker")

    monkeypatch.setenv("TAILGUARD_AGENT_WORKER_USER", "no-such-worker")
    assert cli.main(["run", "--state-dir", str(tmp_path), "--bootstrap-token", "tgb_x"]) == 2
    assert "setting worker_user" in capsys.readouterr().err


def test_an_account_that_cannot_reach_the_state_directory_is_an_error(
    interpreter: Interpreter, tmp: Path
) -> None:
    """Only the state directory is opened to the account, never what lies above it."""
    closed = tmp / "closed"
    (closed / "state").mkdir(parents=True)
    closed.chmod(0o700)
    with pytest.raises(WorkerUserError, match=r"nobody \(setting worker_user\).*cannot enter"):
        ACCOUNT.probe(interpreter.python, closed / "state")


async def test_a_model_staged_on_a_local_volume_is_served_by_the_worker_user(
    interpreter: Interpreter, tmp: Path
) -> None:
    """The local engine makes its pool and volume directories under UMask=0077 (0700): the
    way from the pool down to the model is opened to the worker account, and nothing above
    the pool changes."""
    state, python = tmp / "state", interpreter.python
    model = tmp / "source"
    write_synthetic_model(
        model,
        SyntheticModelSpec(layers=1, hidden=64, heads=2, kv_heads=2, vocab=320, max_context=256),
    )
    archive = tmp / "tiny.tar"
    with tarfile.open(archive, "w") as tar:
        for file in sorted(model.iterdir()):
            tar.add(file, arcname=file.name)
    outer = tmp / "disks"
    outer.mkdir(mode=0o755)
    account = worker_account("nobody")
    assert account is not None
    umask = os.umask(0o077)
    engine = LocalEngine(state / "storage")
    supervisor = WorkerSupervisor(
        SupervisorSettings(work_dir=state, python=python, account=account, ready_timeout_s=120),
        ModelStager(engine, "http://control-plane.invalid", "tgn_" + "x" * 40),
    )
    try:
        storage = Components(
            pools=[
                PoolSpec(
                    name="models",
                    kind="local",
                    directory=str(outer / "pool"),
                    capacity_bytes=256 << 20,
                )
            ],
            volumes=[
                VolumeSpec(
                    name="v-1",
                    tenant_id=uuid.UUID(int=2),
                    pool="models",
                    size_bytes=64 << 20,
                )
            ],
        )
        engine.reconcile(storage_spec(storage, "local", "0.0.0.0"))
        assert stat.S_IMODE((outer / "pool").stat().st_mode) == 0o700
        account.probe(python, state)
        with RangeServer(archive) as server:
            artifact = ArtifactRef(
                uri=server.url,
                sha256=hashlib.sha256(archive.read_bytes()).hexdigest(),
                size_bytes=archive.stat().st_size,
            )
            (result,) = await supervisor.apply(
                Components(
                    pools=storage.pools,
                    volumes=storage.volumes,
                    workers=[spec(uuid.uuid4(), artifact, "v-1")],
                )
            )
        assert result.ok and result.port is not None, result
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{result.port}") as http:
            completion = await http.post(
                "/v1/completions",
                headers={"Authorization": f"Bearer {KEY}"},
                json={"model": "tiny", "prompt": "hi", "max_tokens": 2},
                timeout=60,
            )
        assert completion.status_code == 200, completion.text
        assert stat.S_IMODE((outer / "pool").stat().st_mode) == 0o711
        assert stat.S_IMODE(outer.stat().st_mode) == 0o755
    finally:
        os.umask(umask)
        await supervisor.close()
        engine.close()


def test_a_model_the_worker_user_cannot_read_is_an_error_naming_the_setting(
    interpreter: Interpreter, tmp: Path
) -> None:
    closed = tmp / "closed"
    (closed / "model").mkdir(parents=True)
    (closed / "model" / "config.json").write_text("{}")
    closed.chmod(0o700)
    with pytest.raises(WorkerUserError, match=r"nobody \(setting worker_user\).*cannot read"):
        ACCOUNT.can_read(interpreter.python, closed / "model" / "config.json")


def test_root_follows_no_link_out_of_a_tree_it_opens_to_the_worker(tmp: Path) -> None:
    """What the worker could have written may hold symlinks and hard links to root's files:
    handing the tree over, or opening it to the worker's group, leaves those files alone."""
    secret, shared = tmp / "secret", tmp / "shared"
    for path in (secret, shared):
        path.write_text("root's")
        path.chmod(0o600)
    (tmp / "elsewhere").mkdir(mode=0o700)
    (tmp / "elsewhere" / "inside").write_text("root's")
    for tree in (tmp / "run", tmp / "model"):
        (tree / "sub").mkdir(parents=True)
        (tree / "sub" / "file").write_text("its own")
        (tree / "link").symlink_to(secret)
        (tree / "sub" / "swapped").symlink_to(tmp / "elsewhere")
    os.link(shared, tmp / "run" / "hard")

    ACCOUNT.owns(tmp / "run")
    ACCOUNT.may_read(tmp / "model")

    for path in (tmp / "run", tmp / "run" / "sub", tmp / "run" / "sub" / "file"):
        assert path.stat().st_uid == ACCOUNT.uid, path
    assert (tmp / "model" / "sub" / "file").stat().st_gid == ACCOUNT.gid
    for path in (secret, shared, tmp / "elsewhere", tmp / "elsewhere" / "inside"):
        info = path.stat()
        assert (info.st_uid, info.st_gid) == (0, 0), path
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
