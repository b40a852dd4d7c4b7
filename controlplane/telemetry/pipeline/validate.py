"""Step 1: a batch's bytes become a `TelemetryBatch`, or a rejection that names why.

The agent WebSocket and the HTTP fallback both call `parse_batch` on the raw body before
the batch joins a flush, so they accept the same sizes and answer in the same words, and a
batch that could fail a flush (a sketch that does not decode, a flood of keys, a frame
nested past any sane depth) is refused alone instead of failing everyone's.
"""

from __future__ import annotations

import base64

from pydantic import ValidationError
from pydantic_core import from_json

from agent.protocol import TelemetryBatch
from dataplane.sketch import CheckedSketch, check_wire

MAX_BATCH_BYTES = 4 * 2**20
"""A body or WebSocket frame larger than this is refused on either transport."""
MAX_GAUGE_KEYS = 4096
"""An 8-GPU node with a few hundred volumes reports under 3,000."""
MAX_COUNTER_KEYS = 256
MAX_SERIES = 4096
MAX_USAGE = 2048
MAX_THRESHOLDS = 64
"""SLO counts on one series."""
MAX_REASON = 1000
_SEQ_PREFIX_BYTES = 4096
"""Agents write `node_id` and `seq` first; the seq of an unreadable batch is read from here."""


class BatchRejected(Exception):
    """The batch can never be stored; `seq` is its sequence number if it could be read
    (0 if not), so the agent can drop it."""

    def __init__(self, reason: str, seq: int) -> None:
        super().__init__(reason)
        self.reason = reason[:MAX_REASON]
        self.seq = seq


Decoded = dict[str, CheckedSketch]
"""A sketch's base64 text to the sketch as the check decoded it (`CheckedSketch`), so the
merge adds that instead of decoding the text again (see `merge.Rollups.of`)."""


def parse_batch(raw: bytes | str, decoded: Decoded | None = None) -> TelemetryBatch:
    """The batch in `raw`, checked whole; raises BatchRejected. Its sketches, decoded, go
    into `decoded` when given."""
    if (len(raw.encode()) if isinstance(raw, str) else len(raw)) > MAX_BATCH_BYTES:
        raise BatchRejected(f"batch larger than {MAX_BATCH_BYTES} bytes", seq_of(raw))
    try:
        batch = TelemetryBatch.model_validate_json(raw)
    except ValidationError as exc:
        raise BatchRejected(_describe(exc), seq_of(raw)) from None
    problem = _problem(batch, {} if decoded is None else decoded)
    if problem is not None:
        raise BatchRejected(problem, batch.seq)
    return batch


def seq_of(raw: bytes | str) -> int:
    """The seq of a batch too broken (or too large) to parse, if its start names one."""
    try:
        head = from_json(raw[:_SEQ_PREFIX_BYTES], allow_partial=True)
    except ValueError:
        return 0
    seq = head.get("seq") if isinstance(head, dict) else None
    return seq if isinstance(seq, int) and 0 <= seq < 2**63 else 0


def _describe(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}"
        for err in exc.errors()[:10]
    )


def _problem(batch: TelemetryBatch, decoded: Decoded) -> str | None:
    """Limits the message model leaves open, and sketches that must merge."""
    for what, size, most in (
        ("gauges", len(batch.gauges), MAX_GAUGE_KEYS),
        ("counters", len(batch.counters), MAX_COUNTER_KEYS),
        ("series", len(batch.series), MAX_SERIES),
        ("usage", len(batch.usage), MAX_USAGE),
    ):
        if size > most:
            return f"{what}: {size} entries; at most {most}"
    for index, series in enumerate(batch.series):
        if len(series.thresholds) > MAX_THRESHOLDS:
            return f"series.{index}.thresholds: at most {MAX_THRESHOLDS}"
        try:
            decoded[series.sketch] = check_wire(base64.b64decode(series.sketch))
        except ValueError as exc:
            return f"series.{index}.sketch: {exc}"
    return None
