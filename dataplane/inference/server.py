"""The worker's HTTP face: a small ASGI app that uvicorn serves.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (SSE when ``stream``),
``GET /v1/models`` (those three need ``Authorization: Bearer <key>``; the key's sha256
names the tenant), ``GET /health``, ``GET /metrics`` (Prometheus text) and
``GET /v1/internal/stats?after=SEQ`` (sketches, exact SLO counts and request totals for
the agent, plus the queue depth and running count now; a stats key or a loopback
client). No web framework: six routes, JSON in and out, and streaming that must notice a
departed client are little enough to write against ASGI directly.

``Worker`` assembles runtime, engine, scheduler, tokenizer and measurement from a
``WorkerConfig`` and re-applies the config file on SIGHUP or when its mtime changes.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs

from pydantic import ValidationError

from dataplane.inference.config import WorkerConfig
from dataplane.inference.engine import BatchEngine, EngineSequence
from dataplane.inference.metrics import RequestTiming, TelemetryStats, WorkerMetrics
from dataplane.inference.protocol import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    ResponseShape,
    usage,
    validation_error,
)
from dataplane.inference.runtime import OnnxRuntime
from dataplane.inference.sampling import SamplingParams
from dataplane.inference.scheduler import (
    FINISH_ERROR,
    GenerationRequest,
    QueueFull,
    Scheduler,
)
from dataplane.inference.tokenizer import TextTokenizer

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_BodyT = TypeVar("_BodyT", CompletionRequest, ChatRequest)

CONFIG_POLL_SECONDS = 1.0
_LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})
_JSON = [(b"content-type", b"application/json")]
_SSE = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


def key_digest(key: str) -> str:
    """How keys are stored in the config: lowercase sha256 hex of the key's UTF-8."""
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Identity:
    """Who this process is, as `/health` answers it: the replica it serves and the nonce
    its starter gave this start (None when run by hand)."""

    replica_id: str | None = None
    nonce: str | None = None


class Worker:
    """The assembled worker and its live configuration."""

    def __init__(
        self, config: WorkerConfig, config_path: Path | None = None, identity: Identity = Identity()
    ) -> None:
        self.identity = identity
        self.config = config
        self.config_path = config_path
        self._config_mtime = config_path.stat().st_mtime_ns if config_path else None
        self.config_generation = 1
        self.runtime = OnnxRuntime(config.model_dir, config.cache_dir, config.runtime)
        self.tokenizer = TextTokenizer(config.model_dir)
        self.metrics = WorkerMetrics(config.served_model_name)
        self.stats = TelemetryStats(
            config.deployment_id, config.served_model_name, config.slo_thresholds
        )
        engine = BatchEngine(self.runtime, config.batching.max_rows_per_forward)
        self.scheduler = Scheduler(
            engine, config.batching, config.scheduling, config.tenants, self.metrics, self.stats
        )
        self._keys = self._key_table(config)

    @staticmethod
    def _key_table(config: WorkerConfig) -> list[tuple[str, str]]:
        return [
            (digest, tenant) for tenant, cfg in config.tenants.items() for digest in cfg.key_sha256
        ]

    def tenant_for(self, key: str) -> str | None:
        """Constant-time match of the key's digest against every configured digest."""
        digest = key_digest(key)
        found = None
        for configured, tenant in self._keys:
            if hmac.compare_digest(configured, digest):
                found = tenant
        return found

    def stats_key_ok(self, key: str) -> bool:
        digest = key_digest(key)
        return any([hmac.compare_digest(d, digest) for d in self.config.stats_key_sha256])

    def apply(self, new: WorkerConfig) -> None:
        """Apply a new config between engine steps; in-flight requests carry on."""
        stuck = self.config.restart_fields_changed(new)
        if stuck:
            log.warning("config fields %s change only on restart; keeping the old values", stuck)
            new = new.model_copy(update={name: getattr(self.config, name) for name in stuck})
        self.config = new
        self._keys = self._key_table(new)
        self.scheduler.reconfigure(new.batching, new.scheduling, new.tenants)
        self.stats.set_thresholds(new.slo_thresholds)
        self.config_generation += 1
        log.info("applied config generation %d", self.config_generation)

    def reload(self) -> None:
        """Re-read the config file; a broken file is logged and the old config kept."""
        if self.config_path is None:
            return
        try:
            self._config_mtime = self.config_path.stat().st_mtime_ns
            new = WorkerConfig.load(self.config_path)
        except (OSError, ValueError) as exc:
            log.error("config reload failed, keeping the running config: %s", exc)
            return
        self.apply(new)

    async def watch_config(self) -> None:
        """Reload whenever the config file's mtime changes."""
        while self.config_path is not None:
            await asyncio.sleep(CONFIG_POLL_SECONDS)
            try:
                mtime = self.config_path.stat().st_mtime_ns
            except OSError:
                continue
            if mtime != self._config_mtime:
                self.reload()


