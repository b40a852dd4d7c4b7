"""Next-token choice for a whole batch at once: greedy, or temperature + top-p.

Each request draws from its own seeded generator, so a seeded request produces the same
tokens whoever it shares a batch with.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dataplane.inference.kvcache import FloatArray, IntArray


@dataclass(frozen=True)
class SamplingParams:
    """Per-request generation settings, in OpenAI's terms (temperature 0 is greedy)."""

    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError("temperature must be between 0 and 2")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")


def sample(
    logits: FloatArray, params: Sequence[SamplingParams], rngs: Sequence[np.random.Generator]
) -> IntArray:
    """One token per row of ``logits`` [B, vocab]; vectorised over the batch."""
    chosen: IntArray = logits.argmax(axis=-1).astype(np.int64)
    temperatures = np.array([p.temperature for p in params], np.float32)
    rows = np.flatnonzero(temperatures > 0.0)
    if rows.size == 0:
        return chosen
    scaled = logits[rows] / temperatures[rows, None]
    scaled -= scaled.max(axis=-1, keepdims=True)
    probs = np.exp(scaled)
    probs /= probs.sum(axis=-1, keepdims=True)
    top_p = np.array([params[r].top_p for r in rows.tolist()], np.float32)
    if np.all(top_p >= 1.0):
        order = np.broadcast_to(np.arange(probs.shape[1]), probs.shape)
        ranked = probs
    else:
        order = np.argsort(-probs, axis=-1, kind="stable")
        ranked = np.take_along_axis(probs, order, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (the best token always).
        before = np.cumsum(ranked, axis=-1) - ranked
        ranked = np.where(before < top_p[:, None], ranked, 0.0)
    cumulative = np.cumsum(ranked, axis=-1)
    draws = np.array([rngs[r].random() for r in rows.tolist()]) * cumulative[:, -1]
    picks = np.minimum((cumulative < draws[:, None]).sum(axis=-1), probs.shape[1] - 1)
    chosen[rows] = order[np.arange(rows.size), picks]
    return chosen
