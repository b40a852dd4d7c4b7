"""The KV cache written in place: the tokens of the concatenating layout and of a full
recompute, and rows that join, leave, pause and resume without moving any data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from dataplane.inference.config import RuntimeConfig
from dataplane.inference.engine import BatchEngine, EngineSequence
from dataplane.inference.kvcache import (
    ConcatCache,
    FloatArray,
    IntArray,
    KVCache,
    SlotBuffers,
    SlotCache,
)
from dataplane.inference.model import ModelSpec
from dataplane.inference.runtime import OnnxRuntime, last_logits
from dataplane.inference.sampling import SamplingParams


@pytest.fixture(scope="module")
def in_place(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> OnnxRuntime:
    return OnnxRuntime(model_dir, tmp_path_factory.mktemp("cache"), RuntimeConfig())


@pytest.fixture(scope="module")
def concat(concat_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> OnnxRuntime:
    return OnnxRuntime(concat_model_dir, tmp_path_factory.mktemp("cache"), RuntimeConfig())


def prompts() -> list[list[int]]:
    rng = np.random.default_rng(11)
    return [rng.integers(5, 300, size=n).tolist() for n in (13, 3, 37, 1, 50, 21, 8)]


def greedy(tokens: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=tokens, temperature=0.0, ignore_eos=True)


LENGTHS = [20, 6, 15, 25, 9, 17, 12]


def staggered(
    runtime: object, rows_per_call: int, where: dict[int, set[tuple[int, int]]] | None = None
) -> list[list[int]]:
    """Arrivals every few steps, prompts chunked under a 12-token budget, a pause and a
    resume, sequences finishing at different steps; the third prompt arrives twice at
    once (two choices that share its prefill, then fork). ``where`` collects the (block
    address, slot) each sequence's row was seen in, for in-place caches."""
    assert isinstance(runtime, OnnxRuntime | Recording)
    engine = BatchEngine(runtime, rows_per_call)
    seqs = [EngineSequence(p, greedy(n)) for p, n in zip(prompts(), LENGTHS, strict=True)]
    seqs.append(EngineSequence(prompts()[2], greedy(LENGTHS[2])))
    arriving = [[s] for s in seqs[:7]]
    arriving[2].append(seqs[7])
    pending: list[EngineSequence] = []
    ready: list[EngineSequence] = []
    paused: EngineSequence | None = None
    step = 0

    def look() -> None:
        if where is None or not isinstance(engine.cache, SlotCache):
            return
        for index, seq in enumerate(seqs):
            if seq.row is not None and seq.prefilled == len(seq.prompt):
                buffers, slot = engine.cache.slot_of(seq.row)
                where.setdefault(index, set()).add((buffers.pointers[0], slot))

    while arriving or pending or ready or engine.running or paused:
        if arriving and step % 3 == 0:
            pending.extend(arriving.pop(0))
        park = []
        if step == 8 and seqs[0] in engine.running:
            park, paused = [seqs[0]], seqs[0]
        join = list(ready)
        if step == 14 and paused is not None:
            join, paused = [*join, paused], None
        engine.step(park=park, join=join)
        look()
        ready = engine.prefill(pending, max_tokens=12)
        look()
        pending = [s for s in pending if s not in ready]
        step += 1
    return [s.tokens for s in seqs]


@pytest.mark.parametrize("rows_per_call", [0, 3])
def test_in_place_gives_the_tokens_of_the_concatenated_cache(
    in_place: OnnxRuntime, concat: OnnxRuntime, rows_per_call: int
) -> None:
    assert in_place.spec.kv_layout == "in_place" and concat.spec.kv_layout == "concat"
    assert isinstance(in_place.new_cache(), SlotCache)
    assert isinstance(concat.new_cache(), ConcatCache)
    assert staggered(in_place, rows_per_call) == staggered(concat, rows_per_call)


