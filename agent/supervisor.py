"""Inference worker processes: start one per placed replica, keep it healthy, stop it when gone.

Each worker is `python -m dataplane.inference --config FILE ...` on a port of its own
(the spec's, or any free one it announces), and proves who it is on `/health`. A config
change that a running worker can take (keys, tenants, batching knobs, thresholds) is
written to its file and signalled with SIGHUP, so requests in flight are not dropped;
a change to what it serves (model, runtime) replaces the process. A worker that dies
or stops answering its health check is restarted with exponential backoff. With
`keep_workers`, workers outlive the agent and the next one adopts them. An agent running
as root starts them as an unprivileged account (agent/privileges.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import stat
import sys
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlsplit
from uuid import UUID

import httpx
from pydantic import BaseModel, ConfigDict, Field
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type

from agent.privileges import WorkerAccount, worker_environment
from agent.protocol import SYNTHETIC_SCHEME, ArtifactRef, ComponentResult, Components, WorkerSpec
from agent.retry import backoff
from agent.staging import ModelStager
from dataplane.inference.config import (
    BatchingConfig,
    RuntimeConfig,
    SloThreshold,
    TenantConfig,
    WorkerConfig,
)
from dataplane.inference.synthetic import SyntheticModelSpec, write_synthetic_model

log = logging.getLogger(__name__)
WORKER_METRICS = frozenset({"ttft", "tpot", "itl", "e2e", "queue"})
NONCE_ENV = "TAILGUARD_WORKER_NONCE"
"""Carries a start's nonce to the worker (dataplane/inference/__main__.py): the environment
of a process is readable by its own uid and root only, its command line by every user."""
ANNOUNCEMENT_MAX_BYTES = 4096


@dataclass(frozen=True)
class SupervisorSettings:
    work_dir: Path
    host: str = "127.0.0.1"
    python: str = sys.executable
    ready_timeout_s: float = 300.0
    health_interval_s: float = 5.0
    unhealthy_after: int = 3
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    keep_workers: bool = False
    """Workers run in sessions of their own and keep serving when the agent stops, for the
    next agent to adopt; otherwise they stop with it."""
    account: WorkerAccount | None = None
    """The account workers run as; None: the agent's own."""


def materialize_model(
    spec: WorkerSpec, work_dir: Path, stager: ModelStager | None
) -> tuple[Path, Path]:
    """(model directory, TensorRT cache directory) of a worker, getting the model there first.

    A synthetic model is generated under `work_dir`; a downloadable one is staged into the
    replica's volume, which then holds the cache too.
    """
    if not spec.artifact.uri.startswith(SYNTHETIC_SCHEME):
        if spec.volume is None or stager is None:
            raise ValueError(
                f"artifact {spec.artifact.uri} needs a volume on this node to be "
                "staged into; give the deployment a storage pool on this node"
            )
        return stager.stage(spec.artifact, spec.volume)
    cache_dir = work_dir / "cache" / str(spec.deployment_id)
    return _synthetic_model(spec.artifact, work_dir / "models"), cache_dir


def open_to_worker(
    account: WorkerAccount, python: str, model_dir: Path, cache_dir: Path, root: Path
) -> None:
    """Let the worker account read its model and write its cache, passing through the
    directories of `root` on the way and reading nothing else there; then check, as that
    account, that the model's config.json opens."""
    account.may_read(model_dir)
    account.owns(cache_dir)
    account.may_pass(model_dir.parent, root)
    account.may_pass(cache_dir.parent, root)
    account.can_read(python, model_dir / "config.json")


_SYNTHETIC_FLAGS = {f.name for f in fields(SyntheticModelSpec) if f.type in ("bool", bool)}


def _synthetic_option(name: str, value: str) -> Any:
    """A synthetic:// query option: flags as true/false (or 1/0), sizes as integers."""
    return value.lower() in ("1", "true") if name in _SYNTHETIC_FLAGS else int(value)


