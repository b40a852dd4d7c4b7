"""The reference half of `tailguard bench parity`, run by a Python that has transformers,
optimum-onnx and torch (the project itself needs none of them).

For each architecture it builds a tiny random-weight model from its own config class (no
download), exports it with Optimum (`text-generation-with-past`) beside a word-level
tokenizer (BOS added by its post-processor, a chat template), and records what transformers'
greedy `generate` gives for token prompts, text prompts and chats, each alone. Writes
`<out>/references.json`: per architecture the exported directory, the prompts, their
token ids as transformers encodes or renders them, and the continuations.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

VOCAB = 256
NEW_TOKENS = 24
PROMPT_LENGTHS = (3, 9, 17, 5, 12)

TINY: dict[str, dict[str, Any]] = {
    "llama": {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2},
    "qwen2": {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2},
    "qwen3": {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2},
    "mistral": {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2},
    "phi3": {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 4},
    "gemma": {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 1},
    "gpt2": {"n_embd": 64, "n_head": 4, "n_layer": 2, "n_positions": 256},
}
"""Small enough to export in seconds; GQA where the architecture has it."""

COMMON = {
    "vocab_size": VOCAB,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "max_position_embeddings": 256,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "tie_word_embeddings": False,
}


ROLES = ["user:", "assistant:", "system:"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {{ eos_token }} "
    "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
)
"""Llama-2-like: BOS written by the template, EOS closing each turn."""


def tokenizer_files(directory: Path) -> None:
    """A word-level tokenizer over VOCAB words (id i is `w<i>` past the specials and role
    words) whose post-processor adds BOS, as Llama's does, and a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    specials = ["<pad>", "<s>", "</s>"]
    words = specials + ROLES
    vocab = {word: i for i, word in enumerate(words + [f"w{i}" for i in range(len(words), VOCAB)])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(specials)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)]
    )
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "chat_template": CHAT_TEMPLATE,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


def build(architecture: str, directory: Path, seed: int) -> Any:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = dict(TINY[architecture])
    if architecture != "gpt2":
        settings.update(COMMON)
        settings["head_dim"] = settings["hidden_size"] // settings["num_attention_heads"]
    else:
        settings.update(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config = AutoConfig.for_model(architecture, **settings)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    hf = directory / "hf"
    model.save_pretrained(hf)
    tokenizer_files(hf)
    return model


def export(directory: Path) -> Path:
    from optimum.exporters.onnx import main_export

    onnx_dir = directory / "onnx"
    main_export(
        str(directory / "hf"), output=onnx_dir, task="text-generation-with-past", device="cpu"
    )
    return onnx_dir


def generate(model: Any, prompts: list[list[int]]) -> list[list[int]]:
    """Greedy continuations, each prompt alone (no padding to blur the comparison)."""
    import torch

    outputs = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                pad_token_id=0,
            )
        outputs.append(out[0, len(prompt) :].tolist())
    return outputs


def texts(model: Any, onnx_dir: Path, rng: Any) -> dict[str, Any]:
    """Text and chat prompts as the exported tokenizer encodes and renders them (BOS by its
    post-processor, the chat template by transformers' Jinja), with their continuations."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(onnx_dir)

    def words(n: int) -> str:
        return " ".join(f"w{rng.randrange(len(ROLES) + 3, VOCAB)}" for _ in range(n))

    text = [words(n) for n in (4, 11)]
    chats = [
        [{"role": "user", "content": words(5)}],
        [
            {"role": "system", "content": words(3)},
            {"role": "user", "content": words(4)},
            {"role": "assistant", "content": words(2)},
            {"role": "user", "content": words(6)},
        ],
    ]
    text_ids = [tokenizer(t).input_ids for t in text]
    chat_ids = [
        list(tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True))
        for c in chats
    ]
    return {
        "text": [
            {"prompt": t, "ids": i, "output": o}
            for t, i, o in zip(text, text_ids, generate(model, text_ids), strict=True)
        ],
        "chat": [
            {"messages": c, "ids": i, "output": o}
            for c, i, o in zip(chats, chat_ids, generate(model, chat_ids), strict=True)
        ],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("out", type=Path)
    parser.add_argument("--architectures", default=",".join(TINY))
    args = parser.parse_args(argv)
    import random

    rng = random.Random(7)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(n)] for n in PROMPT_LENGTHS]
    references: dict[str, Any] = {}
    for architecture in args.architectures.split(","):
        directory = args.out / architecture
        try:  # the seed is the architecture's own, so any subset reproduces the full run
            model = build(architecture, directory, list(TINY).index(architecture))
            onnx_dir = export(directory)
        except Exception as error:  # an architecture this transformers cannot build or export
            print(f"{architecture}: {error}", file=sys.stderr)
            references[architecture] = {"error": str(error)}
            continue
        graph_inputs = _inputs(onnx_dir / "model.onnx")
        references[architecture] = {
            "model_dir": str(onnx_dir),
            "position_ids": "position_ids" in graph_inputs,
            "prompts": prompts,
            "outputs": generate(model, prompts),
            **texts(model, onnx_dir, rng),
        }
    (args.out / "references.json").write_text(json.dumps(references, indent=1))
    return 0


def _inputs(path: Path) -> set[str]:
    import onnx

    return {i.name for i in onnx.load(str(path), load_external_data=False).graph.input}


if __name__ == "__main__":
    raise SystemExit(main())
