"""Staging model artifacts from a real local HTTP server into a LocalEngine volume."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from dataplane.storage.artifacts import (
    ArtifactError,
    ArtifactIntegrityError,
    ArtifactSource,
    ProgressCallback,
    stage_artifact,
    unpack_archive,
)
from dataplane.storage.engine import PoolSpec, QuotaExceeded, StorageSpec, VolumeSpec
from dataplane.storage.local import LocalEngine

from .range_server import RangeServer

MIB = 1 << 20
TOKEN = "node-credential"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SIZE = 5 * MIB + 1234  # not a multiple of 4 KiB: exercises the padded tail


@pytest.fixture
def payload(tmp_path: Path) -> Path:
    path = tmp_path / "served.bin"
    path.write_bytes(os.urandom(SIZE))
    return path


@pytest.fixture
def server(payload: Path) -> Iterator[RangeServer]:
    with RangeServer(payload, token=TOKEN) as srv:
        yield srv


@pytest.fixture
def engine(tmp_path: Path) -> LocalEngine:
    eng = LocalEngine(tmp_path / "root")
    eng.reconcile(
        StorageSpec(
            pools=(
                PoolSpec(name="models", directory=str(tmp_path / "pool"), capacity_bytes=64 * MIB),
            ),
            volumes=(
                VolumeSpec(name="llama", pool="models", tenant="acme", size_bytes=16 * MIB),
                VolumeSpec(name="tiny", pool="models", tenant="acme", size_bytes=MIB),
            ),
        )
    )
    return eng


def source(server: RangeServer, payload: Path) -> ArtifactSource:
    return ArtifactSource(
        url=server.url, sha256=hashlib.sha256(payload.read_bytes()).hexdigest(), size_bytes=SIZE
    )


def stage(
    engine: LocalEngine,
    server: RangeServer,
    payload: Path,
    *,
    range_bytes: int = 2 * MIB,
    retries: int = 3,
    on_progress: ProgressCallback | None = None,
) -> Path:
    return stage_artifact(
        engine,
        "llama",
        "llama/model.onnx",
        source(server, payload),
        headers=AUTH,
        on_progress=on_progress,
        range_bytes=range_bytes,
        buffer_bytes=MIB,
        retries=retries,
        retry_delay_s=0.0,
    )


def ranges_started(server: RangeServer) -> list[int]:
    return [int((r or "bytes=0-").split("=")[1].split("-")[0]) for r in server.requests]


def test_stages_in_ranges_with_progress_and_is_a_no_op_afterwards(
    engine: LocalEngine, server: RangeServer, payload: Path
) -> None:
    progress: list[tuple[int, int]] = []
    path = stage(
        engine, server, payload, on_progress=lambda done, total: progress.append((done, total))
    )
    assert path == engine.volume_path("llama") / "llama" / "model.onnx"
    assert path.read_bytes() == payload.read_bytes()
    assert server.requests == [
        "bytes=0-2097151",
        "bytes=2097152-4194303",
        f"bytes=4194304-{SIZE - 1}",
    ]
    assert progress[-1] == (SIZE, SIZE)
    assert [done for done, _ in progress] == sorted(done for done, _ in progress)
    assert not (path.parent / "model.onnx.partial").exists()
    assert not (path.parent / "model.onnx.partial.json").exists()

    stats = engine.stats(), engine.stats()
    assert stats[1]["llama"].write_iops == 0  # baseline taken after the writes
    server.requests.clear()
    assert stage(engine, server, payload) == path
    assert server.requests == []  # verified marker: nothing fetched again


def test_writes_go_through_the_engine_counters(
    engine: LocalEngine, server: RangeServer, payload: Path
) -> None:
    engine.stats()
    stage(engine, server, payload)
    written = engine.stats()["llama"]
    assert written.write_iops > 0 and written.mean_write_latency_us > 0


def test_wrong_credentials_fail_without_discarding(
    engine: LocalEngine, server: RangeServer, payload: Path
) -> None:
    with pytest.raises(ArtifactError, match="HTTP 401") as caught:
        stage_artifact(
            engine,
            "llama",
            "m.bin",
            source(server, payload),
            headers={"Authorization": "Bearer nope"},
        )
    assert not isinstance(caught.value, ArtifactIntegrityError)


def test_interrupted_download_resumes_where_it_stopped(
    engine: LocalEngine, server: RangeServer, payload: Path
) -> None:
    server.drop_after = MIB + 5000  # connection dies inside the first range
    with pytest.raises(ArtifactError, match="resumes there"):
        stage(engine, server, payload, retries=0)
    partial = engine.volume_path("llama") / "llama" / "model.onnx.partial"
    state = json.loads(partial.with_name("model.onnx.partial.json").read_text())
    committed = state["committed_bytes"]
    assert committed == MIB + 4096  # whole 4 KiB blocks received before the drop are kept
    assert partial.exists()

    server.requests.clear()
    path = stage(engine, server, payload)
    assert ranges_started(server)[0] == committed
    assert path.read_bytes() == payload.read_bytes()


def test_dropped_connection_is_retried_within_one_call(
    engine: LocalEngine, server: RangeServer, payload: Path
) -> None:
    server.drop_after = 3 * MIB
    path = stage(engine, server, payload, range_bytes=64 * MIB)
    assert ranges_started(server) == [0, 3 * MIB]
    assert path.read_bytes() == payload.read_bytes()


def test_corrupted_artifact_is_rejected_and_fetched_again(
    engine: LocalEngine, server: RangeServer, payload: Path
) -> None:
    server.corrupt_offset, server.corrupt_times = 3 * MIB + 7, 1
    path = stage(engine, server, payload)
    assert ranges_started(server).count(0) == 2  # discarded and fetched from the start
    assert path.read_bytes() == payload.read_bytes()


def test_persistently_corrupted_artifact_leaves_nothing(
    engine: LocalEngine, server: RangeServer, payload: Path
) -> None:
    server.corrupt_offset, server.corrupt_times = 10, 99
    with pytest.raises(ArtifactIntegrityError, match="sha256"):
        stage(engine, server, payload)
    assert list((engine.volume_path("llama") / "llama").iterdir()) == []


@pytest.mark.parametrize("honor_range", [True, False])
def test_truncated_artifact_is_rejected(
    engine: LocalEngine, server: RangeServer, payload: Path, honor_range: bool
) -> None:
    server.truncate_to = SIZE - 5000
    server.honor_range = honor_range
    with pytest.raises(ArtifactIntegrityError, match="truncated"):
        stage(engine, server, payload)
    assert list((engine.volume_path("llama") / "llama").iterdir()) == []


def test_server_without_range_support_still_resumes(
    engine: LocalEngine, server: RangeServer, payload: Path
) -> None:
    server.drop_after = 2 * MIB + 100
    server.honor_range = False
    path = stage(engine, server, payload, range_bytes=64 * MIB)
    assert len(server.requests) == 2  # the second full body is skipped up to the resume point
    assert path.read_bytes() == payload.read_bytes()


def test_artifact_larger_than_the_volume_hits_the_quota(
    engine: LocalEngine, server: RangeServer, payload: Path
) -> None:
    with pytest.raises(QuotaExceeded):
        stage_artifact(engine, "tiny", "m.bin", source(server, payload), headers=AUTH)


def test_server_errors_are_retried(engine: LocalEngine, server: RangeServer, payload: Path) -> None:
    server.fail_with = 503
    path = stage(engine, server, payload)
    assert ranges_started(server)[:2] == [0, 0]
    assert path.read_bytes() == payload.read_bytes()


def test_empty_artifact(engine: LocalEngine, server: RangeServer) -> None:
    empty = ArtifactSource(url=server.url, sha256=hashlib.sha256(b"").hexdigest(), size_bytes=0)
    path = stage_artifact(engine, "llama", "empty.bin", empty, headers=AUTH)
    assert path.read_bytes() == b"" and server.requests == []


def _tar(path: Path, files: dict[str, bytes], link: str | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if link:
            info = tarfile.TarInfo(link)
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
    return path


def test_unpack_writes_regular_files_within_the_quota_once(engine: LocalEngine) -> None:
    volume = engine.volume_path("llama")
    files = {"model.onnx": os.urandom(MIB + 5), "sub/config.json": b"{}"}
    _tar(volume / "m.tar", files)
    dest = unpack_archive(engine, "llama", "m.tar", "model", "a" * 64)
    assert {
        p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file()
    } == files
    (dest / "model.onnx").unlink()
    assert unpack_archive(engine, "llama", "m.tar", "model", "a" * 64) == dest  # marker: no-op
    assert not (dest / "model.onnx").exists()

    _tar(engine.volume_path("tiny") / "big.tar", {"model.onnx": os.urandom(2 * MIB)})
    with pytest.raises(QuotaExceeded):
        unpack_archive(engine, "tiny", "big.tar", "model", "b" * 64)


def test_unpack_refuses_links(engine: LocalEngine) -> None:
    _tar(engine.volume_path("llama") / "evil.tar", {"model.onnx": b"x"}, link="passwd")
    with pytest.raises(ArtifactIntegrityError, match="not a regular file"):
        unpack_archive(engine, "llama", "evil.tar", "model", "c" * 64)
