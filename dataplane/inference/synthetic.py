"""Writes a small random decoder model in exactly the Optimum export layout.

Machines without a real model (CI, laptops, this repository's tests and benchmarks)
still need a model that does real work per token, so the worker's batching, KV cache
and latency behave like they would with a real one. The graph is a pre-LayerNorm
transformer (token + learned position embeddings, grouped-query attention over a KV
cache, GELU MLP, LM head) with seeded random weights; the
tokenizer is a byte-level BPE trained on seeded pseudo-words. The text it produces is
meaningless; the compute is not.

By default attention is com.microsoft GroupQueryAttention over a KV cache written in
place: each layer's ``past_key_values.N.*`` inputs are preallocated buffers
``[batch, kv_heads, max_context, head_dim]`` that the op writes the new keys and values
into and returns as ``present.N.*`` (the same buffers, bound to both names), each row's
length read from ``attention_mask`` (ones, then right padding), as onnxruntime-genai
builds its models. With ``concat_kv`` (or without ``position_ids``) the graph is in the
Optimum export layout instead: plain ops, ``present`` = ``past`` plus the new columns.
The weights do not depend on the layout, so both give the same tokens.

The spec's switches reproduce what real exports differ in, so the worker is tested
against each: a graph without a ``position_ids`` input (positions derived from the cache
width, as Optimum exports Gemma, MPT and Bloom), a tokenizer whose post-processor adds a
BOS token (Llama, Mistral, Gemma), and a ``chat_template`` in ``tokenizer_config.json``.
``generation_config.json`` lists a stop id that ``config.json`` does not (as Llama 3
Instruct lists ``<|eot_id|>``) and carries any sampling defaults the caller gives.

Run ``python -m dataplane.inference.synthetic DIR --layers 4 --hidden 384 ...``.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from dataplane.inference.model import (
    CONFIG_FILE,
    GENERATION_CONFIG_FILE,
    MODEL_FILE,
    TOKENIZER_CONFIG_FILE,
    TOKENIZER_FILE,
)

OPSET = 17
EOS_TOKEN = "<|endoftext|>"
BOS_TOKEN = "<|startoftext|>"
END_TOKEN = "<|end|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (EOS_TOKEN, BOS_TOKEN, *ROLE_TOKENS, END_TOKEN)
# The model's own chat format: role marker, content and end marker on one line; tool
# calls as their JSON; unknown roles refused the way Hugging Face templates refuse them.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}"
    "{{ raise_exception('Unknown role: ' + message['role']) }}{% endif %}"
    "<|{{ message['role'] }}|>{{ message['content'] or '' }}"
    "{% for call in message['tool_calls'] or [] %}{{ call['function'] | tojson }}{% endfor %}"
    "<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
_MASKED_SCORE = -1.0e9


@dataclass(frozen=True)
class SyntheticModelSpec:
    """Size of the generated model; the defaults make a batch-32 decode step cost a few
    milliseconds on a 2-core CPU, so batching visibly pays."""

    layers: int = 4
    hidden: int = 256
    heads: int = 4
    kv_heads: int = 4
    vocab: int = 1024
    max_context: int = 1024
    mlp_ratio: int = 4
    seed: int = 0
    position_ids: bool = True
    bos: bool = False
    chat_template: bool = True
    concat_kv: bool = False
    # Logits for every position, as onnxruntime-genai exports give them (in place only).
    all_logits: bool = False

    def __post_init__(self) -> None:
        if self.hidden % self.heads:
            raise ValueError("hidden must be a multiple of heads")
        if self.heads % self.kv_heads:
            raise ValueError("heads must be a multiple of kv_heads")
        if self.vocab < 256 + len(SPECIAL_TOKENS):
            raise ValueError("vocab must hold the 256 byte tokens plus the special tokens")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def in_place(self) -> bool:
        """Whether attention writes its KV cache in place (GroupQueryAttention); a graph
        without position_ids is always an Optimum-layout one."""
        return self.position_ids and not self.concat_kv


def _corpus(seed: int) -> Iterator[str]:
    """Seeded pseudo-English so BPE has frequent pairs to merge up to the target vocab."""
    rng = random.Random(seed)
    onsets = [
        "",
        "b",
        "c",
        "d",
        "f",
        "g",
        "h",
        "k",
        "l",
        "m",
        "n",
        "p",
        "r",
        "s",
        "t",
        "v",
        "w",
        "st",
        "tr",
        "ch",
        "sh",
        "th",
        "pl",
        "gr",
    ]
    vowels = ["a", "e", "i", "o", "u", "ai", "ea", "ou", "io"]
    codas = ["", "", "n", "r", "s", "t", "l", "m", "nd", "st", "ng"]
    words = [
        "".join(
            rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas)
            for _ in range(rng.randint(1, 3))
        )
        for _ in range(3000)
    ]
    weights = [1.0 / (rank + 1) for rank in range(len(words))]
    for _ in range(4000):
        sentence = " ".join(rng.choices(words, weights, k=rng.randint(4, 14)))
        yield sentence.capitalize() + rng.choice([".", ".", "?", "!", ","])


def build_tokenizer(vocab: int, seed: int, bos: bool = False) -> Tokenizer:
    """Byte-level BPE: the 256 byte symbols, the special tokens, merges up to ``vocab``;
    with ``bos``, a post-processor that starts every encoding with the BOS token."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(seed), trainer)
    if bos:
        bos_id = tokenizer.token_to_id(BOS_TOKEN)
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{BOS_TOKEN} $A",
            pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
            special_tokens=[(BOS_TOKEN, bos_id)],
        )
    return tokenizer


