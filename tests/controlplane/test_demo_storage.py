"""The demo's storage: SPDK when it is found (a pool on a file, an export to its reader), the
local engine otherwise, seeded idempotently, and a reader that is started again until
stopped. The demo itself runs both ways in tests/e2e/test_demo.py."""

from __future__ import annotations

import stat
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from agent.protocol import PoolSpec
from controlplane import demo_storage
from controlplane.demo_storage import DemoStorage, SpdkBinaries, SpdkDemoStorage, find_spdk
from controlplane.storage.models import Export, Pool, Volume
from tests.controlplane.conftest import World
from tests.controlplane.storage_helpers import ready_node

MIB = 1 << 20


def executable(path: Path) -> Path:
    path.write_text("#!/bin/sh\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_spdk_is_found_by_spdk_tgt_bin_or_on_path_with_its_reader_beside_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    target = executable(bin_dir / "spdk_tgt")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setenv("SPDK_TGT_BIN", str(target))
    assert find_spdk() is None  # no spdk_nvme_perf beside it: nothing would read the volume
    perf = executable(bin_dir / "spdk_nvme_perf")
    assert find_spdk() == SpdkBinaries(target, perf)
    monkeypatch.delenv("SPDK_TGT_BIN")
    assert find_spdk() is None
    monkeypatch.setenv("PATH", str(bin_dir))
    assert find_spdk() == SpdkBinaries(target, perf)


def test_a_local_demo_pool_is_probed_and_an_spdk_one_is_exported_to_its_reader(
    world: World, tmp_path: Path
) -> None:
    node = ready_node("demo-node", world.tenant_a)
    local = DemoStorage(tmp_path)
    volume = local.seed(world.tenant_a, node)
    assert (volume.pool.kind, volume.read_probe_per_s) == ("local", 200)
    assert volume.pool.directory == str(tmp_path / "pools" / "demo")
    assert local.seed(world.tenant_a, node) == volume  # idempotent
    assert "in local pool 'demo': 200 probe reads/s under QoS 1000 IOPS" in local.describe(volume)

    # the next run finds SPDK: the pool moves to a file, volume and all, and is exported
    spdk = SpdkDemoStorage(tmp_path, SpdkBinaries(Path("/spdk/spdk_tgt"), Path("/spdk/perf")))
    for _ in range(2):
        volume = spdk.seed(world.tenant_a, node)
        pool = Pool.objects.get(node=node, name="demo")
        assert pool.spec() == PoolSpec(
            name="demo",
            kind="spdk",
            aio_path=str(tmp_path / "spdk" / "demo-pool.img"),
            capacity_bytes=256 * MIB,
        )
        assert (volume.pool, volume.read_probe_per_s, volume.qos_policy.rw_ios_per_sec) == (
            pool,
            0,
            1000,
        )
        assert Export.objects.get(tenant=world.tenant_a).hosts == [demo_storage.READER_NQN]
    assert Volume.objects.filter(tenant=world.tenant_a).count() == 1
    assert spdk.agent_env == {
        "TAILGUARD_AGENT_SPDK_RPC_SOCKET": str(tmp_path / "spdk" / "spdk.sock"),
        "TAILGUARD_AGENT_NVMF_LISTEN_ADDRESS": "127.0.0.1",
        "TAILGUARD_AGENT_NVMF_LISTEN_PORT": str(spdk.port),
    }
    assert spdk.target_argv is not None and spdk.target_argv[:4] == [
        "nice",
        "-n",
        "19",
        "/spdk/spdk_tgt",
    ]
    assert "in SPDK pool 'demo' (a file; spdk_tgt at nice 19)" in spdk.describe(volume)


def test_the_reader_is_started_again_until_it_is_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader that exits is run again; stopping kills the one running and starts no more."""
    monkeypatch.setattr(demo_storage, "RESTART_DELAY_S", 0.0)
    runs = tmp_path / "runs"
    script = (
        "import pathlib, sys, time\n"
        f"runs = pathlib.Path({str(runs)!r})\n"
        "runs.open('a').write('run\\n')\n"
        "if len(runs.read_text().splitlines()) < 3:\n"
        "    sys.exit(1)\n"
        "time.sleep(600)\n"
    )
    reader = demo_storage._Reader([sys.executable, "-c", script], tmp_path / "reader.log")
    reader.start()
    deadline = time.monotonic() + 60  # a guard against a reader never restarted, not a timing
    while not runs.exists() or len(runs.read_text().splitlines()) < 3:
        assert time.monotonic() < deadline and reader.is_alive()
        time.sleep(0.05)
    running: Any = reader._proc
    reader.stop()
    assert not reader.is_alive()
    assert running.poll() is not None  # killed, not left to sleep
    assert len(runs.read_text().splitlines()) == 3