def _synthetic_model(artifact: ArtifactRef, models_dir: Path) -> Path:
    parts = urlsplit(artifact.uri)
    spec = SyntheticModelSpec(**{k: _synthetic_option(k, v) for k, v in parse_qsl(parts.query)})
    sizes = "-".join(f"{k}{v}" for k, v in sorted(asdict(spec).items()))
    directory = models_dir / f"synthetic-{parts.netloc or 'model'}-{sizes}"
    if not (directory / "model.onnx").exists():
        # Two replicas of the same model on one node materialise it at the same time: each
        # writes its own copy and the first rename wins.
        models_dir.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f"{directory.name}.", dir=models_dir))
        write_synthetic_model(scratch / "model", spec)
        try:
            (scratch / "model").rename(directory)
        except OSError:
            if not (directory / "model.onnx").exists():
                raise
        shutil.rmtree(scratch, ignore_errors=True)
    return directory


def render_config(
    spec: WorkerSpec, components: Components, model_dir: Path, cache_dir: Path
) -> WorkerConfig:
    thresholds = [
        SloThreshold.model_validate(
            {
                "tenant": str(t.tenant_id),
                "metric": t.metric,
                "threshold_seconds": t.threshold_seconds,
            }
        )
        for t in components.slo_thresholds
        if t.metric in WORKER_METRICS
        and t.threshold_seconds is not None
        and t.deployment_id in (None, spec.deployment_id)
        and any(s.tenant_id == t.tenant_id for s in spec.tenants)
    ]
    return WorkerConfig(
        deployment_id=str(spec.deployment_id),
        served_model_name=spec.model_name,
        model_dir=model_dir,
        cache_dir=cache_dir,
        batching=BatchingConfig(
            max_batch_size=spec.max_batch_size,
            max_tokens_per_step=spec.max_tokens_per_step,
            max_queue_delay_ms=spec.max_queue_delay_ms,
            max_queue_len=spec.max_queue_len,
        ),
        runtime=RuntimeConfig.model_validate(spec.runtime_options),
        tenants={
            str(t.tenant_id): TenantConfig(
                weight=t.weight,
                priority=t.priority,
                key_sha256=t.key_hashes,
                max_concurrency=t.max_concurrency,
                tokens_per_s=t.tokens_per_s,
                burst_tokens=t.burst_tokens,
            )
            for t in spec.tenants
        },
        slo_thresholds=thresholds,
    )


class WorkerProcess(Protocol):
    """What the supervisor needs of a worker process: its own child, or an adopted one."""

    @property
    def returncode(self) -> int | None: ...

    async def wait(self) -> int: ...

    def send_signal(self, sig: int) -> None: ...

    def kill(self) -> None: ...