def test_in_place_gives_the_tokens_of_a_full_recompute(in_place: OnnxRuntime) -> None:
    """Each next token from the whole sequence run from scratch in a fresh row."""
    tokens = staggered(in_place, 2)
    for prompt, produced in list(zip(prompts(), tokens[:7], strict=True))[:3]:
        sequence = list(prompt)
        for _ in produced:
            cache = in_place.new_cache()
            logits, rows = cache.start([sequence])
            sequence.append(int(np.argmax(logits[0])))
            cache.release(rows[0])
        assert sequence[len(prompt) :] == produced


class Recording:
    """A runtime whose in-place caches record every allocation, forward call and copy."""

    def __init__(self, inner: OnnxRuntime) -> None:
        self.inner = inner
        self.allocated: list[SlotBuffers] = []
        self.calls: list[tuple[int, int, int]] = []  # (block pointer, first slot, rows)
        self.copies = 0
        self.fail_at = 0  # the forward call that fails (counting from 1), 0: none

    @property
    def spec(self) -> ModelSpec:
        return self.inner.spec

    def new_cache(self, rows_per_call: int = 0) -> KVCache:
        return SlotCache(self, rows_per_call)

    def allocate(self, slots: int) -> SlotBuffers:
        buffers = self.inner.allocate(slots)
        self.allocated.append(buffers)
        return buffers

    def forward_slots(
        self, buffers: SlotBuffers, first: int, ids: IntArray, past: IntArray, new: IntArray
    ) -> FloatArray:
        self.calls.append((buffers.pointers[0], first, int(ids.shape[0])))
        if len(self.calls) == self.fail_at:
            raise RuntimeError("injected failure")
        return self.inner.forward_slots(buffers, first, ids, past, new)

    def copy_slot(
        self,
        source: SlotBuffers,
        source_slot: int,
        target: SlotBuffers,
        target_slot: int,
        length: int,
    ) -> None:
        self.copies += 1
        self.inner.copy_slot(source, source_slot, target, target_slot, length)

    def free_slot(self, buffers: SlotBuffers, slot: int) -> None:
        self.inner.free_slot(buffers, slot)


@pytest.mark.parametrize("rows_per_call", [0, 4])
def test_joining_and_leaving_move_no_data_and_a_pause_moves_one_row(
    in_place: OnnxRuntime, rows_per_call: int
) -> None:
    recording = Recording(in_place)
    where: dict[int, set[tuple[int, int]]] = {}
    tokens = staggered(recording, rows_per_call, where)
    assert tokens == staggered(in_place, rows_per_call)
    assert tokens[7] == tokens[2]  # the second choice of the third prompt, greedy
    blocks = recording.allocated
    if rows_per_call == 0:
        assert len(blocks) == 2  # one block of slots held them all, one the paused row
    # Each sequence decoded in the one slot it started in; the paused one (the first)
    # waited in a parking block and came back.
    assert sorted(where) == list(range(8))
    assert all(len(places) == 1 for index, places in where.items() if index)
    assert len(where[0]) in (2, 3)
    # The copies: the shared prompt's row forked for its second choice, and the paused
    # row out and back.
    assert recording.copies == 3
    # Every forward call wrote into an allocated block, at most rows_per_call rows.
    assert {pointer for pointer, _, _ in recording.calls} <= {b.pointers[0] for b in blocks}
    size = {b.pointers[0]: b.slots for b in blocks}
    assert all(first + rows <= size[pointer] for pointer, first, rows in recording.calls)
    if rows_per_call:
        assert max(rows for _, _, rows in recording.calls) <= rows_per_call


