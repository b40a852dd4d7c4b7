"""Reading Optimum-layout model directories, including ones the generator did not write."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from dataplane.inference.config import RuntimeConfig
from dataplane.inference.engine import BatchEngine, EngineSequence
from dataplane.inference.model import load_model_spec
from dataplane.inference.runtime import OnnxRuntime, select_providers
from dataplane.inference.sampling import SamplingParams
from dataplane.inference.synthetic import SyntheticModelSpec, write_synthetic_model

from .conftest import TEST_MODEL


def greedy(model_dir: Path, cache_dir: Path, prompt: list[int], tokens: int = 12) -> list[int]:
    engine = BatchEngine(OnnxRuntime(model_dir, cache_dir, RuntimeConfig()))
    seq = EngineSequence(
        prompt, SamplingParams(max_new_tokens=tokens, temperature=0.0, ignore_eos=True)
    )
    engine.prefill([seq])
    engine.step(join=[seq])
    while engine.running:
        engine.step()
    return seq.tokens


def test_generator_writes_the_optimum_layout(model_dir: Path) -> None:
    assert {p.name for p in model_dir.iterdir()} >= {"model.onnx", "config.json", "tokenizer.json"}
    graph = onnx.load(str(model_dir / "model.onnx")).graph
    inputs = [i.name for i in graph.input]
    outputs = [o.name for o in graph.output]
    assert inputs[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert "past_key_values.1.value" in inputs and "present.1.value" in outputs
    spec = load_model_spec(model_dir)
    assert (spec.num_layers, spec.num_attention_heads, spec.num_kv_heads, spec.head_dim) == (
        TEST_MODEL.layers,
        TEST_MODEL.heads,
        TEST_MODEL.kv_heads,
        TEST_MODEL.head_dim,
    )
    assert spec.vocab_size == TEST_MODEL.vocab
    assert spec.max_context == TEST_MODEL.max_context
    assert spec.kv_dtype == "float32" and spec.eos_token_ids


def _symbolic_head_dims(source: Path, target: Path, config: dict[str, object]) -> None:
    """Copy a model, leaving KV head count and head size symbolic in the graph (as many
    exporters do) and writing the given config.json instead of the generator's."""
    shutil.copytree(source, target)
    model = onnx.load(str(target / "model.onnx"))
    for value in [*model.graph.input, *model.graph.output]:
        if value.name.startswith(("past_key_values.", "present.")):
            dims = value.type.tensor_type.shape.dim
            dims[1].dim_param = "num_key_value_heads"
            dims[3].dim_param = "head_dim"
    onnx.save(model, str(target / "model.onnx"))
    (target / "config.json").write_text(json.dumps(config))


def test_llama_style_config_with_grouped_query_attention(model_dir: Path, tmp_path: Path) -> None:
    llama = tmp_path / "llama"
    _symbolic_head_dims(
        model_dir,
        llama,
        {
            "model_type": "llama",
            "num_hidden_layers": TEST_MODEL.layers,
            "num_attention_heads": TEST_MODEL.heads,
            "num_key_value_heads": TEST_MODEL.kv_heads,
            "hidden_size": TEST_MODEL.hidden,
            "vocab_size": TEST_MODEL.vocab,
            "max_position_embeddings": TEST_MODEL.max_context,
            "eos_token_id": 0,
        },
    )
    spec = load_model_spec(llama)
    assert spec.num_kv_heads == TEST_MODEL.kv_heads
    assert spec.head_dim == TEST_MODEL.hidden // TEST_MODEL.heads
    # config.json's stop id, then generation_config.json's (the copied one adds <|end|>).
    end = json.loads((llama / "generation_config.json").read_text())["eos_token_id"][1]
    assert spec.eos_token_ids == (0, end)
    prompt = [5, 17, 99, 3]
    assert greedy(llama, tmp_path / "c1", prompt) == greedy(model_dir, tmp_path / "c2", prompt)


def test_gpt2_style_config_names(tmp_path: Path) -> None:
    plain = SyntheticModelSpec(
        layers=1, hidden=32, heads=2, kv_heads=2, vocab=300, max_context=64, seed=1
    )
    source = tmp_path / "source"
    write_synthetic_model(source, plain)
    gpt2 = tmp_path / "gpt2"
    _symbolic_head_dims(
        source,
        gpt2,
        {
            "model_type": "gpt2",
            "n_layer": 1,
            "n_head": 2,
            "n_embd": 32,
            "vocab_size": 300,
            "n_positions": 64,
            "eos_token_id": 0,
        },
    )
    spec = load_model_spec(gpt2)
    assert (spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.max_context) == (1, 2, 16, 64)
    assert len(greedy(gpt2, tmp_path / "cache", [1, 2, 3], tokens=5)) == 5


def test_graph_and_config_disagreeing_is_refused(model_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    config["num_key_value_heads"] = TEST_MODEL.kv_heads * 2
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="num_kv_heads"):
        load_model_spec(broken)


