"""Storage benchmark: stage a model-sized file over HTTP, load it back, compare with fio.

    .venv/bin/python -m tests.bench.storage [--json] [--quick] [--size-mb N]

1. generates a file (default 256 MiB) and serves it from a local HTTP server with
   Range support, in a separate process;
2. stages it into a LocalEngine volume with `stage_artifact` (`stage_mb_s`: Range
   requests, sha256, 4 KiB aligned O_DIRECT writes);
3. reads it back with the engine's aligned reader (`load_mb_s`), after dropping the
   page cache when allowed (else the output says so; direct I/O bypasses the cache);
4. when fio is installed, reads the same file with a sequential fio job of the same
   block size and direct flag (`fio_read_mb_s`, one read in flight) and reports
   `load_vs_fio`; `fio_qd_read_mb_s` is the same job with as many reads in flight as
   the loader keeps (`--workers`), the drive's ceiling for that access pattern.

MB is 2**20 bytes throughout. Each read measurement is the median of `--runs` runs,
load and fio interleaved so both see the same disk weather.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from dataplane.storage.aligned import DEFAULT_READ_WORKERS, probe_direct_io
from dataplane.storage.artifacts import ArtifactSource, stage_artifact
from dataplane.storage.engine import PoolSpec, StorageSpec, VolumeSpec
from dataplane.storage.local import LocalEngine

MB = 1 << 20
TOKEN = "bench-token"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.storage", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quick", action="store_true", help="32 MiB, one run")
    parser.add_argument("--size-mb", type=int, default=256)
    parser.add_argument("--chunk-mb", type=int, default=16, help="read block size")
    parser.add_argument("--workers", type=int, default=DEFAULT_READ_WORKERS, help="reads in flight")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--dir", type=Path, default=Path(tempfile.gettempdir()), help="where files go"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.size_mb, args.runs = 32, 1
    return args


def make_payload(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    block = os.urandom(MB)
    with open(path, "wb") as f:
        for offset in range(0, size, MB):
            chunk = block[: min(MB, size - offset)]
            digest.update(chunk)
            f.write(chunk)
    return digest.hexdigest()


def drop_page_cache() -> str:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as exc:
        return f"not dropped ({exc.strerror})"
    return "dropped"


def describe_cache(state: str, direct: bool) -> str:
    if state == "dropped":
        return "dropped before each read"
    if direct:
        return f"{state}; O_DIRECT reads bypass the page cache anyway"
    return f"{state}; buffered reads may have hit a warm page cache"


def run_fio(path: Path, size: int, block: int, direct: bool, iodepth: int = 1) -> float | None:
    """MB/s of one sequential fio read job over `path`; None if fio is missing or fails."""
    fio = shutil.which("fio")
    if fio is None:
        return None
    engine = "psync" if iodepth == 1 else "libaio"
    command = [
        fio, "--name=load", f"--filename={path}", "--rw=read", f"--bs={block}",
        f"--direct={int(direct)}", f"--ioengine={engine}", f"--iodepth={iodepth}",
        "--numjobs=1", f"--size={size}", "--output-format=json",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        print(f"fio failed: {done.stderr.strip()[:300]}", file=sys.stderr)
        return None
    return float(json.loads(done.stdout)["jobs"][0]["read"]["bw_bytes"]) / MB


def fio_note(block: int, direct: bool, workers: int) -> str:
    if shutil.which("fio") is None:
        return "fio not installed (apt-get install -y fio): no fio_read_mb_s to compare with"
    return (
        f"fio_read_mb_s: one sequential job, psync (1 read in flight), bs={block}, "
        f"direct={int(direct)}; fio_qd_read_mb_s: the same job with libaio and "
        f"iodepth={workers}, as many reads in flight as the loader keeps"
    )


def median(values: list[float]) -> float | None:
    return round(statistics.median(values), 1) if values else None


def serve(path: Path) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.dataplane.storage.range_server", str(path), TOKEN],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    return process, process.stdout.readline().strip()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    size = args.size_mb * MB
    block = args.chunk_mb * MB
    work = Path(tempfile.mkdtemp(prefix="tailguard-bench-", dir=args.dir))
    server: subprocess.Popen[str] | None = None
    try:
        served = work / "served.bin"
        sha = make_payload(served, size)
        server, url = serve(served)
        engine = LocalEngine(work / "engine", chunk_bytes=block, read_workers=args.workers)
        engine.reconcile(
            StorageSpec(
                pools=(
                    PoolSpec(
                        name="bench", directory=str(work / "pool"), capacity_bytes=size + 64 * MB
                    ),
                ),
                volumes=(
                    VolumeSpec(
                        name="model", pool="bench", tenant="bench", size_bytes=size + 16 * MB
                    ),
                ),
            )
        )
        direct_note = probe_direct_io(work)
        direct = direct_note is None

        with tqdm(
            total=size, unit="B", unit_scale=True, unit_divisor=1024, desc="stage", file=sys.stderr
        ) as bar:

            def progress(done: int, total: int) -> None:
                bar.update(done - bar.n)

            started = time.perf_counter()
            staged = stage_artifact(
                engine,
                "model",
                "model.bin",
                ArtifactSource(url, sha, size),
                headers={"Authorization": f"Bearer {TOKEN}"},
                on_progress=progress,
            )
            stage_s = time.perf_counter() - started

        loads: list[float] = []
        fios: list[float] = []
        fios_qd: list[float] = []
        cache = ""
        for _ in tqdm(range(args.runs), desc="load/fio runs", file=sys.stderr):
            cache = drop_page_cache()
            started = time.perf_counter()
            with engine.load_file("model", "model.bin") as loaded:
                load_s = time.perf_counter() - started
                if hashlib.sha256(loaded.view).hexdigest() != sha:
                    print("loaded bytes do not match the artifact", file=sys.stderr)
                    return 1
            loads.append(size / MB / load_s)
            for depth, results in ((1, fios), (args.workers, fios_qd)):
                drop_page_cache()
                measured = run_fio(staged, size, block, direct, depth)
                if measured is not None:
                    results.append(measured)

        load_mb_s = median(loads)
        fio_read_mb_s = median(fios)
        result: dict[str, Any] = {
            "size_mb": args.size_mb,
            "block_mb": args.chunk_mb,
            "load_workers": args.workers,
            "direct_io": direct,
            "direct_io_note": direct_note or "O_DIRECT in use",
            "page_cache": describe_cache(cache, direct),
            "stage_mb_s": round(size / MB / stage_s, 1),
            "load_mb_s": load_mb_s,
            "fio_read_mb_s": fio_read_mb_s,
            "load_vs_fio": round(load_mb_s / fio_read_mb_s, 3)
            if load_mb_s and fio_read_mb_s
            else None,
            "fio_qd_read_mb_s": median(fios_qd),
            "fio_note": fio_note(block, direct, args.workers),
            "runs": {
                "load_mb_s": [round(x, 1) for x in loads],
                "fio_read_mb_s": [round(x, 1) for x in fios],
                "fio_qd_read_mb_s": [round(x, 1) for x in fios_qd],
            },
        }
        if args.json:
            print(json.dumps(result))
        else:
            for key, value in result.items():
                print(f"{key:>16}: {value}")
        return 0
    finally:
        if server is not None:
            server.terminate()
            server.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
