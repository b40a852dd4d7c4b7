"""Agents here run as root when the tests do and start their workers as an unprivileged
account, which must reach their state: each test's temporary directory lets it through."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.agent.unprivileged import reachable_tmp


@pytest.fixture
def tmp_path() -> Iterator[Path]:
    with reachable_tmp() as path:
        yield path
