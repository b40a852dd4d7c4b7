"""An agent running as root starts its workers as an unprivileged account that can serve
and can read none of the agent's secrets; an account that does not exist is an error."""

from __future__ import annotations

import hashlib
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from agent import cli
from agent.enroll import IDENTITY_FILE, Identity
from agent.privileges import WorkerUserError, worker_account
from agent.protocol import ArtifactRef, Components, TenantServing, WorkerSpec
from agent.supervisor import SupervisorSettings, WorkerSupervisor
from tests.agent.unprivileged import (
    ACCOUNT,
    NOBODY,
    Interpreter,
    needs_root,
    process_ids,
    reachable_tmp,
    worker_interpreter,
)

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


def spec(replica: uuid.UUID) -> WorkerSpec:
    return WorkerSpec(
        replica_id=replica,
        deployment_id=uuid.UUID(int=1),
        tenant_id=uuid.UUID(int=2),
        model_name="tiny",
        artifact=ArtifactRef(uri=TINY),
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
