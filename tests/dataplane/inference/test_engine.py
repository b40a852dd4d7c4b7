"""Batched decode over the KV cache: results must not depend on batch company, on the
cache's layout (written in place or concatenated), or on whether the graph takes
position_ids or derives positions from the cache width."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dataplane.inference.config import RuntimeConfig
from dataplane.inference.engine import FINISH_LENGTH, BatchEngine, EngineSequence
from dataplane.inference.kvcache import CacheRow, FloatArray, IntArray, KVBatch, KVCache
from dataplane.inference.model import ModelSpec
from dataplane.inference.runtime import OnnxRuntime
from dataplane.inference.sampling import BoolArray, SamplingParams, TokenConstraint, sample

MODEL_DIRS = {
    "in_place": "model_dir",
    "concat": "concat_model_dir",
    "cache_width": "cache_width_model_dir",
}


@pytest.fixture(scope="module", params=list(MODEL_DIRS))
def runtime(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> OnnxRuntime:
    """Every test runs over the graph that writes its cache in place, its Optimum-layout
    twin, and one that derives positions from the cache width; the reference is always
    one sequence alone, unpadded."""
    directory = request.getfixturevalue(MODEL_DIRS[request.param])
    return OnnxRuntime(directory, tmp_path_factory.mktemp("cache"), RuntimeConfig())


def prompts() -> list[list[int]]:
    rng = np.random.default_rng(3)
    return [rng.integers(5, 300, size=n).tolist() for n in (9, 40, 2, 23, 61)]


def greedy(tokens: int = 24) -> SamplingParams:
    return SamplingParams(max_new_tokens=tokens, temperature=0.0, ignore_eos=True)


def run_to_end(engine: BatchEngine) -> None:
    while engine.running:
        engine.step()


def alone(
    runtime: OnnxRuntime, prompt: list[int], params: SamplingParams, stream: int = 0
) -> list[int]:
    engine = BatchEngine(runtime)
    seq = EngineSequence(prompt, params, stream=stream)
    engine.prefill([seq])
    engine.step(join=[seq])
    run_to_end(engine)
    return seq.tokens


@pytest.mark.parametrize("rows_per_call", [0, 2])
def test_greedy_tokens_alone_equal_tokens_in_a_batch(
    runtime: OnnxRuntime, rows_per_call: int
) -> None:
    expected = [alone(runtime, p, greedy()) for p in prompts()]
    engine = BatchEngine(runtime, rows_per_call)
    seqs = [EngineSequence(p, greedy()) for p in prompts()]
    engine.prefill(seqs)
    engine.step(join=seqs)
    run_to_end(engine)
    assert [s.tokens for s in seqs] == expected


@pytest.mark.parametrize("rows_per_call", [0, 2])
def test_joining_and_leaving_mid_stream_changes_nothing(
    runtime: OnnxRuntime, rows_per_call: int
) -> None:
    all_prompts = prompts()
    lengths = [24, 5, 30, 11, 17]
    expected = [alone(runtime, p, greedy(n)) for p, n in zip(all_prompts, lengths, strict=True)]
    engine = BatchEngine(runtime, rows_per_call)
    seqs = [EngineSequence(p, greedy(n)) for p, n in zip(all_prompts, lengths, strict=True)]
    engine.prefill(seqs[:2])
    engine.step(join=seqs[:2])
    for _ in range(3):
        engine.step()
    engine.prefill(seqs[2:4])
    engine.step(join=seqs[2:4])
    for _ in range(7):
        engine.step()
    engine.prefill(seqs[4:])
    engine.step(join=seqs[4:])
    run_to_end(engine)
    assert [s.tokens for s in seqs] == expected


@pytest.mark.parametrize("rows_per_call", [0, 1])
def test_paused_sequence_resumes_from_its_own_cache(
    runtime: OnnxRuntime, rows_per_call: int
) -> None:
    first, second = prompts()[:2]
    expected = alone(runtime, first, greedy(20))
    engine = BatchEngine(runtime, rows_per_call)
    seq, other = EngineSequence(first, greedy(20)), EngineSequence(second, greedy(40))
    engine.prefill([seq, other])
    engine.step(join=[seq, other])
    for _ in range(4):
        engine.step()
    engine.step(park=[seq])
    assert engine.running == [other] and seq.row is not None
    for _ in range(6):
        engine.step()
    engine.step(join=[seq])
    run_to_end(engine)
    assert seq.tokens == expected and seq.finish_reason == FINISH_LENGTH


@pytest.mark.parametrize("rows_per_call", [0, 2])
def test_prompts_split_over_steps_give_the_tokens_of_a_whole_prefill(
    runtime: OnnxRuntime, rows_per_call: int
) -> None:
    """Chunked prefill under a per-step budget, while other rows decode: every prompt
    is computed in pieces no larger than the budget and nothing else changes."""
    all_prompts = prompts()
    expected = [alone(runtime, p, greedy()) for p in all_prompts]
    counting = CountingRuntime(runtime)
    engine = BatchEngine(counting, rows_per_call)
    seqs = [EngineSequence(p, greedy()) for p in all_prompts]
    pending = list(seqs)
    ready: list[EngineSequence] = []
    while pending or engine.running or ready:
        engine.step(join=ready)
        ready = engine.prefill(pending, max_tokens=16)
        pending = [s for s in pending if s not in ready]
    assert [s.tokens for s in seqs] == expected
    assert max(n for call in counting.calls for n in call) == 16
    assert sum(n for call in counting.calls for n in call) == sum(map(len, all_prompts))


def test_cancelled_sequence_leaves_the_batch(runtime: OnnxRuntime) -> None:
    engine = BatchEngine(runtime)
    seqs = [EngineSequence(p, greedy(50)) for p in prompts()[:3]]
    engine.prefill(seqs)
    engine.step(join=seqs)
    engine.step(leave=[seqs[1]])
    assert {id(s) for s in engine.running} == {id(seqs[0]), id(seqs[2])}
    tokens = len(seqs[1].tokens)
    engine.step()
    assert len(seqs[1].tokens) == tokens


class CountingRuntime:
    """A runtime whose caches record the prompt tokens of every prefill call."""

    def __init__(self, runtime: OnnxRuntime) -> None:
        self.inner = runtime
        self.calls: list[list[int]] = []

    @property
    def spec(self) -> ModelSpec:
        return self.inner.spec

    def new_cache(self, rows_per_call: int = 0) -> KVCache:
        return CountingCache(self.inner.new_cache(rows_per_call), self.calls)


class CountingCache:
    def __init__(self, inner: KVCache, calls: list[list[int]]) -> None:
        self.inner = inner
        self.calls = calls

    @property
    def rows_per_call(self) -> int:
        return self.inner.rows_per_call

    @rows_per_call.setter
    def rows_per_call(self, rows: int) -> None:
        self.inner.rows_per_call = rows

    def start(
        self, prompts: Sequence[Sequence[int]], aside: bool = False
    ) -> tuple[FloatArray, list[CacheRow]]:
        self.calls.append([len(p) for p in prompts])
        return self.inner.start(prompts, aside)

    def extend(self, row: CacheRow, ids: IntArray) -> FloatArray:
        self.calls.append([int(ids.shape[1])])
        return self.inner.extend(row, ids)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_identical_prompts_share_one_prefill_and_draw_their_own_tokens(
    runtime: OnnxRuntime,
) -> None:
    counting = CountingRuntime(runtime)
    engine = BatchEngine(counting)
    params = SamplingParams(max_new_tokens=12, temperature=1.0, seed=5, ignore_eos=True)
    prompt, other = prompts()[:2]
    choices = [EngineSequence(prompt, params, stream=i) for i in range(3)]
    engine.prefill([*choices, EngineSequence(other, greedy(12))])
    assert sorted(n for call in counting.calls for n in call) == sorted([len(prompt), len(other)])
    engine.step(join=choices)
    run_to_end(engine)
    assert [c.tokens for c in choices] == [
        alone(runtime, prompt, params, stream=i) for i in range(3)
    ]
    assert len({tuple(c.tokens) for c in choices}) == 3


def test_cache_width_graph_refuses_padded_rows(cache_width_model_dir: Path, tmp_path: Path) -> None:
    runtime = OnnxRuntime(cache_width_model_dir, tmp_path, RuntimeConfig())
    assert not runtime.spec.has_position_ids
    with pytest.raises(ValueError, match="cache width"):
        runtime.prefill([[5, 6, 7], [8, 9]])
    logits, _ = runtime.prefill([[5, 6, 7], [8, 9, 10]])
    assert logits.shape[0] == 2


def test_stop_ids_end_a_sequence_even_with_ignore_eos(runtime: OnnxRuntime) -> None:
    first = alone(runtime, prompts()[0], greedy(8))
    stop_at = first[3]
    seq = EngineSequence(
        prompts()[0],
        SamplingParams(
            max_new_tokens=8, temperature=0.0, ignore_eos=True, stop_token_ids=frozenset({stop_at})
        ),
    )
    engine = BatchEngine(runtime)
    engine.prefill([seq])
    engine.step(join=[seq])
    run_to_end(engine)
    assert seq.tokens == first[: first.index(stop_at) + 1]
    assert seq.finish_reason == "stop" and seq.stop_token == stop_at


def test_seeded_sampling_is_independent_of_the_batch(runtime: OnnxRuntime) -> None:
    params = SamplingParams(
        max_new_tokens=16, temperature=0.9, top_p=0.8, seed=1234, ignore_eos=True
    )
    target = prompts()[0]
    expected = alone(runtime, target, params)
    assert alone(runtime, target, params) == expected
    engine = BatchEngine(runtime)
    seqs = [EngineSequence(target, params)] + [
        EngineSequence(p, SamplingParams(max_new_tokens=16, temperature=1.0, seed=i))
        for i, p in enumerate(prompts()[1:])
    ]
    engine.prefill(seqs)
    engine.step(join=seqs)
    run_to_end(engine)
    assert seqs[0].tokens == expected


def test_context_limit_finishes_with_length(runtime: OnnxRuntime) -> None:
    limit = runtime.spec.max_context
    seq = EngineSequence([7] * (limit - 3), greedy(100))
    engine = BatchEngine(runtime)
    engine.prefill([seq])
    engine.step(join=[seq])
    run_to_end(engine)
    assert len(seq.prompt) + len(seq.tokens) == limit
    assert seq.finish_reason == FINISH_LENGTH


@dataclass
class Row:
    """A sampling row without a model: params, generator, token history, constraint."""

    params: SamplingParams
    rng: np.random.Generator = field(default_factory=np.random.default_rng)
    prompt: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    constraint: TokenConstraint | None = None


@dataclass
class OneOf:
    """A constraint that allows a fixed set of tokens."""

    tokens: list[int]
    vocab: int

    def allowed(self) -> BoolArray:
        mask = np.zeros(self.vocab, np.bool_)
        mask[self.tokens] = True
        return mask

    def accept(self, token: int) -> bool:
        return False


def test_sampling_rules() -> None:
    logits = np.array([[0.0, 5.0, 4.9, -1.0], [3.0, 0.0, 0.0, 0.0]], np.float32)

    def rows(**params: Any) -> list[Row]:
        return [Row(SamplingParams(**params), np.random.default_rng(seed)) for seed in (0, 1)]

    assert sample(logits, rows(temperature=0.0))[0].tolist() == [1, 0]
    # top_p so small that only the best token survives behaves like greedy.
    narrow = rows(temperature=1.5, top_p=0.01)
    for _ in range(20):
        assert sample(logits, narrow)[0].tolist() == [1, 0]
    # top_p that keeps the two best tokens of row 0 never picks the others; nor does top_k 2.
    for cut in (rows(temperature=1.0, top_p=0.9), rows(temperature=2.0, top_k=2)):
        assert {int(sample(logits, cut)[0][0]) for _ in range(200)} == {1, 2}


def test_constraints_mask_only_their_own_rows() -> None:
    logits = np.array([[0.0, 5.0, 4.9, -1.0], [3.0, 0.0, 0.0, 0.0]], np.float32)
    greedy = SamplingParams(temperature=0.0, logprobs=0)
    rows = [Row(greedy, constraint=OneOf([2, 3], 4)), Row(greedy)]
    tokens, reports = sample(logits, rows)
    assert tokens.tolist() == [2, 0]
    # Log-probabilities stay the raw model's, as with logit_bias.
    assert reports[0] is not None and reports[0].logprob == pytest.approx(
        float(logits[0, 2] - np.log(np.exp(logits[0]).sum()))
    )
    drawn = [
        Row(
            SamplingParams(temperature=2.0, top_k=3, top_p=0.9, presence_penalty=2.0),
            tokens=[3],
            constraint=OneOf([0, 3], 4),
        ),
        Row(SamplingParams(temperature=0.0, logit_bias={3: 10.0})),
    ]
    for _ in range(50):
        tokens, _ = sample(logits, drawn)
        assert tokens[0] in (0, 3) and tokens[1] == 3


def test_penalties_bias_and_logprobs_follow_vllm() -> None:
    logits = np.array([[2.0, 1.9, -1.0, 0.5]], np.float32)
    history = {"prompt": [3], "tokens": [0, 0]}

    def pick(**params: Any) -> int:
        row = Row(SamplingParams(temperature=0.0, **params), **history)  # type: ignore[arg-type]
        return int(sample(logits, [row])[0][0])

    assert pick() == 0
    assert pick(frequency_penalty=0.1) == 1  # 2.0 - 2 * 0.1 < 1.9
    assert pick(presence_penalty=0.05) == 0  # counted once: 1.95 > 1.9
    assert pick(repetition_penalty=1.1) == 1  # 2.0 / 1.1 < 1.9
    assert pick(logit_bias={2: 100.0}) == 2
    assert pick(repetition_penalty=0.2, logit_bias={0: -10.0}) == 3  # 0.5 / 0.2 wins
    tokens, reports = sample(logits, [Row(SamplingParams(temperature=0.0, logprobs=2))])
    report = reports[0]
    assert report is not None and [t for t, _ in report.top] == [0, 1]
    expected = logits[0] - np.log(np.exp(logits[0]).sum())
    assert report.logprob == pytest.approx(float(expected[0]))
    # Log-probabilities are the raw model's, whatever the bias did to the choice.
    biased = sample(logits, [Row(SamplingParams(temperature=0.0, logprobs=0, logit_bias={3: 50}))])
    assert biased[0].tolist() == [3] and biased[1][0] is not None
    assert biased[1][0].logprob == pytest.approx(float(expected[3])) and biased[1][0].top == ()


def test_gather_keeps_rows_right_aligned() -> None:
    def batch(lengths: list[int], width: int, fill: float) -> KVBatch:
        keys = np.zeros((len(lengths), 1, width, 1), np.float32)
        for row, n in enumerate(lengths):
            keys[row, 0, width - n :, 0] = fill + row
        return KVBatch(keys=(keys,), values=(keys.copy(),), lengths=np.array(lengths))

    a = batch([3, 6], 6, 10.0)
    b = batch([2], 2, 20.0)
    merged = KVBatch.gather([(a, [0]), (b, [0])])
    assert merged.width == 3 and merged.lengths.tolist() == [3, 2]
    assert merged.keys[0][:, 0, :, 0].tolist() == [[10, 10, 10], [0, 20, 20]]
    assert merged.attention_mask(1).tolist() == [[1, 1, 1, 1], [0, 1, 1, 1]]
    widened = KVBatch.gather([(b, [0]), (a, [1])])
    assert widened.width == 6
    assert widened.keys[0][0, 0, :, 0].tolist() == [0, 0, 0, 0, 20, 20]
    row = a.row(0)
    assert row.width == 3 and row.lengths.tolist() == [3]
