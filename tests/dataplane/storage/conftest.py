"""Fixtures for the storage tests: an SPDK target (emulated, or real when asked).

Without environment variables the contract tests run against `SpdkEmulator`. With
`SPDK_RPC_SOCKET=/path/to/spdk.sock` they run against that running spdk_tgt instead
(start one with `spdk_tgt --no-huge -s 1024 -u -r /path/to/spdk.sock`). The
save/restore test restarts the target; for a real one it needs `SPDK_TGT_BIN` (the
spdk_tgt binary, default `spdk_tgt` on PATH) and the RDMA test needs a target with
an RDMA-capable NIC (`SPDK_RDMA=1`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from spdk.rpc.client import JSONRPCClient

from dataplane.storage.engine import StorageSpec
from dataplane.storage.spdk import SpdkEngine

from .spdk_emulator import SpdkEmulator


class Target:
    """The SPDK target under test and how to restart it from a saved config."""

    def __init__(self, socket: Path, emulator: SpdkEmulator | None) -> None:
        self.socket = socket
        self.emulator = emulator
        self.real = emulator is None
        self.rdma_capable = os.environ.get("SPDK_RDMA") == "1" if self.real else True
        self._process: subprocess.Popen[bytes] | None = None

    def restart(self, config: Path) -> None:
        """Stop the target and start it again with `--json config`."""
        if self.emulator is not None:
            self.emulator.stop()
            self.emulator = SpdkEmulator(
                self.socket, config=config, nvme_devices=self.emulator.nvme_devices
            ).start()
            return
        binary = shutil.which(os.environ.get("SPDK_TGT_BIN", "spdk_tgt"))
        assert binary, "set SPDK_TGT_BIN to the spdk_tgt binary so the test can restart it"
        with JSONRPCClient(str(self.socket)) as client:
            client.call("spdk_kill_instance", {"sig_name": "SIGTERM"})
        _wait(lambda: not self.socket.exists(), "spdk_tgt to exit")
        self._process = subprocess.Popen(
            [binary, "--no-huge", "-s", "1024", "-u", "-r", str(self.socket), "--json", str(config)]
        )
        _wait(self.socket.exists, "spdk_tgt to open its RPC socket")
        with JSONRPCClient(str(self.socket), conn_retries=50) as client:
            client.call("framework_wait_init")


def _wait(condition: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short directory: Unix socket paths must stay under 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="tg-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def target(short_dir: Path) -> Iterator[Target]:
    real = os.environ.get("SPDK_RPC_SOCKET")
    if real:
        yield Target(Path(real), None)
        return
    emulator = SpdkEmulator(short_dir / "spdk.sock").start()
    tgt = Target(emulator.socket_path, emulator)
    yield tgt
    if tgt.emulator is not None:
        tgt.emulator.stop()


@pytest.fixture
def engine(target: Target) -> Iterator[SpdkEngine]:
    """An engine on the target; whatever a test created is removed afterwards."""
    eng = SpdkEngine(target.socket)
    yield eng
    eng.close()
    cleanup = SpdkEngine(target.socket)
    cleanup.reconcile(StorageSpec())
    cleanup.close()
