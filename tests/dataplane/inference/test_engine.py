"""Batched decode over the KV cache: results must not depend on batch company."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dataplane.inference.config import RuntimeConfig
from dataplane.inference.engine import FINISH_LENGTH, BatchEngine, EngineSequence
from dataplane.inference.kvcache import KVBatch
from dataplane.inference.runtime import OnnxRuntime
from dataplane.inference.sampling import SamplingParams, sample


@pytest.fixture(scope="module")
def runtime(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> OnnxRuntime:
    return OnnxRuntime(model_dir, tmp_path_factory.mktemp("cache"), RuntimeConfig())


def prompts() -> list[list[int]]:
    rng = np.random.default_rng(3)
    return [rng.integers(5, 300, size=n).tolist() for n in (9, 40, 2, 23, 61)]


def greedy(tokens: int = 24) -> SamplingParams:
    return SamplingParams(max_new_tokens=tokens, temperature=0.0, ignore_eos=True)


def run_to_end(engine: BatchEngine) -> None:
    while engine.running:
        engine.step()


def alone(runtime: OnnxRuntime, prompt: list[int], params: SamplingParams) -> list[int]:
    engine = BatchEngine(runtime)
    seq = EngineSequence(prompt, params)
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
    assert engine.running == [other] and seq.parked is not None
    for _ in range(6):
        engine.step()
    engine.step(join=[seq])
    run_to_end(engine)
    assert seq.tokens == expected and seq.finish_reason == FINISH_LENGTH


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


def test_sampling_rules() -> None:
    logits = np.array([[0.0, 5.0, 4.9, -1.0], [3.0, 0.0, 0.0, 0.0]], np.float32)
    rngs = [np.random.default_rng(0), np.random.default_rng(1)]
    greedy_params = [SamplingParams(temperature=0.0)] * 2
    assert sample(logits, greedy_params, rngs).tolist() == [1, 0]
    # top_p so small that only the best token survives behaves like greedy.
    narrow = [SamplingParams(temperature=1.5, top_p=0.01)] * 2
    for _ in range(20):
        assert sample(logits, narrow, rngs).tolist() == [1, 0]
    # top_p that keeps the two best tokens of row 0 never picks the others.
    two = [SamplingParams(temperature=1.0, top_p=0.9)] * 2
    picks = {int(sample(logits, two, rngs)[0]) for _ in range(200)}
    assert picks == {1, 2}


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
