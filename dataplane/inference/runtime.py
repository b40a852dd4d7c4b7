"""ONNX Runtime sessions for decoder models and the ``Runtime`` plug-in point.

A runtime hands the engine a ``KVCache`` that matches its graph: a ``SlotCache`` over
buffers the graph writes in place (bound as both past and present with IOBinding, and
kept on the device of the leading provider), or a ``ConcatCache`` over the arrays an
Optimum export returns each step.

Providers are tried in the order TensorRT -> CUDA -> CPU and the first one this
onnxruntime build offers leads the session's chain (the ones after it catch the nodes
it cannot run). TensorRT builds engines per input-shape profile, which takes minutes,
so its engine and timing caches live in the worker's cache directory and survive
restarts.
"""

from __future__ import annotations

import logging
import mmap
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnxruntime as ort

from dataplane.inference.config import RuntimeConfig
from dataplane.inference.kvcache import (
    ConcatCache,
    FloatArray,
    IntArray,
    KVBatch,
    KVCache,
    SlotBuffers,
    SlotCache,
)
from dataplane.inference.model import MODEL_FILE, ModelSpec, load_model_spec

PROVIDER_CHAIN = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "CPUExecutionProvider",
)

__all__ = ["OnnxRuntime", "Runtime", "SlotBuffers", "last_logits", "select_providers"]

log = logging.getLogger(__name__)

ProviderEntry = tuple[str, dict[str, str]]
# Most device memory one block of in-place slots takes: a block of fewer slots is
# allocated where whole slots are larger (host memory is committed only as it is used).
DEVICE_BLOCK_BYTES = 1 << 30
# Longest slot when the worker's configuration names none: a model's own context may be
# far longer than its deployments use, and every slot is allocated that long.
DEFAULT_MAX_CONTEXT = 32768
# Providers whose sessions keep the KV buffers in CUDA device memory.
_CUDA_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


class Runtime(Protocol):
    """What the engine needs from a model runtime: the model's shape and a KV cache
    whose rows it can start, extend and decode."""

    @property
    def spec(self) -> ModelSpec: ...

    def new_cache(self, rows_per_call: int = 0) -> KVCache:
        """An empty cache of this model's layout; forward calls of at most
        ``rows_per_call`` rows (0: no limit)."""
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


def last_logits(logits: FloatArray, new: IntArray) -> FloatArray:
    """The logits after each row's last new token [B, vocab] out of a graph's output:
    [B, 1, vocab] when the graph picks them itself, or [B, S, vocab] for every position
    of right-padded rows (onnxruntime-genai exports), where row i's is at ``new[i] - 1``."""
    if logits.shape[1] == 1:
        return np.asarray(logits[:, 0, :], dtype=np.float32)
    rows = np.arange(logits.shape[0])
    return np.asarray(logits[rows, np.asarray(new, np.int64) - 1], dtype=np.float32)