def test_a_paused_row_moves_out_of_the_batch_and_back_to_the_lowest_free_slot(
    in_place: OnnxRuntime,
) -> None:
    engine = BatchEngine(in_place, 4)
    cache = engine.cache
    assert isinstance(cache, SlotCache)
    # Slots are taken shortest prompt first: the first sequence (3 tokens) takes slot 0,
    # so pausing it would split the decode of the second.
    seqs = [EngineSequence(prompts()[i], greedy(30)) for i in (1, 0, 2)]
    engine.prefill(seqs[:2])
    engine.step(join=seqs[:2])
    first = seqs[0].row
    assert first is not None
    buffers, slot = cache.slot_of(first)
    assert slot == 0
    assert isinstance(buffers, SlotBuffers)
    before = [array[slot].copy() for array in buffers.arrays]
    length = len(seqs[0].prompt) + len(seqs[0].tokens) - 1
    engine.step(park=[seqs[0]])
    parking, parked_slot = cache.slot_of(first)
    assert seqs[0].row is first and parking is not buffers
    engine.prefill(seqs[2:])  # the third prompt takes the slot the paused row left
    engine.step(join=seqs[2:])
    assert seqs[2].row is not None and cache.slot_of(seqs[2].row) == (buffers, slot)
    # The paused row's positions, exactly, wait in the parking block.
    for kept, array in zip(before, parking.arrays, strict=True):
        assert np.array_equal(kept[:, :length], array[parked_slot, :, :length])
    engine.step(join=[seqs[0]])
    back = cache.slot_of(first)
    assert back == (buffers, 2)  # the lowest free slot
    assert len(cache.slots()) == 3
    engine.step(leave=[seqs[1]])
    assert len(cache.slots()) == 2 and seqs[1].row is None
    while engine.running:
        engine.step()
    assert cache.slots() == [] and len(cache.buffers) == 1


def test_the_first_parking_block_is_kept_for_the_next_pause(in_place: OnnxRuntime) -> None:
    """A parking block is allocated once, not at every pause (on a device it holds
    ``max_context`` positions a slot)."""
    recording = Recording(in_place)
    engine = BatchEngine(recording, 4)
    seqs = [EngineSequence(prompts()[i], greedy(30)) for i in (1, 0)]
    engine.prefill(seqs)
    engine.step(join=seqs)
    allocated = len(recording.allocated)
    for _ in range(3):
        engine.step(park=[seqs[0]])  # slot 0 would split the decode of slot 1: it moves
        engine.step(join=[seqs[0]])  # back to slot 0, and the parking block empties
    assert len(recording.allocated) == allocated + 1
    assert recording.copies == 6


def test_rows_of_cancelled_prompts_and_paused_sequences_are_freed(in_place: OnnxRuntime) -> None:
    engine = BatchEngine(in_place)
    cache = engine.cache
    assert isinstance(cache, SlotCache)
    long, short = EngineSequence([7] * 40, greedy(5)), EngineSequence([9] * 4, greedy(50))
    assert engine.prefill([short, long], max_tokens=20) == [short]
    engine.step(join=[short])
    engine.step(park=[short])
    assert len(cache.slots()) == 2
    engine.step(leave=[long, short])  # one still being prefilled, one paused
    assert cache.slots() == [] and long.row is None and short.row is None


def test_choices_of_one_prompt_share_its_row_then_fork(in_place: OnnxRuntime) -> None:
    recording = Recording(in_place)
    engine = BatchEngine(recording)
    params = SamplingParams(max_new_tokens=10, temperature=1.0, seed=3, ignore_eos=True)
    choices = [EngineSequence(prompts()[2], params, stream=i) for i in range(3)]
    pending = list(choices)
    while pending:
        done = engine.prefill(pending, max_tokens=16)
        pending = [s for s in pending if s not in done]
    assert len(recording.calls) == 3  # 37 prompt tokens in chunks of 16, computed once
    assert recording.copies == 2 and len({id(c.row) for c in choices}) == 3
    engine.step(join=choices)
    while engine.running:
        engine.step()
    expected = []
    for i in range(3):
        alone = BatchEngine(in_place)
        seq = EngineSequence(prompts()[2], params, stream=i)
        alone.prefill([seq])
        alone.step(join=[seq])
        while alone.running:
            alone.step()
        expected.append(seq.tokens)
    assert [c.tokens for c in choices] == expected


