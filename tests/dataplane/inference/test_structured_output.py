"""``response_format`` served by constrained decoding, as vLLM serves it: every
constrained output parses and follows its schema, on both endpoints, streamed or not,
greedy or sampled, alone or batched with unconstrained requests, whose tokens their
company does not change. The random-weight model writes odd JSON, but valid JSON."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import openai
import pytest

from dataplane.inference.config import RuntimeConfig
from dataplane.inference.engine import FINISH_STOP, BatchEngine, EngineSequence
from dataplane.inference.grammar import GrammarError, Grammars
from dataplane.inference.runtime import OnnxRuntime
from dataplane.inference.sampling import SamplingParams
from dataplane.inference.tokenizer import TextTokenizer

from .procs import WorkerProcess, worker_config

KEY = "key-structured"
# Required string and integer properties, an enum and a nested array; the bounds keep a
# random model's greedy output finite.
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "color": {"enum": ["red", "green", "blue"]},
        "points": {
            "type": "array",
            "items": {
                "type": "array",
                "items": {"type": "integer", "minimum": -9, "maximum": 99},
                "maxItems": 3,
            },
            "maxItems": 3,
        },
    },
    "required": ["name", "age", "color", "points"],
    "additionalProperties": False,
}
JSON_OBJECT: dict[str, Any] = {"type": "json_object"}
JSON_SCHEMA: Any = {
    "type": "json_schema",
    "json_schema": {"name": "person", "schema": SCHEMA, "strict": True},
}
FORMATS = {"json_object": (JSON_OBJECT, {"type": "object"}), "json_schema": (JSON_SCHEMA, SCHEMA)}
MAX_TOKENS = 300


@pytest.fixture(scope="module")
def worker(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    workdir = tmp_path_factory.mktemp("structured")
    with WorkerProcess(worker_config(model_dir, workdir / "cache", {"t": KEY}), workdir) as w:
        yield w


def async_client(worker: WorkerProcess) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{worker.base_url}/v1", api_key=KEY, max_retries=0)


async def generate(
    client: openai.AsyncOpenAI,
    prompt: str,
    *,
    chat: bool,
    stream: bool,
    response_format: dict[str, Any] | None = None,
    extra_body: dict[str, Any] | None = None,
    **params: Any,
) -> tuple[str, str | None]:
    """The text and finish reason of one choice, however it was asked for; completions
    take ``response_format`` as vLLM's extension, in the body."""
    body: dict[str, Any] = {"model": "synthetic", "max_tokens": MAX_TOKENS, **params}
    extra = dict(extra_body or {})
    if chat:
        if response_format is not None:
            body["response_format"] = response_format
        messages: Any = [{"role": "user", "content": prompt}]
        if not stream:
            reply = await client.chat.completions.create(
                messages=messages, extra_body=extra, **body
            )
            return reply.choices[0].message.content or "", reply.choices[0].finish_reason
        chunks = await client.chat.completions.create(
            messages=messages, stream=True, extra_body=extra, **body
        )
        deltas = [chunk.choices[0] async for chunk in chunks if chunk.choices]
        return "".join(d.delta.content or "" for d in deltas), deltas[-1].finish_reason
    if response_format is not None:
        extra["response_format"] = response_format
    if not stream:
        completion = await client.completions.create(prompt=prompt, extra_body=extra, **body)
        return completion.choices[0].text, completion.choices[0].finish_reason
    parts = await client.completions.create(prompt=prompt, stream=True, extra_body=extra, **body)
    pieces = [chunk.choices[0] async for chunk in parts if chunk.choices]
    return "".join(p.text for p in pieces), pieces[-1].finish_reason


def assert_follows(text: str, finish_reason: str | None, schema: dict[str, Any]) -> None:
    assert finish_reason == "stop", f"the grammar never completed: {text!r}"
    jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("kind", list(FORMATS))
async def test_greedy_output_follows_the_format(
    worker: WorkerProcess, chat: bool, stream: bool, kind: str
) -> None:
    response_format, schema = FORMATS[kind]
    text, finish = await generate(
        async_client(worker),
        "Hello",
        chat=chat,
        stream=stream,
        response_format=response_format,
        temperature=0.0,
    )
    assert_follows(text, finish, schema)


def test_sampled_choices_each_follow_the_schema(worker: WorkerProcess) -> None:
    client = openai.OpenAI(base_url=f"{worker.base_url}/v1", api_key=KEY, max_retries=0)
    reply = client.chat.completions.create(
        model="synthetic",
        messages=[{"role": "user", "content": "Hello"}],
        max_tokens=MAX_TOKENS,
        temperature=1.0,
        top_p=0.95,
        seed=5,
        n=4,
        response_format=JSON_SCHEMA,
    )
    assert len({choice.message.content for choice in reply.choices}) > 1
    for choice in reply.choices:
        assert_follows(choice.message.content or "", choice.finish_reason, SCHEMA)


