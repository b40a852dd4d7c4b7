"""The OpenAI surface as vLLM serves it, driven with the official openai client and
LangChain, over a Llama-like export: BOS added by the tokenizer, a chat template, an
end-of-turn stop id only in generation_config.json, sampling defaults there, and a graph
without position_ids."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from langchain_openai import ChatOpenAI, OpenAI

from dataplane.inference.synthetic import BOS_TOKEN, END_TOKEN, write_synthetic_model
from dataplane.inference.tokenizer import TextTokenizer

from .conftest import TEST_MODEL
from .procs import WorkerProcess, worker_config

KEY = "key-surface"
GREEDY: dict[str, Any] = {"temperature": 0.0, "extra_body": {"ignore_eos": True}}
CALL_HISTORY: Any = [
    {"role": "user", "content": "Weather in Oslo?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "weather", "arguments": '{"city": "Oslo"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
]


@pytest.fixture(scope="module")
def instruct_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("instruct")
    spec = replace(TEST_MODEL, position_ids=False, bos=True)
    write_synthetic_model(directory, spec, {"repetition_penalty": 1.5})
    return directory


@pytest.fixture(scope="module")
def tokenizer(instruct_dir: Path) -> TextTokenizer:
    return TextTokenizer(instruct_dir)


@pytest.fixture(scope="module")
def worker(instruct_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    workdir = tmp_path_factory.mktemp("surface")
    with WorkerProcess(worker_config(instruct_dir, workdir / "cache", {"t": KEY}), workdir) as w:
        yield w


@pytest.fixture
def client(worker: WorkerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{worker.base_url}/v1", api_key=KEY, max_retries=0)


def token_id(instruct_dir: Path, text: str) -> int:
    vocab = json.loads((instruct_dir / "tokenizer.json").read_text())["model"]["vocab"]
    return int(vocab[text])


def test_prompt_tokens_follow_the_tokenizer_and_the_chat_template(
    client: openai.OpenAI, tokenizer: TextTokenizer, instruct_dir: Path
) -> None:
    completion = client.completions.create(
        model="synthetic", prompt="Hello there", max_tokens=2, **GREEDY
    )
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == len(tokenizer.encode("Hello there"))
    assert tokenizer.encode("Hello there")[0] == token_id(instruct_dir, BOS_TOKEN)
    chat = client.chat.completions.create(
        model="synthetic", messages=CALL_HISTORY, max_tokens=2, **GREEDY
    )
    # Tool-call arguments reach the template parsed from their JSON, as vLLM passes them.
    call = {"function": {"name": "weather", "arguments": {"city": "Oslo"}}}
    history = [CALL_HISTORY[0], {**CALL_HISTORY[1], "tool_calls": [call]}, CALL_HISTORY[2]]
    assert chat.usage is not None
    assert chat.usage.prompt_tokens == len(tokenizer.render_chat(history))


async def test_concurrent_streams_match_each_request_alone(worker: WorkerProcess) -> None:
    """Staggered joins into a running batch over a graph without position_ids."""
    client = openai.AsyncOpenAI(base_url=f"{worker.base_url}/v1", api_key=KEY, max_retries=0)
    prompts = [f"Prompt number {i} " * (1 + 3 * i) for i in range(5)]

    async def run(prompt: str, delay: float) -> str:
        await asyncio.sleep(delay)
        stream = await client.completions.create(
            model="synthetic", prompt=prompt, max_tokens=64, stream=True, **GREEDY
        )
        return "".join([chunk.choices[0].text async for chunk in stream if chunk.choices])

    alone = [await run(prompt, 0) for prompt in prompts]
    together = await asyncio.gather(*[run(p, 0.005 * i) for i, p in enumerate(prompts)])
    assert list(together) == alone


def test_stop_ids_from_generation_config_and_the_request(
    client: openai.OpenAI, instruct_dir: Path
) -> None:
    end = token_id(instruct_dir, END_TOKEN)
    ended = client.completions.create(
        model="synthetic", prompt="Hi", max_tokens=16, temperature=0.0, logit_bias={str(end): 100}
    )
    assert ended.choices[0].finish_reason == "stop" and ended.choices[0].text == ""
    assert ended.usage is not None and ended.usage.completion_tokens == 1
    # A request's stop id ends the sequence despite ignore_eos; its text is not output.
    forced = token_id(instruct_dir, "a")
    cut = client.completions.create(
        model="synthetic",
        prompt="Hi",
        max_tokens=8,
        temperature=0.0,
        logit_bias={str(forced): 100},
        extra_body={"ignore_eos": True, "stop_token_ids": [forced]},
    )
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == ""
    assert cut.usage is not None and cut.usage.completion_tokens == 1


def test_generation_defaults_apply_unless_the_request_overrides(client: openai.OpenAI) -> None:
    def text(**extra: Any) -> str:
        body = {"ignore_eos": True, **extra}
        return (
            client.completions.create(
                model="synthetic",
                prompt="Echo echo echo",
                max_tokens=24,
                temperature=0.0,
                extra_body=body,
            )
            .choices[0]
            .text
        )

    assert text() == text(repetition_penalty=1.5)
    assert text() != text(repetition_penalty=1.0)


def test_n_choices_seed_and_penalties(client: openai.OpenAI) -> None:
    params: Any = {"model": "synthetic", "prompt": "Tell me", "max_tokens": 10}
    greedy = client.completions.create(n=2, **params, **GREEDY)
    assert [c.index for c in greedy.choices] == [0, 1]
    assert greedy.choices[0].text == greedy.choices[1].text
    assert greedy.usage is not None and greedy.usage.completion_tokens == 20
    seeded = [
        client.completions.create(
            n=3, seed=11, temperature=1.0, extra_body={"ignore_eos": True}, **params
        )
        for _ in range(2)
    ]
    assert [c.text for c in seeded[0].choices] == [c.text for c in seeded[1].choices]
    assert len({c.text for c in seeded[0].choices}) > 1

    def tokens(**penalties: float) -> list[str]:
        body = {"ignore_eos": True, "repetition_penalty": 1.0}
        choice = client.completions.create(
            model="synthetic",
            prompt="Tell me",
            max_tokens=32,
            temperature=0.0,
            logprobs=0,
            extra_body=body,
            **penalties,  # type: ignore[arg-type]
        ).choices[0]
        assert choice.logprobs is not None and choice.logprobs.tokens is not None
        return choice.logprobs.tokens

    free = tokens()
    assert len(set(free)) < len(free), "the unpenalised text should repeat a token"
    assert tokens(presence_penalty=2.0) != free
    assert tokens(frequency_penalty=2.0) != free


def test_logit_bias_and_logprobs_shapes(client: openai.OpenAI, instruct_dir: Path) -> None:
    forced = token_id(instruct_dir, "a")
    completion = client.completions.create(
        model="synthetic",
        prompt="Hi",
        max_tokens=5,
        logprobs=3,
        logit_bias={str(forced): 100},
        **GREEDY,
    )
    logprobs = completion.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens is not None
    assert logprobs.token_logprobs is not None and logprobs.top_logprobs is not None
    assert logprobs.text_offset is not None
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 5
    assert all(lp <= 0 for lp in logprobs.token_logprobs)
    assert all(3 <= len(top) <= 4 for top in logprobs.top_logprobs)
    assert logprobs.text_offset[0] == 0 and logprobs.text_offset == sorted(logprobs.text_offset)
    assert completion.choices[0].text == "aaaaa" and logprobs.tokens == ["a"] * 5
    chat = client.chat.completions.create(
        model="synthetic",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=4,
        logprobs=True,
        top_logprobs=2,
        **GREEDY,
    )
    content = chat.choices[0].logprobs and chat.choices[0].logprobs.content
    assert content and len(content) == 4
    for entry in content:
        assert len(entry.top_logprobs) == 2
        # Greedy without bias picks the most likely token.
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert entry.bytes == list(entry.token.encode())


def test_streams_send_one_token_per_chunk(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="synthetic",
            messages=[{"role": "user", "content": "Stream"}],
            max_tokens=24,
            n=2,
            stream=True,
            logprobs=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
    )
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 48 and not chunks[-1].choices
    for index in (0, 1):
        mine = [c.choices[0] for c in chunks[:-1] if c.choices[0].index == index]
        assert len(mine) == 24
        assert all(c.logprobs and c.logprobs.content and len(c.logprobs.content) == 1 for c in mine)
        assert [c.finish_reason for c in mine] == [None] * 23 + ["length"]
        assert mine[0].delta.role == "assistant"
    whole = client.chat.completions.create(
        model="synthetic", messages=[{"role": "user", "content": "Stream"}], max_tokens=24, **GREEDY
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks[:-1] if c.choices[0].index == 0)
    assert text == whole.choices[0].message.content
    completion_chunks = list(
        client.completions.create(
            model="synthetic", prompt="abc", max_tokens=7, stream=True, **GREEDY
        )
    )
    assert len(completion_chunks) == 7


def test_models_by_id_and_refused_parameters(client: openai.OpenAI, worker: WorkerProcess) -> None:
    assert client.models.retrieve("synthetic").id == "synthetic"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")
    refused: list[tuple[str, dict[str, Any]]] = [
        (
            "response_format",
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
        ),
        ("best_of", {"best_of": 3}),
        ("echo", {"echo": True}),
        ("logit_bias", {"logit_bias": {"999999": 1}}),
        ("stop_token_ids", {"stop_token_ids": [999999]}),
    ]
    for param, extra in refused:
        response = httpx.post(
            f"{worker.base_url}/v1/completions",
            json={"model": "synthetic", "prompt": "x", "max_tokens": 1, **extra},
            headers={"Authorization": f"Bearer {KEY}"},
        )
        assert response.status_code == 400, (param, response.text)
        assert response.json()["error"]["param"] == param
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model="synthetic", messages=[{"role": "user", "content": None}], max_tokens=1
        )


def test_langchain_clients_with_their_defaults(worker: WorkerProcess) -> None:
    base = f"{worker.base_url}/v1"
    chat = ChatOpenAI(model="synthetic", base_url=base, api_key=KEY, max_tokens=6, max_retries=0)
    reply = chat.invoke("Hello")
    assert isinstance(reply.content, str)
    assert isinstance("".join(str(part.content) for part in chat.stream("Hello")), str)
    llm = OpenAI(model="synthetic", base_url=base, api_key=KEY, max_tokens=6, max_retries=0)
    assert isinstance(llm.invoke("Hello"), str)
    assert isinstance("".join(llm.stream("Hello")), str)
