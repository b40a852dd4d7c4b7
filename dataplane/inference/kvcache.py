"""The KV cache: where every sequence's keys and values live between forward passes.

Two layouts, one interface (``KVCache``), picked from the model graph:

``SlotCache`` (graphs whose attention writes into its past in place: com.microsoft
GroupQueryAttention reading ``past_key_values.N.*`` and giving them back as
``present.N.*``, as onnxruntime-genai drives it). Each layer's keys and values live in
preallocated blocks of slots, ``[slots, kv_heads, max_context, head_dim]``, bound as both
past and present of every forward call (IOBinding), so a step writes one column per row
where it belongs and copies nothing else. A sequence takes a slot when its prompt starts
and keeps it until it ends: prefill chunks and decode steps work in the slot, so joining
and leaving the batch move no data, and more rows than the blocks hold add a block
without touching the others. A paused row (preempted, or held back by a limit) that
would split a decode call moves to a parking block, one copy of its positions each way,
so the rows that decode stay packed: a forward call binds a run of adjacent slots, and a
paused row left among them would split every step into one call per run, each reading
all the weights. A decode call covers a run of adjacent slots of one block: decoding
rows and the free slots between them, which ride along writing their own first position.
A released slot's host pages go back to the system.

``ConcatCache`` (the Optimum export layout: ``present.N.*`` is past and the new
columns concatenated). Rows are grouped into dense, left-padded batches
(``KVBatch``) and every step returns each group's whole cache plus one column. Every
row is right-aligned: its real tokens occupy the last ``lengths[i]`` columns and the
columns before are padding that the attention mask hides, so a step appends one column
for every row at once. A sequence that joins takes over a free row in place
(``write_row``); a group is copied (``gather``) only to grow it, to widen it for a
longer sequence, or to compact it. A graph without ``position_ids`` derives positions
from the cache width, which is right only for a row that fills the width: such rows are
kept in groups of one length.

Rows never see each other's padding or scratch columns as data, so a sequence's results
do not depend on which other sequences share its forward calls.
"""

from __future__ import annotations

import mmap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import groupby
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from dataplane.inference.model import ModelSpec

FloatArray = npt.NDArray[Any]
IntArray = npt.NDArray[np.int64]

DEFAULT_BLOCK_SLOTS = 32
"""Slots per block of a ``SlotCache`` whose forward calls are not limited in rows."""
PARKING_BLOCK_SLOTS = 4
"""Slots per parking block: paused rows are few, and the first parking block is kept once
allocated (a device holds its ``max_context`` positions a slot from then on)."""


class CacheRow:
    """One sequence's keys and values, opaque to the engine. The sequences of identical
    prompts hold one row together while their prompt is computed (``holders``)."""

    holders: int = 1


class _RowSharing:
    """``KVCache.share`` for both layouts: a shared row counts its holders."""

    def share(self, row: CacheRow) -> CacheRow:
        row.holders += 1
        return row


class KVCache(Protocol):
    """The engine's view of the cache: rows that start, grow and decode.

    A row belongs to the cache from ``start`` until its last holder ``release``s it; it
    is in the batch (decoded by ``decode``) between ``join`` and ``park`` or ``release``.
    """

    rows_per_call: int

    def start(
        self, prompts: Sequence[Sequence[int]], aside: bool = False
    ) -> tuple[FloatArray, list[CacheRow]]:
        """Run prompts (or their first chunks) in new rows; return the logits after each
        one's last token [n, vocab] and its row. ``aside``: between the calls of a
        decode, in rows no call of that decode reads or writes."""
        ...

    def extend(self, row: CacheRow, ids: IntArray) -> FloatArray:
        """Append a prompt's next chunk ``ids`` [1, n] to a row out of the batch (chunked
        prefill); return the logits after its last token [vocab]."""
        ...

    def share(self, row: CacheRow) -> CacheRow:
        """One more holder of ``row`` (a sequence with the same prompt)."""
        ...

    def fork(self, row: CacheRow) -> CacheRow:
        """A row of its own with ``row``'s keys and values, for one of its holders."""
        ...

    def join(self, rows: Sequence[CacheRow]) -> None:
        """Put rows into the batch."""
        ...

    def park(self, row: CacheRow) -> None:
        """Take a row out of the batch and keep its keys and values."""
        ...

    def release(self, row: CacheRow) -> None:
        """Drop one holder of a row (in the batch or not); the last frees it."""
        ...

    def decode(
        self,
        rows: Sequence[CacheRow],
        tokens: IntArray,
        between: Callable[[], None] | None = None,
    ) -> FloatArray:
        """Append ``tokens[i]`` to ``rows[i]``, which must be exactly the rows in the
        batch; return the next-token logits [len(rows), vocab] in that order. ``between``
        runs after each forward call but the last (it may ``start`` rows aside)."""
        ...


