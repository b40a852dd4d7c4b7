"""Staging a model artifact from the control plane into a volume.

Models are large and links drop, so the download is made of HTTP Range requests and
is resumable: bytes land in `<relpath>.partial` and `<relpath>.partial.json` records
how many are safely written; staging again after a crash or an interrupted transfer
re-hashes that prefix from disk and asks only for the rest. The file is written with
4 KiB aligned (O_DIRECT where possible) I/O through the engine, so the volume's quota
applies and the page cache is not flooded. Receiving and writing overlap: the network
fills one aligned buffer while a writer thread hashes and writes the previous one.

At the end the sha256 of the whole file must match the control plane's; a corrupted
or truncated artifact is rejected, its partial discarded, and the artifact fetched
again from scratch (once, by default) before giving up. A finished artifact gets a
`<relpath>.sha256` marker so staging it again is a no-op.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import re
import shutil
import tarfile
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx
from tenacity import (
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_incrementing,
    wait_random,
)

from .aligned import ALIGN, AlignedBuffer, AlignedFile
from .engine import FileVolumes, StorageError, VolumeFile

ProgressCallback = Callable[[int, int], None]
"""Called with (bytes received so far, total bytes)."""

DEFAULT_RANGE_BYTES = 64 << 20
DEFAULT_BUFFER_BYTES = 8 << 20
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


@dataclass(frozen=True)
class ArtifactSource:
    """Where an artifact comes from and what it must be."""

    url: str
    sha256: str
    size_bytes: int

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[0-9a-f]{64}", self.sha256):
            raise ValueError("sha256 must be 64 lowercase hex digits")
        if self.size_bytes < 0:
            raise ValueError("size_bytes must not be negative")


class ArtifactError(StorageError):
    """The download failed; what was written so far is kept and staging resumes there."""


class ArtifactIntegrityError(ArtifactError):
    """The artifact is not what the control plane promised; nothing of it was kept."""


class _Rejected(Exception):
    """Content that can never verify (wrong size, wrong hash): discard and re-fetch."""


class _Pipeline:
    """Aligned buffers filled by the caller and hashed + written by a writer thread."""

    def __init__(
        self,
        file: VolumeFile,
        start: int,
        hasher: hashlib._Hash,
        buffer_bytes: int,
        on_commit: Callable[[int], None],
    ) -> None:
        self._file = file
        self._hasher = hasher
        self._on_commit = on_commit
        self._free: queue.Queue[AlignedBuffer] = queue.Queue()
        self._full: queue.Queue[tuple[int, AlignedBuffer, int] | None] = queue.Queue()
        self._buffers = [AlignedBuffer(buffer_bytes) for _ in range(3)]
        for buf in self._buffers[1:]:
            self._free.put(buf)
        self._current = self._buffers[0]
        self._fill = 0
        self.position = start  # file offset of the current buffer's first byte
        self.committed = start
        self._error: BaseException | None = None
        self._writer = threading.Thread(
            target=self._write_loop, name="artifact-writer", daemon=True
        )
        self._writer.start()

    @property
    def received(self) -> int:
        return self.position + self._fill

    def feed(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            room = self._current.capacity - self._fill
            n = min(room, len(view))
            self._current.raw[self._fill : self._fill + n] = view[:n]
            self._fill += n
            view = view[n:]
            if self._fill == self._current.capacity:
                self._submit(self._fill)

    def drop_unaligned_tail(self) -> None:
        """After an interruption keep only whole 4 KiB blocks; the rest is fetched again."""
        aligned = self._fill - self._fill % ALIGN
        if aligned:
            self._submit(aligned)
        else:
            self._fill = 0
        self.drain()

    def finish(self) -> None:
        if self._fill:
            self._submit(self._fill)
        self.drain()

    def drain(self) -> None:
        """Wait until everything submitted is written (or the writer failed)."""
        self._full.join()
        self._raise_writer_error()

    def close(self) -> None:
        self._full.put(None)
        self._writer.join()
        for buf in self._buffers:
            buf.close()

    def _submit(self, nbytes: int) -> None:
        self._raise_writer_error()
        self._full.put((self.position, self._current, nbytes))
        self.position += nbytes
        self._fill = 0
        self._current = self._free.get()

    def _raise_writer_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _write_loop(self) -> None:
        while (item := self._full.get()) is not None:
            offset, buf, nbytes = item
            try:
                if self._error is None:
                    with buf.raw[:nbytes] as view:
                        self._hasher.update(view)
                        self._file.write_at(offset, view)
                    self.committed = offset + nbytes
                    self._on_commit(self.committed)
            except BaseException as exc:  # handed to the feeding thread
                self._error = exc
            finally:
                self._free.put(buf)
                self._full.task_done()
        self._full.task_done()


class _Stager:
    def __init__(
        self,
        volumes: FileVolumes,
        volume: str,
        relpath: str,
        source: ArtifactSource,
        client: httpx.Client,
        headers: Mapping[str, str],
        on_progress: ProgressCallback | None,
        range_bytes: int,
        buffer_bytes: int,
        retries: int,
        retry_delay_s: float,
    ) -> None:
        self.volumes = volumes
        self.volume = volume
        self.relpath = relpath
        self.source = source
        self.client = client
        self.headers = {**headers, "Accept-Encoding": "identity"}
        self.on_progress = on_progress
        self.range_bytes = range_bytes
        self.buffer_bytes = buffer_bytes
        self.retries = retries
        self.retry_delay_s = retry_delay_s
        base = volumes.volume_path(volume)
        self.final = base / relpath
        self.partial = base / f"{relpath}.partial"
        self.state = base / f"{relpath}.partial.json"
        self.marker = base / f"{relpath}.sha256"

    def already_staged(self) -> bool:
        return (
            self.final.is_file()
            and self.final.stat().st_size == self.source.size_bytes
            and self.marker.is_file()
            and self.marker.read_text().strip() == self.source.sha256
        )

    def discard(self) -> None:
        for path in (self.partial, self.state, self.marker, self.final):
            path.unlink(missing_ok=True)

    def download(self) -> None:
        """Fetch (or resume) into the partial file and verify it; raises _Rejected."""
        size = self.source.size_bytes
        start = self._resume_offset()
        file = self.volumes.create_file(self.volume, f"{self.relpath}.partial", size)
        try:
            hasher = hashlib.sha256()
            self._rehash(file, hasher, start)
            pipeline = _Pipeline(file, start, hasher, self.buffer_bytes, self._save_state)
            try:
                self._fetch_all(pipeline)
                pipeline.finish()
            finally:
                pipeline.close()
            file.finish(size)
        finally:
            file.close()
        digest = hasher.hexdigest()
        if digest != self.source.sha256:
            raise _Rejected(f"sha256 of the download is {digest}, expected {self.source.sha256}")
        os.replace(self.partial, self.final)
        self.marker.write_text(self.source.sha256 + "\n")
        self.state.unlink(missing_ok=True)

    def _fetch_all(self, pipeline: _Pipeline) -> None:
        """Fetch the rest range by range; a dropped connection or 5xx resumes where it
        stopped, `retries` times in all, after a growing, jittered delay."""
        delay = self.retry_delay_s
        retrying = Retrying(
            retry=retry_if_exception_type((httpx.TransportError, _ServerError)),
            stop=stop_after_attempt(self.retries + 1),
            wait=wait_incrementing(start=delay, increment=delay) + wait_random(0, delay),
            reraise=True,
        )
        try:
            for attempt in retrying:
                with attempt:
                    self._fetch_rest(pipeline)
        except (httpx.TransportError, _ServerError) as exc:
            raise ArtifactError(
                f"download of {self.source.url} stopped at {pipeline.committed} of "
                f"{self.source.size_bytes} bytes ({exc}); staging again resumes there"
            ) from exc

    def _fetch_rest(self, pipeline: _Pipeline) -> None:
        try:
            while pipeline.received < self.source.size_bytes:
                self._fetch_range(pipeline)
        except (httpx.TransportError, _ServerError):
            pipeline.drop_unaligned_tail()
            raise

    def _fetch_range(self, pipeline: _Pipeline) -> None:
        size = self.source.size_bytes
        start = pipeline.received
        end = min(start + self.range_bytes, size) - 1
        headers = {**self.headers, "Range": f"bytes={start}-{end}"}
        with self.client.stream("GET", self.source.url, headers=headers) as response:
            if response.status_code == 416:
                raise _Rejected(f"server has fewer than {size} bytes (416 for bytes={start}-)")
            if response.status_code >= 500:
                raise _ServerError(f"HTTP {response.status_code}")
            if response.status_code == 200:
                skip, expect_end = start, size - 1  # Range ignored: the whole body comes
            elif response.status_code == 206:
                skip, expect_end = 0, self._check_content_range(response, start, end)
            else:
                raise ArtifactError(
                    f"GET {self.source.url} answered HTTP {response.status_code}; "
                    "check the artifact URL and the node's credentials"
                )
            for chunk in response.iter_bytes():
                if skip:
                    dropped = min(skip, len(chunk))
                    chunk, skip = chunk[dropped:], skip - dropped
                if pipeline.received + len(chunk) > size:
                    raise _Rejected(f"server sent more than the expected {size} bytes")
                pipeline.feed(chunk)
                self._progress(pipeline.received)
            if pipeline.received < expect_end + 1:
                raise _Rejected(
                    f"artifact truncated: the server's response ended at byte "
                    f"{pipeline.received} of {size}"
                )

    def _check_content_range(self, response: httpx.Response, start: int, end: int) -> int:
        match = _CONTENT_RANGE.fullmatch(response.headers.get("content-range", ""))
        if match is None or int(match[1]) != start:
            raise _Rejected(f"bad Content-Range {response.headers.get('content-range')!r}")
        if match[3] != "*" and int(match[3]) != self.source.size_bytes:
            raise _Rejected(
                f"server holds {match[3]} bytes, expected {self.source.size_bytes} (truncated?)"
            )
        return min(int(match[2]), end)

    def _progress(self, received: int) -> None:
        if self.on_progress is not None:
            self.on_progress(received, self.source.size_bytes)

    def _resume_offset(self) -> int:
        try:
            state = json.loads(self.state.read_text())
        except (OSError, ValueError):
            state = None
        expected = {
            "url": self.source.url,
            "sha256": self.source.sha256,
            "size_bytes": self.source.size_bytes,
        }
        if (
            isinstance(state, dict)
            and all(state.get(k) == v for k, v in expected.items())
            and self.partial.is_file()
            and 0 <= int(state.get("committed_bytes", -1)) <= self.partial.stat().st_size
            and int(state["committed_bytes"]) % ALIGN == 0
        ):
            return int(state["committed_bytes"])
        self.discard()
        return 0

    def _save_state(self, committed: int) -> None:
        tmp = self.state.with_name(self.state.name + ".tmp")
        tmp.write_text(
            json.dumps(
                {
                    "url": self.source.url,
                    "sha256": self.source.sha256,
                    "size_bytes": self.source.size_bytes,
                    "committed_bytes": committed,
                }
            )
        )
        os.replace(tmp, self.state)

    def _rehash(self, file: VolumeFile, hasher: hashlib._Hash, upto: int) -> None:
        """Feed the already written prefix to the hash, read back from disk."""
        with AlignedBuffer(self.buffer_bytes) as buf:
            offset = 0
            while offset < upto:
                n = min(buf.capacity, upto - offset)
                got = file.read_at(offset, buf.raw[:n])
                if got != n:
                    raise _Rejected(f"partial file shorter than its recorded {upto} bytes")
                hasher.update(buf.raw[:n])
                offset += n
        self._progress(upto)


class _ServerError(Exception):
    """A 5xx answer: worth retrying like a dropped connection."""


def stage_artifact(
    volumes: FileVolumes,
    volume: str,
    relpath: str,
    source: ArtifactSource,
    *,
    headers: Mapping[str, str] | None = None,
    client: httpx.Client | None = None,
    on_progress: ProgressCallback | None = None,
    range_bytes: int = DEFAULT_RANGE_BYTES,
    buffer_bytes: int = DEFAULT_BUFFER_BYTES,
    retries: int = 3,
    retry_delay_s: float = 1.0,
    fetches: int = 2,
) -> Path:
    """Download `source` into `relpath` of `volume`, verified; returns the file's path.

    `headers` carries the node's credentials (e.g. `Authorization`). A dropped
    connection or 5xx is retried `retries` times from where it stopped; content that
    fails verification is discarded and fetched again up to `fetches` times in all.
    """
    if range_bytes <= 0 or buffer_bytes <= 0 or buffer_bytes % ALIGN:
        raise ValueError(f"range_bytes must be positive, buffer_bytes a multiple of {ALIGN}")
    own_client = client is None
    http = client or httpx.Client(timeout=httpx.Timeout(30.0), follow_redirects=True)
    stager = _Stager(
        volumes,
        volume,
        relpath,
        source,
        http,
        headers or {},
        on_progress,
        range_bytes,
        buffer_bytes,
        retries,
        retry_delay_s,
    )
    try:
        if stager.already_staged():
            stager._progress(source.size_bytes)
            return stager.final
        reason = ""
        for _ in range(max(1, fetches)):
            try:
                stager.download()
                return stager.final
            except _Rejected as exc:
                reason = str(exc)
                stager.discard()
        raise ArtifactIntegrityError(
            f"artifact {source.url} rejected after {max(1, fetches)} fetch(es): {reason}; "
            "the partial download was discarded"
        )
    finally:
        if own_client:
            http.close()


class DirectoryVolumes:
    """`FileVolumes` over one plain directory, for staging outside an engine (the operator's
    `tailguard-agent stage`): every volume name means that directory and there is no quota."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def volume_path(self, volume: str) -> Path:
        return self.root

    def create_file(self, volume: str, relpath: str, size_bytes: int) -> VolumeFile:
        path = (self.root / relpath).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise ValueError(f"{relpath!r} is not a file path inside {self.root}")
        path.parent.mkdir(parents=True, exist_ok=True)
        file = AlignedFile(path, reserved_bytes=size_bytes)
        try:
            file.reserve()
        except OSError:
            file.close()
            raise
        return file