class AdoptedWorker:
    """A worker an earlier agent started: not this process's child, so it is watched through
    /proc, and signalled only while its environment still carries its start's nonce (a
    recycled pid is never signalled)."""

    def __init__(self, pid: int, nonce: str) -> None:
        self.pid, self.nonce = pid, nonce
        self.returncode: int | None = None

    def alive(self) -> bool:
        try:
            environ = Path(f"/proc/{self.pid}/environ").read_bytes().split(b"\0")
        except OSError:
            return False
        return f"{NONCE_ENV}={self.nonce}".encode() in environ

    async def wait(self) -> int:
        while self.returncode is None:
            if not self.alive():
                self.returncode = -1  # not our child: its exit status is its parent's
                break
            await asyncio.sleep(0.2)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class ManagedWorker:
    """One worker process and the task that keeps it alive.

    Each start gets a fresh nonce; the worker takes the spec's port or, without one, any
    free port, and announces it in `run/endpoint.json`. Nothing counts as this worker until its
    `/health` answers with the replica id and that nonce, so a process of another
    installation on the same port is never mistaken for it. `process.json` records the
    running start, so a restarted agent can adopt the worker instead of replacing it.
    A worker of another account reads its config and writes `run/` only: the record the
    agent signals by stays out of its reach.
    """

    def __init__(
        self, spec: WorkerSpec, config: WorkerConfig, settings: SupervisorSettings
    ) -> None:
        self.spec = spec
        self.config = config
        self.restarts = 0
        self.port = spec.port
        self.nonce = ""
        self._settings = settings
        self._dir = settings.work_dir / "workers" / str(spec.replica_id)
        self._dir.mkdir(parents=True, exist_ok=True)
        self._run = self._dir / "run"
        self._run.mkdir(exist_ok=True)
        if settings.account is not None:
            settings.account.owns(self._run)
            settings.account.may_pass(self._dir, settings.work_dir)
        self.config_path = self._dir / "config.json"
        self._endpoint = self._run / "endpoint.json"
        self._record = self._dir / "process.json"
        self._process: WorkerProcess | None = None
        self._ready = asyncio.Event()
        self._failed: str | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str | None:
        """None until this start announced its port."""
        return None if self.port is None else f"http://{self._settings.host}:{self.port}"

    def write_config(self, config: WorkerConfig) -> None:
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(config.model_dump_json())
        if self._settings.account is not None:
            self._settings.account.may_read(tmp)
        tmp.replace(self.config_path)
        self.config = config

    async def start(self) -> None:
        running = self._running_config()
        self.write_config(self.config)
        self._task = asyncio.create_task(
            self._keep_alive(running), name=f"worker-{self.spec.replica_id}"
        )

    async def wait_ready(self) -> None:
        """Return once healthy; raise with the reason if it could not get there in time."""
        try:
            await asyncio.wait_for(self._ready.wait(), self._settings.ready_timeout_s)
        except TimeoutError:
            raise RuntimeError(self._failed or "worker did not become healthy in time") from None

    async def reconfigure(self, config: WorkerConfig) -> None:
        self.write_config(config)
        if self._process is not None and self._process.returncode is None:
            self._process.send_signal(signal.SIGHUP)

    async def stop(self) -> None:
        await self.detach()
        await self._terminate()
        self._record.unlink(missing_ok=True)

    async def detach(self) -> None:
        """Stop watching the worker and leave it serving (for the next agent to adopt)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _terminate(self) -> None:
        process, self._process = self._process, None
        if process is None or process.returncode is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), 15)
        except TimeoutError:
            process.kill()
            await process.wait()

    def _running_config(self) -> WorkerConfig | None:
        """The config a worker left by an earlier agent runs, if one may be running."""
        if not self._record.exists():
            return None
        try:
            return WorkerConfig.model_validate_json(self.config_path.read_text())
        except (OSError, ValueError):
            return None

    async def _spawn(self) -> asyncio.subprocess.Process:
        self.nonce = secrets.token_hex(16)
        self.port = self.spec.port
        with contextlib.suppress(OSError):  # run/ is the worker's: whatever it left there
            self._endpoint.unlink()
        env = worker_environment()
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, self.spec.gpu_indices))
        env[NONCE_ENV] = self.nonce
        account = self._settings.account
        identity: dict[str, Any] = {}
        if account is not None:
            env.update(HOME=str(self._run), USER=account.name, LOGNAME=account.name)
            identity = {
                "user": account.uid,
                "group": account.gid,
                "extra_groups": list(account.groups),
            }
        log_file = open(self._dir / "worker.log", "ab")  # noqa: SIM115  (owned by the child)
        try:
            return await asyncio.create_subprocess_exec(
                self._settings.python,
                "-m",
                "dataplane.inference",
                "--config",
                str(self.config_path),
                "--host",
                self._settings.host,
                "--port",
                str(self.spec.port or 0),
                "--replica-id",
                str(self.spec.replica_id),
                "--announce",
                str(self._endpoint),
                "--log-level",
                "warning",
                env=env,
                stdout=log_file,
                stderr=log_file,
                # Its own session outlives the agent's, so an agent restart drops no request.
                start_new_session=self._settings.keep_workers,
                **identity,
            )
        except OSError as exc:
            who = f" as {account.name} (setting worker_user)" if account else ""
            self._failed = f"cannot start {self._settings.python}{who}: {exc}"
            raise _WorkerDown(self._failed) from exc
        finally:
            log_file.close()

    async def _keep_alive(self, running: WorkerConfig | None) -> None:
        """Adopt the worker an earlier agent left, or start one; then restart it whenever it
        goes down: after `backoff_initial_s` when it had been healthy, with delays doubling
        up to `backoff_max_s` while starts keep failing."""
        async with httpx.AsyncClient(timeout=5) as http:
            adopted = running is not None and await self._adopt(http, running)
            async for run in self._restarts(self._settings.backoff_initial_s):
                with run:
                    if not adopted:
                        async for start in self._restarts(self._settings.backoff_max_s):
                            with start:
                                await self._start(http)
                    adopted = False
                    await self._serve(http)

    async def _adopt(self, http: httpx.AsyncClient, running: WorkerConfig) -> bool:
        """Take over the recorded worker if it is alive, answers as itself and runs what
        this spec asks for (its config reloads on SIGHUP); otherwise stop it."""
        try:
            record = json.loads(self._record.read_text())
            found = AdoptedWorker(int(record["pid"]), str(record["nonce"]))
            port, gpus = int(record["port"]), list(record["gpu_indices"])
        except (OSError, ValueError, KeyError, TypeError):
            return False
        self.nonce, self.port = found.nonce, port
        if (
            not found.alive()
            or gpus != self.spec.gpu_indices
            or self.spec.port not in (None, port)
            or running.restart_fields_changed(self.config)
            or not await self._healthy(http)
        ):
            found.send_signal(signal.SIGTERM)
            return False
        self._process = found
        found.send_signal(signal.SIGHUP)  # the config written since
        self._ready.set()
        log.info(
            "replica %s: adopted worker pid %d on port %d", self.spec.replica_id, found.pid, port
        )
        return True

    def _restarts(self, max_s: float) -> AsyncRetrying:
        return AsyncRetrying(
            retry=retry_if_exception_type(_WorkerDown),
            wait=backoff(self._settings.backoff_initial_s, max_s),
            before_sleep=self._log_restart,
        )

    def _log_restart(self, state: RetryCallState) -> None:
        log.warning(
            "replica %s: %s; restarting in %.1f s",
            self.spec.replica_id,
            self._failed,
            state.upcoming_sleep,
        )

    async def _start(self, http: httpx.AsyncClient) -> None:
        """Spawn the worker and wait until it answers its health check as itself."""
        process = self._process = await self._spawn()
        while not await self._healthy(http):
            if self.port is None:
                self.port = await asyncio.to_thread(self._announced)
            if await self._exits_within(0.2):
                raise await self._down()
        self._record.write_text(
            json.dumps(
                {
                    "pid": process.pid,
                    "nonce": self.nonce,
                    "port": self.port,
                    "gpu_indices": self.spec.gpu_indices,
                }
            )
        )
        self._ready.set()

    def _announced(self) -> int | None:
        """The port this start bound, once it said so.

        `run/` is the worker's to write, so what lies there is read as if hostile: never
        through a symlink, never waiting on a FIFO, a few bytes at most, and anything but a
        valid announcement of this start counts as none yet."""
        try:
            fd = os.open(self._endpoint, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("replica %s: cannot read %s: %s", self.spec.replica_id, self._endpoint, exc)
            return None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ValueError("not a regular file")
            data = os.read(fd, ANNOUNCEMENT_MAX_BYTES + 1)
            if len(data) > ANNOUNCEMENT_MAX_BYTES:
                raise ValueError(f"larger than {ANNOUNCEMENT_MAX_BYTES} bytes")
            announced = _Announcement.model_validate_json(data)
        except (OSError, ValueError) as exc:  # a ValidationError is a ValueError
            log.warning("replica %s: ignoring %s: %s", self.spec.replica_id, self._endpoint, exc)
            return None
        finally:
            os.close(fd)
        return announced.port if announced.nonce == self.nonce else None

    async def _serve(self, http: httpx.AsyncClient) -> None:
        """Health-check the worker until it exits or fails `unhealthy_after` checks in a row."""
        failures = 0
        while failures < self._settings.unhealthy_after and not await self._exits_within(
            self._settings.health_interval_s
        ):
            failures = 0 if await self._healthy(http) else failures + 1
        raise await self._down()

    async def _healthy(self, http: httpx.AsyncClient) -> bool:
        """Answering, and as this replica's current start: not another process on the port."""
        if self.url is None:
            return False
        try:
            response = await http.get(f"{self.url}/health")
            body = response.json() if response.status_code == 200 else {}
        except (httpx.TransportError, ValueError):
            return False
        return (
            isinstance(body, dict)
            and body.get("replica_id") == str(self.spec.replica_id)
            and body.get("nonce") == self.nonce
        )

    async def _exits_within(self, seconds: float) -> bool:
        assert self._process is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._process.wait(), seconds)
        return self._process.returncode is not None

    async def _down(self) -> _WorkerDown:
        code = self._process.returncode if self._process else None
        await self._terminate()
        self._ready.clear()
        self.restarts += 1
        self._failed = f"worker exited (code {code}); see {self._dir / 'worker.log'}"
        return _WorkerDown(self._failed)


