"""Forward passes over the running batch: the synchronous core that the scheduler's step
loop calls and the benchmark drives directly.

The engine owns the running batch's KV cache. Sequences enter through ``prefill``
(their cache is parked beside the batch; a long prompt may take several calls, one
chunk each), join the batch on the next ``step``, and leave it when finished,
cancelled or preempted; a preempted sequence keeps a private copy of its cache so it
resumes without a second prefill. ``prefill`` touches only the runtime and the
sequences it is given, never the batch.

A graph without a ``position_ids`` input (Optimum's Gemma, MPT and Bloom exports) takes
the cache width as the position of the next token, so a row padded on the left would
see shifted positions. For such a graph the engine regroups: a prefill call takes
prompts of one length only, a decode group holds rows of one length only (they stay
equal, each step adds one token to every row), and a sequence joins a free slot only
in a group exactly as wide as it is long. No row is ever padded, so every row's
positions are the cache width, at the price of more, smaller forward calls.

Identical prompts in one prefill (the ``n`` choices of a request) are computed once and
share the cache rows, which are only ever read.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from itertools import groupby

import numpy as np

from dataplane.inference.kvcache import FloatArray, KVBatch
from dataplane.inference.runtime import Runtime
from dataplane.inference.sampling import SamplingParams, TokenConstraint, TokenLogprob, sample

FINISH_STOP = "stop"
FINISH_LENGTH = "length"


@dataclass(eq=False)
class EngineSequence:
    """A request as the engine sees it: tokens, sampling state and parked cache.

    ``stream`` tells apart the choices of one seeded request, so each draws its own
    tokens. ``stop_token`` is the token that ended the sequence (an EOS or stop id),
    whose text is not part of the output. ``constraint`` (structured output) limits each
    next token and ends the sequence once it is complete.
    """

    prompt: list[int]
    params: SamplingParams
    stream: int = 0
    constraint: TokenConstraint | None = None
    rng: np.random.Generator = field(init=False)
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    parked: KVBatch | None = None
    # Prompt tokens already in ``parked`` while the prompt is prefilled chunk by chunk.
    prefilled: int = 0
    finish_reason: str | None = None
    stop_token: int | None = None

    def __post_init__(self) -> None:
        seed = self.params.seed
        self.rng = np.random.default_rng(None if seed is None else [seed, self.stream])


@dataclass
class _Group:
    """Rows decoded by one forward call: slots over one KV cache (None = free slot)."""

    slots: list[EngineSequence | None]
    cache: KVBatch

    def live(self) -> list[int]:
        return [slot for slot, seq in enumerate(self.slots) if seq is not None]

    def needs_compaction(self) -> bool:
        """Over a quarter of the slots free, or a third wider than the longest row."""
        live = self.live()
        if not live or 4 * (len(self.slots) - len(live)) > len(self.slots):
            return True
        return 3 * self.cache.width > 4 * int(self.cache.lengths[live].max()) + 3


class BatchEngine:
    """Prefill and decode for a set of sequences over one ``Runtime``.

    The running batch is split into groups of at most ``rows_per_call`` rows (0: one
    group), each decoded by its own forward call over its own KV cache. Groups are built
    from rows sorted by length, so each pads only to its own longest row; on a CPU,
    smaller calls also keep the KV working set in cache. A sequence that leaves frees its
    slot; one that joins takes a free slot of the group whose width fits it most
    tightly, in place, so the steady state of continuous batching (one finishes, another
    starts) never copies the batch. Free slots ride along in decode calls (masked to
    themselves, output ignored) until a group needs compaction, when all groups are
    rebuilt; so are they when a joiner fits no free slot.
    """

    def __init__(self, runtime: Runtime, rows_per_call: int = 0) -> None:
        self.runtime = runtime
        self.rows_per_call = rows_per_call
        self._eos = frozenset(runtime.spec.eos_token_ids)
        self._max_context = runtime.spec.max_context
        # Rows of one forward call must all be as long as the cache is wide.
        self._exact_width = not runtime.spec.has_position_ids
        self._groups: list[_Group] = []

    @property
    def running(self) -> list[EngineSequence]:
        return [seq for group in self._groups for seq in group.slots if seq is not None]

    def prefill(
        self, sequences: Sequence[EngineSequence], max_tokens: int | None = None
    ) -> list[EngineSequence]:
        """Advance the prompts by at most ``max_tokens`` prompt tokens in all (None: to
        their ends), in the given order; return the sequences whose prompt is complete,
        each with its first token and a parked cache.

        A prompt the budget cuts keeps its computed part as a parked cache and goes on
        from there in a later call (chunked prefill): prompts that start in this call run
        together from an empty cache, a prompt under way extends its own row.
        """
        budget = math.inf if max_tokens is None else max_tokens
        # Identical prompts at the same point (the n choices of a request) run once.
        chunks: dict[tuple[tuple[int, ...], int], int] = {}
        under_way: dict[tuple[tuple[int, ...], int], KVBatch] = {}
        for seq in sequences:
            key = (tuple(seq.prompt), seq.prefilled)
            if key in chunks or budget <= 0:
                continue
            take = int(min(len(seq.prompt) - seq.prefilled, budget))
            chunks[key] = take
            budget -= take
            if seq.prefilled and seq.parked is not None:
                under_way[key] = seq.parked
        results: dict[tuple[tuple[int, ...], int], tuple[FloatArray, KVBatch]] = {}
        starting = sorted((key for key in chunks if key[1] == 0), key=lambda key: chunks[key])
        for _, same in groupby(starting, key=lambda key: self._width_key(chunks[key])):
            call = list(same)
            logits, cache = self.runtime.prefill([key[0][: chunks[key]] for key in call])
            for row, key in enumerate(call):
                results[key] = (logits[row], cache.row(row))
        for key, parked in under_way.items():
            prompt, done = key
            ids = np.asarray([prompt[done : done + chunks[key]]], np.int64)
            logits, cache = self.runtime.extend(parked, ids)
            results[key] = (logits[0], cache)
        complete = []
        for seq in sequences:
            key = (tuple(seq.prompt), seq.prefilled)
            if key not in results:
                continue
            seq.parked = results[key][1]
            seq.prefilled += chunks[key]
            if seq.prefilled == len(seq.prompt):
                complete.append((seq, results[key][0]))
        if complete:
            self._accept([seq for seq, _ in complete], np.stack([row for _, row in complete]))
        return [seq for seq, _ in complete]

    def _width_key(self, length: int) -> int:
        """Rows with equal keys may share a forward call (all of them, unless the graph
        takes its positions from the cache width)."""
        return length if self._exact_width else 0

    def step(
        self,
        leave: Collection[EngineSequence] = (),
        park: Collection[EngineSequence] = (),
        join: Sequence[EngineSequence] = (),
    ) -> list[EngineSequence]:
        """Apply membership changes, then decode one token for every running sequence.

        ``leave`` drops sequences (cancelled), ``park`` drops them but keeps a copy of
        their cache (preempted), ``join`` adds prefilled or parked ones. Finished
        sequences leave by themselves. Returns the sequences that got a token, in order.
        """
        for group in self._groups:
            for slot, seq in enumerate(group.slots):
                if seq is None:
                    continue
                if seq in park:
                    seq.parked = group.cache.row(slot).detached()
                if seq.finish_reason is not None or seq in leave or seq in park:
                    group.slots[slot] = None
        self._place([s for s in join if s.finish_reason is None and s.parked is not None])
        sequences: list[EngineSequence] = []
        logits = []
        for group in self._groups:
            live = group.live()
            members = [seq for seq in group.slots if seq is not None]
            tokens = np.zeros(len(group.slots), np.int64)
            tokens[live] = [seq.tokens[-1] for seq in members]
            group_logits, group.cache = self.runtime.decode(group.cache, tokens)
            group.cache.lengths[[slot for slot, seq in enumerate(group.slots) if seq is None]] = 0
            logits.append(group_logits[live])
            sequences += members
        if sequences:
            self._accept(sequences, np.concatenate(logits))
        return sequences

    def _place(self, joining: list[EngineSequence]) -> None:
        """Put joining sequences into free slots, or rebuild the groups around them."""
        unplaced = []
        for seq in joining:
            assert seq.parked is not None
            length = seq.parked.width
            fits = [
                (group.cache.width - length, index, slot)
                for index, group in enumerate(self._groups)
                if group.cache.width == length
                or (group.cache.width > length and not self._exact_width)
                for slot, other in enumerate(group.slots)
                if other is None
            ]
            if not fits:
                unplaced.append(seq)
                continue
            _, index, slot = min(fits)
            group = self._groups[index]
            group.cache.write_row(slot, seq.parked)
            group.slots[slot] = seq
            seq.parked = None
        if not unplaced and not any(g.needs_compaction() for g in self._groups):
            return
        rows: list[tuple[int, EngineSequence, KVBatch, int]] = [
            (int(group.cache.lengths[slot]), seq, group.cache, slot)
            for group in self._groups
            for slot, seq in enumerate(group.slots)
            if seq is not None
        ]
        rows += [
            (seq.parked.width, seq, seq.parked, 0) for seq in unplaced if seq.parked is not None
        ]
        rows.sort(key=lambda row: row[0])
        size = self.rows_per_call or max(len(rows), 1)
        chunks = []
        for _, same in groupby(rows, key=lambda row: self._width_key(row[0])):
            alike = list(same)
            chunks += [alike[i : i + size] for i in range(0, len(alike), size)]
        self._groups = [
            _Group(
                slots=[seq for _, seq, _, _ in chunk],
                cache=KVBatch.gather([(cache, [slot]) for _, _, cache, slot in chunk]),
            )
            for chunk in chunks
        ]
        for seq in unplaced:
            seq.parked = None

    def reset(self) -> None:
        """Forget the batch after a failed step; its sequences are failed by the caller."""
        self._groups = []

    def _accept(
        self, sequences: Sequence[EngineSequence], logits: np.typing.NDArray[np.float32]
    ) -> None:
        tokens, logprobs = sample(logits, sequences)
        for seq, token, report in zip(sequences, tokens.tolist(), logprobs, strict=True):
            if report is not None:
                seq.logprobs.append(report)
            seq.tokens.append(token)
            # A constraint allows EOS only once complete, so its EOS ends even ignore_eos.
            complete = seq.constraint is not None and seq.constraint.accept(token)
            if token in seq.params.stop_token_ids or (
                token in self._eos and (complete or not seq.params.ignore_eos)
            ):
                # Before the finish: whoever sees the finish must see its token too.
                seq.stop_token = token
                seq.finish_reason = FINISH_STOP
            elif complete:
                seq.finish_reason = FINISH_STOP
            elif (
                len(seq.tokens) >= seq.params.max_new_tokens
                or len(seq.prompt) + len(seq.tokens) >= self._max_context
            ):
                seq.finish_reason = FINISH_LENGTH