def test_a_failed_step_frees_the_batch_and_keeps_prompts_under_way(
    in_place: OnnxRuntime,
) -> None:
    engine = BatchEngine(in_place)
    cache = engine.cache
    assert isinstance(cache, SlotCache)
    running, chunked = EngineSequence([5] * 6, greedy(20)), EngineSequence([6] * 30, greedy(5))
    engine.prefill([running])
    engine.step(join=[running])
    engine.prefill([chunked], max_tokens=10)
    held = chunked.row
    engine.reset()
    assert engine.running == [] and running.row is None
    assert chunked.row is held and len(cache.slots()) == 1
    assert engine.prefill([chunked]) == [chunked]
    engine.step(join=[chunked])
    while engine.running:
        engine.step()
    assert chunked.tokens == alone(in_place, [6] * 30, 5)


def alone(runtime: OnnxRuntime, prompt: list[int], tokens: int) -> list[int]:
    engine = BatchEngine(runtime)
    seq = EngineSequence(prompt, greedy(tokens))
    engine.prefill([seq])
    engine.step(join=[seq])
    while engine.running:
        engine.step()
    return seq.tokens


@pytest.mark.parametrize("layout", ["in_place", "concat"])
def test_prompts_started_between_a_decodes_calls_leave_every_row_as_alone(
    in_place: OnnxRuntime, concat: OnnxRuntime, layout: str
) -> None:
    """Two prompts start between the calls of a three-call decode, in rows that decode
    does not touch (one ends at its first token, its row freed mid-decode); the other
    joins at the next step, and every sequence, old and new, gets the tokens it gets
    alone."""
    runtime = in_place if layout == "in_place" else concat
    engine = BatchEngine(runtime, rows_per_call=2)
    running = [EngineSequence(p, greedy(6)) for p in prompts()[:5]]
    engine.prefill(running)
    engine.step(join=running)
    late = [EngineSequence(prompts()[5], greedy(6)), EngineSequence(prompts()[6], greedy(1))]
    started: list[EngineSequence] = []
    gaps = 0

    def between() -> None:
        nonlocal gaps
        gaps += 1
        if gaps == 1:
            started.extend(engine.prefill(late, aside=True))
            if isinstance(engine.cache, SlotCache):  # parked: past the decode blocks
                decode_blocks = len(engine.cache.buffers)
                assert sum(1 for block, _ in engine.cache.slots() if block >= decode_blocks) == 1

    engine.step(between=between)
    assert gaps == 2 and started == late
    engine.step(join=late)
    while engine.running:
        engine.step()
    for seq in [*running, *late]:
        assert seq.tokens == alone(runtime, list(seq.prompt), seq.params.max_new_tokens)


def test_buffers_held_as_ortvalues_are_bound_and_copied_by_address(
    in_place: OnnxRuntime,
) -> None:
    """The path a CUDA session takes (its buffers are OrtValues on the device), here over
    OrtValues of host memory: forward calls bind them by address, a fork copies a slot
    with the runtime's own copy session."""
    host = in_place.allocate(3)
    values = tuple(ort.OrtValue.ortvalue_from_numpy(array) for array in host.arrays)
    device = SlotBuffers(3, host.slot_bytes, tuple(v.data_ptr() for v in values), values=values)
    prompt = np.array([[5, 6, 7, 8, 9]], np.int64)
    first = in_place.forward_slots(device, 1, prompt, np.array([0]), np.array([5]))
    in_place.copy_slot(device, 1, device, 2, 5)
    assert all(np.array_equal(array[1], array[2]) for array in host.arrays)
    assert not np.any(host.arrays[0][0])  # the slot before the run is untouched
    both = in_place.forward_slots(
        device, 1, np.array([[3], [3]]), np.array([5, 5]), np.ones(2, np.int64)
    )
    np.testing.assert_allclose(both[0], both[1], rtol=1e-6)
    alone, _ = in_place.new_cache().start([[5, 6, 7, 8, 9]])
    np.testing.assert_allclose(first[0], alone[0], rtol=1e-5, atol=1e-6)