class _Announcement(BaseModel):
    """What a worker writes to `run/endpoint.json` once its port is bound."""

    model_config = ConfigDict(frozen=True)

    port: int = Field(ge=1, le=65535)
    nonce: str | None
    pid: int


class _WorkerDown(Exception):
    """The worker exited or stopped answering its health check."""


class WorkerSupervisor:
    """The reconciler's driver for worker components."""

    def __init__(self, settings: SupervisorSettings, stager: ModelStager | None = None) -> None:
        self._settings = settings
        self._stager = stager
        self.workers: dict[UUID, ManagedWorker] = {}

    async def apply(self, components: Components) -> list[ComponentResult]:
        desired = {w.replica_id: w for w in components.workers}
        for replica_id in [r for r in self.workers if r not in desired]:
            await self.workers.pop(replica_id).stop()
        return list(
            await asyncio.gather(*(self._converge(spec, components) for spec in desired.values()))
        )

    async def _converge(self, spec: WorkerSpec, components: Components) -> ComponentResult:
        name = f"replica-{spec.replica_id}"
        try:
            model_dir, cache_dir = await asyncio.to_thread(
                materialize_model, spec, self._settings.work_dir, self._stager
            )
            if self._settings.account is not None:
                await asyncio.to_thread(
                    open_to_worker,
                    self._settings.account,
                    self._settings.python,
                    model_dir,
                    cache_dir,
                    self._pool_root(spec, model_dir),
                )
            config = render_config(spec, components, model_dir, cache_dir)
            current = self.workers.get(spec.replica_id)
            if current is not None and self._same_process(current, spec, config):
                if config != current.config:
                    await current.reconfigure(config)
            else:
                if current is not None:
                    await current.stop()
                current = self.workers[spec.replica_id] = ManagedWorker(
                    spec, config, self._settings
                )
                await current.start()
            await current.wait_ready()
            return ComponentResult(kind="worker", name=name, ok=True, error=None, port=current.port)
        except Exception as exc:  # every failure becomes the component's error text
            log.exception("replica %s failed to converge", spec.replica_id)
            return ComponentResult(
                kind="worker", name=name, ok=False, error=f"{exc}"[:4000] or repr(exc)
            )

    def _pool_root(self, spec: WorkerSpec, model_dir: Path) -> Path:
        """How far up the worker account is let through to its model: the state directory,
        or the storage pool's own directory where that lies elsewhere."""
        root = self._settings.work_dir
        if model_dir.is_relative_to(root) or spec.volume is None or self._stager is None:
            return root
        return self._stager.pool_directory(spec.volume)

    @staticmethod
    def _same_process(current: ManagedWorker, spec: WorkerSpec, config: WorkerConfig) -> bool:
        return (
            current.spec.port == spec.port
            and current.spec.gpu_indices == spec.gpu_indices
            and not current.config.restart_fields_changed(config)
        )

    async def close(self) -> None:
        """Stop every worker, or leave them serving when `keep_workers` says so."""
        keep = self._settings.keep_workers
        await asyncio.gather(
            *(worker.detach() if keep else worker.stop() for worker in self.workers.values())
        )
        self.workers.clear()
