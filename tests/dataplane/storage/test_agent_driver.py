"""The agent's storage driver and model staging on real engines: LocalEngine on a temporary
directory and SpdkEngine against spdk_tgt (when SPDK_TGT_BIN names one) or the emulator.

(Agent code, tested here beside the engines' fixtures.)
"""

from __future__ import annotations

import hashlib
import io
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.cli import main
from agent.protocol import (
    EXPORT_NQN_PREFIX,
    ArtifactRef,
    Components,
    ExportSpec,
    PoolSpec,
    QosSpec,
    TenantServing,
    VolumeSpec,
    WorkerSpec,
    export_nqn,
)
from agent.staging import ModelStager, credential_headers
from agent.storage import StorageDriver, storage_spec
from agent.supervisor import materialize_model
from dataplane.storage.local import LocalEngine
from dataplane.storage.spdk import SpdkEngine

from .conftest import Target, unused_port
from .range_server import RangeServer
from .spdk_emulator import SpdkEmulator

MIB = 1 << 20
TENANT = uuid.UUID("0b7f5d55-7f37-4e9e-8b1c-2a5b0e4c6d01")
NODE = uuid.UUID("6f1c1b8e-3a43-4c1e-9a59-0d7c2f0f4b11")
HOST = "nqn.2014-08.org.nvmexpress:uuid:0a0a0a0a-0000-4000-8000-00000000000a"
PCI = "0000:5e:00.0"


def local_components(pool_dir: Path, volume_bytes: int = 8 * MIB) -> Components:
    return Components(
        pools=[
            PoolSpec(name="models", kind="local", directory=str(pool_dir), capacity_bytes=64 * MIB)
        ],
        volumes=[VolumeSpec(name="v-1", tenant_id=TENANT, pool="models", size_bytes=volume_bytes)],
        qos=[
            QosSpec(
                volume="v-1",
                rw_ios_per_sec=2000,
                rw_mbytes_per_sec=0,
                r_mbytes_per_sec=100,
                w_mbytes_per_sec=0,
            )
        ],
    )


async def test_local_engine_converges_idempotently_and_reports(tmp_path: Path) -> None:
    engine = LocalEngine(tmp_path / "root")
    driver = StorageDriver(engine, "local")
    components = local_components(tmp_path / "pool")
    for _ in range(2):
        results = await driver.apply(components)
        assert [(r.kind, r.name, r.ok) for r in results] == [
            ("pool", "models", True),
            ("volume", "v-1", True),
            ("qos", "v-1", True),
        ]
    (volume,) = engine.observe().volumes
    assert (volume.tenant, volume.size_bytes, volume.qos.rw_ios_per_sec) == (
        TENANT.hex,
        8 * MIB,
        2000,
    )
    assert driver.file_volumes is engine

    first, second = driver.report(NODE), driver.report(NODE)
    assert first.engine == "local" and first.node_id == NODE
    assert [(p.name, p.capacity_bytes, p.free_bytes) for p in first.pools] == [
        ("models", 64 * MIB, 56 * MIB)
    ]
    assert first.volumes == []  # the first sample is the baseline of the rates
    assert [(v.name, v.pool, v.read_iops) for v in second.volumes] == [("v-1", "models", 0.0)]


async def test_a_refused_spec_fails_every_storage_component_and_changes_nothing(
    tmp_path: Path,
) -> None:
    engine = LocalEngine(tmp_path / "root")
    driver = StorageDriver(engine, "local")
    results = await driver.apply(local_components(tmp_path / "pool", volume_bytes=128 * MIB))
    assert {r.ok for r in results} == {False}
    assert "pool models has" in (results[1].error or "")
    assert engine.observe().volumes == ()

    spdk_pool = Components(pools=[PoolSpec(name="nvme0", kind="spdk", device=PCI)])
    (result,) = await driver.apply(spdk_pool)
    assert not result.ok and "runs on the local engine" in (result.error or "")


@pytest.fixture
def nvme_target(short_dir: Path) -> Iterator[SpdkEmulator]:
    drive = short_dir / "nvme0.img"
    drive.write_bytes(b"")
    with drive.open("r+b") as f:
        f.truncate(64 * MIB)
    emulator = SpdkEmulator(
        short_dir / "spdk.sock", nvme_devices={PCI: drive}, rdma_capable=True
    ).start()
    yield emulator
    emulator.stop()


