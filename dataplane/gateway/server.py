"""The gateway: one OpenAI endpoint for the deployments in its config, in front of their
replicas.

Routes: ``POST /v1/completions`` and ``POST /v1/chat/completions`` (forwarded to a
replica as they came, the answer passed through as it arrives: one SSE chunk at a time
when streamed), ``GET /v1/models[/{id}]``, ``GET /health``, ``GET /metrics`` and
``GET /v1/internal/stats?deployment=ID&after=SEQ`` (the worker's stats shape, measured
here). ``Authorization: Bearer <key>`` names the tenant by the same sha256 key hashes the
workers hold, and is forwarded to the replica, which checks it again.

A request waits at the gateway until a replica has a free batch slot (``queue_ahead``
more, if configured) and the fleet-wide ledger lets its tenant start (``ledger.py``:
priority classes, virtual token counters, concurrency and token rate, shared by every
gateway through Redis); then it goes to the replica with the lowest predicted TTFT
(``routing.py``). While every replica is full, a tenant under its weighted share of the
fleet's slots may still go ahead to a replica whose worker would pause another tenant's
row for it, so it waits a step there rather than for a request to end. While requests wait, those of a lower priority class that can no
longer meet their TTFT objective get 429 (with Retry-After) while a higher class waits
too; any request gets 429 when its tenant's queue here is full or after ``max_wait_s``.

Each replica's state stream is read by a task of its own: a stream that breaks or falls
silent for a health interval marks the replica down until its ``/health`` answers again
(with the configured nonce) and its stream resumes. A replica that fails mid-stream gives
its client an OpenAI error chunk and ``[DONE]``; one that fails before answering is
replaced by another, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import signal
import time
import uuid
from collections import deque
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import aiohttp

from dataplane.asgi import (
    JSON_HEADERS,
    MODEL_PREFIX,
    PEER_KEY_HEADER,
    SSE_HEADERS,
    Call,
    ConfigFile,
    ModelServer,
    check_internal,
    key_digest,
    read_body,
    send_json,
    sse,
    wait_disconnect,
)
from dataplane.gateway.config import DeploymentRoute, GatewayConfig, ReplicaConfig
from dataplane.gateway.ledger import (
    Dues,
    Finished,
    InProcessLedger,
    Ledger,
    RedisLedger,
    Renewal,
    Settlement,
    StartRequest,
)
from dataplane.gateway.metrics import GatewayMetrics
from dataplane.gateway.routing import Dispatch, Replica, ReplicaState, choose, choose_ahead
from dataplane.inference.config import TenantConfig
from dataplane.inference.metrics import RequestTiming, TelemetryStats
from dataplane.inference.protocol import ApiError
from dataplane.mux import MAX_BODY as MUX_MAX_BODY
from dataplane.mux import MuxClient, MuxResponse

log = logging.getLogger(__name__)

# While requests wait, the dispatcher looks again at least this often (other gateways'
# tenants change what this one may start without a message reaching it).
DISPATCH_POLL_S = 0.01
# After the ledger refuses a request going ahead of full replicas, its tenant's next try
# waits this long (or for a slot to free), so a full fleet costs no ledger call per poll;
# another tenant's request, next in line meanwhile, is asked for at once.
AHEAD_BACKOFF_S = 0.05
# What a gateway owes the ledger rides on its next admission. An end with nothing
# waiting is settled at once; what no call took once it is this old (streamed tokens,
# mostly) is settled on its own (the loop looks twice as often).
SETTLE_AFTER_S = 0.02
# How long one settling call, or a stopping gateway's settling, may take (what it
# carried is then owed again; leases expire anyway).
SETTLE_TIMEOUT_S = 2.0
# What a chat request without max_tokens reserves from its tenant's token bucket.
DEFAULT_CHAT_RESERVE = 256
# OpenAI's default max_tokens for completions, written into requests that name none.
DEFAULT_COMPLETION_RESERVE = 16
_DEFAULT_TENANT = TenantConfig.model_validate({})
_TOKEN_CHUNK = b'"choices":[{'
_ERROR_CHUNK = b'data: {"error"'
_DONE = b"data: [DONE]\n\n"
# What a replica that cannot be reached, or breaks off or falls silent, raises: aiohttp's
# connection, payload and timeout errors are all ClientErrors (and timeouts TimeoutErrors).
_TRANSPORT_ERRORS = (aiohttp.ClientError, TimeoutError)


def _timed_out_late(exc: BaseException, began: float, timeout: float | None) -> bool:
    """Whether ``exc`` is a timeout of ``timeout`` seconds from ``began`` (loop time)
    that fired long after it was due: this gateway's own loop was stalled (its machine,
    a pause), which says nothing of the replica."""
    late = asyncio.get_running_loop().time() - began > (timeout or math.inf) * 1.5
    return isinstance(exc, TimeoutError) and late


KEEPALIVE_S = 2.0
"""How long an idle connection to a replica is kept: under the workers' (uvicorn's) 5 s,
so a request is never sent on a connection the worker is closing at that moment, which
would fail it and mark a healthy replica down."""


def _replica_error() -> ApiError:
    return ApiError(
        502,
        "The replica serving this request failed; retry the request.",
        type_="server_error",
        code="replica_failed",
    )


def _lease_error() -> ApiError:
    return ApiError(
        503,
        "The gateway lost this request's place under its tenant's concurrency limit "
        "(it could not renew it in time); retry the request.",
        type_="server_error",
        code="lease_lost",
    )


@dataclass
class _WholeTiming(RequestTiming):
    """A non-streamed answer: its client sees every token at once, at the end."""

    tokens: int = 0

    @property
    def output_tokens(self) -> int:
        return self.tokens


@dataclass(eq=False)
class _Forward:
    """A request being forwarded to a replica. The gateway stops it (cancels its task)
    once at most, for the first of its replica's mark-down (``failed``: it fails over,
    or ends with an error) and its lease's loss (it ends with an error)."""

    task: asyncio.Task[Any] | None
    call: Call
    stopped: bool = False
    failed: bool = False

    def stop(self, *, failed: bool) -> None:
        """Cancel the forwarding task, unless it was already, or its response is
        complete (its last bytes may be on their way)."""
        if not (self.stopped or self.call.done) and self.task is not None:
            self.stopped, self.failed = True, failed
            self.task.cancel()