class _GraphBuilder:
    """Accumulates nodes and seeded initializers; names are unique by counter."""

    def __init__(self, seed: int) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._rng = np.random.default_rng(seed)
        self._count = 0

    def _name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def weight(self, name: str, shape: tuple[int, ...], std: float) -> str:
        data = self._rng.normal(0.0, std, size=shape).astype(np.float32)
        self.initializers.append(numpy_helper.from_array(data, name))
        return name

    def const(self, name: str, value: np.typing.ArrayLike, dtype: type) -> str:
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(
        self, op_type: str, inputs: list[str], hint: str = "", output: str = "", **attrs: Any
    ) -> str:
        out = output or self._name(hint or op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], **attrs))
        return out

    def op_multi(
        self, op_type: str, inputs: list[str], outputs: list[str], domain: str, **attrs: Any
    ) -> str:
        """A node with several outputs (named by the caller); returns the first."""
        self.nodes.append(helper.make_node(op_type, inputs, outputs, domain=domain, **attrs))
        return outputs[0]


@dataclass(frozen=True)
class _ConcatMasks:
    """What every layer's plain-op attention shares: the visibility mask and shapes."""

    visible: str
    scores5_shape: str
    scores4_shape: str


def _concat_attention(
    g: _GraphBuilder, layer: int, q: str, k: str, v: str, masks: _ConcatMasks
) -> str:
    """Grouped-query attention in plain ops over ``past`` + the new columns, which it
    returns as ``present`` (the Optimum layout); the context [B, S, hidden]."""
    # Queries grouped per KV head: [B, kvh, group*S, hd], so both attention MatMuls
    # are plain 4-D products (ORT fuses the K transpose into the MatMul).
    q4 = g.op(
        "Reshape",
        [
            g.op("Transpose", [g.op("Reshape", [q, "shape_q"])], perm=[0, 2, 3, 1, 4]),
            "shape_grouped",
        ],
    )
    present = {}
    for kind, proj in (("key", k), ("value", v)):
        new = g.op("Transpose", [g.op("Reshape", [proj, "shape_kv"])], perm=[0, 2, 1, 3])
        present[kind] = g.op(
            "Concat",
            [f"past_key_values.{layer}.{kind}", new],
            output=f"present.{layer}.{kind}",
            axis=2,
        )
    k_t = g.op("Transpose", [present["key"]], perm=[0, 1, 3, 2])
    scores = g.op(
        "Reshape", [g.op("Mul", [g.op("MatMul", [q4, k_t]), "scale"]), masks.scores5_shape]
    )
    probs = g.op("Softmax", [g.op("Where", [masks.visible, scores, "masked"])], axis=-1)
    grouped_probs = g.op("Reshape", [probs, masks.scores4_shape])
    ctx = g.op(
        "Reshape",
        [
            g.op(
                "Transpose",
                [
                    g.op(
                        "Reshape",
                        [g.op("MatMul", [grouped_probs, present["value"]]), "shape_ctx5"],
                    )
                ],
                perm=[0, 3, 1, 2, 4],
            ),
            "shape_out",
        ],
    )
    return ctx