def unpack_archive(
    volumes: FileVolumes,
    volume: str,
    archive_relpath: str,
    dest_relpath: str,
    sha256: str,
    *,
    buffer_bytes: int = DEFAULT_BUFFER_BYTES,
) -> Path:
    """Unpack a staged tar archive (plain or compressed) into `dest_relpath` of the volume.

    Every file goes through the engine's `create_file`, so the volume's quota holds and the
    writes are aligned; only regular files and directories are accepted. A `<dest>.sha256`
    marker names the archive unpacked there, so unpacking it again is a no-op.
    """
    base = volumes.volume_path(volume)
    dest, marker = base / dest_relpath, base / f"{dest_relpath}.sha256"
    if dest.is_dir() and marker.is_file() and marker.read_text().strip() == sha256:
        return dest
    marker.unlink(missing_ok=True)
    shutil.rmtree(dest, ignore_errors=True)
    with tarfile.open(base / archive_relpath, "r:*") as tar, AlignedBuffer(buffer_bytes) as buf:
        for member in tar:
            if member.isdir():
                continue
            source = tar.extractfile(member) if member.isreg() else None
            if source is None:
                raise ArtifactIntegrityError(
                    f"archive member {member.name!r} is not a regular file; model archives "
                    "hold only files and directories"
                )
            file = volumes.create_file(volume, f"{dest_relpath}/{member.name}", member.size)
            try:
                offset = 0
                while got := source.readinto(buf.raw):  # type: ignore[attr-defined]
                    file.write_at(offset, buf.raw[:got])
                    offset += got
                file.finish(member.size)
            finally:
                file.close()
    marker.write_text(sha256 + "\n")
    return dest