def test_a_failing_forward_call_leaves_every_slot_free(in_place: OnnxRuntime) -> None:
    recording = Recording(in_place)
    engine = BatchEngine(recording, 2)
    cache = engine.cache
    assert isinstance(cache, SlotCache)
    # Three new prompts take two calls (two blocks of two slots); the second fails.
    recording.fail_at = len(recording.calls) + 2
    starting = [EngineSequence([5 + i] * (3 + i), greedy(5)) for i in range(3)]
    with pytest.raises(RuntimeError):
        cache.start([s.prompt for s in starting])
    assert len(recording.calls) == recording.fail_at and cache.slots() == []
    assert len(cache.buffers) == 1  # the failed call's block went with it (the first stays)
    # New prompts start, then a prompt under way fails to extend its row.
    chunked = EngineSequence([6] * 30, greedy(5))
    engine.prefill([chunked], max_tokens=10)
    recording.fail_at = len(recording.calls) + 2  # the new prompts' call, then the chunk
    with pytest.raises(RuntimeError):
        engine.prefill([chunked, *starting], max_tokens=40)
    assert all(s.row is None for s in starting) and len(cache.slots()) == 1
    engine.step(leave=[chunked])
    assert cache.slots() == []
    # A decode step fails while one sequence is parked and another is being prefilled.
    running, parked = EngineSequence([7] * 4, greedy(20)), EngineSequence([8] * 5, greedy(20))
    engine.prefill([running, parked])
    engine.step(join=[running, parked])
    engine.prefill([chunked], max_tokens=10)
    recording.fail_at = len(recording.calls) + 1
    with pytest.raises(RuntimeError):
        engine.step(park=[parked])
    engine.reset()
    engine.step(leave=[parked, chunked])  # what the scheduler queues for failed requests
    assert cache.slots() == [] and parked.row is None and chunked.row is None
    assert len(cache.buffers) == 1  # empty blocks after the first were dropped


