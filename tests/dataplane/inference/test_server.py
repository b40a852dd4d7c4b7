"""A real worker process driven over HTTP with the official openai client and httpx."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from dataplane.inference import server
from dataplane.inference.config import WorkerConfig
from dataplane.inference.server import InferenceApp, Worker

from .procs import WorkerProcess, key_hash, worker_config

KEYS = {"alice": "key-alice", "bob": "key-bob"}


@pytest.fixture(scope="module")
def worker(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    workdir = tmp_path_factory.mktemp("worker")
    config = worker_config(
        model_dir,
        workdir / "cache",
        KEYS,
        max_request_bytes=16_384,
        slo_thresholds=[{"tenant": "alice", "metric": "ttft", "threshold_seconds": 5.0}],
    )
    config["tenants"]["bob"]["weight"] = 2.0
    with WorkerProcess(config, workdir) as proc:
        yield proc


def client(worker: WorkerProcess, tenant: str = "alice") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{worker.base_url}/v1", api_key=KEYS[tenant], max_retries=0)


def async_client(worker: WorkerProcess, tenant: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{worker.base_url}/v1", api_key=KEYS[tenant], max_retries=0)


GREEDY: dict[str, Any] = {"temperature": 0.0, "extra_body": {"ignore_eos": True}}


def test_completion_and_chat_non_streaming(worker: WorkerProcess) -> None:
    c = client(worker)
    completion = c.completions.create(
        model="synthetic", prompt="Hello there", max_tokens=8, **GREEDY
    )
    assert completion.choices[0].finish_reason == "length"
    assert isinstance(completion.choices[0].text, str)
    assert completion.usage is not None and completion.usage.completion_tokens == 8
    assert completion.usage.prompt_tokens > 0
    chat = c.chat.completions.create(
        model="synthetic",
        max_tokens=6,
        **GREEDY,
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is tail latency?"},
        ],
    )
    assert chat.object == "chat.completion"
    assert chat.choices[0].message.role == "assistant"
    assert chat.usage is not None and chat.usage.completion_tokens == 6


def test_streaming_matches_non_streaming(worker: WorkerProcess) -> None:
    c = client(worker)
    messages: Any = [{"role": "user", "content": "Stream me something"}]
    whole = c.chat.completions.create(model="synthetic", messages=messages, max_tokens=20, **GREEDY)
    chunks = list(
        c.chat.completions.create(
            model="synthetic",
            messages=messages,
            max_tokens=20,
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
    )
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices]
    assert finishes[-1] == "length" and set(finishes[:-1]) == {None}
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 20
    completion_chunks = list(
        c.completions.create(model="synthetic", prompt="abc", max_tokens=5, stream=True, **GREEDY)
    )
    assert completion_chunks[-1].choices[0].finish_reason == "length"


def test_stop_string_ends_the_request_early(worker: WorkerProcess) -> None:
    c = client(worker)
    full = (
        c.completions.create(model="synthetic", prompt="Once upon", max_tokens=40, **GREEDY)
        .choices[0]
        .text
    )
    # Early in the text: two greedy runs agree token for token only while no near-tie
    # resolves differently (float sums of differently shaped batches), so the later the
    # stop string, the likelier the second run never writes it.
    stop = full[6:9]
    cut = c.completions.create(
        model="synthetic", prompt="Once upon", max_tokens=40, stop=[stop], **GREEDY
    )
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == full[: full.index(stop)]
    assert cut.usage is not None and cut.usage.completion_tokens < 40


def test_models_and_health(worker: WorkerProcess) -> None:
    assert [m.id for m in client(worker).models.list()] == ["synthetic"]
    client(worker).completions.create(model="synthetic", prompt="cost me", max_tokens=12, **GREEDY)
    health = worker.health()
    assert health["status"] == "ok" and health["deployment_id"] == "dep-test"
    assert health["providers"] == ["CPUExecutionProvider"]
    # The decode steps served so far give what a step costs here: a one-row step costs.
    cost = health["decode_cost"]
    assert cost["base_s"] >= 0 and cost["per_row_s"] >= 0
    assert cost["base_s"] + cost["per_row_s"] > 0


async def test_concurrent_tenants_streaming(worker: WorkerProcess) -> None:
    async def one(tenant: str, tokens: int) -> tuple[str, int, str | None]:
        stream = await async_client(worker, tenant).completions.create(
            model="synthetic",
            prompt=f"{tenant} says",
            max_tokens=tokens,
            stream=True,
            stream_options={"include_usage": True},
            temperature=0.8,
            seed=tokens,
            extra_body={"ignore_eos": True},
        )
        finish, used = None, 0
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
            if chunk.usage is not None:
                used = chunk.usage.completion_tokens
        return tenant, used, finish

    jobs = [one("alice" if i % 2 else "bob", 10 + i) for i in range(16)]
    results = await asyncio.gather(*jobs)
    assert all(used == 10 + i and finish == "length" for i, (_, used, finish) in enumerate(results))
    assert worker.metric("tailguard_requests_total", tenant="bob", outcome="length") >= 8
    assert worker.metric("gen_ai_server_time_to_first_token_seconds_count", tenant="alice") >= 8


def error_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    error: dict[str, Any] = body["error"]
    return error


def test_bad_requests_get_openai_errors_and_the_worker_keeps_serving(worker: WorkerProcess) -> None:
    url = f"{worker.base_url}/v1/completions"
    auth = {"Authorization": f"Bearer {KEYS['alice']}"}
    ok = {"model": "synthetic", "prompt": "hi", "max_tokens": 2}
    cases: list[tuple[dict[str, str], bytes, int, str]] = [
        (auth, b"{not json", 400, "invalid_json"),
        (auth, json.dumps({**ok, "max_tokens": "2"}).encode(), 400, "invalid_value"),
        (auth, json.dumps({**ok, "frobnicate": 1}).encode(), 400, "unknown_parameter"),
        (auth, json.dumps({**ok, "temperature": 9}).encode(), 400, "invalid_value"),
        (auth, json.dumps({**ok, "model": "gpt-9"}).encode(), 404, "model_not_found"),
        (
            auth,
            json.dumps({**ok, "prompt": "word " * 600}).encode(),
            400,
            "context_length_exceeded",
        ),
        (auth, json.dumps({**ok, "max_tokens": 100_000}).encode(), 400, "context_length_exceeded"),
        ({}, json.dumps(ok).encode(), 401, "invalid_api_key"),
        ({"Authorization": "Bearer wrong"}, json.dumps(ok).encode(), 401, "invalid_api_key"),
        (auth, json.dumps({**ok, "prompt": "x" * 20_000}).encode(), 413, "request_too_large"),
    ]
    for headers, body, status, code in cases:
        response = httpx.post(url, content=body, headers=headers, timeout=10)
        assert response.status_code == status, (body[:60], response.text)
        assert error_of(response)["code"] == code
    assert httpx.get(url, timeout=5).status_code == 405
    assert httpx.get(f"{worker.base_url}/nope", timeout=5).status_code == 404
    with pytest.raises(openai.NotFoundError):
        client(worker).completions.create(model="other", prompt="x", max_tokens=1)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{worker.base_url}/v1", api_key="nope", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError):
        client(worker).chat.completions.create(
            model="synthetic", messages=[{"role": "user", "content": "y " * 600}]
        )
    good = httpx.post(url, json=ok, headers=auth, timeout=10)
    assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] <= 2


def wait_for(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_client_disconnect_frees_the_slot(worker: WorkerProcess) -> None:
    cancelled_before = worker.metric("tailguard_requests_total", outcome="cancelled")
    body = {
        "model": "synthetic",
        "prompt": "go",
        "max_tokens": 480,
        "stream": True,
        "ignore_eos": True,
    }
    with (
        httpx.Client(timeout=10) as http,
        http.stream(
            "POST",
            f"{worker.base_url}/v1/completions",
            json=body,
            headers={"Authorization": f"Bearer {KEYS['bob']}"},
        ) as response,
    ):
        assert response.status_code == 200
        lines = 0
        for line in response.iter_lines():
            lines += line.startswith("data: ")
            if lines == 3:
                break
    wait_for(lambda: worker.health()["running"] == 0)
    wait_for(
        lambda: (
            worker.metric("tailguard_requests_total", outcome="cancelled") == cancelled_before + 1
        )
    )
    done = client(worker, "bob").completions.create(
        model="synthetic", prompt="again", max_tokens=3, **GREEDY
    )
    assert done.usage is not None and done.usage.completion_tokens == 3


def test_non_streaming_disconnect_is_cancelled_too(worker: WorkerProcess) -> None:
    cancelled_before = worker.metric("tailguard_requests_total", outcome="cancelled")
    body = {"model": "synthetic", "prompt": "go", "max_tokens": 480, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{worker.base_url}/v1/completions",
            json=body,
            timeout=0.05,
            headers={"Authorization": f"Bearer {KEYS['bob']}"},
        )
    wait_for(
        lambda: (
            worker.metric("tailguard_requests_total", outcome="cancelled") == cancelled_before + 1
        )
    )
    wait_for(lambda: worker.health()["running"] == 0)


def test_stats_endpoint_sequence_numbers(worker: WorkerProcess) -> None:
    client(worker).completions.create(model="synthetic", prompt="count me", max_tokens=4, **GREEDY)
    url = f"{worker.base_url}/v1/internal/stats"
    first = httpx.get(url, params={"after": 0}).json()
    again = httpx.get(url, params={"after": 0}).json()
    assert again == first
    tenants = {r["tenant"] for r in first["requests"]}
    assert "alice" in tenants
    assert {s["metric"] for s in first["sketches"] if s["tenant"] == "alice"} >= {
        "ttft",
        "tpot",
        "itl",
        "e2e",
        "queue",
    }
    slo = [s for s in first["slo"] if s["tenant"] == "alice"]
    assert slo and slo[0]["metric"] == "ttft" and slo[0]["good"] == slo[0]["total"] > 0
    following = httpx.get(url, params={"after": first["seq"]}).json()
    assert following["seq"] == first["seq"] + 1
    assert httpx.get(url, params={"after": "x"}).status_code == 400


def test_state_stream_pushes_on_change(worker: WorkerProcess) -> None:
    """Idle, the stream sends its heartbeat; a request shows up as it runs (with its
    tenant's row), and the measured step cost arrives with the first steps."""
    url = f"{worker.base_url}/v1/internal/state"
    seen: list[dict[str, Any]] = []
    with httpx.stream("GET", url, timeout=30) as response:
        assert response.headers["content-type"] == "application/x-ndjson"
        lines = response.iter_lines()
        seen.append(json.loads(next(lines)))
        assert seen[0]["running"] == 0 and seen[0]["free_slots"] == seen[0]["max_batch_size"]
        with httpx.Client(base_url=worker.base_url, timeout=30) as http:
            body = {"model": "synthetic", "prompt": "stream me", "max_tokens": 64, "stream": True}
            with http.stream(
                "POST",
                "/v1/completions",
                json={**body, "ignore_eos": True},
                headers={"authorization": f"Bearer {KEYS['alice']}"},
            ) as generating:
                chunks = generating.iter_lines()
                next(chunks)
                while not any(m["rows"] for m in seen):  # prefilled, then decoding
                    seen.append(json.loads(next(lines)))
                decoding = next(m for m in seen if m["rows"])
                assert decoding["rows"] == {"alice": 1} and decoding["running"] == 1
                assert decoding["preempts"] and decoding["row_cap"] == decoding["max_batch_size"]
                for _ in chunks:
                    pass
        while seen[-1]["running"]:
            seen.append(json.loads(next(lines)))
    assert [m["seq"] for m in seen] == list(range(1, len(seen) + 1))
    assert seen[-1]["step_s"] > 0 and seen[-1]["prefill_token_s"] > 0


def test_queue_full_is_429_with_retry_after_and_other_tenants_still_served(
    model_dir: Path, tmp_path: Path
) -> None:
    config = worker_config(
        model_dir, tmp_path / "cache", KEYS, batching={"max_batch_size": 1, "max_queue_len": 2}
    )
    with WorkerProcess(config, tmp_path) as proc:

        async def flood() -> list[int | str]:
            async def one(tenant: str) -> int | str:
                try:
                    await async_client(proc, tenant).completions.create(
                        model="synthetic",
                        prompt="busy",
                        max_tokens=200,
                        extra_body={"ignore_eos": True},
                    )
                except openai.RateLimitError as exc:
                    retry = exc.response.headers["retry-after"]
                    assert int(retry) >= 1
                    assert exc.response.json()["error"]["code"] == "rate_limit_exceeded"
                    return 429
                return tenant

            return list(await asyncio.gather(*[one("alice") for _ in range(8)], one("bob")))

        outcomes = asyncio.run(flood())
        assert outcomes.count(429) >= 4
        assert "bob" in outcomes
        assert proc.metric(
            "tailguard_requests_total", tenant="alice", outcome="rejected"
        ) == outcomes.count(429)
        assert (
            client(proc).completions.create(model="synthetic", prompt="after", max_tokens=2).usage
            is not None
        )


def test_reload_under_load_drops_nothing(model_dir: Path, tmp_path: Path) -> None:
    config = worker_config(model_dir, tmp_path / "cache", {"alice": KEYS["alice"]})
    tokens = 300
    with WorkerProcess(config, tmp_path) as proc:

        async def load() -> list[tuple[int, str | None]]:
            started = asyncio.Event()
            counts = [0] * 12

            async def one(i: int) -> tuple[int, str | None]:
                stream = await async_client(proc, "alice").completions.create(
                    model="synthetic",
                    prompt=f"stream {i}",
                    max_tokens=tokens,
                    stream=True,
                    stream_options={"include_usage": True},
                    extra_body={"ignore_eos": True},
                )
                finish, used = None, 0
                async for chunk in stream:
                    counts[i] += 1
                    if all(counts):
                        started.set()
                    if chunk.choices and chunk.choices[0].finish_reason:
                        finish = chunk.choices[0].finish_reason
                    if chunk.usage is not None:
                        used = chunk.usage.completion_tokens
                return used, finish

            jobs = [asyncio.create_task(one(i)) for i in range(12)]
            await started.wait()
            new = worker_config(
                model_dir,
                tmp_path / "cache",
                {"carol": "key-carol"},
                batching={"max_batch_size": 4},
                scheduling={"policy": "fcfs"},
                slo_thresholds=[{"tenant": "carol", "metric": "e2e", "threshold_seconds": 1.0}],
            )
            new["tenants"]["alice"] = {"key_sha256": [key_hash(KEYS["alice"])], "weight": 3}
            proc.write_config(new)
            proc.signal_reload()
            await asyncio.to_thread(wait_for, lambda: proc.health()["config_generation"] >= 2)
            assert not all(job.done() for job in jobs), "reload came after the load ended"
            return list(await asyncio.gather(*jobs))

        results = asyncio.run(load())
        assert results == [(tokens, "length")] * 12
        health = proc.health()
        assert health["max_batch_size"] == 4 and health["policy"] == "fcfs"
        carol = openai.OpenAI(base_url=f"{proc.base_url}/v1", api_key="key-carol", max_retries=0)
        assert (
            carol.completions.create(model="synthetic", prompt="hi", max_tokens=2).usage is not None
        )
        # Editing the file alone (no signal) is picked up too: carol's key goes away.
        generation = health["config_generation"]
        proc.write_config(worker_config(model_dir, tmp_path / "cache", {"alice": KEYS["alice"]}))
        wait_for(lambda: proc.health()["config_generation"] > generation)
        with pytest.raises(openai.AuthenticationError):
            carol.completions.create(model="synthetic", prompt="hi", max_tokens=2)


class _StateReader:
    """One ``GET /v1/internal/state`` call straight into the ASGI app, from loopback: its
    lines as they are sent; ``leave`` disconnects."""

    def __init__(self, app: InferenceApp) -> None:
        scope = {"type": "http", "method": "GET", "path": "/v1/internal/state", "headers": []}
        self.lines: asyncio.Queue[bytes] = asyncio.Queue()
        self._left = asyncio.Event()
        self.task = asyncio.create_task(
            app({**scope, "client": ("127.0.0.1", 1)}, self._receive, self._send)
        )

    async def _receive(self) -> dict[str, Any]:
        await self._left.wait()
        return {"type": "http.disconnect"}

    async def _send(self, message: dict[str, Any]) -> None:
        if message.get("body"):
            self.lines.put_nowait(message["body"])

    async def line(self) -> tuple[int, bytes]:
        """The next message's seq, and the rest of it."""
        async with asyncio.timeout(60):
            found = await self.lines.get()
        head, _, rest = found.partition(b",")
        assert json.loads(found)["seq"] == int(head.removeprefix(b'{"seq":'))
        return int(head.removeprefix(b'{"seq":')), rest

    async def leave(self) -> None:
        self._left.set()
        await self.task


async def test_a_scheduler_that_stops_by_itself_stops_the_worker(
    model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A worker whose scheduler failed would answer /health and hold its requests for
    good: the failure is logged and the process stops, for its supervisor to restart."""
    config = WorkerConfig.model_validate(worker_config(model_dir, tmp_path / "cache", KEYS))
    worker = Worker(config)

    async def failing() -> None:
        raise RuntimeError("admission broke")

    worker.scheduler.run = failing  # type: ignore[method-assign]
    signals: list[int] = []
    monkeypatch.setattr(server.os, "kill", lambda pid, sig: signals.append(sig))
    app = InferenceApp(worker)
    await app.startup()
    async with asyncio.timeout(60):
        while not signals:
            await asyncio.sleep(0.01)
    assert signals == [signal.SIGTERM]
    assert "admission broke" in caplog.text
    await app.shutdown()


async def test_a_change_is_encoded_once_for_every_state_stream(
    model_dir: Path, tmp_path: Path
) -> None:
    """Every gateway of a deployment follows every worker, so a change is built into a
    message once and each stream sends it under its own seq."""
    config = WorkerConfig.model_validate(worker_config(model_dir, tmp_path / "cache", KEYS))
    worker = Worker(config)
    built = 0
    state = worker.scheduler.state

    def counted() -> dict[str, Any]:
        nonlocal built
        built += 1
        return state()

    worker.scheduler.state = counted  # type: ignore[method-assign]
    app = InferenceApp(worker)
    readers = [_StateReader(app) for _ in range(3)]
    first = [await reader.line() for reader in readers]
    assert built == 3 and [seq for seq, _ in first] == [1, 1, 1]  # each stream's own first
    worker.scheduler._changed()
    second = [await reader.line() for reader in readers]
    assert built == 4
    assert [seq for seq, _ in second] == [2, 2, 2] and len({rest for _, rest in second}) == 1
    assert json.loads(b"{" + second[0][1])["replica_id"] == worker.identity.replica_id
    for reader in readers:
        await reader.leave()
