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
import functools
import hashlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import stat
import sys
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, Generic, NamedTuple, Protocol, TypeVar, cast
from urllib.parse import parse_qsl, urlsplit
from uuid import UUID

import httpx
from pydantic import BaseModel, ConfigDict, Field
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type

from agent.privileges import WorkerAccount, worker_environment
from agent.protocol import (
    SYNTHETIC_SCHEME,
    ArtifactRef,
    ComponentResult,
    Components,
    GatewaySpec,
    WorkerSpec,
)
from agent.retry import backoff
from agent.staging import ModelStager
from dataplane.asgi import is_loopback
from dataplane.gateway.config import NONCE_ENV as GATEWAY_NONCE_ENV
from dataplane.gateway.config import DeploymentRoute, GatewayConfig, ReplicaConfig
from dataplane.inference.config import (
    BatchingConfig,
    RuntimeConfig,
    SchedulingConfig,
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
WILDCARDS = ("0.0.0.0", "::", "")


def advertised_url(host: str, advertise: str | None, port: int) -> str:
    """`http://name:port`, named as other machines reach it: `advertise`, else the listening
    `host`, else (a wildcard) this machine's name."""
    name = advertise or (socket.gethostname() if host in WILDCARDS else host)
    return f"http://{'[' + name + ']' if ':' in name else name}:{port}"


@dataclass(frozen=True)
class SupervisorSettings:
    work_dir: Path
    host: str = "127.0.0.1"
    advertise: str | None = None
    """The host name other nodes' gateways reach the workers at; None: `host` (this
    machine's name for a wildcard), unless that is loopback: workers then serve this node's
    gateway alone and no address is reported for them."""
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

    def peer_url(self, port: int | None) -> str | None:
        """Where other nodes reach a worker listening on `port`; None: they do not."""
        if port is None or (self.advertise is None and is_loopback(self.host)):
            return None
        return advertised_url(self.host, self.advertise, port)


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


def _thresholds(spec: WorkerSpec, components: Components) -> list[SloThreshold]:
    """The SLO thresholds that count a deployment's requests: its tenants' latency SLOs on
    it or on every deployment."""
    return [
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


def _tenants(spec: WorkerSpec) -> dict[str, TenantConfig]:
    return {
        str(t.tenant_id): TenantConfig(
            weight=t.weight,
            priority=t.priority,
            key_sha256=t.key_hashes,
            max_concurrency=t.max_concurrency,
            tokens_per_s=t.tokens_per_s,
            burst_tokens=t.burst_tokens,
        )
        for t in spec.tenants
    }


def render_config(
    spec: WorkerSpec, components: Components, model_dir: Path, cache_dir: Path
) -> WorkerConfig:
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
        scheduling=SchedulingConfig(tpot_steps=spec.tpot_steps),
        tenants=_tenants(spec),
        slo_thresholds=_thresholds(spec, components),
        peer_key_sha256=[spec.peer_key_hash] if spec.peer_key_hash else [],
        peers_only=True,
    )


class ServedProcess(Protocol):
    """What the supervisor needs of a process it runs: its own child, or an adopted one."""

    @property
    def returncode(self) -> int | None: ...

    async def wait(self) -> int: ...

    def send_signal(self, sig: int) -> None: ...

    def kill(self) -> None: ...


class AdoptedProcess:
    """A process an earlier agent started: not this process's child, so it is watched through
    /proc, and signalled only while its environment still carries its start's nonce (a
    recycled pid is never signalled)."""

    def __init__(self, pid: int, nonce: str, nonce_env: str) -> None:
        self.pid, self.nonce, self._marker = pid, nonce, f"{nonce_env}={nonce}".encode()
        self.returncode: int | None = None

    def alive(self) -> bool:
        try:
            environ = Path(f"/proc/{self.pid}/environ").read_bytes().split(b"\0")
        except OSError:
            return False
        return self._marker in environ

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


class RestartAware(Protocol):
    """A process config (WorkerConfig, GatewayConfig) that knows which of its changes need a
    new process; the rest a running one takes on SIGHUP."""

    def model_dump_json(self) -> str: ...

    def restart_fields_changed(self, other: Any) -> list[str]: ...


C = TypeVar("C", bound=RestartAware)


@functools.cache
def _schema_of(model: type[BaseModel]) -> str:
    schema = json.dumps(model.model_json_schema(), sort_keys=True)
    return hashlib.sha256(schema.encode()).hexdigest()[:16]


class ManagedProcess(ABC, Generic[C]):
    """One data-plane process (an inference worker, the gateway) and the task that keeps it
    alive.

    Each start gets a fresh nonce; the process takes its fixed port or, without one, any
    free port, and announces it in `run/endpoint.json`. Nothing counts as this process
    until its `/health` answers with its identity and that nonce, so a process of another
    installation on the same port is never mistaken for it. `process.json` records the
    running start, so a restarted agent can adopt the process instead of replacing it.
    A process of another account reads its config and writes `run/` only: the record the
    agent signals by stays out of its reach. Subclasses say what to run and who it is.
    """

    kind: ClassVar[str]
    """`worker` or `gateway`: its log file's name and its component kind."""
    nonce_env: ClassVar[str]
    module: ClassVar[str]
    unrecorded_host: ClassVar[str | None] = None
    """Where a process listens whose record predates recording it; None: where it would now."""

    def __init__(self, config: C, directory: Path, settings: SupervisorSettings) -> None:
        self.config = config
        self.restarts = 0
        self.port = self.fixed_port
        self._served_port: int | None = None
        """The port of the last start that answered: the next start takes it again, so a
        restart keeps the address the control plane was told."""
        self.nonce = ""
        self._settings = settings
        self._dir = directory
        self._dir.mkdir(parents=True, exist_ok=True)
        self._run = self._dir / "run"
        self._run.mkdir(exist_ok=True)
        if settings.account is not None:
            settings.account.owns(self._run)
            settings.account.may_pass(self._dir, settings.work_dir)
        self.config_path = self._dir / "config.json"
        self.endpoint = self._run / "endpoint.json"
        self._record = self._dir / "process.json"
        self._log = self._dir / f"{self.kind}.log"
        self._process: ServedProcess | None = None
        self._ready = asyncio.Event()
        self._failed: str | None = None
        self._task: asyncio.Task[None] | None = None
        self.on_ready: Callable[[], None] = lambda: None
        """Called each time a start (or an adopted process) answers as itself; what it
        raises is logged, never the end of the process's supervision."""

    # -- what subclasses say ---------------------------------------------------------------

    @property
    def what(self) -> str:
        """Names the process in logs and errors."""
        return self.kind

    @property
    @abstractmethod
    def identity(self) -> tuple[str, str]:
        """The field and value its /health answers besides the nonce."""

    @property
    def fixed_port(self) -> int | None:
        """The port it must take; None: any free one, announced."""
        return None

    @property
    def bind_host(self) -> str:
        return self._settings.host

    @property
    def gpu_indices(self) -> list[int]:
        """The GPUs it runs on, which an adopted process must have been started with."""
        return []

    def arguments(self) -> list[str]:
        """Its command line after `python -m module`, for this start (`self.port` is the
        port it must take, None: any)."""
        return ["--config", str(self.config_path)]

    def environment(self) -> dict[str, str]:
        return {}

    # -- the life cycle ------------------------------------------------------------------

    @property
    def url(self) -> str | None:
        """Where the agent reaches it; None until this start announced its port."""
        if self.port is None:
            return None
        return f"http://{_url_host(self.bind_host)}:{self.port}"

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def write_config(self, config: C) -> None:
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(config.model_dump_json())
        if self._settings.account is not None:
            self._settings.account.may_read(tmp)
        tmp.replace(self.config_path)
        self.config = config

    async def start(self) -> None:
        running = self._running_config()
        self.write_config(self.config)
        self._task = asyncio.create_task(self._keep_alive(running), name=self.what)

    async def wait_ready(self) -> None:
        """Return once healthy; raise with the reason if it could not get there in time."""
        try:
            await asyncio.wait_for(self._ready.wait(), self._settings.ready_timeout_s)
        except TimeoutError:
            raise RuntimeError(
                self._failed or f"{self.what} did not become healthy in time"
            ) from None

    def reconfigure(self, config: C) -> None:
        """Rewrite the config; a process still starting reads it when it starts watching
        the file (SIGHUP before it handles the signal would end it)."""
        self.write_config(config)
        if self.ready and self._process is not None and self._process.returncode is None:
            self._process.send_signal(signal.SIGHUP)

    async def stop(self) -> None:
        await self.detach()
        await self._terminate()
        self._record.unlink(missing_ok=True)

    async def detach(self) -> None:
        """Stop watching the process and leave it serving (for the next agent to adopt)."""
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

    def _running_config(self) -> C | None:
        """The config a process left by an earlier agent runs, if one may be running."""
        if not self._record.exists():
            return None
        try:
            return type(self.config).model_validate_json(self.config_path.read_text())  # type: ignore[attr-defined,no-any-return]
        except (OSError, ValueError):
            return None

    async def _spawn(self) -> asyncio.subprocess.Process:
        self.nonce = secrets.token_hex(16)
        self.port = self.fixed_port or self._served_port
        with contextlib.suppress(OSError):  # run/ is the process's: whatever it left there
            self.endpoint.unlink()
        env = worker_environment()
        env.update(self.environment())
        env[self.nonce_env] = self.nonce
        account = self._settings.account
        identity: dict[str, Any] = {}
        if account is not None:
            env.update(HOME=str(self._run), USER=account.name, LOGNAME=account.name)
            identity = {
                "user": account.uid,
                "group": account.gid,
                "extra_groups": list(account.groups),
            }
        log_file = open(self._log, "ab")  # noqa: SIM115  (owned by the child)
        try:
            return await asyncio.create_subprocess_exec(
                self._settings.python,
                "-m",
                self.module,
                *self.arguments(),
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
            raise _ProcessDown(self._failed) from exc
        finally:
            log_file.close()

    async def _keep_alive(self, running: C | None) -> None:
        """Adopt the process an earlier agent left, or start one; then restart it whenever it
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

    async def _adopt(self, http: httpx.AsyncClient, running: C) -> bool:
        """Take over the recorded process if it is alive, answers as itself and runs what
        this config asks for (the rest reloads on SIGHUP); otherwise stop it."""
        try:
            record = json.loads(self._record.read_text())
            found = AdoptedProcess(int(record["pid"]), str(record["nonce"]), self.nonce_env)
            port, gpus = int(record["port"]), list(record["gpu_indices"])
            host = str(record.get("host", self.unrecorded_host or self.bind_host))
            schema = record.get("schema")
        except (OSError, ValueError, KeyError, TypeError):
            return False
        self.nonce, self.port = found.nonce, port
        if (
            not found.alive()
            or gpus != self.gpu_indices
            or host != self.bind_host  # who may reach it changed
            or schema != self._schema  # it could not read the config written since
            or self.fixed_port not in (None, port)
            or running.restart_fields_changed(self.config)
            or not await self._healthy(http)
        ):
            found.send_signal(signal.SIGTERM)
            return False
        self._process = found
        found.send_signal(signal.SIGHUP)  # the config written since
        self._write_record(found.pid)
        self._served_port = port
        self._ready.set()
        self._answered()
        log.info("%s: adopted %s pid %d on port %d", self.what, self.kind, found.pid, port)
        return True

    def _restarts(self, max_s: float) -> AsyncRetrying:
        return AsyncRetrying(
            retry=retry_if_exception_type(_ProcessDown),
            wait=backoff(self._settings.backoff_initial_s, max_s),
            before_sleep=self._log_restart,
        )

    def _log_restart(self, state: RetryCallState) -> None:
        log.warning("%s: %s; restarting in %.1f s", self.what, self._failed, state.upcoming_sleep)

    async def _start(self, http: httpx.AsyncClient) -> None:
        """Spawn the process and wait until it answers its health check as itself."""
        process = self._process = await self._spawn()
        while not await self._healthy(http):
            if self.port is None:
                self.port = await asyncio.to_thread(self._announced)
            if await self._exits_within(0.2):
                self._served_port = None  # taken meanwhile, maybe: the next start takes any
                raise await self._down()
        self._write_record(process.pid)
        self._served_port = self.port
        self._ready.set()
        self._answered()

    @property
    def _schema(self) -> str:
        """Names the config's schema: a process of other code may not read this one's."""
        return _schema_of(cast(type[BaseModel], type(self.config)))

    def _write_record(self, pid: int) -> None:
        record = {
            "pid": pid,
            "nonce": self.nonce,
            "port": self.port,
            "host": self.bind_host,
            "gpu_indices": self.gpu_indices,
            "schema": self._schema,
        }
        self._record.write_text(json.dumps(record))

    def _answered(self) -> None:
        try:
            self.on_ready()
        except Exception:
            log.exception("%s: acting on its start failed", self.what)

    def _announced(self) -> int | None:
        """The port this start bound, once it said so.

        `run/` is the process's to write, so what lies there is read as if hostile: never
        through a symlink, never waiting on a FIFO, a few bytes at most, and anything but a
        valid announcement of this start counts as none yet."""
        try:
            fd = os.open(self.endpoint, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("%s: cannot read %s: %s", self.what, self.endpoint, exc)
            return None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ValueError("not a regular file")
            data = os.read(fd, ANNOUNCEMENT_MAX_BYTES + 1)
            if len(data) > ANNOUNCEMENT_MAX_BYTES:
                raise ValueError(f"larger than {ANNOUNCEMENT_MAX_BYTES} bytes")
            announced = _Announcement.model_validate_json(data)
        except (OSError, ValueError) as exc:  # a ValidationError is a ValueError
            log.warning("%s: ignoring %s: %s", self.what, self.endpoint, exc)
            return None
        finally:
            os.close(fd)
        return announced.port if announced.nonce == self.nonce else None

    async def _serve(self, http: httpx.AsyncClient) -> None:
        """Health-check the process until it exits or fails `unhealthy_after` checks in a row."""
        failures = 0
        while failures < self._settings.unhealthy_after and not await self._exits_within(
            self._settings.health_interval_s
        ):
            failures = 0 if await self._healthy(http) else failures + 1
        raise await self._down()

    async def _healthy(self, http: httpx.AsyncClient) -> bool:
        """Answering, and as this start of this process: not another process on the port."""
        if self.url is None:
            return False
        try:
            response = await http.get(f"{self.url}/health")
            body = response.json() if response.status_code == 200 else {}
        except (httpx.TransportError, ValueError):
            return False
        field, value = self.identity
        return (
            isinstance(body, dict) and body.get(field) == value and body.get("nonce") == self.nonce
        )

    async def _exits_within(self, seconds: float) -> bool:
        assert self._process is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._process.wait(), seconds)
        return self._process.returncode is not None

    async def _down(self) -> _ProcessDown:
        code = self._process.returncode if self._process else None
        await self._terminate()
        self._ready.clear()
        self.restarts += 1
        self._failed = f"{self.kind} exited (code {code}); see {self._log}"
        return _ProcessDown(self._failed)


class ManagedWorker(ManagedProcess[WorkerConfig]):
    """An inference worker: one replica of a deployment, on its GPUs."""

    kind = "worker"
    nonce_env = NONCE_ENV
    module = "dataplane.inference"
    unrecorded_host = "127.0.0.1"  # the only address workers had then

    def __init__(
        self, spec: WorkerSpec, config: WorkerConfig, settings: SupervisorSettings
    ) -> None:
        self.spec = spec
        super().__init__(config, settings.work_dir / "workers" / str(spec.replica_id), settings)

    @property
    def what(self) -> str:
        return f"replica {self.spec.replica_id}"

    @property
    def identity(self) -> tuple[str, str]:
        return ("replica_id", str(self.spec.replica_id))

    @property
    def fixed_port(self) -> int | None:
        return self.spec.port

    @property
    def gpu_indices(self) -> list[int]:
        return list(self.spec.gpu_indices)

    def arguments(self) -> list[str]:
        return [
            *super().arguments(),
            *("--host", self._settings.host, "--port", str(self.port or 0)),
            *("--replica-id", str(self.spec.replica_id), "--announce", str(self.endpoint)),
            *("--log-level", "warning"),
        ]

    def environment(self) -> dict[str, str]:
        return {"CUDA_VISIBLE_DEVICES": ",".join(map(str, self.spec.gpu_indices))}


def _url_host(host: str) -> str:
    """How a URL names a listening address: loopback for a wildcard, IPv6 in brackets."""
    host = "127.0.0.1" if host in WILDCARDS else host
    return f"[{host}]" if ":" in host else host


class _Announcement(BaseModel):
    """What a worker writes to `run/endpoint.json` once its port is bound."""

    model_config = ConfigDict(frozen=True)

    port: int = Field(ge=1, le=65535)
    nonce: str | None
    pid: int


def stop_recorded(directory: Path, nonce_env: str) -> None:
    """Stop the process an earlier agent recorded in `directory` and left serving (with
    `keep_workers`), now that no desired state wants it."""
    record = directory / "process.json"
    try:
        data = json.loads(record.read_text())
        found = AdoptedProcess(int(data["pid"]), str(data["nonce"]), nonce_env)
    except (OSError, ValueError, KeyError, TypeError):
        return
    found.send_signal(signal.SIGTERM)
    record.unlink(missing_ok=True)


class _ProcessDown(Exception):
    """The process exited or stopped answering its health check."""


class WorkerSupervisor:
    """The reconciler's driver for worker components."""

    def __init__(self, settings: SupervisorSettings, stager: ModelStager | None = None) -> None:
        self._settings = settings
        self._stager = stager
        self.workers: dict[UUID, ManagedWorker] = {}
        self.on_change: Callable[[], None] = lambda: None
        """Called whenever a worker starts answering (on whatever port it took) and before
        one is stopped, so the node's gateway follows them."""

    async def apply(self, components: Components) -> list[ComponentResult]:
        desired = {w.replica_id: w for w in components.workers}
        gone = [self.workers.pop(r) for r in list(self.workers) if r not in desired]
        if gone:
            self.on_change()  # the gateway stops sending them requests first
        for worker in gone:
            await worker.stop()
        root = self._settings.work_dir / "workers"
        left = (
            [d for d in root.iterdir() if d.name not in {str(r) for r in desired}]
            if root.is_dir()
            else []
        )
        for directory in left:  # kept serving for an earlier agent, now wanted by none
            await asyncio.to_thread(stop_recorded, directory, NONCE_ENV)
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
                    current.reconfigure(config)
            else:
                if current is not None:
                    await current.stop()
                current = self.workers[spec.replica_id] = ManagedWorker(
                    spec, config, self._settings
                )
                current.on_ready = lambda: self.on_change()
                await current.start()
            await current.wait_ready()
            return ComponentResult(
                kind="worker",
                name=name,
                ok=True,
                error=None,
                port=current.port,
                url=self._settings.peer_url(current.port),
            )
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


@dataclass(frozen=True)
class GatewaySettings:
    """The node's gateway: who it is, where clients reach it, where its counters live."""

    gateway_id: str
    host: str = "127.0.0.1"
    advertise: str | None = None
    """The host name clients use; None: `host`, or the machine's name when `host` is a
    wildcard."""
    counters_url: str | None = None
    """Redis shared by every gateway of the fleet; None: counters in the process, which
    hold a deployment's limits only while one gateway serves it."""

    def client_url(self, port: int) -> str:
        return advertised_url(self.host, self.advertise, port)


def render_gateway_config(
    spec: GatewaySpec,
    components: Components,
    workers: Mapping[UUID, ManagedWorker],
    gateway: GatewaySettings,
    announce: Path,
    stats_key_sha256: list[str],
) -> GatewayConfig:
    """The gateway in front of each deployment the node runs workers of, forwarding to those
    that answer, at the port and nonce of their current start, and to the deployment's
    replicas on other nodes (with its peer key, which they require); its stats served to
    holders of a key with one of `stats_key_sha256`."""
    by_deployment: dict[UUID, list[WorkerSpec]] = {}
    for worker in components.workers:
        by_deployment.setdefault(worker.deployment_id, []).append(worker)
    peers = {p.deployment_id: p for p in spec.peers}
    routes = []
    for deployment_id, specs in sorted(by_deployment.items(), key=lambda item: str(item[0])):
        running = [workers.get(w.replica_id) for w in specs]
        local = [  # over loopback: no key
            ReplicaConfig(replica_id=str(w.spec.replica_id), base_url=w.url, nonce=w.nonce)
            for w in running
            if w is not None and w.ready and w.url is not None
        ]
        peer = peers.get(deployment_id)
        remote = (
            [
                ReplicaConfig(replica_id=str(r.replica_id), base_url=r.url, peer_key=peer.key)
                for r in peer.replicas
            ]
            if peer is not None
            else []
        )
        routes.append(
            DeploymentRoute(
                deployment_id=str(deployment_id),
                served_model_name=specs[0].model_name,
                replicas=local + remote,
                tenants=_tenants(specs[0]),
                slo_thresholds=_thresholds(specs[0], components),
            )
        )
    return GatewayConfig(
        gateway_id=gateway.gateway_id,
        host=gateway.host,
        port=spec.port or 0,
        announce=announce,
        counters_url=gateway.counters_url,
        deployments=routes,
        stats_key_sha256=stats_key_sha256,
    )


class ManagedGateway(ManagedProcess[GatewayConfig]):
    """The node's OpenAI gateway (dataplane/gateway)."""

    kind = "gateway"
    nonce_env = GATEWAY_NONCE_ENV
    module = "dataplane.gateway"

    def __init__(
        self, spec: GatewaySpec, config: GatewayConfig, settings: SupervisorSettings
    ) -> None:
        self.spec = spec
        super().__init__(config, settings.work_dir / "gateway", settings)

    @property
    def identity(self) -> tuple[str, str]:
        return ("gateway_id", self.config.gateway_id)

    @property
    def fixed_port(self) -> int | None:
        return self.spec.port

    @property
    def bind_host(self) -> str:
        return self.config.host

    def arguments(self) -> list[str]:
        return [*super().arguments(), "--port", str(self.port or 0), "--log-level", "warning"]


class Fronted(NamedTuple):
    """The running gateway as telemetry reads it: where, with which stats key, for what."""

    url: str
    stats_key: str
    deployments: list[str]


class GatewaySupervisor:
    """The reconciler's driver for the node's gateway: started once the workers converged,
    in front of those that answer, and pointed anew at a worker each time it starts on a
    port or is about to stop (a config rewrite, which requests in flight survive)."""

    def __init__(
        self, settings: SupervisorSettings, gateway: GatewaySettings, workers: WorkerSupervisor
    ) -> None:
        self._settings = settings
        self._gateway = gateway
        self._workers = workers
        self._desired: tuple[GatewaySpec, Components] | None = None
        # The agent's own key to the gateway's /v1/internal/stats, whatever it listens on.
        self._stats_key = secrets.token_urlsafe(32)
        self.process: ManagedGateway | None = None
        workers.on_change = self._refresh

    async def apply(self, components: Components) -> list[ComponentResult]:
        spec = components.gateway if components.workers else None
        if spec is None:
            self._desired = None
            await self._stop()
            await asyncio.to_thread(stop_recorded, self._directory, GATEWAY_NONCE_ENV)
            return []
        try:
            config = self._render(spec, components)
            self._desired = (spec, components)
            current = self.process
            if (
                current is not None
                and current.spec.port == spec.port  # peers come and go on a running one
                and not current.config.restart_fields_changed(config)
            ):
                current.spec = spec
                if config != current.config:
                    current.reconfigure(config)
            else:
                await self._stop()
                config = self._render(spec, components)  # workers may have moved meanwhile
                current = self.process = ManagedGateway(spec, config, self._settings)
                await current.start()
            await current.wait_ready()
            assert current.port is not None
            return [
                ComponentResult(
                    kind="gateway",
                    name="gateway",
                    ok=True,
                    error=None,
                    port=current.port,
                    url=self._gateway.client_url(current.port),
                )
            ]
        except Exception as exc:  # every failure becomes the component's error text
            log.exception("the gateway failed to converge")
            return [
                ComponentResult(
                    kind="gateway", name="gateway", ok=False, error=f"{exc}"[:4000] or repr(exc)
                )
            ]

    @property
    def fronted(self) -> Fronted | None:
        """None while the gateway is not serving."""
        process = self.process
        if process is None or not process.ready or process.url is None:
            return None
        deployments = [d.deployment_id for d in process.config.deployments]
        return Fronted(process.url, self._stats_key, deployments)

    @property
    def _directory(self) -> Path:
        return self._settings.work_dir / "gateway"

    def _render(self, spec: GatewaySpec, components: Components) -> GatewayConfig:
        return render_gateway_config(
            spec,
            components,
            self._workers.workers,
            self._gateway,
            self._directory / "run" / "endpoint.json",
            [hashlib.sha256(self._stats_key.encode()).hexdigest()],
        )

    def _refresh(self) -> None:
        if self.process is None or self._desired is None:
            return
        config = self._render(*self._desired)
        if config != self.process.config:
            self.process.reconfigure(config)

    async def _stop(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            await process.stop()

    async def close(self) -> None:
        """At the agent's exit: stop the gateway, or leave it serving when `keep_workers`
        says so, for the next agent to adopt."""
        if self._settings.keep_workers and self.process is not None:
            process, self.process = self.process, None
            await process.detach()
        else:
            await self._stop()