@dataclass(eq=False)
class _Waiter:
    """A request waiting at the gateway for a replica and the ledger's leave."""

    tenant: str
    priority: int
    prompt_tokens: int
    reserve: int
    arrival: float
    objective: float | None
    stream: bool = False
    lease: str = field(default_factory=lambda: uuid.uuid4().hex)
    future: asyncio.Future[Replica] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    # Set where the replica is chosen: the request counts against its room from then on.
    dispatch: Dispatch | None = None
    # The TTFT predicted where it was sent (the learnt bias left out); None when sent
    # ahead of a full batch, whose TTFT depends on the worker pausing a row for it.
    predicted: float | None = 0.0
    # Output tokens passed to the client so far.
    tokens: int = 0
    # Its last start was asked by a call whose answer was lost: it may hold its lease.
    unsure: bool = False
    # What its last start asked the ledger to advance its tenant's counter by.
    cost: float = 0.0
    # Its lease lapsed and another request may hold its place: it is ended.
    lost: bool = False
    # Where it is being forwarded, once it is.
    forward: _Forward | None = None

    def undone(self, limits: TenantConfig) -> Finished:
        """The end of a start that never reached a replica, applied only if it happened."""
        return Finished(self.tenant, self.lease, self.reserve, limits, True, self.cost)


def _process(replica: Replica) -> tuple[str, str | None]:
    """The worker process serving a replica: its address and the nonce it answers."""
    return replica.config.base_url, replica.config.nonce


class _Deployment:
    """A deployment's live part of the gateway: replicas, waiting requests, measurement."""

    def __init__(self, route: DeploymentRoute) -> None:
        self.route = route
        self.replicas: dict[str, Replica] = {}
        self.watchers: dict[str, asyncio.Task[None]] = {}
        self.waiting: dict[str, deque[_Waiter]] = {}
        self.wake = asyncio.Event()
        self.stats = TelemetryStats(
            route.deployment_id, route.served_model_name, route.slo_thresholds
        )
        self.counters: dict[str, float] = {}
        self.owed = Dues()
        # Settling what ended while nothing waited here to carry it.
        self.settling: asyncio.Task[None] | None = None
        # The leases of the requests started here: tenant -> lease id -> request; and
        # when the ledger last renewed them (time.monotonic).
        self.leases: dict[str, dict[str, _Waiter]] = {}
        self.renewed_at = time.monotonic()
        # Seconds until the tenant's bucket held enough, as the ledger last said.
        self.token_wait: dict[str, float] = {}
        # By the process serving them (address and nonce): a worker restarted under the
        # same replica id is not cut when its predecessor's streams fail, and a replica
        # whose config changed around the same process is.
        self.forwards: dict[tuple[str, str | None], set[_Forward]] = {}
        # The replicas that take requests over one connection (dataplane.mux), by id.
        self.muxes: dict[str, MuxClient] = {}
        # While every replica is full, no request of these tenants goes ahead before
        # this (perf_counter).
        self.ahead_after: dict[str, float] = {}
        self.keys: list[tuple[str, str]] = []
        self.set_route(route)

    def set_route(self, route: DeploymentRoute) -> None:
        self.route = route
        self.keys = [(d, tenant) for tenant, cfg in route.tenants.items() for d in cfg.key_sha256]
        self.stats.set_thresholds(route.slo_thresholds)

    def tenant_for(self, digest: str) -> str | None:
        found = None
        for configured, tenant in self.keys:
            if hmac.compare_digest(configured, digest):
                found = tenant
        return found

    def limits(self, tenant: str) -> TenantConfig:
        return self.route.tenants.get(tenant, _DEFAULT_TENANT)

    def waiting_tenants(self) -> dict[str, int]:
        """Tenants with requests waiting here -> the reservation of the next one."""
        return {tenant: queue[0].reserve for tenant, queue in self.waiting.items() if queue}

    def unqueue(self, waiter: _Waiter) -> None:
        """Take the waiter out of its queue, never started; a start that may have
        happened unseen is undone."""
        queue = self.waiting.get(waiter.tenant)
        if queue is not None and waiter in queue:
            queue.remove(waiter)
            if waiter.unsure:
                self.owed.end(waiter.undone(self.limits(waiter.tenant)))

    def replica_down(self, replica: Replica) -> None:
        """Mark the replica down and end the requests forwarded to it."""
        replica.mark_down()
        for forward in self.forwards.pop(_process(replica), set()):
            forward.stop(failed=True)
        self.wake.set()

    def forwarding(self, replica: Replica, forward: _Forward) -> None:
        self.forwards.setdefault(_process(replica), set()).add(forward)

    def forwarded(self, replica: Replica, forward: _Forward) -> None:
        """The forward ended (or failed): no mark-down is for it any more."""
        key = _process(replica)
        held = self.forwards.get(key)
        if held is not None:
            held.discard(forward)
            if not held:
                del self.forwards[key]

    def renewed(self, sent: Mapping[str, Collection[str]], renewal: Renewal) -> None:
        """Act on the lapsed leases a renewal of ``sent`` (tenant -> lease ids) found: a
        request whose lease was lost is ended (another may have started in its place).
        The ledger applies a request's end after a renewal sent before it; one applied
        first all the same (a call sent again after a Redis restart or a retry) has its
        lease taken back, which is freed again."""
        self.renewed_at = time.monotonic()
        for tenant, ids in sent.items():
            held = self.leases.get(tenant, {})
            for lease in renewal.regained.intersection(ids).difference(held):
                self.owed.end(Finished(tenant, lease, 0, self.limits(tenant)))
            for lease in renewal.lost.intersection(ids):
                waiter = held.get(lease)
                if waiter is None or waiter.lost:
                    continue
                log.warning("tenant %s lost a lease under a running request; ending it", tenant)
                waiter.lost = True
                if waiter.forward is not None:
                    waiter.forward.stop(failed=False)

    def waiting_count(self) -> int:
        return sum(len(queue) for queue in self.waiting.values())

    @contextlib.contextmanager
    def paying(self) -> Iterator[list[Settlement]]:
        """What is owed, for one ledger call to carry. If the call fails it is owed again
        as it was (the ledger applies each settlement once); if it succeeds, the
        counters seen here advance by its charges."""
        owed = self.owed.take()
        try:
            yield owed
        except BaseException:
            self.owed.restore(owed)
            raise
        for settlement in owed:
            for tenant, amount in settlement.charges.items():
                self.counters[tenant] = self.counters.get(tenant, 0.0) + amount


