from __future__ import annotations

from tests.dataplane.inference.conftest import model_dir

__all__ = ["model_dir"]
