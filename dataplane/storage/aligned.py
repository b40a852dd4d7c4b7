"""4 KiB aligned file I/O, with O_DIRECT where the filesystem allows it.

NVMe drives work in 4 KiB blocks: aligned, direct I/O skips the page cache (no second
copy of a multi-GiB model in RAM, no eviction of the inference worker's memory) and
never makes the drive read-modify-write. Buffers come from anonymous mmaps, which are
page aligned as O_DIRECT requires. Filesystems that refuse O_DIRECT (tmpfs) get
buffered I/O instead and `AlignedFile.direct` says so.

`load_file` is the model loader's reader: it keeps several large chunk reads in
flight from a few threads (the GIL is released during the syscalls), which keeps the
drive busy while the kernel pins the next pages of the destination buffer.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Protocol

from .engine import QuotaExceeded

ALIGN = 4096
DEFAULT_CHUNK_BYTES = 16 << 20
DEFAULT_READ_WORKERS = 4


def align_up(n: int, to: int = ALIGN) -> int:
    return -(-n // to) * to


class IoObserver(Protocol):
    """Hooks around each I/O call: QoS admission before, statistics after."""

    def admit(self, *, read_bytes: int, write_bytes: int) -> None: ...

    def record(self, *, read: bool, nbytes: int, seconds: float) -> None: ...


class AlignedBuffer:
    """Page-aligned memory from an anonymous mmap; `view` covers the first `length` bytes.

    Release `view` slices you took before `close()`; the mapping cannot be unmapped
    while they are alive.
    """

    def __init__(self, capacity: int, *, length: int | None = None) -> None:
        self.capacity = max(ALIGN, align_up(capacity))
        # Plain 4 KiB pages on purpose: MADV_HUGEPAGE made loads bimodal here (fast, or
        # 3-5x slower when the kernel had to compact memory for huge pages).
        self._map = mmap.mmap(-1, self.capacity, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.raw = memoryview(self._map)
        self.length = self.capacity if length is None else length
        self.view = self.raw[: self.length]

    def close(self) -> None:
        self.view.release()
        self.raw.release()
        self._map.close()

    def __enter__(self) -> AlignedBuffer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def open_aligned(path: Path, flags: int, mode: int = 0o644) -> tuple[int, bool]:
    """Open with O_DIRECT if the filesystem accepts it; returns (fd, direct)."""
    try:
        return os.open(path, flags | os.O_DIRECT, mode), True
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
    return os.open(path, flags, mode), False


def probe_direct_io(directory: Path) -> str | None:
    """None when O_DIRECT works in `directory`, else why it does not."""
    probe = directory / f".direct-io-probe-{os.getpid()}"
    try:
        fd, direct = open_aligned(probe, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
        try:
            if not direct:
                return f"O_DIRECT refused by the filesystem at {directory} (EINVAL)"
            with AlignedBuffer(ALIGN) as buf:
                os.pwritev(fd, [buf.view], 0)
        finally:
            os.close(fd)
    except OSError as exc:
        return f"O_DIRECT write failed at {directory}: {exc.strerror}"
    finally:
        probe.unlink(missing_ok=True)
    return None


def _address_aligned(view: memoryview) -> bool:
    """True when a buffer can go to O_DIRECT as is (writable, page aligned)."""
    if view.readonly or not view.c_contiguous:
        return False
    return ctypes.addressof(ctypes.c_char.from_buffer(view)) % ALIGN == 0


class AlignedFile:
    """A file written and read at 4 KiB aligned offsets, directly when possible.

    Only the last write of a file may have a length that is not a multiple of 4 KiB;
    it is padded on disk and `finish` cuts the file to its real size. Writes past
    `reserved_bytes` (the quota the engine granted) raise QuotaExceeded.
    """

    def __init__(
        self,
        path: Path,
        *,
        reserved_bytes: int,
        volume: str = "",
        observer: IoObserver | None = None,
    ) -> None:
        self.path = path
        self.reserved_bytes = reserved_bytes
        self._volume = volume or str(path)
        self._observer = observer
        self._fd, self.direct = open_aligned(path, os.O_RDWR | os.O_CREAT)

    def write_at(self, offset: int, data: memoryview) -> None:
        if offset % ALIGN:
            raise ValueError(f"write offset {offset} is not a multiple of {ALIGN}")
        if offset + len(data) > align_up(self.reserved_bytes):
            raise QuotaExceeded(self._volume, self.reserved_bytes, offset + len(data))
        if self.direct and (len(data) % ALIGN or not _address_aligned(data)):
            with AlignedBuffer(len(data)) as bounce:
                bounce.raw[: len(data)] = data
                self._write_all(offset, bounce.raw[: align_up(len(data))])
            return
        self._write_all(offset, data)

    def _write_all(self, offset: int, data: memoryview) -> None:
        done = 0
        while done < len(data):
            if self._observer:
                self._observer.admit(read_bytes=0, write_bytes=len(data) - done)
            started = time.perf_counter()
            written = os.pwritev(self._fd, [data[done:]], offset + done)
            if self._observer:
                self._observer.record(
                    read=False, nbytes=written, seconds=time.perf_counter() - started
                )
            done += written

    def read_at(self, offset: int, buf: memoryview) -> int:
        """Fill `buf` from `offset`; returns the bytes read (fewer at end of file)."""
        if offset % ALIGN:
            raise ValueError(f"read offset {offset} is not a multiple of {ALIGN}")
        if self.direct and (len(buf) % ALIGN or not _address_aligned(buf)):
            with AlignedBuffer(len(buf)) as bounce:
                got = _read_chunk(
                    self._fd, bounce.raw[: align_up(len(buf))], offset, self._observer
                )
                got = min(got, len(buf))
                buf[:got] = bounce.raw[:got]
                return got
        return _read_chunk(self._fd, buf, offset, self._observer)

    def reserve(self) -> None:
        """Preallocate the reserved size (fallocate) so later writes cannot hit ENOSPC."""
        if self.reserved_bytes:
            os.posix_fallocate(self._fd, 0, self.reserved_bytes)

    def finish(self, size_bytes: int) -> None:
        os.ftruncate(self._fd, size_bytes)
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _read_chunk(fd: int, view: memoryview, offset: int, observer: IoObserver | None) -> int:
    """One positioned read; a short read means end of file (regular files only)."""
    if observer:
        observer.admit(read_bytes=len(view), write_bytes=0)
    started = time.perf_counter()
    got = os.preadv(fd, [view], offset)
    if observer:
        observer.record(read=True, nbytes=got, seconds=time.perf_counter() - started)
    return got


def load_file(
    path: Path,
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    workers: int = DEFAULT_READ_WORKERS,
    observer: IoObserver | None = None,
) -> AlignedBuffer:
    """Read a whole file into an aligned buffer (zero copies after the read).

    Chunks of `chunk_bytes` (a multiple of 4 KiB) are read by `workers` threads.
    The caller owns the returned buffer and closes it.
    """
    if chunk_bytes % ALIGN or chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be a positive multiple of {ALIGN}")
    fd, _ = open_aligned(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        buf = AlignedBuffer(size, length=size)
        try:
            offsets = range(0, align_up(size) if size else 0, chunk_bytes)

            def read_one(offset: int) -> int:
                end = min(offset + chunk_bytes, buf.capacity)
                with buf.raw[offset:end] as view:
                    return _read_chunk(fd, view, offset, observer)

            if workers <= 1 or len(offsets) <= 1:
                total = sum(read_one(offset) for offset in offsets)
            else:
                with ThreadPoolExecutor(workers, thread_name_prefix="aligned-read") as pool:
                    total = sum(pool.map(read_one, offsets))
            if total != size:
                raise OSError(errno.EIO, f"read {total} of {size} bytes (file changed?)", str(path))
        except BaseException:
            buf.close()
            raise
        return buf
    finally:
        os.close(fd)


def read_file(
    path: Path,
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    workers: int = DEFAULT_READ_WORKERS,
    observer: IoObserver | None = None,
) -> bytes:
    """`load_file` copied into bytes, for callers that want an immutable object."""
    with load_file(path, chunk_bytes=chunk_bytes, workers=workers, observer=observer) as buf:
        return bytes(buf.view)