def test_missing_context_length_is_named(model_dir: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    shutil.copytree(model_dir, bare)
    (bare / "config.json").unlink()
    with pytest.raises(ValueError, match="max_context"):
        load_model_spec(bare)


def test_provider_chain_prefers_tensorrt_with_caches(tmp_path: Path) -> None:
    chain = select_providers(
        ["CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"], tmp_path
    )
    assert [name for name, _ in chain] == [
        "TensorrtExecutionProvider",
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]
    trt = chain[0][1]
    assert trt["trt_engine_cache_enable"] == "True"
    assert trt["trt_timing_cache_enable"] == "True"
    assert Path(trt["trt_engine_cache_path"]).is_dir()
    assert Path(trt["trt_timing_cache_path"]).is_dir()
    assert trt["trt_engine_cache_path"].startswith(str(tmp_path))


def test_provider_chain_falls_back() -> None:
    cuda = select_providers(["CUDAExecutionProvider", "CPUExecutionProvider"], Path("/x"))
    assert [name for name, _ in cuda] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert select_providers(["CPUExecutionProvider"], Path("/x")) == [("CPUExecutionProvider", {})]
    with pytest.raises(RuntimeError):
        select_providers(["AzureExecutionProvider"], Path("/x"))


def test_tokenizer_is_byte_level_with_specials(model_dir: Path) -> None:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    text = "héllo wörld ✓"
    assert tokenizer.decode(tokenizer.encode(text).ids) == text
    assert tokenizer.token_to_id("<|endoftext|>") is not None
    assert tokenizer.get_vocab_size() == TEST_MODEL.vocab
    ids = np.array(tokenizer.encode("<|user|>hi<|end|>").ids)
    assert tokenizer.token_to_id("<|user|>") in ids


def test_streamed_text_does_not_depend_on_how_tokens_are_grouped(model_dir: Path) -> None:
    # The step thread may hand a stream several tokens at once.
    from dataplane.inference.tokenizer import TextTokenizer

    tokenizer = TextTokenizer(model_dir)
    ids = tokenizer.encode("héllo wörld, stream me ✓ please")
    one_by_one = tokenizer.stream()
    grouped = tokenizer.stream()
    expected = "".join(one_by_one.feed([token]) for token in ids)
    assert "".join(grouped.feed(ids[i : i + 3]) for i in range(0, len(ids), 3)) == expected
    assert expected == "héllo wörld, stream me ✓ please"


@pytest.fixture(scope="module")
def instruct_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Llama-like export: BOS post-processor, sampling defaults, no position_ids."""
    directory = tmp_path_factory.mktemp("instruct")
    spec = SyntheticModelSpec(
        layers=1,
        hidden=32,
        heads=2,
        kv_heads=1,
        vocab=300,
        max_context=64,
        position_ids=False,
        bos=True,
    )
    write_synthetic_model(directory, spec, {"temperature": 0.6, "top_k": 20, "top_p": 0.9})
    return directory


def test_text_is_encoded_with_the_tokenizers_own_special_tokens(instruct_dir: Path) -> None:
    from tokenizers import Tokenizer

    from dataplane.inference.synthetic import BOS_TOKEN
    from dataplane.inference.tokenizer import TextTokenizer

    bos = Tokenizer.from_file(str(instruct_dir / "tokenizer.json")).token_to_id(BOS_TOKEN)
    tokenizer = TextTokenizer(instruct_dir)
    ids = tokenizer.encode("Hello there")
    assert ids[0] == bos and ids[1:] == tokenizer.encode("Hello there", add_special_tokens=False)


def test_chat_is_rendered_with_the_models_template(instruct_dir: Path, model_dir: Path) -> None:
    from dataplane.inference.tokenizer import ChatTemplateError, TextTokenizer

    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "w", "arguments": {"q": 1}}}
            ],
        },
        {"role": "tool", "content": "sunny", "tool_call_id": "c1"},
    ]
    instruct = TextTokenizer(instruct_dir)
    assert instruct.has_chat_template
    assert instruct.chat_text(messages) == (
        "<|startoftext|><|system|>Be brief.<|end|><|user|>Weather?<|end|>"
        '<|assistant|>{"name": "w", "arguments": {"q": 1}}<|end|><|tool|>sunny<|end|><|assistant|>'
    )
    # The template writes BOS itself, so encoding the text adds none.
    ids = instruct.render_chat(messages)
    assert ids[1] != ids[0] and ids == instruct.encode(instruct.chat_text(messages), False)
    with pytest.raises(ChatTemplateError, match="Unknown role: critic"):
        instruct.chat_text([{"role": "critic", "content": "x"}])

    # A model without a template gets the built-in one.
    (bare := instruct_dir.parent / "no-template").mkdir(exist_ok=True)
    for name in ("tokenizer.json", "config.json"):
        shutil.copy(model_dir / name, bare / name)
    builtin = TextTokenizer(bare)
    assert not builtin.has_chat_template
    assert builtin.chat_text(messages[:2]) == (
        "<|system|>\nBe brief.<|end|>\n<|user|>\nWeather?<|end|>\n<|assistant|>\n"
    )

    # transformers 4.43 and later save the template as chat_template.jinja, which wins
    # over tokenizer_config.json's as it does when transformers loads the directory.
    (bare / "chat_template.jinja").write_text(
        "{% for m in messages %}[{{ m['role'] }}]{% endfor %}"
    )
    shutil.copy(instruct_dir / "tokenizer_config.json", bare / "tokenizer_config.json")
    saved = TextTokenizer(bare)
    assert saved.has_chat_template and saved.chat_text(messages[:2]) == "[system][user]"


def test_generation_config_adds_stop_ids_and_sampling_defaults(instruct_dir: Path) -> None:
    config = json.loads((instruct_dir / "config.json").read_text())
    generation = json.loads((instruct_dir / "generation_config.json").read_text())
    spec = load_model_spec(instruct_dir)
    assert config["eos_token_id"] == generation["eos_token_id"][0]
    assert spec.eos_token_ids == tuple(generation["eos_token_id"])
    assert (spec.generation.temperature, spec.generation.top_p, spec.generation.top_k) == (
        0.6,
        0.9,
        20,
    )
    assert spec.generation.repetition_penalty is None and not spec.has_position_ids
