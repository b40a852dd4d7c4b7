"""Streaming clients for the gateway's tests and benchmark: each request as the client
saw it (status, Retry-After, the time of every token chunk, an error chunk if any)."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass
class Streamed:
    """One streamed request on the client's monotonic clock."""

    sent: float
    status: int = 0
    retry_after: str | None = None
    token_times: list[float] = field(default_factory=list)
    error: dict[str, Any] | None = None
    done: bool = False

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.sent if self.token_times else None


async def stream(
    client: httpx.AsyncClient,
    base_url: str,
    key: str,
    max_tokens: int,
    prompt: str = "The quick brown fox jumps over the lazy dog",
    first_token: asyncio.Event | None = None,
) -> Streamed:
    body = {
        "model": "synthetic",
        "prompt": prompt,
        "max_tokens": max_tokens,
        "stream": True,
        "temperature": 0.0,
        "ignore_eos": True,
    }
    result = Streamed(time.monotonic())
    async with client.stream(
        "POST",
        f"{base_url}/v1/completions",
        json=body,
        headers={"authorization": f"Bearer {key}"},
    ) as response:
        result.status = response.status_code
        result.retry_after = response.headers.get("retry-after")
        if response.status_code != 200:
            await response.aread()
            return result
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line.removeprefix("data: ")
            if data == "[DONE]":
                result.done = True
                continue
            chunk = json.loads(data)
            if "error" in chunk:
                result.error = chunk["error"]
            elif chunk.get("choices"):
                result.token_times.append(time.monotonic())
                if first_token is not None:
                    first_token.set()
    return result


async def closed_loop(
    base_url: str,
    key: str,
    streams: int,
    seconds: float,
    max_tokens: int,
    backoff_s: float = 0.05,
) -> list[Streamed]:
    """``streams`` clients, each sending its next request when the last one ends (after
    ``backoff_s`` when refused), for ``seconds``."""
    results: list[Streamed] = []
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=streams, max_keepalive_connections=streams)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:

        async def one_client() -> None:
            while time.monotonic() < deadline:
                found = await stream(client, base_url, key, max_tokens)
                results.append(found)
                if found.status != 200:
                    await asyncio.sleep(backoff_s)

        await asyncio.gather(*(one_client() for _ in range(streams)))
    return results


def tokens_between(results: list[Streamed], start: float, end: float) -> int:
    return sum(1 for r in results for t in r.token_times if start <= t < end)
