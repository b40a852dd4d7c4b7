from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from dataplane.inference.synthetic import SyntheticModelSpec, write_synthetic_model

# Small enough that a decode step takes well under a millisecond, with grouped-query
# attention (4 heads over 2 KV heads) so that path is exercised everywhere.
TEST_MODEL = SyntheticModelSpec(
    layers=2, hidden=64, heads=4, kv_heads=2, vocab=320, max_context=512, seed=7
)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("model")
    write_synthetic_model(directory, TEST_MODEL)
    return directory


@pytest.fixture(scope="session")
def concat_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test model's weights in the Optimum layout: present = past + new columns."""
    directory = tmp_path_factory.mktemp("model-concat")
    write_synthetic_model(directory, replace(TEST_MODEL, concat_kv=True))
    return directory


@pytest.fixture(scope="session")
def cache_width_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test model's weights in a graph without a position_ids input (Gemma-style)."""
    directory = tmp_path_factory.mktemp("model-cache-width")
    write_synthetic_model(directory, replace(TEST_MODEL, position_ids=False))
    return directory


@pytest.fixture(scope="session")
def all_logits_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The in-place test model returning logits for every position (onnxruntime-genai)."""
    directory = tmp_path_factory.mktemp("model-all-logits")
    write_synthetic_model(directory, replace(TEST_MODEL, all_logits=True))
    return directory