def _host_buffer(shape: list[int], dtype: np.dtype[Any]) -> tuple[FloatArray, mmap.mmap]:
    """Zeroed private anonymous memory in small pages, and its mapping: each (slot, head)
    row is far from the next, so huge pages (which numpy asks for on large arrays) would
    commit megabytes for every row a prompt touches."""
    size = int(np.prod(shape)) * dtype.itemsize
    memory = mmap.mmap(-1, max(size, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        memory.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(memory, dtype, int(np.prod(shape))).reshape(shape), memory


def _give_back(memory: mmap.mmap, start: int, end: int) -> None:
    """Return the whole pages of ``[start, end)`` to the system; they read as zeros."""
    page = mmap.PAGESIZE
    first = -(-start // page) * page
    last = end // page * page
    if last > first and hasattr(mmap, "MADV_DONTNEED"):
        memory.madvise(mmap.MADV_DONTNEED, first, last - first)


class OnnxRuntime:
    """A decoder model in one ONNX Runtime session.

    In the in-place layout every pass is one call over a run of slots of a block: the
    block's buffers are bound as the past and the present of each layer at the run's
    first slot, prompts are right-padded, and each row's mask says how long it is.

    In the concatenating layout prefill and decode are the same forward call over a
    right-aligned cache: prefill starts from an empty cache with left-padded prompts,
    decode appends one token per row. A graph without a ``position_ids`` input takes the
    cache width as the position, so for it every row must fill the cache (rows of
    length 0 are free slots, ignored): the engine groups rows that way, and a call that
    breaks the rule is refused rather than answered with shifted positions.
    """

    def __init__(self, model_dir: Path, cache_dir: Path, config: RuntimeConfig) -> None:
        spec = load_model_spec(model_dir)
        # The longest sequence, and the length of every in-place slot.
        limit = config.max_context or spec.max_context
        if config.max_context is None and spec.kv_layout == "in_place":
            limit = min(limit, DEFAULT_MAX_CONTEXT)
        self._spec = replace(spec, max_context=min(spec.max_context, limit))
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
        leading = self._session.get_providers()[0]
        self._device = "cuda" if leading in _CUDA_PROVIDERS else "cpu"
        self._copier: ort.InferenceSession | None = None
        if (
            self._device == "cuda"
            and self._spec.kv_layout == "in_place"
            and self._dtype == np.float32
        ):
            log.warning(
                "%s leads this session, but the model's KV cache is float32: "
                "onnxruntime's CUDA GroupQueryAttention runs only float16 and bfloat16, "
                "so attention falls back to the CPU and every call copies each layer's "
                "whole cache between the devices; use a float16 or bfloat16 export",
                leading,
            )

    @property
    def spec(self) -> ModelSpec:
        return self._spec

    @property
    def providers(self) -> list[str]:
        return list(self._session.get_providers())

    def new_cache(self, rows_per_call: int = 0) -> KVCache:
        if self._spec.kv_layout == "in_place":
            if self._device == "cpu":
                return SlotCache(self, rows_per_call)
            slot_bytes = self._slot_bytes() * 2 * self._spec.num_layers
            return SlotCache(self, rows_per_call, max(1, DEVICE_BLOCK_BYTES // slot_bytes))
        return ConcatCache(self, rows_per_call)

    # -- the in-place layout: buffers bound as past and present ------------------------

    def _slot_shape(self, slots: int) -> list[int]:
        spec = self._spec
        return [slots, spec.num_kv_heads, spec.max_context, spec.head_dim]

    def _slot_bytes(self) -> int:
        """One slot of one layer's keys (or values)."""
        return int(np.prod(self._slot_shape(1))) * self._dtype.itemsize

    def allocate(self, slots: int) -> SlotBuffers:
        """A block of ``slots`` slots on the session's device. Host memory is mapped a
        page at a time on first touch, so a slot costs memory only as far as its rows
        have reached, and ``free_slot`` gives it back."""
        shape = self._slot_shape(slots)
        slot_bytes = self._slot_bytes()
        count = 2 * self._spec.num_layers
        if self._device == "cpu":
            host = [_host_buffer(shape, self._dtype) for _ in range(count)]
            arrays = tuple(array for array, _ in host)
            pointers = tuple(a.ctypes.data for a in arrays)
            maps = tuple(memory for _, memory in host)
            return SlotBuffers(slots, slot_bytes, pointers, arrays, maps)
        values = tuple(
            ort.OrtValue.ortvalue_from_shape_and_type(shape, self._dtype, self._device, 0)
            for _ in range(count)
        )
        return SlotBuffers(slots, slot_bytes, tuple(v.data_ptr() for v in values), values=values)

    def free_slot(self, buffers: SlotBuffers, slot: int) -> None:
        """Give a released slot's host pages back (device memory stays with its block)."""
        start = slot * buffers.slot_bytes
        for memory in buffers.maps:
            _give_back(memory, start, start + buffers.slot_bytes)

    def forward_slots(
        self, buffers: SlotBuffers, first: int, ids: IntArray, past: IntArray, new: IntArray
    ) -> FloatArray:
        rows, steps = ids.shape
        if first < 0 or first + rows > buffers.slots:
            raise ValueError("slots out of the block")
        total = past + new
        if int(total.max()) > self._spec.max_context:
            raise ValueError("a row would outgrow the model's context")
        # The attention op reads each row's length from its mask (ones, then padding)
        # and writes the new keys and values at that row's past length.
        mask = (np.arange(int(total.max()))[None, :] < total[:, None]).astype(np.int64)
        binding = self._session.io_binding()
        binding.bind_output("logits", "cpu")
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(ids, np.int64))
        binding.bind_cpu_input("attention_mask", mask)
        if self._spec.has_position_ids:
            positions = past[:, None] + np.arange(steps)[None, :]
            binding.bind_cpu_input(
                "position_ids", np.minimum(positions, self._spec.max_context - 1)
            )
        shape = self._slot_shape(rows)
        offset = first * buffers.slot_bytes
        for layer in range(self._spec.num_layers):
            for index, kind in enumerate(("key", "value")):
                pointer = buffers.pointers[2 * layer + index] + offset
                for bind, name in (
                    (binding.bind_input, f"past_key_values.{layer}.{kind}"),
                    (binding.bind_output, f"present.{layer}.{kind}"),
                ):
                    bind(name, self._device, 0, self._dtype, shape, pointer)
        self._session.run_with_iobinding(binding)
        return last_logits(binding.get_outputs()[0].numpy(), new)

    def copy_slot(
        self,
        source: SlotBuffers,
        source_slot: int,
        target: SlotBuffers,
        target_slot: int,
        length: int,
    ) -> None:
        if source.arrays and target.arrays:
            for mine, theirs in zip(target.arrays, source.arrays, strict=True):
                mine[target_slot, :, :length] = theirs[source_slot, :, :length]
            return
        # On a device: a session of Identity nodes copies, buffer to buffer, each head's
        # first ``length`` positions (one call per KV head: they are contiguous in it).
        copier = self._copier or self._slot_copier()
        head_bytes = self._spec.max_context * self._spec.head_dim * self._dtype.itemsize
        size = [length * self._spec.head_dim]
        for head in range(self._spec.num_kv_heads):
            binding = copier.io_binding()
            pairs = zip(source.pointers, target.pointers, strict=True)
            for index, (src, dst) in enumerate(pairs):
                src_at = src + source_slot * source.slot_bytes + head * head_bytes
                dst_at = dst + target_slot * target.slot_bytes + head * head_bytes
                binding.bind_input(f"in{index}", self._device, 0, self._dtype, size, src_at)
                binding.bind_output(f"out{index}", self._device, 0, self._dtype, size, dst_at)
            copier.run_with_iobinding(binding)

    def _slot_copier(self) -> ort.InferenceSession:
        from onnx import helper

        elem = helper.np_dtype_to_tensor_dtype(self._dtype)
        count = 2 * self._spec.num_layers
        graph = helper.make_graph(
            [helper.make_node("Identity", [f"in{i}"], [f"out{i}"]) for i in range(count)],
            "slot_copy",
            [helper.make_tensor_value_info(f"in{i}", elem, ["n"]) for i in range(count)],
            [helper.make_tensor_value_info(f"out{i}", elem, ["n"]) for i in range(count)],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        # Only the provider that owns the buffers: TensorRT would build an engine for it.
        plain = "CUDAExecutionProvider" if self._device == "cuda" else "CPUExecutionProvider"
        self._copier = ort.InferenceSession(model.SerializeToString(), providers=[plain])
        return self._copier

    # -- the concatenating layout: dense arrays in, dense arrays out -------------------

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