class Gateway:
    """The assembled gateway: config, ledger, replica watchers and dispatchers."""

    def __init__(
        self, config: GatewayConfig, config_path: Path | None = None, nonce: str | None = None
    ) -> None:
        self.config = config
        self.nonce = nonce
        self.config_file = ConfigFile(config_path, GatewayConfig.load, self.apply)
        backlog_ttl = min(config.lease_ttl_s, 2.0)
        # Leases and waiting marks are renewed four times within the shorter of the TTLs.
        self.beat_every = min(config.lease_ttl_s, backlog_ttl) / 4
        self.ledger: Ledger
        if config.counters_url is None:
            self.ledger = InProcessLedger(config.lease_ttl_s, backlog_ttl)
        else:
            self.ledger = RedisLedger(config.counters_url, config.lease_ttl_s, backlog_ttl)
        self.metrics = GatewayMetrics()
        self.deployments: dict[str, _Deployment] = {}
        """By deployment id: deployments of different tenants may share a model name."""
        self._dispatchers: dict[str, asyncio.Task[None]] = {}
        # Deployments removed while requests of theirs ran, with their dispatchers:
        # settled until those end.
        self._retired: list[tuple[_Deployment, asyncio.Task[None]]] = []
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []
        self._client: aiohttp.ClientSession | None = None
        # Mux clients closing once the requests on them end.
        self._retiring: dict[MuxClient, asyncio.Task[None]] = {}

    @property
    def client(self) -> aiohttp.ClientSession:
        """The HTTP client for the replicas, made on first use (it belongs to the running
        event loop): connections without limit, kept alive between requests for
        KEEPALIVE_S; a connect timeout of a health interval and no other, so a stream may
        last any time."""
        if self._client is None:
            self._client = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=0, limit_per_host=0, keepalive_timeout=KEEPALIVE_S
                ),
                timeout=aiohttp.ClientTimeout(total=None, connect=self.config.health_interval_s),
            )
        return self._client

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.apply(self.config)
        self._tasks = [
            loop.create_task(self._flush_loop()),
            loop.create_task(self.config_file.watch()),
        ]

    async def stop(self) -> None:
        self._stopping = True  # ends from now on are left to the last settling below
        tasks = [*self._tasks, *self._dispatchers.values()]
        tasks += [t for d in self.deployments.values() for t in d.watchers.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        muxes = [*self._retiring, *(m for d in self.deployments.values() for m in d.muxes.values())]
        muxes += [m for dep, _ in self._retired for m in dep.muxes.values()]
        for mux in muxes:
            await mux.close()
        if self._client is not None:
            await self._client.close()
            self._client = None
        every = [*self.deployments.values(), *(dep for dep, _ in self._retired)]
        # Settling under way is let finish, not cancelled, so what it carries is
        # settled before the gateway goes.
        settling = [dep.settling for dep in every if dep.settling is not None]
        if settling:
            _, late = await asyncio.wait(settling, timeout=SETTLE_TIMEOUT_S)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        for dep in every:  # what no call carried yet, starts in doubt undone
            for waiter in [w for queue in dep.waiting.values() for w in queue if w.unsure]:
                dep.unqueue(waiter)
            for _ in range(2):  # what failed calls carried goes alone, then the rest
                try:
                    await self.settle(dep)
                except Exception:
                    log.exception("settling with the ledger failed; its leases will expire")
                    break
        await self.ledger.close()

    def apply(self, new: GatewayConfig) -> None:
        """Apply a config: deployments and replicas come and go, tenants and objectives
        change; requests in flight carry on."""
        stuck = self.config.restart_fields_changed(new)
        if stuck:
            log.warning("config fields %s change only on restart; keeping the old values", stuck)
            new = new.model_copy(update={name: getattr(self.config, name) for name in stuck})
        self.config = new
        loop = asyncio.get_running_loop()
        routes = {route.deployment_id: route for route in new.deployments}
        for deployment_id in [d for d in self.deployments if d not in routes]:
            gone = self.deployments.pop(deployment_id)
            dispatcher = self._dispatchers.pop(deployment_id)
            dispatcher.cancel()
            self._retired.append((gone, dispatcher))
            model = gone.route.served_model_name
            for task in gone.watchers.values():
                task.cancel()
            for queue in gone.waiting.values():
                for waiter in list(queue):
                    if not waiter.future.done():
                        waiter.future.set_exception(
                            ApiError(
                                404, f"The model `{model}` does not exist.", code="model_not_found"
                            )
                        )
                    gone.unqueue(waiter)
        for deployment_id, route in routes.items():
            dep = self.deployments.get(deployment_id)
            if dep is None:
                dep = self.deployments[deployment_id] = _Deployment(route)
                self._dispatchers[deployment_id] = loop.create_task(self._dispatch_loop(dep))
            dep.set_route(route)
            wanted = {r.replica_id: r for r in route.replicas}
            for replica_id in [r for r in dep.replicas if r not in wanted]:
                dep.watchers.pop(replica_id).cancel()
                dep.replica_down(dep.replicas.pop(replica_id))
            for replica_id, cfg in wanted.items():
                replica = dep.replicas.get(replica_id)
                if replica is not None and replica.config == cfg:
                    continue
                if replica is not None:
                    dep.watchers.pop(replica_id).cancel()
                replica = dep.replicas[replica_id] = Replica(cfg)
                dep.watchers[replica_id] = loop.create_task(self._watch_replica(dep, replica))
            dep.wake.set()

    def reload(self) -> None:
        self.config_file.reload()

    # -- replicas ---------------------------------------------------------------------

    def _state_headers(self, replica: ReplicaConfig) -> dict[str, str]:
        key = self.config.worker_key
        return {**({"authorization": f"Bearer {key}"} if key else {}), **_peer(replica)}

    async def _watch_replica(self, dep: _Deployment, replica: Replica) -> None:
        """Follow a replica's state stream; down while it is broken, retried every health
        interval."""
        try:
            await self._follow_replica(dep, replica)
        finally:
            # Its connection goes with it, unless a replica of new config took its place.
            if dep.replicas.get(replica.replica_id) in (None, replica):
                mux = dep.muxes.pop(replica.replica_id, None)
                if mux is not None:
                    self._retire(mux)

    def _retire(self, mux: MuxClient) -> None:
        """Close ``mux`` once the requests on it end (a removed deployment's carry on);
        a stopping gateway closes it at once."""
        task = self._retiring[mux] = asyncio.create_task(mux.close(drain=True))
        task.add_done_callback(lambda _: self._retiring.pop(mux, None))

    async def _follow_replica(self, dep: _Deployment, replica: Replica) -> None:
        cfg = replica.config
        model = dep.route.served_model_name
        loop = asyncio.get_running_loop()
        excused = False  # the last silence was put down to a stall of this gateway
        while True:
            interval = self.config.health_interval_s
            heard = loop.time()  # when the replica was last asked, or last answered
            # Connecting, and each read, may take a health interval at most.
            timeout = aiohttp.ClientTimeout(total=None, connect=interval, sock_read=interval)
            try:
                async with self.client.get(
                    f"{cfg.base_url}/health", timeout=timeout, allow_redirects=False
                ) as health:
                    health.raise_for_status()
                    body = json.loads(await health.read())
                if not isinstance(body, dict):
                    raise ValueError(f"/health answers no object at {cfg.base_url}")
                if cfg.nonce is not None and body.get("nonce") != cfg.nonce:
                    raise ValueError(f"/health answers another nonce than {cfg.replica_id}'s")
                if cfg.peer_key is not None and body.get("replica_id") != cfg.replica_id:
                    # a replica of the fleet's (no nonce for another node's) answers as itself
                    raise ValueError(f"/health answers as another replica than {cfg.replica_id}")
                self._use_mux(dep, cfg, body.get("mux"))
                heard = loop.time()
                async with self.client.get(
                    f"{cfg.base_url}/v1/internal/state",
                    headers=self._state_headers(cfg),
                    timeout=timeout,
                    allow_redirects=False,
                ) as stream:
                    stream.raise_for_status()
                    self.metrics.replica_up.labels(model, cfg.replica_id).set(1)
                    pending = b""
                    async for chunk in stream.content.iter_any():
                        heard, excused = loop.time(), False
                        # Only the newest of the messages read at once matters.
                        pending += chunk
                        *lines, pending = pending.split(b"\n")
                        if lines:
                            state = ReplicaState.from_message(json.loads(lines[-1]))
                            replica.update(state, messages=len(lines))
                            if dep.waiting_count():  # room may have freed for them
                                dep.wake.set()
            except TimeoutError as exc:
                # A silence timed out long after it was due: what the replica sent
                # meanwhile waits unread. The replica is asked again, not marked down; a
                # second such silence in a row is the replica's.
                if _timed_out_late(exc, heard, interval) and not excused:
                    log.warning("replica %s: read after a stall of this gateway", cfg.replica_id)
                    excused = True
                    continue
                if replica.up:
                    log.warning("replica %s is down: %s", cfg.replica_id, exc)
            except (*_TRANSPORT_ERRORS, ValueError, KeyError, TypeError, AttributeError) as exc:
                # Unreachable, or answering what no worker would: down either way.
                if replica.up:
                    log.warning("replica %s is down: %s", cfg.replica_id, exc)
            dep.replica_down(replica)
            if (mux := dep.muxes.get(cfg.replica_id)) is not None:
                await mux.disconnect()  # the next request connects to whatever serves then
            self.metrics.replica_up.labels(model, cfg.replica_id).set(0)
            await asyncio.sleep(interval)

    def _use_mux(self, dep: _Deployment, cfg: ReplicaConfig, path: Any) -> None:
        """Forward to the replica over one connection where its /health offers one; a
        replica that stops offering it (an older worker in its place) is sent HTTP. New
        credentials are for its next connection; a connection to an address no longer
        used is closed once the requests on it end."""
        mux = dep.muxes.get(cfg.replica_id)
        if isinstance(path, str) and path.startswith("/"):
            url, headers = cfg.base_url + path, self._state_headers(cfg)
            if mux is not None and mux.url == url:
                mux.headers = headers
                return
            dep.muxes[cfg.replica_id] = MuxClient(self.client, url, headers)
        elif mux is not None:
            del dep.muxes[cfg.replica_id]
        if mux is not None:
            self._retire(mux)

    # -- admission ----------------------------------------------------------------------

    async def _dispatch_loop(self, dep: _Deployment) -> None:
        while True:
            dep.wake.clear()
            # Leases unrenewed for a TTL (a stall, the ledger away) may have lapsed: no
            # request starts here until a renewal says which were lost, so a start in
            # their place does not cost this gateway's own running requests.
            held = any(dep.leases.values())
            try:
                if not held or time.monotonic() - dep.renewed_at < self.config.lease_ttl_s:
                    await self._dispatch_round(dep)
            except Exception:  # the ledger's server may be away: retry, never stop
                log.exception("dispatch round failed")
            self.metrics.waiting.labels(dep.route.served_model_name).set(dep.waiting_count())
            timeout = DISPATCH_POLL_S if dep.waiting_count() else None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(dep.wake.wait(), timeout)

    def _reject(self, dep: _Deployment, waiter: _Waiter, why: str) -> None:
        dep.unqueue(waiter)
        if waiter.future.done():
            return
        waiter.future.set_exception(self._busy(dep, waiter.tenant, why))

    def _busy(self, dep: _Deployment, tenant: str, why: str) -> ApiError:
        """429 with the seconds until the requests waiting ahead could have started: the
        replicas' capacity for everyone waiting here, and the tenant's own limits for its
        own queue (its concurrency, and its token bucket as the ledger last saw it)."""
        replicas = [r for r in dep.replicas.values() if r.state is not None]
        slots = sum(r.state.max_batch_size for r in replicas if r.state is not None) or 1
        e2e = max((r.state.mean_e2e_s for r in replicas if r.state is not None), default=1.0)
        ahead = dep.waiting_count() + 1
        waits = [ahead * e2e / slots]
        limits = dep.limits(tenant)
        own = list(dep.waiting.get(tenant, ()))
        if limits.max_concurrency:
            waits.append((len(own) + 1) * e2e / limits.max_concurrency)
        if limits.tokens_per_s:
            queued = sum(w.reserve for w in own)
            waits.append(dep.token_wait.get(tenant, 0.0) + queued / limits.tokens_per_s)
        retry = max(1, math.ceil(max(waits)))
        return ApiError(
            429,
            f"Tenant {tenant!r}: {why}",
            type_="rate_limit_error",
            code="rate_limit_exceeded",
            headers={"retry-after": str(retry)},
        )

    async def _dispatch_round(self, dep: _Deployment) -> None:
        """Shed what must wait no longer, then start waiting requests while a replica has
        room: highest class first, then the lowest fleet-wide counter, each as the
        ledger allows."""
        now = time.perf_counter()
        admission = dep.route.admission
        waiters = [w for queue in dep.waiting.values() for w in queue]
        late = [w for w in waiters if w.objective is not None and now - w.arrival > w.objective]
        top = max((w.priority for w in waiters), default=0)
        if late:  # who waits at other gateways decides whether they must give way
            fleet = await self.ledger.waiting(dep.route.deployment_id)
            top = max([top, *(dep.limits(t).priority for t in fleet)])
        for waiter in waiters:
            if waiter.future.done():
                dep.unqueue(waiter)
            elif now - waiter.arrival > admission.max_wait_s:
                self._reject(dep, waiter, "waited too long for capacity")
            elif waiter in late and waiter.priority < top:
                self._reject(dep, waiter, "no replica can meet its TTFT objective now")
        skip: set[str] = set()
        replicas = list(dep.replicas.values())
        configs = dep.route.tenants
        while True:
            tenants = [t for t in dep.waiting_tenants() if t not in skip]
            if not tenants:
                return
            tenant = min(tenants, key=lambda t: (-dep.limits(t).priority, dep.counters.get(t, 0.0)))
            full = not any(r.room(admission.queue_ahead) > 0 for r in replicas)
            # With every replica full, only the tenant next in line may go ahead, to a
            # worker that would pause a row for it; the ledger is asked once per backoff.
            if full and (
                time.perf_counter() < dep.ahead_after.get(tenant, 0.0)
                or not any(r.pauses_for(tenant, configs) for r in replicas)
            ):
                return
            queue = dep.waiting[tenant]
            waiter = queue[0]
            limits = configs.get(tenant, _DEFAULT_TENANT)
            if not waiter.unsure:  # asked again under its lease: what the first call charged
                waiter.cost = waiter.prompt_tokens * dep.route.input_token_weight / limits.weight
            slots = sum(r.state.row_cap for r in replicas if r.up and r.state) if full else 0
            request = StartRequest(
                tenant, waiter.lease, waiter.cost, waiter.reserve, len(queue) == 1, share_of=slots
            )
            try:
                with dep.paying() as owed:
                    decision = await self.ledger.try_start(
                        dep.route.deployment_id,
                        self.config.gateway_id,
                        request,
                        dep.waiting_tenants(),
                        dep.route.tenants,
                        owed,
                    )
            except BaseException:
                if waiter.future.done() or waiter not in queue:  # it left during the call
                    dep.owed.end(waiter.undone(limits))
                else:
                    waiter.unsure = True  # asked again under the same lease, or undone
                raise
            waiter.unsure = False  # any answer says whether the lease is held
            dep.counters[tenant] = decision.counter
            dep.token_wait[tenant] = decision.wait_s if decision.reason == "tokens" else 0.0
            if not decision.ok:
                if full:
                    now = time.perf_counter()
                    dep.ahead_after = {t: at for t, at in dep.ahead_after.items() if at > now}
                    dep.ahead_after[tenant] = now + AHEAD_BACKOFF_S
                    return
                skip.add(tenant)
                continue
            if waiter in queue:
                queue.remove(waiter)
            replica = (
                choose_ahead(replicas, tenant, waiter.prompt_tokens, configs)
                if full
                else choose(replicas, waiter.prompt_tokens, waiter.priority, admission.queue_ahead)
            )
            if waiter.future.done() or replica is None:
                # Held only: a waiter that left during the call had this start undone
                # already if an earlier answer was lost.
                dep.owed.end(waiter.undone(limits))
                if replica is None and not waiter.future.done():
                    # A new lease: the old one's end may still be on its way to the ledger.
                    waiter.lease = uuid.uuid4().hex
                    queue.appendleft(waiter)
                    skip.add(tenant)  # the replicas changed meanwhile: next round
                continue
            # The slot is taken here, before the next choice, not when the request is sent.
            waiter.predicted = (
                None if full else replica.model_ttft(waiter.prompt_tokens, waiter.priority)
            )
            waiter.dispatch = replica.routed(tenant, waiter.prompt_tokens, waiter.stream)
            dep.leases.setdefault(tenant, {})[waiter.lease] = waiter
            waiter.future.set_result(replica)

    async def settle(self, dep: _Deployment) -> None:
        """Settle what the deployment owes the ledger, if anything; a call that fails
        leaves it owed."""
        if not dep.owed:
            return
        with dep.paying() as owed:
            async with asyncio.timeout(SETTLE_TIMEOUT_S):
                await self.ledger.settle(dep.route.deployment_id, owed)
        if any(s.finished for s in owed) and dep.waiting_count():  # it may let one start
            dep.wake.set()

    async def _flush_loop(self) -> None:
        """Settle what no admission carried; renew leases and waiting marks."""
        beat_every = self.beat_every
        last_beat = 0.0
        while True:
            await asyncio.sleep(SETTLE_AFTER_S / 2)
            now = time.monotonic()
            beat = now - last_beat >= beat_every
            if beat:
                last_beat = now
            for dep in [*self.deployments.values(), *(dep for dep, _ in self._retired)]:
                since = dep.owed.since
                if since is not None and now - since >= SETTLE_AFTER_S:
                    try:
                        await self.settle(dep)
                    except Exception:
                        log.exception("settling with the ledger failed; retrying")
            self._retired = [
                (dep, dispatcher)
                for dep, dispatcher in self._retired
                if dep.owed or dep.settling or any(dep.leases.values()) or not dispatcher.done()
            ]
            if not beat:
                continue
            # A removed deployment's requests run to their ends under leases that must
            # not lapse meanwhile (unless its id is back: its waiting marks would go).
            retired = [d for d, _ in self._retired if d.route.deployment_id not in self.deployments]
            for dep in [*self.deployments.values(), *retired]:
                sent = {t: list(held) for t, held in dep.leases.items() if held}
                try:
                    renewal = await self.ledger.heartbeat(
                        dep.route.deployment_id,
                        self.config.gateway_id,
                        dep.waiting_tenants(),
                        sent,
                        dep.route.tenants,
                    )
                except Exception:
                    log.exception("renewing leases failed; retrying")
                    continue
                dep.renewed(sent, renewal)

    async def admit(self, dep: _Deployment, tenant: str, waiter: _Waiter) -> Replica:
        queue = dep.waiting.setdefault(tenant, deque())
        if len(queue) >= dep.route.admission.max_queue_len:
            raise self._busy(dep, tenant, "too many requests waiting")
        queue.append(waiter)
        dep.wake.set()
        try:
            return await waiter.future
        except asyncio.CancelledError:
            dep.unqueue(waiter)
            dep.wake.set()  # the count of those waiting changed
            future = waiter.future
            if future.done() and not future.cancelled() and future.exception() is None:
                if waiter.dispatch is not None:
                    future.result().seen(waiter.dispatch)
                self.release(dep, tenant, waiter, waiter.reserve)
            raise

    def release(self, dep: _Deployment, tenant: str, waiter: _Waiter, refund: int) -> None:
        """Free the request's lease here, and owe the ledger its end: the lease and the
        settled reservation go with the admission it wakes, or, with nothing waiting
        here, at once, off any request's way."""
        dep.leases.get(tenant, {}).pop(waiter.lease, None)
        dep.owed.end(Finished(tenant, waiter.lease, refund, dep.limits(tenant)))
        if not (dep.waiting_count() or dep.settling or self._stopping):
            dep.settling = asyncio.get_running_loop().create_task(self._settle_idle(dep))
        dep.wake.set()

    async def _settle_idle(self, dep: _Deployment) -> None:
        """Settle ends (and the tokens owed beside them) while nothing waits here; tokens
        alone wait for the settling loop, or a stream would cost a call per token."""
        try:
            while dep.owed.ends and not dep.waiting_count():
                await self.settle(dep)
        except Exception:
            log.exception("settling with the ledger failed; retrying")
        finally:
            dep.settling = None


async def watch_disconnect(call: Call, work: asyncio.Task[Any]) -> None:
    """Cancel ``work`` when the client disconnects before its response is complete."""
    await wait_disconnect(call)
    if not call.done:
        work.cancel()


def _prompt_tokens(body: dict[str, Any]) -> int:
    """About how many tokens the prompt is (the gateway has no tokenizer): four bytes a
    token of text, token ids as they are."""
    prompt = body.get("prompt")
    if prompt is None:
        messages = body.get("messages") or []
        text = sum(len(json.dumps(m.get("content", ""))) for m in messages if isinstance(m, dict))
        return max(1, text // 4 + 4 * len(messages))
    if isinstance(prompt, str):
        return max(1, len(prompt.encode()) // 4)
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return len(prompt)
    return max(1, len(json.dumps(prompt)) // 4)


def _reserve(body: dict[str, Any], chat: bool) -> tuple[int, int | None]:
    """Output tokens the request may produce, and the ``max_tokens`` to forward when the
    request names none (so the worker stops at what was reserved)."""
    limit = body.get("max_completion_tokens") if chat else None
    limit = limit or body.get("max_tokens")
    default = None
    if not limit:
        limit = default = DEFAULT_CHAT_RESERVE if chat else DEFAULT_COMPLETION_RESERVE
    choices = body.get("n") or 1
    if not isinstance(limit, int) or not isinstance(choices, int):
        raise ApiError(400, "max_tokens and n are integers.", code="invalid_value")
    return max(1, limit) * max(1, choices), default


def _status_outcome(status: int) -> str:
    """How a replica's answer other than 200 counts."""
    if status == 429:
        return "rejected"
    return "failed" if status >= 500 else "error"


class GatewayApp(ModelServer):
    """ASGI application over a ``Gateway``."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        super().__init__()

    async def startup(self) -> None:
        self.gateway.start()
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.gateway.reload)

    async def shutdown(self) -> None:
        await self.gateway.stop()

    # -- plumbing -----------------------------------------------------------------------

    def _tenants(self, call: Call) -> dict[str, tuple[_Deployment, str]]:
        """Model name -> the deployment serving it to the key's tenant, and that tenant
        (401 if the key names none); the config lets one tenant see one deployment per
        model name."""
        digest = key_digest(call.require_bearer())
        found = {}
        for dep in self.gateway.deployments.values():
            tenant = dep.tenant_for(digest)
            if tenant is not None:
                found[dep.route.served_model_name] = (dep, tenant)
        if not found:
            raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")
        return found

    async def _read_body(self, call: Call) -> bytes:
        return await read_body(call, self.gateway.config.max_request_bytes)

    # -- OpenAI endpoints -------------------------------------------------------------

    async def _completions(self, call: Call) -> None:
        await self._serve(call, "/v1/completions", chat=False)

    async def _chat(self, call: Call) -> None:
        await self._serve(call, "/v1/chat/completions", chat=True)

    async def _serve(self, call: Call, path: str, *, chat: bool) -> None:
        """Admit, forward and measure one request; a client that leaves ends it, waiting
        or streaming, and the replica sees it leave too."""
        tenants = self._tenants(call)
        raw = await self._read_body(call)
        try:
            body = json.loads(raw)
        except ValueError:
            raise ApiError(
                400, "We could not parse the JSON body of your request.", code="invalid_json"
            ) from None
        if not isinstance(body, dict):
            raise ApiError(400, "The request body must be a JSON object.", code="invalid_value")
        model = body.get("model")
        if not isinstance(model, str) or model not in tenants:
            raise ApiError(
                404, f"The model `{model}` does not exist.", param="model", code="model_not_found"
            )
        dep, tenant = tenants[model]
        work = asyncio.create_task(
            self._admit_and_forward(call, dep, tenant, path, raw, body, chat)
        )
        watcher = asyncio.create_task(watch_disconnect(call, work))
        try:
            await work
        except asyncio.CancelledError:
            dep.stats.count_cancelled(tenant)
            self.gateway.metrics.requests.labels(tenant, model, "cancelled").inc()
        finally:
            watcher.cancel()

    async def _admit_and_forward(
        self,
        call: Call,
        dep: _Deployment,
        tenant: str,
        path: str,
        raw: bytes,
        body: dict[str, Any],
        chat: bool,
    ) -> None:
        gateway = self.gateway
        model = dep.route.served_model_name
        limits = dep.limits(tenant)
        reserve, default = _reserve(body, chat)
        if default is not None:  # the replica may produce no more than was reserved
            raw = json.dumps({**body, "max_tokens": default}).encode()
        stream = bool(body.get("stream"))
        waiter = _Waiter(
            tenant=tenant,
            priority=limits.priority,
            prompt_tokens=_prompt_tokens(body),
            reserve=reserve,
            arrival=call.arrival,
            objective=dep.stats.tightest(tenant, "ttft"),
            stream=stream,
        )
        try:
            replica = await gateway.admit(dep, tenant, waiter)
        except ApiError as exc:
            if exc.status == 429:
                dep.stats.count_rejected(tenant)
                gateway.metrics.requests.labels(tenant, model, "rejected").inc()
            raise
        timing: RequestTiming = (
            RequestTiming(call.arrival, waiter.prompt_tokens)
            if stream
            else _WholeTiming(call.arrival, waiter.prompt_tokens)
        )
        timing.scheduled = time.perf_counter()
        headers = {"content-type": "application/json"}
        if (auth := call.header(b"authorization")) is not None:
            headers["authorization"] = auth.decode("latin-1")
        outcome = "failed"
        try:
            outcome = await self._forward(
                call, dep, tenant, waiter, replica, path, raw, headers, timing
            )
        except asyncio.CancelledError:
            outcome = "cancelled"  # counted once, where the cancellation ends
            raise
        except ApiError as exc:
            outcome = "rejected" if exc.status == 429 else "failed"
            raise
        finally:
            if outcome != "cancelled":
                gateway.metrics.requests.labels(tenant, model, outcome).inc()
            if outcome == "completed":
                dep.stats.record(tenant, timing)
                gateway.metrics.observe(tenant, model, timing)
            elif outcome == "failed":
                dep.stats.count_failed(tenant)
            elif outcome == "rejected":
                dep.stats.count_rejected(tenant)
            # What it did not use goes back to the bucket; what it used beyond is charged.
            gateway.release(dep, tenant, waiter, waiter.reserve - waiter.tokens)

    async def _forward(
        self,
        call: Call,
        dep: _Deployment,
        tenant: str,
        waiter: _Waiter,
        replica: Replica,
        path: str,
        raw: bytes,
        headers: dict[str, str],
        timing: RequestTiming,
    ) -> str:
        """Send the request to ``replica`` (another one, once, if it cannot be reached)
        and pass the answer on; returns the outcome (the output tokens are counted on
        the waiter as they pass)."""
        gateway = self.gateway
        model = dep.route.served_model_name
        weight = dep.route.output_token_weight / dep.limits(tenant).weight
        stream = waiter.stream
        dispatch = waiter.dispatch
        predicted = waiter.predicted
        for attempt in range(2):
            if waiter.lost:
                raise _lease_error()
            current = replica
            if not current.up:  # down since it was chosen
                if dispatch is not None:
                    current.seen(dispatch)
                dispatch = None
                fallback = self._fallback(dep, current, waiter)
                if attempt or fallback is None:
                    raise _replica_error()
                replica = current = fallback
            if dispatch is None:
                predicted = current.model_ttft(waiter.prompt_tokens, waiter.priority)
                dispatch = current.routed(tenant, waiter.prompt_tokens, stream)
            current.inflight += 1
            forward = waiter.forward = _Forward(asyncio.current_task(), call)
            dep.forwarding(current, forward)
            gateway.metrics.routed.labels(model, current.replica_id).inc()
            began = asyncio.get_running_loop().time()
            mux = dep.muxes.get(current.replica_id) if len(raw) <= MUX_MAX_BODY else None
            started = False
            try:
                try:
                    response: aiohttp.ClientResponse | MuxResponse
                    if mux is not None:
                        response = await mux.request(
                            path, {**headers, **_peer(current.config)}, raw
                        )
                    else:
                        response = await gateway.client.request(
                            "POST",
                            current.config.base_url + path,
                            data=raw,
                            headers={**headers, **_peer(current.config)},
                            allow_redirects=False,
                        )
                    if stream:
                        current.started(dispatch)
                    try:
                        if response.status != 200:
                            payload = await response.read()
                            await call.send(
                                {
                                    "type": "http.response.start",
                                    "status": response.status,
                                    "headers": _passed_headers(response),
                                }
                            )
                            started = True
                            call.done = True
                            await call.send({"type": "http.response.body", "body": payload})
                            return _status_outcome(response.status)
                        if not stream:
                            payload = await response.read()
                            timing.token_times.append(time.perf_counter())
                            tokens = _usage_tokens(payload)
                            assert isinstance(timing, _WholeTiming)
                            timing.tokens = waiter.tokens = tokens
                            dep.owed.charge(tenant, tokens * weight)
                            await call.send(
                                {
                                    "type": "http.response.start",
                                    "status": 200,
                                    "headers": JSON_HEADERS,
                                }
                            )
                            started = True
                            call.done = True
                            await call.send({"type": "http.response.body", "body": payload})
                            return "completed"
                        await call.send(
                            {"type": "http.response.start", "status": 200, "headers": SSE_HEADERS}
                        )
                        started = True
                        pending = b""
                        errored = False
                        async for chunk in response.content.iter_any():
                            await call.send(
                                {"type": "http.response.body", "body": chunk, "more_body": True}
                            )
                            # The events complete so far; JSON escapes quotes in strings,
                            # so the markers match only where an event has them.
                            complete, _, pending = (pending + chunk).rpartition(b"\n\n")
                            now = time.perf_counter()
                            fresh = complete.count(_TOKEN_CHUNK)
                            errored = errored or _ERROR_CHUNK in complete
                            if fresh:
                                if waiter.tokens == 0 and predicted is not None:
                                    current.observed(predicted, now - (timing.scheduled or now))
                                timing.token_times.extend([now] * fresh)
                                waiter.tokens += fresh
                                dep.owed.charge(tenant, fresh * weight)
                        call.done = True
                        await call.send({"type": "http.response.body", "body": b""})
                        return "failed" if errored else "completed"
                    finally:
                        # Back to the pool once read to its end; closed if not, so the
                        # replica sees the request leave.
                        response.release()
                except asyncio.CancelledError:
                    task = asyncio.current_task()
                    # Stopped by the mark-down alone, it fails over; by its lease's loss
                    # alone, it ends with an error; cancelled by the client's leaving too
                    # (in the same loop iteration), it ends here.
                    if not forward.stopped or (task is not None and task.uncancel() > 0):
                        raise
                    if forward.failed:
                        raise aiohttp.ClientConnectionError("the replica was marked down") from None
                    if not started:
                        raise _lease_error() from None
                    call.done = True
                    await call.send(
                        {"type": "http.response.body", "body": sse(_lease_error().body()) + _DONE}
                    )
                    return "failed"
            except _TRANSPORT_ERRORS as exc:
                log.warning("replica %s failed: %s", current.replica_id, exc)
                dep.forwarded(current, forward)  # it ends here, not by cancel
                # A connect that timed out late is this gateway's stall: the replica's
                # health watch, not this request, says whether it is down.
                connecting = isinstance(exc, aiohttp.ConnectionTimeoutError)
                late = connecting and _timed_out_late(exc, began, gateway.client.timeout.connect)
                if not (forward.failed or late):
                    dep.replica_down(current)
                if started:
                    tail = sse(_replica_error().body()) + _DONE
                    call.done = True
                    await call.send({"type": "http.response.body", "body": tail})
                    return "failed"
                fallback = self._fallback(dep, current, waiter)
                if attempt or fallback is None:
                    raise _replica_error() from None
                replica = fallback
            finally:
                current.inflight -= 1
                current.seen(dispatch)
                dep.forwarded(current, forward)
                dispatch = None
        raise _replica_error()

    @staticmethod
    def _fallback(dep: _Deployment, failed: Replica, waiter: _Waiter) -> Replica | None:
        others = [r for r in dep.replicas.values() if r is not failed and r.up]
        return min(
            others, key=lambda r: r.predict(waiter.prompt_tokens, waiter.priority), default=None
        )

    async def _models(self, call: Call) -> None:
        tenants = self._tenants(call)
        cards = [self._card(model) for model in tenants]
        await send_json(call.send, 200, {"object": "list", "data": cards})

    async def _model(self, call: Call) -> None:
        tenants = self._tenants(call)
        name = call.scope["path"].removeprefix(MODEL_PREFIX)
        if name not in tenants:
            raise ApiError(
                404, f"The model `{name}` does not exist.", param="model", code="model_not_found"
            )
        await send_json(call.send, 200, self._card(name))

    @staticmethod
    def _card(model: str) -> dict[str, Any]:
        return {"id": model, "object": "model", "created": 0, "owned_by": "tailguard"}

    # -- operations ---------------------------------------------------------------------

    async def _health(self, call: Call) -> None:
        gateway = self.gateway
        deployments = [
            {
                "deployment_id": dep.route.deployment_id,
                "model": dep.route.served_model_name,
                "waiting": dep.waiting_count(),
                "replicas": [
                    {"replica_id": r.replica_id, "up": r.up, "inflight": r.inflight}
                    for r in dep.replicas.values()
                ],
            }
            for dep in gateway.deployments.values()
        ]
        await send_json(
            call.send,
            200,
            {
                "status": "ok",
                "gateway_id": gateway.config.gateway_id,
                "nonce": gateway.nonce,
                "deployments": deployments,
            },
        )

    async def _metrics(self, call: Call) -> None:
        payload = self.gateway.metrics.render()
        headers = [(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")]
        await call.send({"type": "http.response.start", "status": 200, "headers": headers})
        await call.send({"type": "http.response.body", "body": payload})

    async def _stats(self, call: Call) -> None:
        """A deployment's stats as measured here, in the worker's shape (one deployment
        needs no ``deployment`` parameter)."""
        check_internal(call, self.gateway.config.stats_key_sha256)
        query = parse_qs(call.scope.get("query_string", b"").decode())
        after = query.get("after", ["0"])[0]
        if not after.isdigit():
            raise ApiError(
                400, "after must be a sequence number", param="after", code="invalid_value"
            )
        by_id = self.gateway.deployments
        wanted = query.get("deployment", [None])[0]
        if wanted is None and len(by_id) == 1:
            wanted = next(iter(by_id))
        dep = by_id.get(wanted or "")
        if dep is None:
            raise ApiError(
                404, "Name a deployment of this gateway.", param="deployment", code="not_found"
            )
        window = dep.stats.collect(int(after))
        live = {
            "queue_depth": dep.waiting_count(),
            "running": sum(len(ids) for ids in dep.leases.values()),
            "replicas": [_routing(r, r.replica_id in dep.muxes) for r in dep.replicas.values()],
        }
        await send_json(call.send, 200, {**window, **live})


def _routing(replica: Replica, mux: bool) -> dict[str, Any]:
    """Where this gateway sends requests and why: each replica's routed count since the
    gateway started, the TTFT it predicts for a short request sent there now, and how
    requests reach it (one connection for all, or HTTP each)."""
    predicted = replica.predict(0, 0)
    return {
        "replica_id": replica.replica_id,
        "up": replica.up,
        "inflight": replica.inflight,
        "routed": replica.routed_total,
        "predicted_ttft_s": predicted if math.isfinite(predicted) else None,
        "transport": "mux" if mux else "http",
    }


def _peer(replica: ReplicaConfig) -> dict[str, str]:
    """What lets a worker on another node serve this gateway: its deployment's peer key."""
    return {PEER_KEY_HEADER: replica.peer_key} if replica.peer_key else {}


def _passed_headers(response: aiohttp.ClientResponse | MuxResponse) -> list[tuple[bytes, bytes]]:
    keep = ("content-type", "retry-after", "allow")
    return [
        (name.encode(), value.encode())
        for key, value in response.headers.items()
        if (name := key.lower()) in keep
    ]


def _usage_tokens(payload: bytes) -> int:
    try:
        usage = json.loads(payload).get("usage") or {}
        return int(usage.get("completion_tokens", 0))
    except (ValueError, AttributeError, TypeError):
        return 0