@dataclass(frozen=True)
class KVBatch:
    """Per-layer key and value arrays for a batch of sequences plus each row's length."""

    keys: tuple[FloatArray, ...]
    values: tuple[FloatArray, ...]
    lengths: IntArray

    @classmethod
    def empty(
        cls, layers: int, kv_heads: int, head_dim: int, batch: int, dtype: np.dtype[Any]
    ) -> KVBatch:
        """Zero-width cache: what a prompt's first forward pass takes as its past."""
        shape = (batch, kv_heads, 0, head_dim)
        return cls(
            keys=tuple(np.zeros(shape, dtype) for _ in range(layers)),
            values=tuple(np.zeros(shape, dtype) for _ in range(layers)),
            lengths=np.zeros(batch, np.int64),
        )

    @property
    def size(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def width(self) -> int:
        return int(self.keys[0].shape[2])

    def attention_mask(self, new_tokens: int) -> IntArray:
        """Mask for this cache followed by ``new_tokens`` real tokens in every row."""
        columns = np.arange(self.width + new_tokens, dtype=np.int64)
        return (columns[None, :] >= (self.width - self.lengths)[:, None]).astype(np.int64)

    def row(self, index: int) -> KVBatch:
        """One row without its padding, as views: cheap, but keeps this batch alive."""
        start = self.width - int(self.lengths[index])
        return KVBatch(
            keys=tuple(k[index : index + 1, :, start:, :] for k in self.keys),
            values=tuple(v[index : index + 1, :, start:, :] for v in self.values),
            lengths=self.lengths[index : index + 1].copy(),
        )

    def detached(self) -> KVBatch:
        """A compact copy that owns its memory (for a sequence parked out of the batch)."""
        return KVBatch(
            keys=tuple(np.ascontiguousarray(k).copy() for k in self.keys),
            values=tuple(np.ascontiguousarray(v).copy() for v in self.values),
            lengths=self.lengths.copy(),
        )

    def write_row(self, index: int, source: KVBatch) -> None:
        """Overwrite row ``index`` in place with ``source``'s single row, right-aligned.

        How a sequence takes over a departed one's slot without copying the batch; the
        source must fit the width.
        """
        length = int(source.lengths[0])
        if length > self.width:
            raise ValueError("row does not fit the batch width")
        start = self.width - length
        for mine, theirs in ((self.keys, source.keys), (self.values, source.values)):
            for layer, array in enumerate(mine):
                array[index, :, :start, :] = 0
                array[index, :, start:, :] = theirs[layer][0, :, source.width - length :, :]
        self.lengths[index] = length

    @staticmethod
    def gather(parts: Sequence[tuple[KVBatch, Sequence[int]]]) -> KVBatch:
        """A new batch made of the given rows of the given batches, in that order.

        The width is the longest selected row, so padding that only departed rows needed
        is dropped. One allocation and one copy per source batch and layer.
        """
        selected = [(batch, np.asarray(rows, np.int64)) for batch, rows in parts if len(rows)]
        if not selected:
            raise ValueError("gather needs at least one row")
        lengths = np.concatenate([batch.lengths[rows] for batch, rows in selected])
        width = int(lengths.max())

        def stack(arrays: list[tuple[FloatArray, int, IntArray]]) -> FloatArray:
            first = arrays[0][0]
            dest = np.zeros(
                (int(lengths.shape[0]), first.shape[1], width, first.shape[3]), first.dtype
            )
            offset = 0
            for source, source_width, rows in arrays:
                keep = min(width, source_width)
                dest[offset : offset + rows.shape[0], :, width - keep :, :] = source[
                    rows, :, source_width - keep :, :
                ]
                offset += int(rows.shape[0])
            return dest

        layers = range(len(selected[0][0].keys))
        return KVBatch(
            keys=tuple(stack([(b.keys[i], b.width, rows) for b, rows in selected]) for i in layers),
            values=tuple(
                stack([(b.values[i], b.width, rows) for b, rows in selected]) for i in layers
            ),
            lengths=lengths,
        )


class ConcatModel(Protocol):
    """Forward passes of a graph in the Optimum layout over dense ``KVBatch`` arrays."""

    @property
    def spec(self) -> ModelSpec: ...

    def prefill(self, prompts: Sequence[Sequence[int]]) -> tuple[FloatArray, KVBatch]:
        """Run whole prompts; return next-token logits [n, vocab] and their KV cache."""
        ...

    def decode(self, cache: KVBatch, tokens: IntArray) -> tuple[FloatArray, KVBatch]:
        """Append one token per row; return next-token logits [B, vocab] and the cache."""
        ...

    def extend(self, cache: KVBatch, ids: IntArray) -> tuple[FloatArray, KVBatch]:
        """Append a prompt's next chunk ``ids`` [1, n] to a one-row cache; return the
        logits after its last token [1, vocab] and the cache."""
        ...


@dataclass(eq=False)
class _ConcatRow(CacheRow):
    """Out of the batch a row owns (or shares views of) a one-row ``KVBatch``; in the
    batch it is a slot of a group."""

    batch: KVBatch | None = None
    group: _Group | None = None
    slot: int = 0


@dataclass(eq=False)
class _Group:
    """Rows decoded by one forward call: slots over one KV cache (None = free slot)."""

    slots: list[_ConcatRow | None]
    cache: KVBatch

    def live(self) -> list[int]:
        return [slot for slot, row in enumerate(self.slots) if row is not None]

    def needs_compaction(self) -> bool:
        """Over a quarter of the slots free, or a third wider than the longest row."""
        live = self.live()
        if not live or 4 * (len(self.slots) - len(live)) > len(self.slots):
            return True
        return 3 * self.cache.width > 4 * int(self.cache.lengths[live].max()) + 3


class ConcatCache(_RowSharing):
    """The batch as groups of at most ``rows_per_call`` rows (0: one group), each decoded
    by its own forward call over its own dense cache.

    Groups are built from rows sorted by length, so each pads only to its own longest
    row; on a CPU, smaller calls also keep the KV working set in cache. A row that leaves
    frees its slot; one that joins takes a free slot of the group whose width fits it most
    tightly, in place, so the steady state of continuous batching (one finishes, another
    starts) never copies a group. Free slots ride along in decode calls (masked to
    themselves, output ignored) until a group needs compaction, when all groups are
    rebuilt; so are they when a joiner fits no free slot.
    """

    def __init__(self, model: ConcatModel, rows_per_call: int = 0) -> None:
        self.model = model
        self.rows_per_call = rows_per_call
        # Rows of one forward call must all be as long as the cache is wide.
        self._exact_width = not model.spec.has_position_ids
        self._groups: list[_Group] = []

    def _width_key(self, length: int) -> int:
        """Rows with equal keys may share a forward call (all of them, unless the graph
        takes its positions from the cache width)."""
        return length if self._exact_width else 0

    def start(
        self, prompts: Sequence[Sequence[int]], aside: bool = False
    ) -> tuple[FloatArray, list[CacheRow]]:
        # New rows have caches of their own until they join: always aside.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        logits: list[FloatArray] = [np.empty(0)] * len(prompts)
        rows: list[CacheRow] = [CacheRow()] * len(prompts)
        for _, same in groupby(order, key=lambda i: self._width_key(len(prompts[i]))):
            call = list(same)
            call_logits, cache = self.model.prefill([prompts[i] for i in call])
            for position, index in enumerate(call):
                logits[index] = call_logits[position]
                rows[index] = _ConcatRow(batch=cache.row(position))
        return np.stack(logits), rows

    def extend(self, row: CacheRow, ids: IntArray) -> FloatArray:
        assert isinstance(row, _ConcatRow) and row.batch is not None
        logits, row.batch = self.model.extend(row.batch, ids)
        return np.asarray(logits[0])

    def fork(self, row: CacheRow) -> CacheRow:
        # Views of a prefilled cache are only ever read: joining copies them.
        assert isinstance(row, _ConcatRow) and row.batch is not None
        return _ConcatRow(batch=row.batch)

    def park(self, row: CacheRow) -> None:
        assert isinstance(row, _ConcatRow)
        if row.group is not None:
            row.batch = row.group.cache.row(row.slot).detached()
            row.group.slots[row.slot] = None
            row.group = None

    def release(self, row: CacheRow) -> None:
        assert isinstance(row, _ConcatRow)
        row.holders -= 1
        if row.holders > 0:
            return
        if row.group is not None:
            row.group.slots[row.slot] = None
            row.group = None
        row.batch = None

    def join(self, rows: Sequence[CacheRow]) -> None:
        """Put joining rows into free slots, or rebuild the groups around them."""
        unplaced: list[_ConcatRow] = []
        for row in rows:
            assert isinstance(row, _ConcatRow) and row.batch is not None
            length = row.batch.width
            fits = [
                (group.cache.width - length, index, slot)
                for index, group in enumerate(self._groups)
                if group.cache.width == length
                or (group.cache.width > length and not self._exact_width)
                for slot, other in enumerate(group.slots)
                if other is None
            ]
            if not fits:
                unplaced.append(row)
                continue
            _, index, slot = min(fits)
            group = self._groups[index]
            group.cache.write_row(slot, row.batch)
            group.slots[slot] = row
            row.group, row.slot, row.batch = group, slot, None
        if not unplaced and not any(g.needs_compaction() for g in self._groups):
            return
        members: list[tuple[int, _ConcatRow, KVBatch, int]] = [
            (int(group.cache.lengths[slot]), row, group.cache, slot)
            for group in self._groups
            for slot, row in enumerate(group.slots)
            if row is not None
        ]
        members += [(row.batch.width, row, row.batch, 0) for row in unplaced if row.batch]
        members.sort(key=lambda member: member[0])
        size = self.rows_per_call or max(len(members), 1)
        chunks = []
        for _, same in groupby(members, key=lambda member: self._width_key(member[0])):
            alike = list(same)
            chunks += [alike[i : i + size] for i in range(0, len(alike), size)]
        self._groups = []
        for chunk in chunks:
            group = _Group(
                slots=[row for _, row, _, _ in chunk],
                cache=KVBatch.gather([(cache, [slot]) for _, _, cache, slot in chunk]),
            )
            for slot, (_, row, _, _) in enumerate(chunk):
                row.group, row.slot, row.batch = group, slot, None
            self._groups.append(group)

    def decode(
        self,
        rows: Sequence[CacheRow],
        tokens: IntArray,
        between: Callable[[], None] | None = None,
    ) -> FloatArray:
        token_of = {id(row): int(token) for row, token in zip(rows, tokens, strict=True)}
        logits: dict[int, FloatArray] = {}
        for index, group in enumerate(self._groups):
            if index and between is not None:
                between()
            live = group.live()
            ids = np.zeros(len(group.slots), np.int64)
            ids[live] = [token_of[id(group.slots[slot])] for slot in live]
            group_logits, group.cache = self.model.decode(group.cache, ids)
            group.cache.lengths[[slot for slot, row in enumerate(group.slots) if row is None]] = 0
            for slot in live:
                logits[id(group.slots[slot])] = group_logits[slot]
        return np.stack([logits[id(row)] for row in rows])


@dataclass(frozen=True)
class SlotBuffers:
    """One block of in-place KV buffers: per layer a key and a value buffer of shape
    ``[slots, kv_heads, max_context, head_dim]``, key then value for each layer.

    ``pointers`` are the buffers' addresses, which the forward calls bind. On the host
    ``arrays`` view them and ``maps`` are the anonymous mappings that own the memory (so
    a released slot's pages can be given back); on a device ``values`` are the OrtValues
    that own it. The block's memory lives as long as this object does.
    """

    slots: int
    slot_bytes: int
    pointers: tuple[int, ...]
    arrays: tuple[FloatArray, ...] = ()
    maps: tuple[mmap.mmap, ...] = ()
    values: tuple[Any, ...] = ()


class SlotModel(Protocol):
    """Forward passes of a graph that writes its keys and values into bound buffers."""

    @property
    def spec(self) -> ModelSpec: ...

    def allocate(self, slots: int) -> SlotBuffers:
        """Buffers of ``slots`` slots for every layer's keys and values, on the device
        the graph runs on."""
        ...

    def forward_slots(
        self, buffers: SlotBuffers, first: int, ids: IntArray, past: IntArray, new: IntArray
    ) -> FloatArray:
        """Run ``ids`` [B, S] (row i's ``new[i]`` tokens first, right-padded) in slots
        ``first .. first + B - 1`` of ``buffers`` after their ``past[i]`` tokens; return
        the logits after each row's last new token [B, vocab]."""
        ...

    def copy_slot(
        self,
        source: SlotBuffers,
        source_slot: int,
        target: SlotBuffers,
        target_slot: int,
        length: int,
    ) -> None:
        """Copy the first ``length`` positions of a slot into another one."""
        ...

    def free_slot(self, buffers: SlotBuffers, slot: int) -> None:
        """A slot is no longer held: give its memory back where the device allows."""
        ...


@dataclass(eq=False)
class _SlotRow(CacheRow):
    block: _Block
    slot: int
    length: int
    decoding: bool = False
    paused: bool = False


@dataclass(eq=False)
class _Block:
    buffers: SlotBuffers
    rows: list[_SlotRow | None]


class SlotCache(_RowSharing):
    """Rows are slots of preallocated blocks that every forward call writes in place.

    New rows take the lowest free slots, so the rows in the batch stay packed at the
    start of the blocks. A decode call covers a run of at most ``rows_per_call`` slots
    (0: a whole block) of decoding rows and the free slots between them, which ride
    along from position 0; a held row that does not decode (being prefilled or waiting
    to join) ends a run, so no call reads or writes its context. A paused row with a
    decoding row after it in its block moves, when a decode comes, to a parking block
    (``PARKING_BLOCK_SLOTS`` slots) that no decode call binds, and comes back to the
    lowest free slot when it joins again; a paused row that splits nothing stays. Blocks
    hold
    ``block_slots`` slots (fewer where ``rows_per_call`` is smaller) and are added when
    the slots run out; a released slot's memory is given back, and empty blocks at the end
    are dropped (the first decode block and the first parking block are kept).
    """

    def __init__(
        self, model: SlotModel, rows_per_call: int = 0, block_slots: int = DEFAULT_BLOCK_SLOTS
    ) -> None:
        self.model = model
        self.rows_per_call = rows_per_call
        self.block_slots = max(1, block_slots)
        self._blocks: list[_Block] = []
        self._parking: list[_Block] = []

    @property
    def buffers(self) -> list[SlotBuffers]:
        """Each block's buffers (what the forward calls bind), oldest first."""
        return [block.buffers for block in self._blocks]

    def slots(self) -> list[tuple[int, int]]:
        """The (block, slot) of every held row, in order; parking blocks are numbered
        after the decode blocks (``buffers`` lists only those)."""
        return [
            (index, slot)
            for index, block in enumerate([*self._blocks, *self._parking])
            for slot, row in enumerate(block.rows)
            if row is not None
        ]

    @staticmethod
    def slot_of(row: CacheRow) -> tuple[SlotBuffers, int]:
        """Where a row lives: its block's buffers and its slot."""
        assert isinstance(row, _SlotRow)
        return row.block.buffers, row.slot

    def _claim(
        self, count: int, blocks: list[_Block] | None = None, size: int = 0
    ) -> list[tuple[_Block, int, int]]:
        """``count`` free slots of ``blocks`` (the decode blocks by default), lowest
        first, as runs (block, first slot, length); new blocks (of ``size`` slots, or
        the cache's block size) are added to them."""
        blocks = self._blocks if blocks is None else blocks
        runs: list[tuple[_Block, int, int]] = []
        for block in blocks:
            slot = 0
            while slot < len(block.rows) and count > 0:
                if block.rows[slot] is not None:
                    slot += 1
                    continue
                end = slot
                while end < len(block.rows) and block.rows[end] is None and end - slot < count:
                    end += 1
                runs.append((block, slot, end - slot))
                count -= end - slot
                slot = end
        while count > 0:
            size = size or min(self.rows_per_call or DEFAULT_BLOCK_SLOTS, self.block_slots)
            block = _Block(self.model.allocate(size), [None] * size)
            blocks.append(block)
            runs.append((block, 0, min(size, count)))
            count -= min(size, count)
        return runs

    def start(
        self, prompts: Sequence[Sequence[int]], aside: bool = False
    ) -> tuple[FloatArray, list[CacheRow]]:
        """Aside, rows start in a parking block, which no decode call binds; they move
        to a decode block when they join."""
        if any(len(prompt) < 1 for prompt in prompts):
            raise ValueError("every prompt needs at least one token")
        # Similar lengths side by side: a call pads its rows to its longest prompt.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        logits: list[FloatArray] = [np.empty(0)] * len(prompts)
        rows: list[CacheRow] = [CacheRow()] * len(prompts)
        taken = 0
        claimed: list[_SlotRow] = []
        try:
            claimed_runs = (
                self._claim(len(prompts), self._parking, PARKING_BLOCK_SLOTS)
                if aside
                else self._claim(len(prompts))
            )
            for block, first, count in claimed_runs:
                call = order[taken : taken + count]
                taken += count
                lengths = np.array([len(prompts[i]) for i in call], np.int64)
                ids = np.zeros((count, int(lengths.max())), np.int64)
                for position, index in enumerate(call):
                    ids[position, : lengths[position]] = prompts[index]
                call_logits = self.model.forward_slots(
                    block.buffers, first, ids, np.zeros(count, np.int64), lengths
                )
                for position, index in enumerate(call):
                    row = _SlotRow(block, first + position, int(lengths[position]))
                    claimed.append(row)
                    logits[index] = call_logits[position]
                    rows[index] = row
        except Exception:
            self._drop_empty_blocks()  # blocks added for this start hold no row
            raise
        # Only once every call has succeeded: a failed one leaves no slot taken.
        for row in claimed:
            row.block.rows[row.slot] = row
        return np.stack(logits), rows

    def extend(self, row: CacheRow, ids: IntArray) -> FloatArray:
        assert isinstance(row, _SlotRow)
        logits = self.model.forward_slots(
            row.block.buffers,
            row.slot,
            ids.astype(np.int64),
            np.array([row.length], np.int64),
            np.array([ids.shape[1]], np.int64),
        )
        row.length += int(ids.shape[1])
        return np.asarray(logits[0])

    def fork(self, row: CacheRow) -> CacheRow:
        assert isinstance(row, _SlotRow)
        ((block, slot, _),) = self._claim(1)
        self.model.copy_slot(row.block.buffers, row.slot, block.buffers, slot, row.length)
        copy = _SlotRow(block, slot, row.length)
        block.rows[slot] = copy
        return copy

    def join(self, rows: Sequence[CacheRow]) -> None:
        for row in rows:
            assert isinstance(row, _SlotRow)
            if any(row.block is block for block in self._parking):
                ((block, slot, _),) = self._claim(1)
                self._move(row, block, slot)
            row.decoding, row.paused = True, False

    def park(self, row: CacheRow) -> None:
        assert isinstance(row, _SlotRow)
        row.decoding, row.paused = False, True

    def _park_splitting(self, block: _Block) -> None:
        """Move the paused rows of a block that have a decoding row after them to a
        parking block: left in place, each would end a decode call."""
        last = max((s for s, row in enumerate(block.rows) if row and row.decoding), default=-1)
        for row in block.rows[:last]:
            if row is not None and row.paused:
                ((parking, slot, _),) = self._claim(1, self._parking, PARKING_BLOCK_SLOTS)
                self._move(row, parking, slot)

    def _move(self, row: _SlotRow, block: _Block, slot: int) -> None:
        """Copy a row's positions to a free slot and free the one it leaves."""
        self.model.copy_slot(row.block.buffers, row.slot, block.buffers, slot, row.length)
        left, left_slot = row.block, row.slot
        block.rows[slot] = row
        row.block, row.slot = block, slot
        left.rows[left_slot] = None
        self.model.free_slot(left.buffers, left_slot)
        self._drop_empty_blocks()

    def _drop_empty_blocks(self) -> None:
        """Empty decode blocks at the end go, and empty parking blocks; the first of each
        stays, so a pause or a start aside does not allocate a block (on a device,
        ``max_context`` positions a slot) each time."""
        while len(self._blocks) > 1 and all(other is None for other in self._blocks[-1].rows):
            self._blocks.pop()
        self._parking = [
            b for i, b in enumerate(self._parking) if not i or any(r is not None for r in b.rows)
        ]

    def release(self, row: CacheRow) -> None:
        assert isinstance(row, _SlotRow)
        row.holders -= 1
        if row.holders > 0 or row.block.rows[row.slot] is not row:
            return
        row.decoding = row.paused = False
        row.block.rows[row.slot] = None
        self.model.free_slot(row.block.buffers, row.slot)
        self._drop_empty_blocks()

    def _runs(self, block: _Block) -> list[tuple[int, int]]:
        """The decode calls over a block, as (first slot, count): runs of decoding rows
        and the free slots between them, at most ``rows_per_call`` long, broken by any
        held row that does not decode."""
        span = self.rows_per_call or len(block.rows)
        runs: list[tuple[int, int]] = []
        first = last = -1
        for slot, row in enumerate(block.rows):
            if row is None:
                continue
            if row.decoding and first >= 0 and slot - first < span:
                last = slot
                continue
            if first >= 0:
                runs.append((first, last - first + 1))
            first = last = slot if row.decoding else -1
        if first >= 0:
            runs.append((first, last - first + 1))
        return runs

    def decode(
        self,
        rows: Sequence[CacheRow],
        tokens: IntArray,
        between: Callable[[], None] | None = None,
    ) -> FloatArray:
        token_of = {id(row): int(token) for row, token in zip(rows, tokens, strict=True)}
        logits: dict[int, FloatArray] = {}
        calls = 0
        for block in list(self._blocks):
            self._park_splitting(block)
            for first, count in self._runs(block):
                if calls and between is not None:
                    between()
                calls += 1
                # Free slots in the run get past 0: they write their own position 0.
                ids = np.zeros((count, 1), np.int64)
                past = np.zeros(count, np.int64)
                for position in range(count):
                    row = block.rows[first + position]
                    if row is not None:
                        past[position] = row.length
                        ids[position, 0] = token_of[id(row)]
                call_logits = self.model.forward_slots(
                    block.buffers, first, ids, past, np.ones(count, np.int64)
                )
                for position in range(count):
                    row = block.rows[first + position]
                    if row is not None:
                        logits[id(row)] = call_logits[position]
                        row.length += 1
        return np.stack([logits[id(row)] for row in rows])