def build_graph(spec: SyntheticModelSpec, vocab: int) -> onnx.ModelProto:
    """The decoder graph with Optimum's input/output names and dynamic axes."""
    g = _GraphBuilder(spec.seed)
    hd, kvh, group = spec.head_dim, spec.kv_heads, spec.heads // spec.kv_heads
    ffn = spec.hidden * spec.mlp_ratio
    std = 0.02
    ones = g.const("ln_ones", np.ones(spec.hidden), np.float32)
    zeros = g.const("ln_zeros", np.zeros(spec.hidden), np.float32)
    g.const("axes_1", [1], np.int64)
    g.const("axes_1_2_3", [1, 2, 3], np.int64)
    g.const("one_i64", 1, np.int64)
    g.const("zero_i64", 0, np.int64)
    g.const("zero_1d", [0], np.int64)
    g.const("scale", 1.0 / np.sqrt(hd), np.float32)
    g.const("masked", _MASKED_SCORE, np.float32)
    g.const("gelu_k", 1.702, np.float32)
    g.const("shape_q", [0, 0, kvh, group, hd], np.int64)
    g.const("shape_kv", [0, 0, kvh, hd], np.int64)
    g.const("shape_grouped", [0, kvh, -1, hd], np.int64)
    g.const("shape_ctx5", [0, kvh, group, -1, hd], np.int64)
    g.const("shape_out", [0, 0, spec.hidden], np.int64)

    seq_len = g.op("Gather", [g.op("Shape", ["input_ids"]), "one_i64"], "seq_len")
    total_len = g.op("Gather", [g.op("Shape", ["attention_mask"]), "one_i64"], "total_len")
    past_len = g.op("Sub", [total_len, seq_len], "past_len")
    new_pos = g.op("Range", [past_len, total_len, "one_i64"], "new_pos")
    # Without a position_ids input, positions are the cache columns the new tokens take.
    positions = "position_ids" if spec.position_ids else new_pos
    x = g.op(
        "Add",
        [
            g.op("Gather", [g.weight("embed_tokens", (vocab, spec.hidden), std), "input_ids"]),
            g.op(
                "Gather",
                [g.weight("embed_positions", (spec.max_context, spec.hidden), std), positions],
            ),
        ],
        "embeddings",
    )
    if spec.in_place:
        # Each row's length (past + new) from its mask, as GroupQueryAttention takes it:
        # seqlens_k = length - 1 per row, total_sequence_length = the mask's width.
        lengths = g.op("ReduceSum", ["attention_mask", "axes_1"], "lengths", keepdims=0)
        seqlens = g.op("Sub", [lengths, "one_i64"], "seqlens")
        seqlens_k = g.op("Cast", [seqlens], "seqlens_k", to=TensorProto.INT32)
        total_i32 = g.op("Cast", [total_len], "total_sequence_length", to=TensorProto.INT32)
        # A row's last new token: its own length - 1 in a first (right-padded) prompt,
        # the last column otherwise.
        last_index = g.op("Min", [seqlens, g.op("Sub", [seq_len, "one_i64"])], "last_index")
    else:
        # Mask [B, 1, 1, S, T]: key t is visible to query s when t <= past + s and the
        # attention_mask marks t as a real token.
        key_pos = g.op("Range", ["zero_i64", total_len, "one_i64"], "key_pos")
        query_pos = g.op("Unsqueeze", [new_pos, "axes_1"])
        causal = g.op("LessOrEqual", [key_pos, query_pos], "causal")
        padding = g.op(
            "Unsqueeze", [g.op("Cast", ["attention_mask"], to=TensorProto.BOOL), "axes_1_2_3"]
        )
        total_1d = g.op("Unsqueeze", [total_len, "zero_1d"])
        masks = _ConcatMasks(
            visible=g.op("And", [causal, padding], "visible"),
            scores5_shape=g.op(
                "Concat",
                [g.const("shape_scores5_prefix", [0, kvh, group, -1], np.int64), total_1d],
                axis=0,
            ),
            scores4_shape=g.op(
                "Concat",
                [g.const("shape_scores4_prefix", [0, kvh, -1], np.int64), total_1d],
                axis=0,
            ),
        )

    for layer in range(spec.layers):
        h = g.op("LayerNormalization", [x, ones, zeros], f"ln_attn{layer}", axis=-1)
        q = g.op("MatMul", [h, g.weight(f"l{layer}.q", (spec.hidden, spec.hidden), std)])
        k = g.op("MatMul", [h, g.weight(f"l{layer}.k", (spec.hidden, kvh * hd), std)])
        v = g.op("MatMul", [h, g.weight(f"l{layer}.v", (spec.hidden, kvh * hd), std)])
        if spec.in_place:
            ctx = g.op_multi(
                "GroupQueryAttention",
                [
                    q,
                    k,
                    v,
                    f"past_key_values.{layer}.key",
                    f"past_key_values.{layer}.value",
                    seqlens_k,
                    total_i32,
                ],
                [f"attn{layer}", f"present.{layer}.key", f"present.{layer}.value"],
                domain="com.microsoft",
                num_heads=spec.heads,
                kv_num_heads=kvh,
                scale=float(1.0 / np.sqrt(hd)),
            )
        else:
            ctx = _concat_attention(g, layer, q, k, v, masks)
        attn_out = g.op("MatMul", [ctx, g.weight(f"l{layer}.o", (spec.hidden, spec.hidden), std)])
        x = g.op("Add", [x, attn_out], f"resid_attn{layer}")
        h = g.op("LayerNormalization", [x, ones, zeros], f"ln_mlp{layer}", axis=-1)
        up = g.op("MatMul", [h, g.weight(f"l{layer}.up", (spec.hidden, ffn), std)])
        act = g.op("Mul", [up, g.op("Sigmoid", [g.op("Mul", [up, "gelu_k"])])], "gelu")
        down = g.op("MatMul", [act, g.weight(f"l{layer}.down", (ffn, spec.hidden), std)])
        x = g.op("Add", [x, down], f"resid_mlp{layer}")

    # Logits only where a token is sampled: the last position of each row.
    if spec.in_place and spec.all_logits:
        last = x
    elif spec.in_place:
        picked = g.op("GatherND", [x, g.op("Unsqueeze", [last_index, "axes_1"])], batch_dims=1)
        last = g.op("Unsqueeze", [picked, "axes_1"], "last_position")
    else:
        last = g.op(
            "Slice",
            [
                x,
                g.const("last_start", [-1], np.int64),
                g.const("last_end", [np.iinfo(np.int64).max], np.int64),
                "axes_1",
            ],
            "last_position",
        )
    final = g.op("LayerNormalization", [last, ones, zeros], "ln_final", axis=-1)
    g.op(
        "MatMul",
        [final, g.weight("lm_head", (spec.hidden, vocab), 1.0 / np.sqrt(spec.hidden))],
        output="logits",
    )

    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    inputs = [
        helper.make_tensor_value_info("input_ids", i64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info(
            "attention_mask", i64, ["batch_size", "past_sequence_length + sequence_length"]
        ),
    ]
    if spec.position_ids:
        inputs.append(
            helper.make_tensor_value_info("position_ids", i64, ["batch_size", "sequence_length"])
        )
    logit_positions: str | int = "sequence_length" if spec.in_place and spec.all_logits else 1
    outputs = [helper.make_tensor_value_info("logits", f32, ["batch_size", logit_positions, vocab])]
    # In place, past and present are one buffer as long as the context.
    past_len_dim = "max_sequence_length" if spec.in_place else "past_sequence_length"
    present_len_dim = (
        "max_sequence_length" if spec.in_place else "past_sequence_length + sequence_length"
    )
    for layer in range(spec.layers):
        for kind in ("key", "value"):
            inputs.append(
                helper.make_tensor_value_info(
                    f"past_key_values.{layer}.{kind}",
                    f32,
                    ["batch_size", kvh, past_len_dim, hd],
                )
            )
            outputs.append(
                helper.make_tensor_value_info(
                    f"present.{layer}.{kind}", f32, ["batch_size", kvh, present_len_dim, hd]
                )
            )
    graph = helper.make_graph(
        g.nodes, "tailguard_synthetic_decoder", inputs, outputs, g.initializers
    )
    model = helper.make_model(
        graph,
        opset_imports=[
            helper.make_opsetid("", OPSET),
            *([helper.make_opsetid("com.microsoft", 1)] if spec.in_place else []),
        ],
        producer_name="tailguard-synthetic",
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def count_parameters(model: onnx.ModelProto) -> int:
    """Weights in the graph, constants included (they are a rounding error)."""
    return sum(int(np.prod(init.dims)) for init in model.graph.initializer)


def write_synthetic_model(
    directory: Path, spec: SyntheticModelSpec, generation: Mapping[str, Any] | None = None
) -> int:
    """Write model.onnx, config.json, generation_config.json, tokenizer.json and
    tokenizer_config.json; ``generation`` adds sampling defaults (temperature, top_p,
    ...) to generation_config.json. Return the parameter count."""
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(spec.vocab, spec.seed, spec.bos)
    vocab = tokenizer.get_vocab_size()
    model = build_graph(spec, vocab)
    onnx.save(model, str(directory / MODEL_FILE))
    tokenizer.save(str(directory / TOKENIZER_FILE))
    eos_id, end_id = tokenizer.token_to_id(EOS_TOKEN), tokenizer.token_to_id(END_TOKEN)
    bos_id = tokenizer.token_to_id(BOS_TOKEN) if spec.bos else eos_id
    config = {
        "model_type": "tailguard-synthetic",
        "architectures": ["TailguardSyntheticForCausalLM"],
        "num_hidden_layers": spec.layers,
        "hidden_size": spec.hidden,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "head_dim": spec.head_dim,
        "intermediate_size": spec.hidden * spec.mlp_ratio,
        "vocab_size": vocab,
        "max_position_embeddings": spec.max_context,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "torch_dtype": "float32",
        "tailguard_synthetic": asdict(spec),
    }
    generation_config = {
        "bos_token_id": bos_id,
        "eos_token_id": [eos_id, end_id],
        **(generation or {}),
    }
    tokenizer_config: dict[str, Any] = {"eos_token": EOS_TOKEN}
    if spec.bos:
        tokenizer_config["bos_token"] = {"content": BOS_TOKEN, "special": True}
    if spec.chat_template:
        tokenizer_config["chat_template"] = CHAT_TEMPLATE
    for name, content in (
        (CONFIG_FILE, config),
        (GENERATION_CONFIG_FILE, generation_config),
        (TOKENIZER_CONFIG_FILE, tokenizer_config),
    ):
        (directory / name).write_text(json.dumps(content, indent=2) + "\n")
    return count_parameters(model)


def main(argv: list[str] | None = None) -> int:
    defaults = SyntheticModelSpec()
    parser = argparse.ArgumentParser(
        prog="python -m dataplane.inference.synthetic",
        description=__doc__.splitlines()[0] if __doc__ else None,
    )
    parser.add_argument("directory", type=Path)
    parser.add_argument("--layers", type=int, default=defaults.layers)
    parser.add_argument("--hidden", type=int, default=defaults.hidden)
    parser.add_argument("--heads", type=int, default=defaults.heads)
    parser.add_argument(
        "--kv-heads",
        type=int,
        default=None,
        help="grouped-query attention: fewer KV heads than heads",
    )
    parser.add_argument("--vocab", type=int, default=defaults.vocab)
    parser.add_argument("--max-context", type=int, default=defaults.max_context)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--no-position-ids",
        action="store_true",
        help="derive positions from the cache width, as Gemma exports do",
    )
    parser.add_argument("--bos", action="store_true", help="tokenizer adds a BOS token")
    parser.add_argument("--no-chat-template", action="store_true")
    parser.add_argument(
        "--concat-kv",
        action="store_true",
        help="the Optimum export layout (present = past + new) instead of a cache written in place",
    )
    args = parser.parse_args(argv)
    spec = SyntheticModelSpec(
        layers=args.layers,
        hidden=args.hidden,
        heads=args.heads,
        kv_heads=args.kv_heads or args.heads,
        vocab=args.vocab,
        max_context=args.max_context,
        seed=args.seed,
        position_ids=not args.no_position_ids,
        bos=args.bos,
        chat_template=not args.no_chat_template,
        concat_kv=args.concat_kv,
    )
    params = write_synthetic_model(args.directory, spec)
    print(f"wrote {args.directory} ({params} parameters)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