@pytest.fixture(scope="module")
def all_logits(all_logits_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> OnnxRuntime:
    return OnnxRuntime(all_logits_model_dir, tmp_path_factory.mktemp("cache"), RuntimeConfig())


def test_logits_of_every_position_are_read_at_each_rows_last_token(
    in_place: OnnxRuntime, all_logits: OnnxRuntime
) -> None:
    """A graph that returns logits for every position (as onnxruntime-genai exports do):
    a right-padded prompt's next token comes from its own last token, not the padding."""
    logits = np.arange(2 * 4 * 3, dtype=np.float32).reshape(2, 4, 3)
    np.testing.assert_array_equal(last_logits(logits, np.array([2, 4])), logits[[0, 1], [1, 3]])
    np.testing.assert_array_equal(last_logits(logits[:, :1], np.array([1, 1])), logits[:, 0])
    assert staggered(all_logits, 3) == staggered(in_place, 3)
    short, long = [5, 6, 7], [9] * 20
    together, _ = all_logits.new_cache().start([short, long])
    one, _ = in_place.new_cache().start([short])
    np.testing.assert_allclose(together[0], one[0], rtol=1e-5, atol=1e-6)


def test_a_released_slot_gives_its_host_pages_back(in_place: OnnxRuntime) -> None:
    engine = BatchEngine(in_place)
    cache = engine.cache
    assert isinstance(cache, SlotCache)
    short, long = EngineSequence([4] * 3, greedy(300)), EngineSequence([5] * 200, greedy(100))
    engine.prefill([short, long])
    engine.step(join=[short, long])
    while long in engine.running:
        engine.step()
    assert long.finish_reason is not None and long.row is None
    engine.step()  # the finished row leaves the batch and its slot is released
    ((buffers, slot),) = [cache.slot_of(short.row)] if short.row else []
    assert buffers.slot_bytes % 4096 == 0  # the test model's slots are whole pages
    for array in buffers.arrays:
        assert not np.any(array[1 - slot])  # every page of the long sequence's slot
        assert np.any(array[slot])  # the sequence still running keeps its own


def test_a_paused_row_waits_outside_every_decode_call(in_place: OnnxRuntime) -> None:
    """The middle row of three pauses for several steps: it moves to a parking block
    that no call binds, the rows on either side decode in one call, its keys and values
    stay exactly as they were, and every sequence gets its own tokens."""
    recording = Recording(in_place)
    engine = BatchEngine(recording)
    cache = engine.cache
    assert isinstance(cache, SlotCache)
    # Prompts of 3, 13 and 37 tokens: slots are taken shortest first.
    seqs = [EngineSequence(prompts()[i], greedy(24)) for i in (1, 0, 2)]
    expected = [alone(in_place, s.prompt, 24) for s in seqs]
    engine.prefill(seqs)
    engine.step(join=seqs)
    assert [cache.slot_of(s.row)[1] for s in seqs if s.row] == [0, 1, 2]
    engine.step()
    engine.step(park=[seqs[1]])
    assert seqs[1].row is not None
    buffers, slot = cache.slot_of(seqs[1].row)
    before = [array[slot].copy() for array in buffers.arrays]
    recording.calls.clear()
    for _ in range(6):
        engine.step()
    assert recording.calls and all(p != buffers.pointers[0] for p, _, _ in recording.calls)
    assert all(rows == 3 for _, _, rows in recording.calls)  # one call: slots 0 to 2
    assert all(np.array_equal(b, a[slot]) for b, a in zip(before, buffers.arrays, strict=True))
    engine.step(join=[seqs[1]])
    while engine.running:
        engine.step()
    assert [s.tokens for s in seqs] == expected


def test_a_paused_row_that_splits_no_call_stays_where_it_is(in_place: OnnxRuntime) -> None:
    recording = Recording(in_place)
    engine = BatchEngine(recording)
    cache = engine.cache
    assert isinstance(cache, SlotCache)
    seqs = [EngineSequence(prompts()[i], greedy(12)) for i in (1, 0)]
    engine.prefill(seqs)
    engine.step(join=seqs)
    assert seqs[1].row is not None
    place = cache.slot_of(seqs[1].row)
    assert place[1] == 1  # the last decoding row
    engine.step(park=[seqs[1]])
    for _ in range(3):
        engine.step()
    engine.step(join=[seqs[1]])
    assert cache.slot_of(seqs[1].row) == place and recording.copies == 0
    while engine.running:
        engine.step()
    assert [s.tokens for s in seqs] == [alone(in_place, s.prompt, 12) for s in seqs]


def test_a_fork_copies_only_the_rows_positions(in_place: OnnxRuntime) -> None:
    host = in_place.allocate(3)
    values = tuple(ort.OrtValue.ortvalue_from_numpy(array) for array in host.arrays)
    device = SlotBuffers(3, host.slot_bytes, tuple(v.data_ptr() for v in values), values=values)
    in_place.forward_slots(device, 0, np.array([[5, 6, 7, 8, 9]]), np.array([0]), np.array([5]))
    in_place.copy_slot(device, 0, device, 1, 3)
    for array in host.arrays:
        assert np.any(array[0, :, 3:5])
        assert np.array_equal(array[1, :, :3], array[0, :, :3])
        assert not np.any(array[1, :, 3:])
    # The copies run in a session of the one provider that owns the buffers.
    assert in_place._copier is not None
    assert in_place._copier.get_providers() == ["CPUExecutionProvider"]


def test_the_configured_context_caps_every_slot(model_dir: Path, tmp_path: Path) -> None:
    capped = OnnxRuntime(model_dir, tmp_path, RuntimeConfig(max_context=64))
    assert capped.spec.max_context == 64
    assert capped.allocate(1).arrays[0].shape[2] == 64
    engine = BatchEngine(capped)
    seq = EngineSequence([5] * 60, greedy(100))
    engine.prefill([seq])
    engine.step(join=[seq])
    while engine.running:
        engine.step()
    assert len(seq.prompt) + len(seq.tokens) == 64 and seq.finish_reason == "length"


def test_a_float32_in_place_model_led_by_cuda_says_attention_falls_back(
    model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    OnnxRuntime(model_dir, tmp_path, RuntimeConfig())
    assert "GroupQueryAttention" not in caplog.text
    cuda = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(ort.InferenceSession, "get_providers", lambda self: cuda)
    OnnxRuntime(model_dir, tmp_path, RuntimeConfig())
    assert "GroupQueryAttention runs only float16 and bfloat16" in caplog.text
    assert "falls back to the CPU" in caplog.text
