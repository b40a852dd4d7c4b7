"""Forward passes over the running batch: the synchronous core that the scheduler's step
loop calls and the benchmark drives directly.

The engine owns the sequences; the runtime's ``KVCache`` owns their keys and values
(see ``kvcache`` for its two layouts). Sequences enter through ``prefill`` (a row of
the cache is started for each new prompt; a long prompt may take several calls, one
chunk each), join the batch on the next ``step``, and leave it when finished,
cancelled or preempted; a preempted sequence keeps its row, so it resumes without a
second prefill. ``prefill`` touches only the cache rows of the sequences it is given,
never the batch's.

Identical prompts in one prefill (the ``n`` choices of a request) are computed once and
share a row while their prompt runs; when it is complete each choice gets a row of its
own to decode in.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

import numpy as np

from dataplane.inference.kvcache import CacheRow, FloatArray
from dataplane.inference.runtime import Runtime
from dataplane.inference.sampling import SamplingParams, TokenConstraint, TokenLogprob, sample

FINISH_STOP = "stop"
FINISH_LENGTH = "length"


@dataclass(eq=False)
class EngineSequence:
    """A request as the engine sees it: tokens, sampling state and its cache row.

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
    # Its keys and values, from the first prompt chunk until it leaves the engine.
    row: CacheRow | None = None
    # Prompt tokens already in ``row`` while the prompt is prefilled chunk by chunk.
    prefilled: int = 0
    finish_reason: str | None = None
    stop_token: int | None = None

    def __post_init__(self) -> None:
        seed = self.params.seed
        self.rng = np.random.default_rng(None if seed is None else [seed, self.stream])


