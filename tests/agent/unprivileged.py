"""What tests that run as root need to start workers as an unprivileged account: a Python
that account can run, and temporary directories it can enter."""

from __future__ import annotations

import atexit
import functools
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agent.privileges import WorkerAccount

NOBODY = pwd.getpwnam("nobody")
ACCOUNT = WorkerAccount("nobody", NOBODY.pw_uid, NOBODY.pw_gid)


@dataclass(frozen=True)
class Interpreter:
    """A Python to start agents with, and what its environment must hold."""

    python: str
    env: dict[str, str] = field(default_factory=dict)


def runs_workers(interpreter: Interpreter) -> bool:
    """Whether `nobody` can run the interpreter with the worker's code."""
    try:
        done = subprocess.run(
            [interpreter.python, "-c", "import dataplane.inference.server"],
            user=ACCOUNT.uid,
            group=ACCOUNT.gid,
            extra_groups=[],
            cwd="/",
            env={**os.environ, **interpreter.env},
            capture_output=True,
            timeout=120,
            check=False,
        )
    except OSError:
        return False
    return done.returncode == 0


@functools.cache
def worker_interpreter() -> Interpreter:
    """This interpreter when `nobody` can run it, or when the tests are not root (an agent
    that is not root runs workers as itself).

    Otherwise (pyenv keeps interpreters in a home directory no one else may enter) the same
    interpreter hard-linked into a temporary directory, its standard library included and
    this environment's packages linked in: the very same files, reachable by others. The
    test is skipped where that cannot be made (another file system)."""
    here = Interpreter(sys.executable)
    if os.geteuid() != 0 or runs_workers(here):
        return here
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    base = Path(sys.base_prefix)
    view = Path(tempfile.mkdtemp(prefix="tailguard-python-"))
    atexit.register(shutil.rmtree, view, ignore_errors=True)
    view.chmod(0o755)
    try:
        (view / "bin").mkdir()
        os.link(Path(sys._base_executable).resolve(), view / "bin" / version)  # noqa: SLF001
        (view / "lib").mkdir()
        for library in base.glob("lib/libpython*.so.*"):
            os.link(library, view / "lib" / library.name)
        shutil.copytree(
            base / "lib" / version,
            view / "lib" / version,
            copy_function=os.link,
            ignore=shutil.ignore_patterns("site-packages", "test"),
        )
    except OSError as exc:
        pytest.skip(f"nobody cannot run {sys.executable}, nor a linked copy of it: {exc}")
    (view / "lib" / version / "site-packages").symlink_to(
        Path(sys.prefix) / "lib" / version / "site-packages"
    )
    linked = Interpreter(str(view / "bin" / version), {"LD_LIBRARY_PATH": str(view / "lib")})
    if not runs_workers(linked):
        pytest.skip(f"nobody can run neither {sys.executable} nor its linked copy")
    return linked


@contextmanager
def reachable_tmp() -> Iterator[Path]:
    """A temporary directory others may pass through (0711) but not list, outside pytest's
    own, which are 0700 and which any pytest session that starts closes again."""
    path = Path(tempfile.mkdtemp(prefix="tailguard-test-"))
    path.chmod(0o711)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def process_ids(pid: int) -> tuple[int, int]:
    """(effective uid, effective gid) of a running process, from /proc."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return int(fields["Uid"].split()[1]), int(fields["Gid"].split()[1])


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="starts workers as another account")
