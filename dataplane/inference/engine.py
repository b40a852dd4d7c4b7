"""Forward passes over the running batch: the synchronous core that the scheduler calls
from its compute threads and the benchmark drives directly.

The engine owns the running batch's KV cache. Sequences enter through ``prefill``
(their cache is parked beside the batch), join the batch on the next ``step``, and
leave it when finished, cancelled or preempted; a preempted sequence keeps a private
copy of its cache so it resumes without a second prefill. ``prefill`` touches only the
runtime and the sequences it is given, never the batch, so it may run in one thread
while ``step`` runs in another.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import numpy as np

from dataplane.inference.kvcache import KVBatch
from dataplane.inference.runtime import Runtime
from dataplane.inference.sampling import SamplingParams, sample

FINISH_STOP = "stop"
FINISH_LENGTH = "length"


@dataclass(eq=False)
class EngineSequence:
    """A request as the engine sees it: tokens, sampling state and parked cache."""

    prompt: list[int]
    params: SamplingParams
    rng: np.random.Generator = field(init=False)
    tokens: list[int] = field(default_factory=list)
    parked: KVBatch | None = None
    finish_reason: str | None = None

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.params.seed)


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
        self._groups: list[_Group] = []

    @property
    def running(self) -> list[EngineSequence]:
        return [seq for group in self._groups for seq in group.slots if seq is not None]

    def prefill(self, sequences: Sequence[EngineSequence]) -> None:
        """Run the prompts together; each sequence gets its first token and a parked cache."""
        logits, cache = self.runtime.prefill([s.prompt for s in sequences])
        self._accept(sequences, logits)
        for row, seq in enumerate(sequences):
            seq.parked = cache.row(row)

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
                if group.cache.width >= length
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
        self._groups = [
            _Group(
                slots=[seq for _, seq, _, _ in chunk],
                cache=KVBatch.gather([(cache, [slot]) for _, _, cache, slot in chunk]),
            )
            for chunk in (rows[i : i + size] for i in range(0, len(rows), size))
        ]
        for seq in unplaced:
            seq.parked = None

    def reset(self) -> None:
        """Forget the batch after a failed step; its sequences are failed by the caller."""
        self._groups = []

    def _accept(
        self, sequences: Sequence[EngineSequence], logits: np.typing.NDArray[np.float32]
    ) -> None:
        tokens = sample(logits, [s.params for s in sequences], [s.rng for s in sequences])
        for seq, token in zip(sequences, tokens.tolist(), strict=True):
            seq.tokens.append(token)
            if token in self._eos and not seq.params.ignore_eos:
                seq.finish_reason = FINISH_STOP
            elif (
                len(seq.tokens) >= seq.params.max_new_tokens
                or len(seq.prompt) + len(seq.tokens) >= self._max_context
            ):
                seq.finish_reason = FINISH_LENGTH