class BatchEngine:
    """Prefill and decode for a set of sequences over one ``Runtime`` and its cache.

    ``rows_per_call`` caps the rows of one decode forward call (0: no cap); how rows are
    grouped into calls is the cache's business.
    """

    def __init__(self, runtime: Runtime, rows_per_call: int = 0) -> None:
        self.runtime = runtime
        self.cache = runtime.new_cache(rows_per_call)
        self._eos = frozenset(runtime.spec.eos_token_ids)
        self._max_context = runtime.spec.max_context
        self._running: list[EngineSequence] = []

    @property
    def rows_per_call(self) -> int:
        return self.cache.rows_per_call

    @rows_per_call.setter
    def rows_per_call(self, rows: int) -> None:
        self.cache.rows_per_call = rows

    @property
    def running(self) -> list[EngineSequence]:
        return list(self._running)

    def prefill(
        self,
        sequences: Sequence[EngineSequence],
        max_tokens: int | None = None,
        aside: bool = False,
    ) -> list[EngineSequence]:
        """Advance the prompts by at most ``max_tokens`` prompt tokens in all (None: to
        their ends), in the given order; return the sequences whose prompt is complete,
        each with its first token and its cache row.

        A prompt the budget cuts keeps its computed part in its row and goes on from
        there in a later call (chunked prefill): prompts that start in this call run
        together in new rows, a prompt under way extends its own row. ``aside``: new
        prompts, each unlike the others, started between the forward calls of a decode
        (from its ``between``) in rows that decode does not touch.
        """
        budget = math.inf if max_tokens is None else max_tokens
        # Identical prompts at the same point (the n choices of a request) run once.
        chunks: dict[tuple[tuple[int, ...], int], int] = {}
        under_way: dict[tuple[tuple[int, ...], int], CacheRow] = {}
        for seq in sequences:
            key = (tuple(seq.prompt), seq.prefilled)
            if key in chunks or budget <= 0:
                continue
            take = int(min(len(seq.prompt) - seq.prefilled, budget))
            chunks[key] = take
            budget -= take
            if seq.prefilled and seq.row is not None:
                under_way[key] = seq.row
        results: dict[tuple[tuple[int, ...], int], tuple[FloatArray, CacheRow]] = {}
        starting = [key for key in chunks if key[1] == 0]
        # New rows, each held by no sequence yet (the first to take one holds it).
        unclaimed: set[int] = set()
        if starting:
            logits, rows = self.cache.start([key[0][: chunks[key]] for key in starting], aside)
            for index, key in enumerate(starting):
                results[key] = (logits[index], rows[index])
                unclaimed.add(id(rows[index]))
        try:
            for key, row in under_way.items():
                prompt, done = key
                ids = np.asarray([prompt[done : done + chunks[key]]], np.int64)
                results[key] = (self.cache.extend(row, ids), row)
        except Exception:
            # No sequence holds the rows just started yet: free them here. Rows of
            # prompts under way stay with their sequences, whose caller releases them.
            for _, row in results.values():
                if id(row) in unclaimed:
                    self.cache.release(row)
            raise
        complete = []
        for seq in sequences:
            key = (tuple(seq.prompt), seq.prefilled)
            if key not in results:
                continue
            row = results[key][1]
            if seq.row is not row:
                if seq.row is not None:  # an identical prompt's row took over
                    self.cache.release(seq.row)
                if id(row) in unclaimed:
                    unclaimed.discard(id(row))
                    seq.row = row
                else:  # a second sequence with this prompt
                    seq.row = self.cache.share(row)
            seq.prefilled += chunks[key]
            if seq.prefilled == len(seq.prompt):
                complete.append((seq, results[key][0]))
        if complete:
            self._own_rows([seq for seq, _ in complete])
            self._accept([seq for seq, _ in complete], np.stack([row for _, row in complete]))
            for seq, _ in complete:
                if seq.finish_reason is not None and seq.row is not None:
                    self.cache.release(seq.row)
                    seq.row = None
        return [seq for seq, _ in complete]

    def _own_rows(self, sequences: Sequence[EngineSequence]) -> None:
        """Give each sequence whose prompt is complete a row of its own to decode in."""
        seen: set[int] = set()
        for seq in sequences:
            assert seq.row is not None
            if id(seq.row) in seen:
                shared = seq.row
                seq.row = self.cache.fork(shared)
                self.cache.release(shared)
            seen.add(id(seq.row))

    def step(
        self,
        leave: Collection[EngineSequence] = (),
        park: Collection[EngineSequence] = (),
        join: Sequence[EngineSequence] = (),
        between: Callable[[], None] | None = None,
    ) -> list[EngineSequence]:
        """Apply membership changes, then decode one token for every running sequence.

        ``leave`` drops sequences, in the batch or not (cancelled: their rows are freed),
        ``park`` takes them out of the batch with their rows (preempted), ``join`` adds
        prefilled or parked ones. Finished sequences leave by themselves. Returns the
        sequences that got a token, in order. ``between`` runs between the decode's
        forward calls (see ``KVCache.decode``).
        """
        for seq in leave:
            if seq.row is not None and seq not in self._running:
                self.cache.release(seq.row)
                seq.row = None
        staying = []
        for seq in self._running:
            assert seq.row is not None
            if seq.finish_reason is not None or seq in leave:
                self.cache.release(seq.row)
                seq.row = None
            elif seq in park:
                self.cache.park(seq.row)
            else:
                staying.append(seq)
        joining = []
        for seq in join:
            if seq.row is None or seq in staying or seq in joining:
                continue
            if seq.finish_reason is not None:
                self.cache.release(seq.row)
                seq.row = None
            else:
                joining.append(seq)
        # The batch first: rows a failed join leaves behind are the batch's, and a reset
        # releases them.
        self._running = staying + joining
        self.cache.join([seq.row for seq in joining if seq.row is not None])
        if not self._running:
            return []
        rows = [seq.row for seq in self._running if seq.row is not None]
        tokens = np.array([seq.tokens[-1] for seq in self._running], np.int64)
        logits = self.cache.decode(rows, tokens, between)
        sequences = list(self._running)
        self._accept(sequences, logits)
        return sequences

    def reset(self) -> None:
        """Forget the batch after a failed step; its sequences are failed by the caller.
        Rows out of the batch (prompts under way, paused sequences) are kept."""
        for seq in self._running:
            if seq.row is not None:
                self.cache.release(seq.row)
            seq.row = None
        self._running = []

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
