"""Read probes: random 4 KiB reads of a volume at a steady rate, timed as a reader sees them.

A storage-read SLO needs reads to count even while nothing else reads, and its latency is
what a reader waits, QoS pacing included, not only the device's service time. A probe reads
a file of random data it keeps in the volume (written once, `PROBE_FILE_BYTES`) through the
engine's own I/O path, so the engine counts and throttles its reads like any other, and
records each read's latency into a sketch and exact counters per threshold. `take` hands
over what was measured since the previous call.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from dataplane.sketch import LatencySketch, ThresholdCounter

from .aligned import ALIGN, AlignedBuffer
from .engine import VolumeFile

PROBE_FILE = ".tailguard-read-probe"
PROBE_FILE_BYTES = 1 << 20
BLOCK_BYTES = ALIGN

log = logging.getLogger(__name__)


class ProbeVolumes(Protocol):
    """Engines that can open a volume's probe file on this host (the local engine)."""

    def open_probe_file(self, volume: str) -> VolumeFile: ...


def fill_probe_file(file: VolumeFile) -> None:
    """Write the probe file's random content: reads of unwritten blocks may never reach
    the device."""
    with AlignedBuffer(PROBE_FILE_BYTES) as buf:
        buf.raw[:] = random.randbytes(PROBE_FILE_BYTES)
        file.write_at(0, buf.raw)
    file.finish(PROBE_FILE_BYTES)


@dataclass
class ProbeWindow:
    """Reads measured since the previous `take`: latency sketch and good/total per bound."""

    sketch: LatencySketch = field(default_factory=LatencySketch)
    counters: dict[float, ThresholdCounter] = field(default_factory=dict)
    errors: int = 0


class ReadProbe:
    """One volume's probe: a daemon thread reading `rate_per_s` blocks a second.

    Reads are paced on a fixed schedule, not back to back, so a slow read delays the next
    one only as long as it is itself late (as a reader issuing at a steady rate sees it).
    """

    def __init__(
        self,
        volume: str,
        open_file: Callable[[], VolumeFile],
        rate_per_s: int,
        *,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.volume = volume
        self.rate_per_s = rate_per_s
        self._open_file = open_file
        self._clock = clock
        self._lock = threading.Lock()
        self._thresholds: tuple[float, ...] = ()
        self._window = ProbeWindow()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"read-probe-{volume}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def count_against(self, thresholds: Iterable[float]) -> None:
        """The bounds to count exactly from now on (a bound new to the window starts at 0)."""
        with self._lock:
            self._thresholds = tuple(sorted(set(thresholds)))

    def take(self) -> ProbeWindow:
        with self._lock:
            window, self._window = self._window, ProbeWindow()
        return window

    def _record(self, seconds: float | None) -> None:
        with self._lock:
            window = self._window
            if seconds is None:
                window.errors += 1
                return
            window.sketch.add(seconds)
            for bound in self._thresholds:
                window.counters.setdefault(bound, ThresholdCounter(bound)).observe(seconds)

    def _run(self) -> None:
        try:
            file = self._open_file()
        except Exception:  # the thread's only report: the agent sees errors in the window
            log.exception("read probe of %s cannot open its file", self.volume)
            self._record(None)
            return
        blocks = PROBE_FILE_BYTES // BLOCK_BYTES
        interval = 1.0 / self.rate_per_s
        try:
            with AlignedBuffer(BLOCK_BYTES) as buf:
                due = self._clock()
                while not self._stop.wait(max(0.0, due - self._clock())):
                    started = self._clock()
                    try:
                        file.read_at(random.randrange(blocks) * BLOCK_BYTES, buf.raw)
                    except OSError as exc:
                        log.warning("read probe of %s: %s", self.volume, exc)
                        self._record(None)
                    else:
                        self._record(self._clock() - started)
                    due = max(due + interval, self._clock() - 1.0)  # never a burst to catch up
        finally:
            file.close()
