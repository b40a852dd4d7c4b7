"""Reads the shape of a decoder-only model directory in the layout Hugging Face Optimum
exports (``model.onnx`` + ``config.json`` + ``tokenizer.json``, optionally
``generation_config.json`` and ``tokenizer_config.json``).

The runtime needs the layer count, KV head count, head size, vocabulary size, context
length, the KV dtype and the cache layout (written in place by the attention op, or
concatenated as Optimum exports it) before it can build caches, so this module reads them
from the graph's declared inputs where they are static and from ``config.json``
otherwise, and refuses a directory where the two disagree. Stop ids are the union of
``eos_token_id`` in ``config.json`` and ``generation_config.json`` (chat models list their
end-of-turn token only in the latter), and the sampling defaults come from
``generation_config.json``, as transformers and vLLM take them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

MODEL_FILE = "model.onnx"
CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"

_PAST_KEY = re.compile(r"^past_key_values\.(\d+)\.key$")
_ONNX_FLOAT_TYPES: dict[int, str] = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
}


@dataclass(frozen=True)
class GenerationDefaults:
    """The model's sampling defaults; None where generation_config.json names none."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None


@dataclass(frozen=True)
class ModelSpec:
    """Everything the runtime must know about a model to drive its KV cache."""

    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_context: int
    eos_token_ids: tuple[int, ...]
    kv_dtype: str
    has_position_ids: bool
    has_use_cache_branch: bool
    # "in_place": attention writes the new keys and values into its bound past buffers
    # (GroupQueryAttention); "concat": present = past + new columns (Optimum exports).
    kv_layout: str = "concat"
    generation: GenerationDefaults = GenerationDefaults()

    @property
    def numpy_kv_dtype(self) -> np.dtype[Any]:
        return np.dtype(self.kv_dtype)


def _first(config: dict[str, Any], *names: str) -> Any:
    for name in names:
        if name in config and config[name] is not None:
            return config[name]
    return None


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object file, or {} when the file is absent."""
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a JSON object")
    return data


def _token_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(v) for v in value) if isinstance(value, list) else (int(value),)


def _generation_defaults(generation: dict[str, Any]) -> GenerationDefaults:
    def number(name: str) -> float | None:
        value = generation.get(name)
        return float(value) if value is not None else None

    top_k = generation.get("top_k")
    return GenerationDefaults(
        temperature=number("temperature"),
        top_p=number("top_p"),
        top_k=int(top_k) if top_k is not None else None,
        repetition_penalty=number("repetition_penalty"),
    )


def _static_dim(value_info: onnx.ValueInfoProto, axis: int) -> int | None:
    dims = value_info.type.tensor_type.shape.dim
    if len(dims) <= axis or not dims[axis].HasField("dim_value"):
        return None
    return int(dims[axis].dim_value)


def _agree(name: str, from_graph: int | None, from_config: Any) -> int:
    if from_graph is not None and from_config is not None and int(from_config) != from_graph:
        raise ValueError(
            f"model graph says {name}={from_graph} but config.json says {from_config}; "
            "re-export the model or fix config.json"
        )
    value = from_graph if from_graph is not None else from_config
    if value is None:
        raise ValueError(
            f"cannot tell {name}: the graph leaves it symbolic and config.json does not name it"
        )
    return int(value)


def load_model_spec(model_dir: Path) -> ModelSpec:
    """Read a model directory's spec; raise ValueError naming what is missing."""
    model_path = model_dir / MODEL_FILE
    if not model_path.is_file():
        raise ValueError(f"{model_path} not found: the worker expects an Optimum export")
    config = read_json(model_dir / CONFIG_FILE)
    generation = read_json(model_dir / GENERATION_CONFIG_FILE)
    graph = onnx.load(str(model_path), load_external_data=False).graph
    inputs = {vi.name: vi for vi in graph.input}
    outputs = {vi.name: vi for vi in graph.output}
    for required in ("input_ids", "attention_mask"):
        if required not in inputs:
            raise ValueError(f"model.onnx has no input {required!r}: not a decoder export")
    if "logits" not in outputs:
        raise ValueError("model.onnx has no output 'logits': not a decoder export")

    layer_ids = sorted(int(m.group(1)) for n in inputs if (m := _PAST_KEY.match(n)))
    if not layer_ids:
        raise ValueError(
            "model.onnx has no past_key_values.N.key inputs: export it with past "
            "(Optimum task text-generation-with-past)"
        )
    if layer_ids != list(range(len(layer_ids))):
        raise ValueError(f"past_key_values layers are not contiguous: {layer_ids}")
    for layer in layer_ids:
        for kind in ("key", "value"):
            if f"past_key_values.{layer}.{kind}" not in inputs:
                raise ValueError(f"missing input past_key_values.{layer}.{kind}")
            if f"present.{layer}.{kind}" not in outputs:
                raise ValueError(f"missing output present.{layer}.{kind}")

    num_layers = _agree(
        "num_layers", len(layer_ids), _first(config, "num_hidden_layers", "n_layer")
    )
    past0 = inputs["past_key_values.0.key"]
    heads = _first(config, "num_attention_heads", "n_head")
    kv_heads = _agree(
        "num_kv_heads",
        _static_dim(past0, 1),
        _first(config, "num_key_value_heads", "n_head_kv", "num_attention_heads", "n_head"),
    )
    hidden = _first(config, "hidden_size", "n_embd")
    config_head_dim = _first(config, "head_dim")
    if config_head_dim is None and hidden is not None and heads:
        config_head_dim = int(hidden) // int(heads)
    head_dim = _agree("head_dim", _static_dim(past0, 3), config_head_dim)
    vocab = _agree("vocab_size", _static_dim(outputs["logits"], 2), config.get("vocab_size"))
    max_context = _agree(
        "max_context",
        None,
        _first(config, "max_position_embeddings", "n_positions", "n_ctx"),
    )
    eos_ids = tuple(
        dict.fromkeys(
            _token_ids(config.get("eos_token_id")) + _token_ids(generation.get("eos_token_id"))
        )
    )
    in_place = any(
        node.op_type == "GroupQueryAttention"
        and node.domain == "com.microsoft"
        and len(node.input) > 4
        and _PAST_KEY.match(node.input[3])
        for node in graph.node
    )
    elem_type = past0.type.tensor_type.elem_type
    if elem_type not in _ONNX_FLOAT_TYPES:
        raise ValueError(f"unsupported KV cache element type {elem_type}")
    return ModelSpec(
        num_layers=num_layers,
        num_attention_heads=int(heads) if heads else kv_heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=vocab,
        max_context=max_context,
        eos_token_ids=eos_ids,
        kv_dtype=_ONNX_FLOAT_TYPES[elem_type],
        has_position_ids="position_ids" in inputs,
        has_use_cache_branch="use_cache_branch" in inputs,
        kv_layout="in_place" if in_place else "concat",
        generation=_generation_defaults(generation),
    )
