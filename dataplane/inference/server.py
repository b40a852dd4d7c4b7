"""The worker's HTTP face: a small ASGI app that uvicorn serves.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (SSE when ``stream``,
one token per chunk as vLLM sends them), ``GET /v1/models[/{id}]`` (those need
``Authorization: Bearer <key>``; the key's sha256 names the tenant), ``GET /health``, ``GET /metrics`` (Prometheus text) and
``GET /v1/internal/stats?after=SEQ`` (sketches, exact SLO counts and request totals for
the agent, plus the queue depth and running count now; a stats key or a loopback
client) and ``GET /v1/internal/state`` (the same access rule: newline-delimited JSON, one
message of live scheduler state whenever its occupancy changes (a decode step that moved
only the measured costs sends none until they drift), at most one per change the reader
keeps up with, and one per ``STATE_HEARTBEAT_S`` regardless, for the gateways' routing). No web framework: a handful of routes, JSON in and out, and streaming that must
notice a departed client are little enough to write against ASGI directly.

A request for ``n`` choices runs as ``n`` sequences scheduled independently (each is a
request to the scheduler, with its own seed stream); the engine computes their identical
prompt once when they are prefilled together, which they are unless the step's token
budget or free slots split them.

``Worker`` assembles runtime, engine, scheduler, tokenizer and measurement from a
``WorkerConfig`` and re-applies the config file on SIGHUP or when its mtime changes.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs

from pydantic import ValidationError

from dataplane.asgi import (
    MODEL_PREFIX,
    SSE_HEADERS,
    Call,
    ConfigFile,
    ModelServer,
    Receive,
    Scope,
    Send,
    check_internal,
    check_peer,
    digest_in,
    key_digest,
    read_body,
    send_json,
    sse,
    wait_disconnect,
)
from dataplane.inference.config import STATE_HEARTBEAT_S, WorkerConfig
from dataplane.inference.engine import BatchEngine, EngineSequence
from dataplane.inference.grammar import Grammar, GrammarError, Grammars
from dataplane.inference.metrics import RequestTiming, TelemetryStats, WorkerMetrics
from dataplane.inference.protocol import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    LogprobEntry,
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
from dataplane.inference.tokenizer import ChatTemplateError, TextTokenizer
from dataplane.mux import MUX_PATH, serve

log = logging.getLogger(__name__)

_BodyT = TypeVar("_BodyT", CompletionRequest, ChatRequest)


_T = TypeVar("_T")


def _first(*values: _T | None) -> _T:
    """The first value that is not None (the last is the fallback and never None)."""
    return next(value for value in values if value is not None)


def _engine_error() -> ApiError:
    return ApiError(
        500,
        "The engine failed while serving this request.",
        type_="server_error",
        code="engine_error",
    )


@dataclass(frozen=True)
class _Piece:
    """One output token of a choice: its id, its index in the output, the text it
    releases (held-back text included) and, on the last one, the finish reason."""

    token: int
    position: int
    text: str
    finish_reason: str | None


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
        self.config_file = ConfigFile(config_path, WorkerConfig.load, self.apply)
        self.config_generation = 1
        self.runtime = OnnxRuntime(config.model_dir, config.cache_dir, config.runtime)
        self.tokenizer = TextTokenizer(config.model_dir)
        spec = self.runtime.spec
        self.grammars = Grammars(self.tokenizer.to_json(), spec.vocab_size, spec.eos_token_ids)
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
        return digest_in(key, self.config.stats_key_sha256)

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
        self.config_file.reload()

    async def watch_config(self) -> None:
        await self.config_file.watch()


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


class InferenceApp(ModelServer):
    """ASGI application over a ``Worker``."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self._tasks: list[asyncio.Task[None]] = []
        self._state_streams: set[asyncio.Event] = set()
        # The state message after its ``seq``, and the scheduler version it was built at.
        self._state_body: tuple[int, bytes] | None = None
        self._closing = False
        super().__init__({"/v1/internal/state": ("GET", self._state)})

    async def startup(self) -> None:
        loop = asyncio.get_running_loop()
        batching = loop.create_task(self.worker.scheduler.run())
        batching.add_done_callback(self._scheduler_ended)
        self._tasks = [batching, loop.create_task(self.worker.watch_config())]
        loop.add_signal_handler(signal.SIGHUP, self.worker.reload)

    def _scheduler_ended(self, task: asyncio.Task[None]) -> None:
        """A scheduler that stopped by itself admits nothing more while /health still
        answers: say why, and stop the process, so its supervisor starts it again."""
        if task.cancelled():
            return
        log.critical("the scheduler stopped; stopping the worker", exc_info=task.exception())
        os.kill(os.getpid(), signal.SIGTERM)

    async def shutdown(self) -> None:
        for task in self._tasks:
            task.cancel()
        self.worker.scheduler.close()

    def close_streams(self) -> None:
        """End the state streams, which never finish by themselves, so a graceful
        shutdown waits only for requests."""
        self._closing = True
        for event in self._state_streams:
            event.set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await self._mux(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)

    async def _mux(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A gateway's connection for its requests to this worker (``dataplane.mux``):
        opened as the state stream is, each request then checked as over HTTP."""
        if (await receive())["type"] != "websocket.connect":
            return
        try:
            if scope["path"] != MUX_PATH:
                raise ApiError(404, f"Unknown path {scope['path']}", code="not_found")
            self._check_gateway(Call(scope, receive, send, time.perf_counter()))
        except ApiError as exc:
            log.warning("mux connection refused: %s", exc)
            await send({"type": "websocket.close", "code": 1008})
            return
        await send({"type": "websocket.accept"})
        await serve(self, scope, receive, send)

    # -- plumbing ----------------------------------------------------------------------

    def _check_peer(self, call: Call) -> None:
        if self.worker.config.peers_only:
            check_peer(call, self.worker.config.peer_key_sha256)

    def _authenticate(self, call: Call) -> str:
        self._check_peer(call)
        tenant = self.worker.tenant_for(call.require_bearer())
        if tenant is None:
            raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")
        return tenant

    async def _read_body(self, call: Call) -> bytes:
        return await read_body(call, self.worker.config.max_request_bytes)

    async def _watch_disconnect(self, call: Call, requests: list[GenerationRequest]) -> None:
        await wait_disconnect(call)
        for request in requests:
            self.worker.scheduler.cancel(request)

    # -- OpenAI endpoints -----------------------------------------------------------------

    async def _completions(self, call: Call) -> None:
        tenant = self._authenticate(call)
        body = await self._parse(call, CompletionRequest)
        prompt = _single_prompt(body.prompt)
        if isinstance(prompt, str):
            ids = self.worker.tokenizer.encode(prompt)
        else:
            ids = prompt
            self._check_token_ids(ids, "prompt")
        await self._generate(call, tenant, body, ids, body.max_tokens or 16, chat=False)

    async def _chat(self, call: Call) -> None:
        tenant = self._authenticate(call)
        body = await self._parse(call, ChatRequest)
        try:
            ids = self.worker.tokenizer.render_chat([m.for_template() for m in body.messages])
        except ChatTemplateError as exc:
            raise ApiError(
                400,
                f"The model's chat template refused the messages: {exc}",
                param="messages",
                code="invalid_value",
            ) from None
        limit = body.max_completion_tokens or body.max_tokens
        room = self.worker.runtime.spec.max_context - len(ids)
        await self._generate(call, tenant, body, ids, limit or max(room, 1), chat=True)

    def _check_token_ids(self, ids: Sequence[int], param: str) -> None:
        vocab = self.worker.runtime.spec.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise ApiError(
                400, f"Token ids must be in [0, {vocab}).", param=param, code="invalid_value"
            )

    async def _parse(self, call: Call, model: type[_BodyT]) -> _BodyT:
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
        body.check_supported()
        return body

    def _sampling_params(
        self, body: CompletionRequest | ChatRequest, max_tokens: int
    ) -> SamplingParams:
        """The request's settings over the model's generation defaults over OpenAI's."""
        spec = self.worker.runtime.spec
        defaults = spec.generation
        self._check_token_ids(body.stop_token_ids or [], "stop_token_ids")
        top_k = _first(body.top_k, defaults.top_k, 0)
        try:
            return SamplingParams(
                max_new_tokens=max_tokens,
                temperature=_first(body.temperature, defaults.temperature, 1.0),
                top_p=_first(body.top_p, defaults.top_p, 1.0),
                top_k=max(top_k, 0),
                seed=body.seed,
                ignore_eos=body.ignore_eos,
                presence_penalty=body.presence_penalty or 0.0,
                frequency_penalty=body.frequency_penalty or 0.0,
                repetition_penalty=_first(
                    body.repetition_penalty, defaults.repetition_penalty, 1.0
                ),
                logit_bias=body.token_biases(spec.vocab_size),
                logprobs=body.top_logprobs_count(),
                stop_token_ids=frozenset(body.stop_token_ids or ()),
            )
        except ValueError as exc:
            raise ApiError(400, str(exc), code="invalid_value") from None

    async def _grammar(self, body: CompletionRequest | ChatRequest) -> Grammar | None:
        """The compiled grammar of the request's ``response_format``, if it asks for one;
        compiled in a thread, since a large schema takes a while the first time."""
        schema = body.response_format.output_schema() if body.response_format is not None else None
        if schema is None:
            return None
        try:
            return await asyncio.to_thread(self.worker.grammars.compile, schema)
        except GrammarError as exc:
            raise ApiError(
                400,
                f"response_format cannot be served: {exc}",
                param="response_format",
                code="invalid_value",
            ) from None

    async def _generate(
        self,
        call: Call,
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
        params = self._sampling_params(body, max_tokens)
        grammar = await self._grammar(body)
        tenant_cfg = self.worker.config.tenants.get(tenant)
        requests = [
            GenerationRequest(
                tenant=tenant,
                priority=tenant_cfg.priority if tenant_cfg else 0,
                seq=EngineSequence(
                    prompt=ids,
                    params=params,
                    stream=index,
                    constraint=grammar.matcher() if grammar is not None else None,
                ),
                timing=RequestTiming(arrival=call.arrival, input_tokens=len(ids)),
            )
            for index in range(body.choices)
        ]
        scheduler = self.worker.scheduler
        submitted: list[GenerationRequest] = []
        try:
            for request in requests:
                scheduler.submit(request)
                submitted.append(request)
        except QueueFull as exc:
            for request in submitted:
                scheduler.cancel(request)
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
        watcher = asyncio.create_task(self._watch_disconnect(call, requests))
        try:
            if body.stream:
                await self._stream(call, requests, shape, stops, body)
            else:
                await self._respond(call, requests, shape, stops)
        finally:
            watcher.cancel()
            for request in requests:
                scheduler.cancel(request)
                if request.finish_reason == FINISH_ERROR:
                    self.worker.stats.count_failed(tenant)

    async def _pieces(self, request: GenerationRequest, stops: list[str]) -> AsyncIterator[_Piece]:
        """One piece per output token as tokens arrive; the last one carries the finish.
        A stop string ends the request early; an EOS or stop id adds no text."""
        detok = self.worker.tokenizer.stream()
        matcher = _StopMatcher(stops)
        sent = 0
        while True:
            while sent < len(request.output_ids):
                token = request.output_ids[sent]
                sent += 1
                last = request.done and sent == len(request.output_ids)
                hidden = last and request.seq.stop_token is not None
                text, stopped = matcher.push("" if hidden else detok.feed([token]))
                if stopped:
                    self.worker.scheduler.stop(request)
                elif last:
                    text += matcher.flush()
                yield _Piece(
                    token, sent - 1, text, request.finish_reason if last or stopped else None
                )
                if stopped:
                    return
            if request.done:
                return
            await request.next_update()

    async def _merged(
        self, requests: list[GenerationRequest], stops: list[str]
    ) -> AsyncIterator[tuple[int, _Piece]]:
        """Every choice's pieces, tagged with the choice's index, as they come."""
        queue: asyncio.Queue[tuple[int, _Piece | None]] = asyncio.Queue()

        async def pump(index: int, request: GenerationRequest) -> None:
            async for piece in self._pieces(request, stops):
                await queue.put((index, piece))
            await queue.put((index, None))

        pumps = [asyncio.create_task(pump(i, r)) for i, r in enumerate(requests)]
        try:
            running = len(pumps)
            while running:
                index, piece = await queue.get()
                if piece is None:
                    running -= 1
                else:
                    yield index, piece
        finally:
            for task in pumps:
                task.cancel()

    def _logprob_entry(self, request: GenerationRequest, piece: _Piece) -> LogprobEntry:
        report = request.seq.logprobs[piece.position]
        text = self.worker.tokenizer.token_text
        return LogprobEntry(
            token=text(piece.token),
            logprob=report.logprob,
            top=tuple((text(token), logprob) for token, logprob in report.top),
        )

    async def _respond(
        self,
        call: Call,
        requests: list[GenerationRequest],
        shape: ResponseShape,
        stops: list[str],
    ) -> None:
        want_logprobs = requests[0].seq.params.logprobs is not None
        texts: list[list[str]] = [[] for _ in requests]
        entries: list[list[LogprobEntry]] = [[] for _ in requests]
        async for index, piece in self._merged(requests, stops):
            texts[index].append(piece.text)
            if want_logprobs:
                entries[index].append(self._logprob_entry(requests[index], piece))
        if any(r.cancelled for r in requests):
            return
        if any(r.finish_reason == FINISH_ERROR for r in requests):
            raise _engine_error()
        choices = [
            ("".join(text), request.finish_reason or "stop", found if want_logprobs else None)
            for text, found, request in zip(texts, entries, requests, strict=True)
        ]
        used = usage(len(requests[0].seq.prompt), sum(len(found) for found in texts))
        await send_json(call.send, 200, shape.complete(choices, used))

    async def _stream(
        self,
        call: Call,
        requests: list[GenerationRequest],
        shape: ResponseShape,
        stops: list[str],
        body: CompletionRequest | ChatRequest,
    ) -> None:
        options = body.stream_options
        running_usage = options is not None and options.continuous_usage_stats
        want_logprobs = requests[0].seq.params.logprobs is not None
        send = call.send
        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
        prompt_tokens = len(requests[0].seq.prompt)
        produced = [0] * len(requests)
        async for index, piece in self._merged(requests, stops):
            if any(r.cancelled for r in requests):
                return
            produced[index] += 1
            chunk = shape.chunk(
                index,
                piece.text,
                piece.finish_reason,
                logprobs=[self._logprob_entry(requests[index], piece)] if want_logprobs else None,
                first=produced[index] == 1,
                usage_=usage(prompt_tokens, sum(produced)) if running_usage else None,
            )
            await send({"type": "http.response.body", "body": sse(chunk), "more_body": True})
        if any(r.cancelled for r in requests):
            return
        tail = []
        if any(r.finish_reason == FINISH_ERROR for r in requests):
            tail.append(sse(_engine_error().body()))
        if options is not None and options.include_usage:
            tail.append(sse(shape.usage_chunk(usage(prompt_tokens, sum(produced)))))
        tail.append(b"data: [DONE]\n\n")
        await send({"type": "http.response.body", "body": b"".join(tail)})

    def _model_card(self) -> dict[str, Any]:
        config = self.worker.config
        return {
            "id": config.served_model_name,
            "object": "model",
            "created": 0,
            "owned_by": "tailguard",
            "max_model_len": self.worker.runtime.spec.max_context,
        }

    async def _models(self, call: Call) -> None:
        self._authenticate(call)
        await send_json(call.send, 200, {"object": "list", "data": [self._model_card()]})

    async def _model(self, call: Call) -> None:
        self._authenticate(call)
        name = call.scope["path"].removeprefix(MODEL_PREFIX)
        if name != self.worker.config.served_model_name:
            raise ApiError(
                404, f"The model `{name}` does not exist.", param="model", code="model_not_found"
            )
        await send_json(call.send, 200, self._model_card())

    # -- operations ---------------------------------------------------------------------

    async def _health(self, call: Call) -> None:
        worker = self.worker
        scheduler = worker.scheduler
        line = scheduler.decode_cost
        await send_json(
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
                "mux": MUX_PATH,
                # What a decode step costs here while serving: a fixed part and a part
                # per row (the machine's other work included, unlike the engine alone).
                "decode_cost": (
                    None if line is None else {"base_s": line.base, "per_row_s": line.per_unit}
                ),
            },
        )

    async def _metrics(self, call: Call) -> None:
        self._check_peer(call)
        payload = self.worker.metrics.render()
        await call.send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")],
            }
        )
        await call.send({"type": "http.response.body", "body": payload})

    def _check_internal(self, call: Call) -> None:
        check_internal(call, self.worker.config.stats_key_sha256)

    def _check_gateway(self, call: Call) -> None:
        """What the deployment's gateways read and send on (state stream, mux): a stats
        key, loopback, or the deployment's peer key."""
        config = self.worker.config
        check_internal(call, config.stats_key_sha256, config.peer_key_sha256)

    async def _state(self, call: Call) -> None:
        """Push the scheduler's state as it changes. The scheduler only sets an event;
        this loop, in the event loop, builds and sends a message when it gets to it, so
        changes that arrive while a message is being sent fold into the next one and a
        slow reader never holds up a step."""
        self._check_gateway(call)
        worker = self.worker
        changed = worker.scheduler.watch()
        self._state_streams.add(changed)
        headers = [(b"content-type", b"application/x-ndjson"), (b"cache-control", b"no-cache")]
        await call.send({"type": "http.response.start", "status": 200, "headers": headers})
        gone = asyncio.create_task(wait_disconnect(call))
        seq = 0
        fresh = True  # a stream's first message and its heartbeats are built anew
        try:
            while not (gone.done() or self._closing):
                changed.clear()
                seq += 1
                line = b'{"seq":%d,' % seq + self._state_message(fresh) + b"\n"
                await call.send({"type": "http.response.body", "body": line, "more_body": True})
                try:
                    await asyncio.wait_for(changed.wait(), STATE_HEARTBEAT_S)
                    fresh = False
                except TimeoutError:
                    fresh = True
        finally:
            worker.scheduler.unwatch(changed)
            self._state_streams.discard(changed)
            gone.cancel()

    def _state_message(self, fresh: bool) -> bytes:
        """The state message after its opening ``{"seq":N,``: built once per change of
        the scheduler for all streams, as a deployment's every gateway follows every
        worker; ``fresh`` builds it anew whatever the version."""
        scheduler = self.worker.scheduler
        built = self._state_body
        if fresh or built is None or built[0] != scheduler.version:
            identity = self.worker.identity
            message = {
                "replica_id": identity.replica_id,
                "nonce": identity.nonce,
                **scheduler.state(),
            }
            body = json.dumps(message, separators=(",", ":")).encode()
            built = self._state_body = (scheduler.version, body[1:])
        return built[1]

    async def _stats(self, call: Call) -> None:
        self._check_internal(call)
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
        await send_json(call.send, 200, {**window, **live})
