"""Next-token choice for a whole batch at once, with vLLM's order of logit processing.

Per row: a constraint (a grammar, for structured output) masks the tokens it does not
allow, ``logit_bias`` is added, then the repetition penalty (transformers' rule over
prompt and output tokens: positive logits divided, negative ones multiplied), then the
frequency and presence penalties (OpenAI's rule over output tokens); temperature 0 takes
the argmax of the result, otherwise it is scaled, cut to ``top_k`` and ``top_p`` and
drawn from. Log-probabilities are those of the model's raw logits, as vLLM reports them
by default. Each sequence draws from its own seeded generator, so a seeded request
produces the same tokens whoever it shares a batch with.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt

from dataplane.inference.kvcache import FloatArray, IntArray

MAX_LOGPROBS = 20

BoolArray = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class SamplingParams:
    """Per-request generation settings, in OpenAI's terms (temperature 0 is greedy).

    ``top_k`` 0 means no cut; ``logprobs`` is how many alternatives to report with each
    token's own log-probability (None: report nothing). ``stop_token_ids`` end the
    sequence even when ``ignore_eos`` is set.
    """

    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    logprobs: int | None = None
    stop_token_ids: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError("temperature must be between 0 and 2")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be 0 (no cut) or positive")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be between -2 and 2")
        if self.repetition_penalty <= 0.0:
            raise ValueError("repetition_penalty must be positive")
        if any(not -100.0 <= bias <= 100.0 for bias in self.logit_bias.values()):
            raise ValueError("logit_bias values must be between -100 and 100")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be between 0 and {MAX_LOGPROBS}")

    @property
    def adjusts_logits(self) -> bool:
        return bool(
            self.logit_bias
            or self.presence_penalty
            or self.frequency_penalty
            or self.repetition_penalty != 1.0
        )


@dataclass(frozen=True)
class TokenLogprob:
    """A chosen token's log-probability and the ``top`` most likely (id, logprob) pairs."""

    logprob: float
    top: tuple[tuple[int, float], ...]


class TokenConstraint(Protocol):
    """Restricts the tokens a sequence may take next (a grammar, for structured output).

    Sampling masks the row's logits with ``allowed`` (one flag per vocabulary id) before
    choosing; the engine then reports the choice with ``accept``, which answers whether
    the constraint is complete and allows nothing more.
    """

    def allowed(self) -> BoolArray: ...

    def accept(self, token: int) -> bool: ...


class SampleRow(Protocol):
    """What sampling reads of a sequence."""

    @property
    def params(self) -> SamplingParams: ...

    @property
    def rng(self) -> np.random.Generator: ...

    @property
    def prompt(self) -> list[int]: ...

    @property
    def tokens(self) -> list[int]: ...

    @property
    def constraint(self) -> TokenConstraint | None: ...


def _adjust(logits: FloatArray, row: SampleRow) -> None:
    """Bias and penalties for one row's logits, in place."""
    params = row.params
    if params.logit_bias:
        ids = np.fromiter(params.logit_bias.keys(), np.int64)
        logits[ids] += np.fromiter(params.logit_bias.values(), np.float32)
    if params.repetition_penalty != 1.0:
        seen = np.unique(np.asarray(row.prompt + row.tokens, np.int64))
        values = logits[seen]
        penalty = params.repetition_penalty
        logits[seen] = np.where(values > 0, values / penalty, values * penalty)
    if (params.presence_penalty or params.frequency_penalty) and row.tokens:
        counts = np.bincount(np.asarray(row.tokens, np.int64), minlength=logits.shape[0])
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0)


def _mask(logits: FloatArray, constraints: Mapping[int, TokenConstraint]) -> None:
    """Rule out, in place, the tokens each constrained row may not take; masks are
    computed for those rows only, so unconstrained rows pay nothing for them."""
    rows = list(constraints)
    allowed = np.stack([constraint.allowed() for constraint in constraints.values()])
    logits[rows] = np.where(allowed, logits[rows], -np.inf)


def _logprobs(logits: FloatArray, token: int, top: int) -> TokenLogprob:
    shifted = logits - logits.max()
    logprobs = shifted - np.log(np.exp(shifted).sum())
    best = np.argpartition(-logprobs, top - 1)[:top] if top else np.zeros(0, np.int64)
    best = best[np.argsort(-logprobs[best], kind="stable")]
    return TokenLogprob(
        logprob=float(logprobs[token]),
        top=tuple((int(i), float(logprobs[i])) for i in best),
    )


def sample(
    logits: FloatArray, rows: Sequence[SampleRow]
) -> tuple[IntArray, list[TokenLogprob | None]]:
    """One token per row of ``logits`` [B, vocab] (vectorised over the batch), and each
    row's log-probabilities where its params ask for them."""
    raw = logits
    constraints = {
        index: row.constraint for index, row in enumerate(rows) if row.constraint is not None
    }
    if constraints or any(row.params.adjusts_logits for row in rows):
        logits = logits.astype(np.float32, copy=True)
        if constraints:
            _mask(logits, constraints)
        for index, row in enumerate(rows):
            if row.params.adjusts_logits:
                _adjust(logits[index], row)
    chosen: IntArray = logits.argmax(axis=-1).astype(np.int64)
    temperatures = np.array([row.params.temperature for row in rows], np.float32)
    drawn = np.flatnonzero(temperatures > 0.0)
    if drawn.size:
        chosen[drawn] = _draw(
            logits[drawn] / temperatures[drawn, None], [rows[r] for r in drawn.tolist()]
        )
    reports = [
        _logprobs(raw[index], int(chosen[index]), row.params.logprobs)
        if row.params.logprobs is not None
        else None
        for index, row in enumerate(rows)
    ]
    return chosen, reports


def _draw(scaled: FloatArray, rows: Sequence[SampleRow]) -> IntArray:
    """Draw from temperature-scaled logits after each row's top-k and top-p cuts."""
    for index, row in enumerate(rows):
        k = row.params.top_k
        if 0 < k < scaled.shape[1]:
            kth = np.partition(scaled[index], -k)[-k]
            scaled[index, scaled[index] < kth] = -np.inf
    scaled -= scaled.max(axis=-1, keepdims=True)
    probs = np.exp(scaled)
    probs /= probs.sum(axis=-1, keepdims=True)
    top_p = np.array([row.params.top_p for row in rows], np.float32)
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
    draws = np.array([row.rng.random() for row in rows]) * cumulative[:, -1]
    picks = np.minimum((cumulative < draws[:, None]).sum(axis=-1), probs.shape[1] - 1)
    result: IntArray = order[np.arange(len(rows)), picks].astype(np.int64)
    return result
