"""Real data-plane server processes for tests and benchmarks: the part the worker and the
gateway share.

``ServerProcess`` writes a JSON config, starts ``python -m MODULE --config PATH`` and
waits until the subclass's ``ready`` says so; leaving the context stops it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]


class ServerProcess(ABC):
    """A server subprocess until the context exits; ``name`` names its files."""

    module = ""
    name = ""

    def __init__(self, config: dict[str, Any], workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.config_path = workdir / f"{self.name}.json"
        self.log_path = workdir / f"{self.name}.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self.write_config(config)

    def write_config(self, config: dict[str, Any]) -> None:
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(config))
        os.replace(tmp, self.config_path)

    def arguments(self) -> list[str]:
        """Command-line arguments beyond the config and the log level."""
        return []

    @abstractmethod
    def ready(self) -> bool:
        """Whether the started process serves; an HTTP error counts as not yet."""

    def __enter__(self) -> Self:
        self.start()
        return self

    def start(self) -> None:
        log = self.log_path.open("ab")
        self._proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                self.module,
                "--config",
                str(self.config_path),
                *self.arguments(),
                "--log-level",
                "warning",
            ],
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.log_path.read_text()}")
            try:
                if self.ready():
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} did not become ready: {self.log_path.read_text()}")

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()

    @property
    def pid(self) -> int:
        assert self._proc is not None, f"start the {self.name} first"
        return self._proc.pid

    def cpu_seconds(self) -> float:
        """User plus system CPU time the process has used so far (Linux ``/proc``)."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        # utime and stime are the stat file's 14th and 15th fields; two were before ")".
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def kill(self) -> None:
        """Die at once, as a crash would."""
        assert self._proc is not None, f"start the {self.name} first"
        self._proc.send_signal(signal.SIGKILL)
        self._proc.wait()

    def pause(self) -> None:
        """Stop running (SIGSTOP), as a process stalled by its machine would."""
        assert self._proc is not None, f"start the {self.name} first"
        self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self._proc is not None, f"start the {self.name} first"
        self._proc.send_signal(signal.SIGCONT)

    def signal_reload(self) -> None:
        assert self._proc is not None, f"start the {self.name} first"
        self._proc.send_signal(signal.SIGHUP)