async def test_constrained_and_unconstrained_requests_share_a_batch(
    worker: WorkerProcess,
) -> None:
    client = async_client(worker)
    free = [(f"Prompt number {i} " * (1 + 2 * i), i % 2 == 1) for i in range(4)]

    async def unconstrained(prompt: str, stream: bool) -> list[str]:
        """The greedy output's tokens, from completions' logprobs."""
        body: Any = {
            "model": "synthetic",
            "prompt": prompt,
            "max_tokens": 64,
            "temperature": 0.0,
            "logprobs": 0,
            "extra_body": {"ignore_eos": True},
        }
        if not stream:
            completion = await client.completions.create(**body)
            logprobs = completion.choices[0].logprobs
            return list(logprobs.tokens or []) if logprobs else []
        chunks = await client.completions.create(stream=True, **body)
        return [
            token
            async for chunk in chunks
            if chunk.choices and chunk.choices[0].logprobs
            for token in chunk.choices[0].logprobs.tokens or []
        ]

    alone = [await unconstrained(prompt, stream) for prompt, stream in free]
    constrained = [
        generate(client, "Hello", chat=chat, stream=stream, response_format=fmt, temperature=0.0)
        for fmt, _ in FORMATS.values()
        for chat in (False, True)
        for stream in (False, True)
    ]
    together = asyncio.gather(*[unconstrained(prompt, stream) for prompt, stream in free])
    outputs, tokens = await asyncio.gather(asyncio.gather(*constrained), together)
    assert all(len(found) == 64 for found in alone)
    assert tokens == alone
    schemas = [schema for _, schema in FORMATS.values() for _ in range(4)]
    for (text, finish), schema in zip(outputs, schemas, strict=True):
        assert_follows(text, finish, schema)


def test_formats_that_cannot_be_served_are_400s_naming_response_format(
    worker: WorkerProcess,
) -> None:
    client = openai.OpenAI(base_url=f"{worker.base_url}/v1", api_key=KEY, max_retries=0)
    refused: list[Any] = [
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frob"}}},
        {"type": "json_schema", "json_schema": {"name": "x"}},
        {"type": "json_schema"},
    ]
    for response_format in refused:
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(
                model="synthetic",
                messages=[{"role": "user", "content": "x"}],
                max_tokens=4,
                response_format=response_format,
            )
        assert caught.value.param == "response_format", response_format
    text = client.completions.create(
        model="synthetic",
        prompt="x",
        max_tokens=2,
        extra_body={"response_format": {"type": "text"}},
    )
    assert text.choices[0].finish_reason in ("stop", "length")


def test_a_tokenizer_the_grammar_library_cannot_read_serves_text_and_refuses_formats(
    model_dir: Path, tmp_path: Path
) -> None:
    """A tokenizer.json without a decoder (word-level vocabularies often have none): the
    worker still serves, and only response_format is refused, saying why."""
    plain = tmp_path / "model"
    shutil.copytree(model_dir, plain)
    tokenizer = json.loads((plain / "tokenizer.json").read_text())
    tokenizer["decoder"] = None
    (plain / "tokenizer.json").write_text(json.dumps(tokenizer))
    with WorkerProcess(worker_config(plain, tmp_path / "cache", {"t": KEY}), tmp_path) as w:
        client = openai.OpenAI(base_url=f"{w.base_url}/v1", api_key=KEY, max_retries=0)
        text = client.completions.create(model="synthetic", prompt="x", max_tokens=3)
        assert text.usage is not None and text.usage.completion_tokens >= 1
        with pytest.raises(openai.BadRequestError) as caught:
            client.completions.create(
                model="synthetic",
                prompt="x",
                max_tokens=3,
                extra_body={"response_format": JSON_OBJECT},
            )
    assert caught.value.param == "response_format"
    assert "tokenizer cannot drive a grammar" in str(caught.value)


@pytest.fixture(scope="module")
def runtime(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> OnnxRuntime:
    return OnnxRuntime(model_dir, tmp_path_factory.mktemp("cache"), RuntimeConfig())


@pytest.fixture(scope="module")
def grammars(model_dir: Path, runtime: OnnxRuntime) -> Grammars:
    spec = runtime.spec
    return Grammars(TextTokenizer(model_dir).to_json(), spec.vocab_size, spec.eos_token_ids)


def test_each_schema_is_compiled_once(grammars: Grammars) -> None:
    assert grammars.compile(SCHEMA) is grammars.compile(json.loads(json.dumps(SCHEMA)))
    reordered = {**SCHEMA, "properties": dict(reversed(SCHEMA["properties"].items()))}
    assert grammars.compile(reordered) is not grammars.compile(SCHEMA)
    with pytest.raises(GrammarError):
        grammars.compile({"type": "object", "properties": {"a": {"type": "frob"}}})


@pytest.mark.parametrize("rows_per_call", [0, 2])
def test_engine_masks_only_constrained_rows(
    model_dir: Path, runtime: OnnxRuntime, grammars: Grammars, rows_per_call: int
) -> None:
    tokenizer = TextTokenizer(model_dir)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(10, 300, size=n).tolist() for n in (9, 23, 4)]
    free = SamplingParams(max_new_tokens=40, temperature=0.0, ignore_eos=True)
    bounded = SamplingParams(max_new_tokens=MAX_TOKENS, temperature=0.0)

    def run(seqs: list[EngineSequence]) -> None:
        engine = BatchEngine(runtime, rows_per_call)
        engine.prefill(seqs)
        engine.step(join=seqs)
        while engine.running:
            engine.step()

    alone = [EngineSequence(prompt, free) for prompt in prompts]
    run(alone)
    mixed = [EngineSequence(prompt, free) for prompt in prompts]
    constrained = [
        EngineSequence(prompt, bounded, constraint=grammars.compile(SCHEMA).matcher())
        for prompt in prompts
    ]
    run([seq for pair in zip(mixed, constrained, strict=True) for seq in pair])
    assert [seq.tokens for seq in mixed] == [seq.tokens for seq in alone]
    for seq in constrained:
        assert seq.finish_reason == FINISH_STOP
        output = seq.tokens[:-1] if seq.stop_token is not None else seq.tokens
        jsonschema.validate(json.loads(tokenizer.stream().feed(output)), SCHEMA)
