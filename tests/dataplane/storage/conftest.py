"""Fixtures for the storage tests: an SPDK target per test, real when one is given.

With `SPDK_TGT_BIN` set to a spdk_tgt binary (`../shared/spdk/install.sh` prints one;
`.ci/run` sets it), every test that asks for `target` starts its own spdk_tgt (the demo's
command line, `processes.spdk_target`, on a socket in a temporary directory) and stops it
afterwards, so no process, bdev, socket or DPDK runtime folder outlives the test. Without
it they run against `SpdkEmulator`, which answers as spdk_tgt v26.05 does. The test ids name the target
(`[SPDK v26.05]` or `[emulator]`). Set `SPDK_RDMA=1` when that spdk_tgt's machine has an
RDMA-capable NIC.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from spdk.rpc.client import JSONRPCClient

from controlplane.processes import dpdk_runtime_dir, spdk_target
from dataplane.storage.engine import StorageSpec
from dataplane.storage.spdk import SpdkEngine

from .spdk_emulator import SpdkEmulator

SPDK_TGT = os.environ.get("SPDK_TGT_BIN") or None
STOP_TIMEOUT_S = 30.0


def target_name() -> str:
    """What `target` runs: spdk_tgt's version, or `emulator`."""
    if SPDK_TGT is None:
        return "emulator"
    found = subprocess.run([SPDK_TGT, "--version"], capture_output=True, text=True, check=True)
    return found.stdout.strip()


TARGET = target_name()


def unused_port() -> int:
    """A TCP port free on 127.0.0.1 now, for an NVMe/TCP listener."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Target:
    """The SPDK target of one test: a spdk_tgt process it owns, or the emulator."""

    def __init__(self, socket_path: Path) -> None:
        self.socket = socket_path
        self.real = SPDK_TGT is not None
        self.rdma_capable = os.environ.get("SPDK_RDMA") == "1" if self.real else False
        self.emulator: SpdkEmulator | None = None
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, config: Path | None = None) -> Target:
        """Start the target, replaying `config` (a saved configuration) when given."""
        if SPDK_TGT is None:
            self.emulator = SpdkEmulator(self.socket, config=config).start()
            return self
        replay = ["--json", str(config)] if config else []
        with open(self.socket.with_suffix(".log"), "ab") as log:
            self._process = subprocess.Popen(
                [*spdk_target(Path(SPDK_TGT), self.socket), *replay],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        # connecting retries until spdk_tgt opens its socket (0.2 s apart, 60 s in all)
        with JSONRPCClient(str(self.socket), conn_retries=300) as client:
            client.call("framework_wait_init")
        return self

    def stop(self) -> None:
        """Stop the target as an operator would (SIGTERM), killing it if it hangs."""
        if self.emulator is not None:
            self.emulator.stop()
            self.emulator = None
        if self._process is not None:
            process, self._process = self._process, None
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                raise
            finally:
                self.socket.unlink(missing_ok=True)
                shutil.rmtree(dpdk_runtime_dir(process.pid), ignore_errors=True)

    def restart(self, config: Path) -> None:
        """Stop the target and start it again with `--json config`."""
        self.stop()
        self.start(config)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short directory: Unix socket paths must stay under 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="tg-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(params=[TARGET])
def target(short_dir: Path) -> Iterator[Target]:
    """A fresh target, stopped after the test; the param (test id) says which kind."""
    tgt = Target(short_dir / "spdk.sock")
    try:
        yield tgt.start()
    finally:
        tgt.stop()
    assert not tgt.socket.exists(), f"the target left its socket {tgt.socket} behind"


@pytest.fixture
def engine(target: Target) -> Iterator[SpdkEngine]:
    """An engine on the target; whatever a test created is removed afterwards."""
    eng = SpdkEngine(target.socket)
    yield eng
    eng.close()
    cleanup = SpdkEngine(target.socket)
    cleanup.reconcile(StorageSpec())
    left = [b["name"] for b in cleanup.call("bdev_get_bdevs")]
    cleanup.close()
    assert not left, f"an empty spec left bdevs behind: {left}"