@pytest.mark.parametrize(("rdma", "transport"), [(True, "rdma"), (False, "tcp")])
async def test_spdk_exports_use_the_transport_the_node_can_offer(
    nvme_target: SpdkEmulator, short_dir: Path, rdma: bool, transport: str
) -> None:
    engine = SpdkEngine(
        nvme_target.socket_path, rdma_port_active=rdma, nqn_prefix=EXPORT_NQN_PREFIX
    )
    driver = StorageDriver(
        engine, "spdk", listen_address="127.0.0.1", config_path=short_dir / "spdk-config.json"
    )
    components = Components(
        pools=[PoolSpec(name="nvme0", kind="spdk", device=PCI)],
        volumes=[VolumeSpec(name="v-1", tenant_id=TENANT, pool="nvme0", size_bytes=8 * MIB)],
        exports=[ExportSpec(volume="v-1", tenant_id=TENANT, nqn=export_nqn(TENANT), hosts=[HOST])],
        qos=[
            QosSpec(
                volume="v-1",
                rw_ios_per_sec=3000,
                rw_mbytes_per_sec=0,
                r_mbytes_per_sec=0,
                w_mbytes_per_sec=50,
            )
        ],
    )
    try:
        results = await driver.apply(components)
        assert all(r.ok for r in results), results
        assert [r.kind for r in results] == ["pool", "volume", "export", "qos"]
        assert "bdev_nvme_attach_controller" in (short_dir / "spdk-config.json").read_text()
        report = driver.report(NODE)
        (pool,) = report.pools
        assert pool.name == "nvme0" and 0 < pool.free_bytes < pool.capacity_bytes <= 64 * MIB
        (endpoint,) = report.exports
        assert (endpoint.tenant_id, endpoint.nqn, endpoint.transport, str(endpoint.address)) == (
            TENANT,
            export_nqn(TENANT),
            transport,
            "127.0.0.1",
        )
        assert (await driver.apply(components)) == results  # idempotent

        wrong = components.model_copy(
            update={
                "exports": [
                    components.exports[0].model_copy(update={"nqn": "nqn.2024-01.io.example:other"})
                ]
            }
        )
        assert {r.ok for r in await driver.apply(wrong)} == {False}
    finally:
        engine.close()


async def test_an_spdk_pool_on_a_file_needs_no_nvme_drive(target: Target, short_dir: Path) -> None:
    """A machine without a spare NVMe drive (a laptop, the demo) gets an SPDK pool on a file
    the engine creates at the pool's capacity; its volume is limited and exported as on a
    drive, on the port the agent was given."""
    disk = short_dir / "pool.img"
    port = unused_port()
    engine = SpdkEngine(target.socket, nqn_prefix=EXPORT_NQN_PREFIX)
    driver = StorageDriver(engine, "spdk", listen_address="127.0.0.1", listen_port=port)
    components = Components(
        pools=[PoolSpec(name="file0", kind="spdk", aio_path=str(disk), capacity_bytes=64 * MIB)],
        volumes=[VolumeSpec(name="v-1", tenant_id=TENANT, pool="file0", size_bytes=8 * MIB)],
        exports=[ExportSpec(volume="v-1", tenant_id=TENANT, nqn=export_nqn(TENANT), hosts=[HOST])],
        qos=[
            QosSpec(
                volume="v-1",
                rw_ios_per_sec=1000,
                rw_mbytes_per_sec=0,
                r_mbytes_per_sec=20,
                w_mbytes_per_sec=0,
            )
        ],
    )
    try:
        results = await driver.apply(components)
        assert all(r.ok for r in results), results
        assert disk.stat().st_size == 64 * MIB
        assert not engine.reconcile(storage_spec(components, "spdk", "127.0.0.1", port)).changed
        (volume,) = engine.observe().volumes
        assert (volume.size_bytes, volume.qos.rw_ios_per_sec, volume.qos.r_mbytes_per_sec) == (
            8 * MIB,
            1000,
            20,
        )
        report = driver.report(NODE)
        (pool,) = report.pools
        assert (pool.name, pool.capacity_bytes - pool.free_bytes) == ("file0", 8 * MIB)
        (endpoint,) = report.exports
        assert (endpoint.transport, str(endpoint.address), endpoint.port) == (
            "tcp",
            "127.0.0.1",
            port,
        )
        assert all(r.ok for r in await driver.apply(Components()))
        assert engine.call("bdev_get_bdevs") == []  # the file's bdev went with its pool
    finally:
        engine.close()


