"""The layering of DESIGN.md §1 and the typing of agent/ and dataplane/ hold."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def test_import_contracts_are_kept() -> None:
    done = subprocess.run([BIN / "lint-imports"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_agent_and_dataplane_pass_mypy_strict() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "agent", "dataplane"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_code_is_linted_and_formatted() -> None:
    for argv in (["check", "."], ["format", "--check", "."]):
        done = subprocess.run([BIN / "ruff", *argv], cwd=REPO, capture_output=True, text=True)
        assert done.returncode == 0, f"ruff {' '.join(argv)}:\n{done.stdout}{done.stderr}"