@dataclass
class _Call:
    scope: Scope
    receive: Receive
    send: Send
    arrival: float

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.scope["headers"]:
            if key == name:
                return bytes(value)
        return None


async def _send_json(
    send: Send, status: int, body: Any, headers: dict[str, str] | None = None
) -> None:
    payload = json.dumps(body).encode()
    extra = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": [*_JSON, *extra]})
    await send({"type": "http.response.body", "body": payload})


def _sse(body: Any) -> bytes:
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


class _StopMatcher:
    """Holds back just enough streamed text to catch a stop string split across tokens."""

    def __init__(self, stops: list[str]) -> None:
        self._stops = stops
        self._hold = max((len(s) for s in stops), default=1) - 1
        self._pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Text that is safe to emit now, and whether a stop string was reached."""
        self._pending += text
        hits = [i for i in (self._pending.find(s) for s in self._stops) if i >= 0]
        if hits:
            out, self._pending = self._pending[: min(hits)], ""
            return out, True
        cut = max(0, len(self._pending) - self._hold)
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self._pending = self._pending, ""
        return out


def _single_prompt(prompt: str | list[int] | list[str] | list[list[int]]) -> str | list[int]:
    """OpenAI takes a prompt as text, token ids, or a batch of either; we take one."""
    if isinstance(prompt, str):
        return prompt
    texts = [p for p in prompt if isinstance(p, str)]
    id_lists = [p for p in prompt if isinstance(p, list)]
    ids = [p for p in prompt if isinstance(p, int)]
    if len(texts) + len(id_lists) == 1:
        return texts[0] if texts else id_lists[0]
    if texts or id_lists:
        raise ApiError(
            400, "Only one prompt per request is supported.", param="prompt", code="invalid_value"
        )
    return ids


class InferenceApp:
    """ASGI application over a ``Worker``."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self._tasks: list[asyncio.Task[None]] = []
        self._routes: dict[str, tuple[str, Callable[[_Call], Awaitable[None]]]] = {
            "/v1/completions": ("POST", self._completions),
            "/v1/chat/completions": ("POST", self._chat),
            "/v1/models": ("GET", self._models),
            "/health": ("GET", self._health),
            "/metrics": ("GET", self._metrics),
            "/v1/internal/stats": ("GET", self._stats),
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        call = _Call(scope, receive, send, time.perf_counter())
        try:
            route = self._routes.get(scope["path"])
            if route is None:
                raise ApiError(404, f"Unknown path {scope['path']}", code="not_found")
            method, handler = route
            if scope["method"] != method:
                raise ApiError(
                    405,
                    f"{scope['path']} takes {method}",
                    code="method_not_allowed",
                    headers={"allow": method},
                )
            await handler(call)
        except ApiError as exc:
            await _send_json(send, exc.status, exc.body(), exc.headers)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                loop = asyncio.get_running_loop()
                self._tasks = [
                    loop.create_task(self.worker.scheduler.run()),
                    loop.create_task(self.worker.watch_config()),
                ]
                loop.add_signal_handler(signal.SIGHUP, self.worker.reload)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                for task in self._tasks:
                    task.cancel()
                self.worker.scheduler.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    # -- plumbing ----------------------------------------------------------------------

    def _authenticate(self, call: _Call) -> str:
        value = call.header(b"authorization") or b""
        scheme, _, key = value.decode("latin-1").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise ApiError(
                401,
                "You didn't provide an API key (Authorization: Bearer KEY).",
                code="invalid_api_key",
            )
        tenant = self.worker.tenant_for(key.strip())
        if tenant is None:
            raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")
        return tenant

    async def _read_body(self, call: _Call) -> bytes:
        limit = self.worker.config.max_request_bytes
        declared = call.header(b"content-length")
        too_big = ApiError(413, f"Request body exceeds {limit} bytes.", code="request_too_large")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_big
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await call.receive()
            if message["type"] == "http.disconnect":
                raise ApiError(400, "Client disconnected.", code="client_closed")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise too_big
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _watch_disconnect(self, call: _Call, request: GenerationRequest) -> None:
        while True:
            message = await call.receive()
            if message["type"] == "http.disconnect":
                self.worker.scheduler.cancel(request)
                return

    # -- OpenAI endpoints -----------------------------------------------------------------

    async def _completions(self, call: _Call) -> None:
        tenant = self._authenticate(call)
        body = await self._parse(call, CompletionRequest)
        prompt = _single_prompt(body.prompt)
        if isinstance(prompt, str):
            ids = self.worker.tokenizer.encode(prompt)
        else:
            ids = prompt
            vocab = self.worker.runtime.spec.vocab_size
            if any(not 0 <= t < vocab for t in ids):
                raise ApiError(
                    400, f"Token ids must be in [0, {vocab}).", param="prompt", code="invalid_value"
                )
        await self._generate(call, tenant, body, ids, body.max_tokens or 16, chat=False)

    async def _chat(self, call: _Call) -> None:
        tenant = self._authenticate(call)
        body = await self._parse(call, ChatRequest)
        messages = [
            ("system" if m.role == "developer" else m.role, m.text()) for m in body.messages
        ]
        ids = self.worker.tokenizer.render_chat(messages)
        limit = body.max_completion_tokens or body.max_tokens
        room = self.worker.runtime.spec.max_context - len(ids)
        await self._generate(call, tenant, body, ids, limit or max(room, 1), chat=True)

    async def _parse(self, call: _Call, model: type[_BodyT]) -> _BodyT:
        raw = await self._read_body(call)
        try:
            body = model.model_validate_json(raw)
        except ValidationError as exc:
            if exc.errors()[0]["type"] == "json_invalid":
                raise ApiError(
                    400, "We could not parse the JSON body of your request.", code="invalid_json"
                ) from None
            raise validation_error(exc) from None
        if body.model != self.worker.config.served_model_name:
            raise ApiError(
                404,
                f"The model `{body.model}` does not exist.",
                param="model",
                code="model_not_found",
            )
        return body

    async def _generate(
        self,
        call: _Call,
        tenant: str,
        body: CompletionRequest | ChatRequest,
        ids: list[int],
        max_tokens: int,
        *,
        chat: bool,
    ) -> None:
        spec = self.worker.runtime.spec
        param = "messages" if chat else "prompt"
        if not ids:
            raise ApiError(400, "The prompt is empty.", param=param, code="invalid_value")
        if len(ids) + max_tokens > spec.max_context:
            raise ApiError(
                400,
                f"This model's maximum context length is {spec.max_context} tokens. However, "
                f"you requested {len(ids) + max_tokens} tokens ({len(ids)} in the {param}, "
                f"{max_tokens} in the completion).",
                param=param,
                code="context_length_exceeded",
            )
        stops = body.stop_strings()
        params = SamplingParams(
            max_new_tokens=max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed,
            ignore_eos=body.ignore_eos,
        )
        tenant_cfg = self.worker.config.tenants.get(tenant)
        request = GenerationRequest(
            tenant=tenant,
            priority=tenant_cfg.priority if tenant_cfg else 0,
            seq=EngineSequence(prompt=ids, params=params),
            timing=RequestTiming(arrival=call.arrival, input_tokens=len(ids)),
        )
        try:
            self.worker.scheduler.submit(request)
        except QueueFull as exc:
            raise ApiError(
                429,
                str(exc),
                type_="rate_limit_error",
                code="rate_limit_exceeded",
                headers={"retry-after": str(exc.retry_after_s)},
            ) from None
        shape = ResponseShape(
            chat,
            f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            int(time.time()),
            self.worker.config.served_model_name,
        )
        watcher = asyncio.create_task(self._watch_disconnect(call, request))
        try:
            if body.stream:
                await self._stream(call, request, shape, stops, body)
            else:
                await self._respond(call, request, shape, stops)
        finally:
            watcher.cancel()
            self.worker.scheduler.cancel(request)
            if request.finish_reason == FINISH_ERROR:
                self.worker.stats.count_failed(tenant)

    async def _tokens(self, request: GenerationRequest, stops: list[str]) -> AsyncIterator[str]:
        """Yield text as tokens arrive; ends the request early on a stop string."""
        detok = self.worker.tokenizer.stream()
        matcher = _StopMatcher(stops)
        sent = 0
        while True:
            new = request.output_ids[sent:]
            sent += len(new)
            text, stopped = matcher.push(detok.feed(new))
            if stopped:
                self.worker.scheduler.stop(request)
                yield text
                return
            if request.done:
                yield text + matcher.flush()
                return
            if text:
                yield text
            await request.next_update()

    async def _respond(
        self, call: _Call, request: GenerationRequest, shape: ResponseShape, stops: list[str]
    ) -> None:
        text = "".join([piece async for piece in self._tokens(request, stops)])
        if request.cancelled:
            return
        if request.finish_reason == FINISH_ERROR:
            raise ApiError(
                500,
                "The engine failed while serving this request.",
                type_="server_error",
                code="engine_error",
            )
        body = shape.complete(
            text,
            request.finish_reason or "stop",
            usage(request.timing.input_tokens, len(request.output_ids)),
        )
        await _send_json(call.send, 200, body)

    async def _stream(
        self,
        call: _Call,
        request: GenerationRequest,
        shape: ResponseShape,
        stops: list[str],
        body: CompletionRequest | ChatRequest,
    ) -> None:
        options = body.stream_options
        running_usage = options is not None and options.continuous_usage_stats
        send = call.send
        await send({"type": "http.response.start", "status": 200, "headers": _SSE})
        first = True
        prompt_tokens = request.timing.input_tokens
        async for text in self._tokens(request, stops):
            if request.cancelled:
                return
            if not text and not first:
                continue
            now_usage = usage(prompt_tokens, len(request.output_ids)) if running_usage else None
            chunk = shape.chunk(text, first=first, usage_=now_usage)
            first = False
            await send({"type": "http.response.body", "body": _sse(chunk), "more_body": True})
        if request.cancelled:
            return
        final_usage = usage(prompt_tokens, len(request.output_ids))
        tail = []
        if request.finish_reason == FINISH_ERROR:
            tail.append(
                _sse(
                    ApiError(
                        500,
                        "The engine failed while serving this request.",
                        type_="server_error",
                        code="engine_error",
                    ).body()
                )
            )
        else:
            tail.append(
                _sse(
                    shape.chunk(
                        None, request.finish_reason, usage_=final_usage if running_usage else None
                    )
                )
            )
        if options is not None and options.include_usage:
            tail.append(_sse(shape.usage_chunk(final_usage)))
        tail.append(b"data: [DONE]\n\n")
        await send({"type": "http.response.body", "body": b"".join(tail)})

    async def _models(self, call: _Call) -> None:
        self._authenticate(call)
        config = self.worker.config
        await _send_json(
            call.send,
            200,
            {
                "object": "list",
                "data": [
                    {
                        "id": config.served_model_name,
                        "object": "model",
                        "created": 0,
                        "owned_by": "tailguard",
                        "max_model_len": self.worker.runtime.spec.max_context,
                    }
                ],
            },
        )

    # -- operations ---------------------------------------------------------------------

    async def _health(self, call: _Call) -> None:
        worker = self.worker
        scheduler = worker.scheduler
        await _send_json(
            call.send,
            200,
            {
                "status": "ok",
                "replica_id": worker.identity.replica_id,
                "nonce": worker.identity.nonce,
                "deployment_id": worker.config.deployment_id,
                "model": worker.config.served_model_name,
                "providers": worker.runtime.providers,
                "running": len(scheduler.running),
                "waiting": len(scheduler.policy),
                "max_batch_size": worker.config.batching.max_batch_size,
                "policy": worker.config.scheduling.policy,
                "config_generation": worker.config_generation,
            },
        )

    async def _metrics(self, call: _Call) -> None:
        payload = self.worker.metrics.render()
        await call.send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")],
            }
        )
        await call.send({"type": "http.response.body", "body": payload})

    async def _stats(self, call: _Call) -> None:
        client = call.scope.get("client") or ("", 0)
        if self.worker.config.stats_key_sha256:
            scheme, _, key = (call.header(b"authorization") or b"").decode("latin-1").partition(" ")
            if scheme.lower() != "bearer" or not self.worker.stats_key_ok(key.strip()):
                raise ApiError(401, "A stats key is required.", code="invalid_api_key")
        elif client[0] not in _LOOPBACK:
            raise ApiError(403, "Stats are served to loopback clients only.", code="forbidden")
        query = parse_qs(call.scope.get("query_string", b"").decode())
        after_values = query.get("after", ["0"])
        if not after_values[0].isdigit():
            raise ApiError(
                400, "after must be a sequence number", param="after", code="invalid_value"
            )
        scheduler = self.worker.scheduler
        window = self.worker.stats.collect(int(after_values[0]))
        # Queue depth and running are right now, not part of the (possibly resent) window.
        live = {"queue_depth": len(scheduler.policy), "running": len(scheduler.running)}
        await _send_json(call.send, 200, {**window, **live})