def model_archive(tmp_path: Path) -> tuple[Path, str]:
    archive = tmp_path / "model.tar"
    with tarfile.open(archive, "w") as tar:
        for name, size in (
            ("model.onnx", 3 * MIB + 17),
            ("config.json", 40),
            ("tokenizer.json", 9000),
        ):
            info = tarfile.TarInfo(name)
            info.size = size
            tar.addfile(info, io.BytesIO(bytes(range(256)) * (size // 256) + b"x" * (size % 256)))
    return archive, hashlib.sha256(archive.read_bytes()).hexdigest()


def test_stage_command_refetches_a_corrupted_download_and_unpacks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    archive, sha256 = model_archive(tmp_path)
    dest = tmp_path / "staged"
    with RangeServer(archive) as server:
        server.corrupt_offset, server.corrupt_times = MIB, 1
        code = main(
            [
                "stage",
                "--artifact-url",
                server.url,
                "--sha256",
                sha256,
                "--size",
                str(archive.stat().st_size),
                "--dest",
                str(dest),
                "--state-dir",
                str(tmp_path / "no-agent-here"),
            ]
        )
        fetches = server.requests
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.strip() == str(dest / "model")
    assert (dest / "model" / "model.onnx").stat().st_size == 3 * MIB + 17
    assert (dest / "model.tar.sha256").read_text().strip() == sha256
    assert fetches.count(f"bytes=0-{archive.stat().st_size - 1}") == 2  # rejected, fetched again
    assert "staging" in err  # the progress bar


def test_a_workers_model_is_staged_into_its_volume(tmp_path: Path) -> None:
    archive, sha256 = model_archive(tmp_path)
    engine = LocalEngine(tmp_path / "root")
    engine.reconcile(storage_spec(local_components(tmp_path / "pool"), "local", "0.0.0.0"))
    with RangeServer(archive) as server:
        spec = WorkerSpec(
            replica_id=uuid.uuid4(),
            deployment_id=uuid.uuid4(),
            tenant_id=TENANT,
            model_name="m",
            artifact=ArtifactRef(uri=server.url, sha256=sha256, size_bytes=archive.stat().st_size),
            runtime_options={},
            gpu_indices=[],
            port=18000,
            max_batch_size=1,
            max_tokens_per_step=8,
            max_queue_delay_ms=0,
            max_queue_len=1,
            volume="v-1",
            tenants=[TenantServing(tenant_id=TENANT, weight=1.0, priority=0, key_hashes=[])],
        )
        stager = ModelStager(engine, "http://control-plane.example", "tgn_" + "x" * 40)
        model_dir, cache_dir = materialize_model(spec, tmp_path / "work", stager)
        volume = engine.volume_path("v-1")
        assert (model_dir, cache_dir) == (volume / "model", volume / "trt-cache")
        assert (model_dir / "tokenizer.json").stat().st_size == 9000
        assert materialize_model(spec, tmp_path / "work", stager) == (model_dir, cache_dir)
        assert server.requests == [f"bytes=0-{archive.stat().st_size - 1}"]  # staged once

        with pytest.raises(ValueError, match="needs a volume"):
            materialize_model(spec.model_copy(update={"volume": None}), tmp_path / "work", stager)


def test_the_node_credential_goes_to_the_control_plane_only() -> None:
    cp = "https://cp.example:8443"
    assert credential_headers(f"{cp}/api/v1/agent/artifacts/1/", cp + "/", "tgn_secret") == {
        "Authorization": "Node tgn_secret"
    }
    assert credential_headers("https://cp.example:8443.evil/x", cp, "tgn_secret") == {}
    assert credential_headers("https://models.example/m.tar", cp, "tgn_secret") == {}
