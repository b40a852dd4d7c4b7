"""Batched, left-padded KV cache in the Optimum layout ([batch, kv_heads, len, head_dim]).

Every row is right-aligned: its real tokens occupy the last ``lengths[i]`` columns and
the columns before are padding that the attention mask hides. Right alignment means a
decode step appends one column for every row at once, so the arrays a step returns
(``present.N.*``) are the next step's inputs with no copy. A sequence that joins takes
over a free row in place (``write_row``); the whole batch is copied (``gather``) only
to grow it, to widen it for a longer sequence, or to compact it. Rows never see each
other's padding as data; with a graph that takes ``position_ids`` a sequence's results
therefore do not depend on which other sequences share its batch. A graph without that
input derives positions from the cache width, which is right only for a row that fills
the width: the engine keeps such rows in groups of one length (see ``engine``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[Any]
IntArray = npt.NDArray[np.int64]


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
