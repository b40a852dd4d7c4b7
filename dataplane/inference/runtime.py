"""ONNX Runtime sessions for decoder models and the ``Runtime`` plug-in point.

Providers are tried in the order TensorRT -> CUDA -> CPU and the first one this
onnxruntime build offers leads the session's chain (the ones after it catch the nodes
it cannot run). TensorRT builds engines per input-shape profile, which takes minutes,
so its engine and timing caches live in the worker's cache directory and survive
restarts.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnxruntime as ort

from dataplane.inference.config import RuntimeConfig
from dataplane.inference.kvcache import FloatArray, IntArray, KVBatch
from dataplane.inference.model import MODEL_FILE, ModelSpec, load_model_spec

PROVIDER_CHAIN = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "CPUExecutionProvider",
)

ProviderEntry = tuple[str, dict[str, str]]


class Runtime(Protocol):
    """What the engine needs from a model runtime: two kinds of forward pass."""

    @property
    def spec(self) -> ModelSpec: ...

    def prefill(self, prompts: Sequence[Sequence[int]]) -> tuple[FloatArray, KVBatch]:
        """Run whole prompts; return next-token logits [n, vocab] and their KV cache."""
        ...

    def decode(self, cache: KVBatch, tokens: IntArray) -> tuple[FloatArray, KVBatch]:
        """Append one token per row; return next-token logits [B, vocab] and the cache."""
        ...

    def extend(self, cache: KVBatch, ids: IntArray) -> tuple[FloatArray, KVBatch]:
        """Append a prompt's next chunk ``ids`` [1, n] to a one-row cache (chunked
        prefill); return the logits after its last token [1, vocab] and the cache."""
        ...


def select_providers(available: Sequence[str], cache_dir: Path) -> list[ProviderEntry]:
    """The provider chain from the first preferred provider that is available, with the
    TensorRT engine and timing caches pointed at ``cache_dir``."""
    chain = [name for name in PROVIDER_CHAIN if name in available]
    if not chain:
        raise RuntimeError(f"onnxruntime offers none of {PROVIDER_CHAIN}: {list(available)}")
    entries: list[ProviderEntry] = []
    for name in chain:
        options: dict[str, str] = {}
        if name == "TensorrtExecutionProvider":
            engines, timing = cache_dir / "trt-engines", cache_dir / "trt-timing"
            engines.mkdir(parents=True, exist_ok=True)
            timing.mkdir(parents=True, exist_ok=True)
            options = {
                "trt_engine_cache_enable": "True",
                "trt_engine_cache_path": str(engines),
                "trt_timing_cache_enable": "True",
                "trt_timing_cache_path": str(timing),
            }
        entries.append((name, options))
    return entries


class OnnxRuntime:
    """A decoder model in one ONNX Runtime session.

    Both passes are the same forward call over a right-aligned cache: prefill starts
    from an empty cache with left-padded prompts, decode appends one token per row.
    A graph without a ``position_ids`` input takes the cache width as the position, so
    for it every row must fill the cache (rows of length 0 are free slots, ignored):
    the engine groups rows that way, and a call that breaks the rule is refused rather
    than answered with shifted positions.
    """

    def __init__(self, model_dir: Path, cache_dir: Path, config: RuntimeConfig) -> None:
        self._spec = load_model_spec(model_dir)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = config.intra_op_threads
        # A spinning thread pool burns the cores the event loop needs between steps.
        options.add_session_config_entry(
            "session.intra_op.allow_spinning", "1" if config.allow_spinning else "0"
        )
        options.log_severity_level = 3
        providers = select_providers(ort.get_available_providers(), cache_dir)
        self._session = ort.InferenceSession(
            str(model_dir / MODEL_FILE),
            options,
            providers=[name for name, _ in providers],
            provider_options=[opts for _, opts in providers],
        )
        self._dtype = self._spec.numpy_kv_dtype

    @property
    def spec(self) -> ModelSpec:
        return self._spec

    @property
    def providers(self) -> list[str]:
        return list(self._session.get_providers())

    def prefill(self, prompts: Sequence[Sequence[int]]) -> tuple[FloatArray, KVBatch]:
        lengths = np.array([len(p) for p in prompts], np.int64)
        if lengths.min(initial=1) < 1:
            raise ValueError("every prompt needs at least one token")
        width = int(lengths.max())
        ids = np.zeros((len(prompts), width), np.int64)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = prompt
        empty = KVBatch.empty(
            self._spec.num_layers,
            self._spec.num_kv_heads,
            self._spec.head_dim,
            len(prompts),
            self._dtype,
        )
        return self._forward(empty, ids, lengths)

    def decode(self, cache: KVBatch, tokens: IntArray) -> tuple[FloatArray, KVBatch]:
        return self._forward(
            cache, tokens.reshape(-1, 1).astype(np.int64), np.ones(cache.size, np.int64)
        )

    def extend(self, cache: KVBatch, ids: IntArray) -> tuple[FloatArray, KVBatch]:
        if cache.size != 1 or ids.shape[0] != 1:
            raise ValueError("a prompt chunk extends one row at a time")
        return self._forward(cache, ids.astype(np.int64), np.array([ids.shape[1]], np.int64))

    def _forward(
        self, cache: KVBatch, ids: IntArray, new_lengths: IntArray
    ) -> tuple[FloatArray, KVBatch]:
        """Run ``ids`` (left-padded to a common width) after ``cache``.

        Three shapes are used: an empty cache with prompts (or their first chunks), any
        cache with one token per row, or one unpadded row with its prompt's next chunk;
        all keep every row right-aligned.
        """
        steps = ids.shape[1]
        new_pad = steps - new_lengths
        if not self._spec.has_position_ids:
            # Positions come from the cache width: a padded row would get shifted ones.
            filled = cache.lengths > 0 if cache.width else np.ones(cache.size, bool)
            if np.any((cache.lengths + new_lengths)[filled] != cache.width + steps):
                raise ValueError(
                    "this graph takes positions from the cache width: every row of a "
                    "forward call must be exactly as long as the cache is wide"
                )
        mask = cache.attention_mask(steps)
        mask[:, cache.width :] = np.arange(steps)[None, :] >= new_pad[:, None]
        feeds: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        if self._spec.has_position_ids:
            positions = cache.lengths[:, None] + np.arange(steps)[None, :] - new_pad[:, None]
            feeds["position_ids"] = np.maximum(positions, 0)
        if self._spec.has_use_cache_branch:
            feeds["use_cache_branch"] = np.array([cache.width > 0])
        for layer in range(self._spec.num_layers):
            feeds[f"past_key_values.{layer}.key"] = cache.keys[layer]
            feeds[f"past_key_values.{layer}.value"] = cache.values[layer]
        names = ["logits"] + [
            f"present.{layer}.{kind}"
            for layer in range(self._spec.num_layers)
            for kind in ("key", "value")
        ]
        outputs = self._session.run(names, feeds)
        logits = np.asarray(outputs[0][:, -1, :], dtype=np.float32)
        presents = outputs[1:]
        return logits, KVBatch(
            keys=tuple(presents[0::2]),
            values=tuple(presents[1::2]),
            lengths=cache.lengths + new_lengths,
        )
