"""Telemetry collectors: what each interval's TelemetryBatch is made of.

A collector is any object of the `Collector` shape; the shipper calls every collector
once per `telemetry_interval_s` and merges their `Reading`s into one batch. Gauge keys
follow the telemetry contract (`gpu.<index>.<name>`, `host.<name>`,
`storage.<volume>.<name>`, `pool.<pool>.<name>`, `worker.<deployment_id>.<name>`).

`WorkerStats` reads each inference worker's `/v1/internal/stats` window. A window is
taken only once: its position (`instance:seq`) is a cursor the shipper writes to disk in
the same transaction as the batch holding it, and the next request asks for what comes
after that cursor, so neither a failed append nor an agent restart counts a window twice.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol
from uuid import UUID

import httpx
from pydantic import BaseModel, ConfigDict, ValidationError
from pynvml import (
    NVML_CLOCK_MEM,
    NVML_CLOCK_SM,
    NVML_MEMORY_ERROR_TYPE_CORRECTED,
    NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
    NVML_TEMPERATURE_GPU,
    NVML_VOLATILE_ECC,
    NVMLError,
)

from agent.protocol import (
    ComponentResult,
    Components,
    LatencyMetric,
    SeriesSketch,
    SloThreshold,
    ThresholdCount,
    UsageCount,
    WorkerSpec,
)
from agent.storage import StorageDriver
from dataplane.sketch import LatencySketch
from dataplane.storage.engine import StorageError

log = logging.getLogger(__name__)


@dataclass
class Reading:
    """What one collector saw over an interval."""

    gauges: dict[str, float] = field(default_factory=dict)
    series: list[SeriesSketch] = field(default_factory=list)
    usage: list[UsageCount] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)
    cursors: dict[str, str] | None = None
    """Positions in the collector's sources, stored atomically with the batch (None: the
    collector keeps none). They replace the collector's previous cursors."""


class Collector(Protocol):
    """A source of telemetry; `cursors` are its own, as last stored with a batch."""

    name: str

    async def collect(self, cursors: Mapping[str, str]) -> Reading: ...


# --- GPUs -------------------------------------------------------------------------------


class Utilization(Protocol):
    @property
    def gpu(self) -> int: ...
    @property
    def memory(self) -> int: ...


class Memory(Protocol):
    @property
    def total(self) -> int: ...
    @property
    def used(self) -> int: ...


class NvmlGauges(Protocol):
    """The subset of `pynvml` the GPU gauges call, under pynvml's own names."""

    def nvmlInit(self) -> None: ...
    def nvmlShutdown(self) -> None: ...
    def nvmlDeviceGetCount(self) -> int: ...
    def nvmlDeviceGetHandleByIndex(self, index: int) -> object: ...
    def nvmlDeviceGetUtilizationRates(self, handle: object) -> Utilization: ...
    def nvmlDeviceGetMemoryInfo(self, handle: object) -> Memory: ...
    def nvmlDeviceGetPowerUsage(self, handle: object) -> int: ...
    def nvmlDeviceGetTemperature(self, handle: object, sensor: int) -> int: ...
    def nvmlDeviceGetClockInfo(self, handle: object, clock_type: int) -> int: ...
    def nvmlDeviceGetTotalEccErrors(
        self, handle: object, error_type: int, counter_type: int
    ) -> int: ...
    def nvmlDeviceGetCurrentClocksThrottleReasons(self, handle: object) -> int: ...


class GpuGauges:
    """NVML readings per GPU; a machine without NVML simply has no GPU gauges.

    A reading a GPU does not support (ECC on consumer boards, power on some) is left out.
    NVML stays initialised between intervals; `close` shuts it down.
    """

    name = "gpu"

    def __init__(self, nvml: NvmlGauges) -> None:
        self._nvml = nvml
        self._handles: list[object] | None = None
        self._unavailable = False

    async def collect(self, cursors: Mapping[str, str]) -> Reading:
        return Reading(gauges=await asyncio.to_thread(self.read))

    def read(self) -> dict[str, float]:
        handles = self._open()
        gauges: dict[str, float] = {}
        for index, handle in enumerate(handles):
            for name, value in self._device(handle):
                gauges[f"gpu.{index}.{name}"] = value
        return gauges

    def _open(self) -> list[object]:
        if self._handles is not None or self._unavailable:
            return self._handles or []
        try:
            self._nvml.nvmlInit()
        except NVMLError as exc:
            log.debug("NVML unavailable (%s); no GPU gauges", exc)
            self._unavailable = True
            return []
        nvml = self._nvml
        self._handles = [
            nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())
        ]
        return self._handles

    def _device(self, handle: object) -> list[tuple[str, float]]:
        nvml = self._nvml

        def ecc(error_type: int) -> float:
            return float(nvml.nvmlDeviceGetTotalEccErrors(handle, error_type, NVML_VOLATILE_ECC))

        def utilization() -> list[tuple[str, float]]:
            rates = nvml.nvmlDeviceGetUtilizationRates(handle)
            return [("utilization_pct", float(rates.gpu)), ("memory_util_pct", float(rates.memory))]

        def memory() -> list[tuple[str, float]]:
            info = nvml.nvmlDeviceGetMemoryInfo(handle)
            return [
                ("memory_used_bytes", float(info.used)),
                ("memory_total_bytes", float(info.total)),
            ]

        readers: list[Callable[[], list[tuple[str, float]]]] = [
            utilization,
            memory,
            lambda: [("power_w", nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0)],
            lambda: [
                (
                    "temperature_c",
                    float(nvml.nvmlDeviceGetTemperature(handle, NVML_TEMPERATURE_GPU)),
                )
            ],
            lambda: [("sm_clock_mhz", float(nvml.nvmlDeviceGetClockInfo(handle, NVML_CLOCK_SM)))],
            lambda: [("mem_clock_mhz", float(nvml.nvmlDeviceGetClockInfo(handle, NVML_CLOCK_MEM)))],
            lambda: [("ecc_corrected", ecc(NVML_MEMORY_ERROR_TYPE_CORRECTED))],
            lambda: [("ecc_uncorrected", ecc(NVML_MEMORY_ERROR_TYPE_UNCORRECTED))],
            lambda: [
                ("throttle_reasons", float(nvml.nvmlDeviceGetCurrentClocksThrottleReasons(handle)))
            ],
        ]
        out: list[tuple[str, float]] = []
        for read in readers:
            try:
                out.extend(read())
            except NVMLError as exc:  # NotSupported, GpuIsLost, ...: leave the reading out
                log.debug("NVML reading skipped: %s", exc)
        return out

    def close(self) -> None:
        if self._handles is not None:
            self._handles = None
            self._nvml.nvmlShutdown()


# --- host -------------------------------------------------------------------------------


class HostGauges:
    """Load, CPU utilisation (from /proc/stat deltas) and memory, from procfs."""

    name = "host"

    def __init__(self, proc_root: Path = Path("/proc")) -> None:
        self._proc = proc_root
        self._cpu: tuple[int, int] | None = None

    async def collect(self, cursors: Mapping[str, str]) -> Reading:
        return Reading(gauges=self.read())

    def read(self) -> dict[str, float]:
        gauges: dict[str, float] = {}
        try:
            gauges["host.load1"] = float((self._proc / "loadavg").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pass
        busy_total = self._cpu_times()
        if busy_total is not None:
            if self._cpu is not None and busy_total[1] > self._cpu[1]:
                busy = busy_total[0] - self._cpu[0]
                gauges["host.cpu_util_pct"] = 100.0 * busy / (busy_total[1] - self._cpu[1])
            self._cpu = busy_total
        memory = self._meminfo()
        if "MemTotal" in memory:
            total = memory["MemTotal"]
            gauges["host.mem_total_bytes"] = float(total)
            gauges["host.mem_used_bytes"] = float(
                total - memory.get("MemAvailable", memory.get("MemFree", 0))
            )
        return gauges

    def _cpu_times(self) -> tuple[int, int] | None:
        """(busy, total) jiffies of all CPUs; idle and iowait are not busy."""
        try:
            with (self._proc / "stat").open() as handle:
                fields = handle.readline().split()
        except OSError:
            return None
        if not fields or fields[0] != "cpu":
            return None
        values = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
        total = sum(values)
        return total - values[3] - values[4], total

    def _meminfo(self) -> dict[str, int]:
        out: dict[str, int] = {}
        try:
            text = (self._proc / "meminfo").read_text()
        except OSError:
            return out
        for line in text.splitlines():
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                out[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
        return out


# --- storage ----------------------------------------------------------------------------


class StorageGauges:
    """Per-volume I/O rates and pool capacity from the node's storage engine."""

    name = "storage"

    def __init__(self, driver: StorageDriver, node_id: UUID) -> None:
        self._driver = driver
        self._node_id = node_id
        self._failing = False

    async def collect(self, cursors: Mapping[str, str]) -> Reading:
        try:
            report = await self._driver.snapshot(self._node_id)
        except (StorageError, OSError, ValueError) as exc:
            if not self._failing:
                log.warning("storage gauges unavailable: %s", exc)
            self._failing = True
            return Reading()
        self._failing = False
        gauges: dict[str, float] = {}
        for pool in report.pools:
            gauges[f"pool.{pool.name}.capacity_bytes"] = float(pool.capacity_bytes)
            gauges[f"pool.{pool.name}.free_bytes"] = float(pool.free_bytes)
        for v in report.volumes:
            prefix = f"storage.{v.name}."
            gauges[prefix + "read_iops"] = v.read_iops
            gauges[prefix + "write_iops"] = v.write_iops
            gauges[prefix + "read_mb_s"] = v.read_mb_s
            gauges[prefix + "write_mb_s"] = v.write_mb_s
            gauges[prefix + "read_latency_us"] = v.mean_read_latency_us
            gauges[prefix + "write_latency_us"] = v.mean_write_latency_us
        return Reading(gauges=gauges)


# --- inference workers ------------------------------------------------------------------


class AppliedComponents:
    """A reconciler driver that only remembers the components last applied.

    Telemetry maps the workers' threshold counts to SLO ids through them; they are kept
    on disk because a restarted agent is not handed its unchanged desired state again.
    """

    def __init__(self, path: Path | None = None) -> None:
        self._path = path
        self.components = Components()
        if path is not None and path.exists():
            try:
                self.components = Components.model_validate_json(path.read_bytes())
            except (ValidationError, OSError) as exc:
                log.warning("ignoring unreadable %s: %s", path, exc)

    async def apply(self, components: Components) -> list[ComponentResult]:
        self.components = components
        if self._path is not None:
            tmp = self._path.with_suffix(".tmp")
            tmp.write_text(components.model_dump_json())
            tmp.replace(self._path)
        return []


class _Payload(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class WindowSketch(_Payload):
    tenant: str
    deployment_id: str
    metric: LatencyMetric
    count: int
    sketch: str


class WindowSlo(_Payload):
    tenant: str
    deployment_id: str
    metric: LatencyMetric
    threshold_seconds: float
    good: int
    total: int


class WindowRequests(_Payload):
    tenant: str
    deployment_id: str
    completed: int = 0
    failed: int = 0
    rejected: int = 0
    cancelled: int = 0
    input_tokens: int = 0
    output_tokens: int = 0


class RoutedReplica(_Payload):
    """A replica as the node's gateway routes to it (dataplane/gateway/server.py)."""

    replica_id: str
    up: bool
    routed: int
    """Requests sent to it since the gateway started."""
    predicted_ttft_s: float | None = None


class WorkerWindow(_Payload):
    """One `/v1/internal/stats` answer (dataplane/inference/metrics.py TelemetryStats);
    the gateway's also says where it routes."""

    instance: str
    seq: int
    deployment_id: str
    sketches: list[WindowSketch] = []
    slo: list[WindowSlo] = []
    requests: list[WindowRequests] = []
    queue_depth: int = 0
    running: int = 0
    replicas: list[RoutedReplica] = []


class RunningWorker(Protocol):
    @property
    def spec(self) -> WorkerSpec: ...
    @property
    def url(self) -> str | None:
        """None until the worker announced its port."""


class WorkerSource(Protocol):
    """The supervisor's workers by replica id (agent/supervisor.py WorkerSupervisor)."""

    @property
    def workers(self) -> Mapping[UUID, RunningWorker]: ...


class FrontedDeployments(Protocol):
    @property
    def url(self) -> str: ...
    @property
    def stats_key(self) -> str: ...
    @property
    def deployments(self) -> list[str]: ...


class GatewaySource(Protocol):
    """The node's gateway (agent/supervisor.py GatewaySupervisor)."""

    @property
    def fronted(self) -> FrontedDeployments | None:
        """Its URL, the key to its stats and the deployments it fronts; None while it is
        not serving."""


def _uuid(text: str) -> UUID | None:
    try:
        return UUID(text)
    except ValueError:
        return None


def _applies(slo: SloThreshold, tenant: UUID, deployment: UUID) -> bool:
    return slo.tenant_id == tenant and slo.deployment_id in (None, deployment)


EMPTY_SKETCH = base64.b64encode(LatencySketch().to_bytes()).decode("ascii")


_Series = tuple[UUID, UUID, LatencyMetric]
_Counts = dict[tuple[UUID, UUID, LatencyMetric, float], list[int]]
_Usage = dict[tuple[UUID, UUID], list[int]]
_USAGE_FIELDS = ("completed", "failed", "rejected", "cancelled", "input_tokens", "output_tokens")


def _tally(windows: Sequence[WorkerWindow]) -> tuple[_Counts, _Usage]:
    """Good/total per tenant+deployment+metric+threshold and usage per tenant+deployment,
    summed over the windows (tenants or deployments that are not UUIDs left out)."""
    counts: dict[tuple[UUID, UUID, LatencyMetric, float], list[int]] = {}
    usage: dict[tuple[UUID, UUID], list[int]] = {}
    for window in windows:
        for c in window.slo:
            tenant, dep = _uuid(c.tenant), _uuid(c.deployment_id)
            if tenant and dep:
                pair = counts.setdefault((tenant, dep, c.metric, c.threshold_seconds), [0, 0])
                pair[0] += c.good
                pair[1] += c.total
        for r in window.requests:
            tenant, dep = _uuid(r.tenant), _uuid(r.deployment_id)
            if tenant and dep:
                row = usage.setdefault((tenant, dep), [0] * len(_USAGE_FIELDS))
                for i, name in enumerate(_USAGE_FIELDS):
                    row[i] += getattr(r, name)
    return counts, usage


def _slo_counts(
    tally: tuple[_Counts, _Usage], thresholds: Sequence[SloThreshold]
) -> dict[_Series, list[ThresholdCount]]:
    """Each SLO's exact counts from tallied windows, by the series they travel on:
    availability on e2e (good = completed, total = completed + failed + rejected)."""
    counts, usage = tally
    out: dict[_Series, list[ThresholdCount]] = {}
    for (tenant, dep, metric, threshold), (good, total) in counts.items():
        for slo in thresholds:
            if (
                total
                and slo.metric == metric
                and slo.threshold_seconds == threshold
                and _applies(slo, tenant, dep)
            ):
                out.setdefault((tenant, dep, metric), []).append(
                    ThresholdCount(
                        slo_id=slo.slo_id, threshold_seconds=threshold, good=good, total=total
                    )
                )
    for (tenant, dep), row in usage.items():
        good, total = row[0], row[0] + row[1] + row[2]
        for slo in thresholds:
            if total and slo.metric == "availability" and _applies(slo, tenant, dep):
                out.setdefault((tenant, dep, "e2e"), []).append(
                    ThresholdCount(
                        slo_id=slo.slo_id, threshold_seconds=None, good=good, total=total
                    )
                )
    return out


def windows_to_reading(
    windows: Sequence[WorkerWindow],
    thresholds: Sequence[SloThreshold],
    gateway_windows: Sequence[WorkerWindow] = (),
) -> Reading:
    """Merge worker windows into series per tenant+deployment+metric, SLO counts by slo_id,
    usage per tenant+deployment and queue gauges per deployment.

    Several workers of one deployment merge: sketches through DDSketch's merge, counts by
    addition. An SLO takes its counts from where it is measured: the workers' windows, or
    the node gateway's (`gateway_windows`); sketches, usage and gauges come from the
    workers alone, so no request is counted twice. A series with counts but no sample
    (every request failed) travels with an empty sketch.
    """
    sketches: dict[_Series, list[str]] = {}
    gauges: dict[str, float] = {}
    for window in windows:
        dep_key = f"worker.{window.deployment_id}."
        gauges[dep_key + "queue_depth"] = (
            gauges.get(dep_key + "queue_depth", 0.0) + window.queue_depth
        )
        gauges[dep_key + "running"] = gauges.get(dep_key + "running", 0.0) + window.running
        for s in window.sketches:
            tenant, dep = _uuid(s.tenant), _uuid(s.deployment_id)
            if tenant and dep and s.count:
                sketches.setdefault((tenant, dep, s.metric), []).append(s.sketch)
    measured = {
        where: [t for t in thresholds if t.measured_at == where] for where in ("worker", "gateway")
    }
    tally = _tally(windows)
    counted = _slo_counts(tally, measured["worker"])
    for key, found in _slo_counts(_tally(gateway_windows), measured["gateway"]).items():
        counted.setdefault(key, []).extend(found)
    series = [
        SeriesSketch(
            tenant_id=tenant,
            deployment_id=dep,
            metric=metric,
            sketch=_merged(sketches[key]) if key in sketches else EMPTY_SKETCH,
            thresholds=counted.get(key, []),
        )
        for key in sorted(sketches.keys() | counted.keys(), key=str)
        for tenant, dep, metric in [key]
    ]
    usage = tally[1]
    return Reading(
        gauges=gauges,
        series=series,
        usage=[
            UsageCount(
                tenant_id=tenant, deployment_id=dep, **dict(zip(_USAGE_FIELDS, row, strict=True))
            )
            for (tenant, dep), row in sorted(usage.items(), key=lambda kv: str(kv[0]))
        ],
    )


def _merged(encoded: list[str]) -> str:
    if len(encoded) == 1:
        return encoded[0]
    merged = LatencySketch()
    for text in encoded:
        merged.merge(LatencySketch.from_bytes(base64.b64decode(text)))
    return base64.b64encode(merged.to_bytes()).decode("ascii")


class WorkerStats:
    """Windows from every worker the supervisor runs, and from the node's gateway for each
    deployment it fronts, each taken exactly once.

    Cursor per replica (and per `gateway/<deployment>`): `<instance>:<seq>` of the last
    window stored. A window from another instance (the process restarted) is new by
    definition; the next request then continues from that instance's sequence.
    """

    name = "workers"

    def __init__(
        self,
        source: WorkerSource,
        applied: AppliedComponents,
        http: httpx.AsyncClient,
        gateway: GatewaySource | None = None,
        *,
        timeout_s: float = 2.0,
    ) -> None:
        self._source = source
        self._gateway = gateway
        self._applied = applied
        self._http = http
        self._timeout_s = timeout_s
        # (gateway instance, routed count, monotonic time) per (deployment, replica)
        self._routed: dict[tuple[str, str], tuple[str, int, float]] = {}

    async def collect(self, cursors: Mapping[str, str]) -> Reading:
        sources: list[tuple[str, str, str | None]] = [
            (str(replica), w.url, None) for replica, w in self._source.workers.items() if w.url
        ]
        fronted = self._gateway.fronted if self._gateway is not None else None
        headers = {}
        if fronted is not None:
            sources += [(f"gateway/{dep}", fronted.url, dep) for dep in fronted.deployments]
            headers = {"Authorization": f"Bearer {fronted.stats_key}"}
        answers = await asyncio.gather(
            *(
                self._fetch(url, cursors.get(key), dep, headers if dep else {})
                for key, url, dep in sources
            )
        )
        taken: dict[bool, list[WorkerWindow]] = {False: [], True: []}
        new_cursors: dict[str, str] = {}
        for (key, _url, dep), window in zip(sources, answers, strict=True):
            if window is None:
                if key in cursors:
                    new_cursors[key] = cursors[key]
                continue
            new_cursors[key] = f"{window.instance}:{window.seq}"
            if cursors.get(key) == new_cursors[key]:
                continue  # already stored (cannot happen with after=seq, but never twice)
            taken[dep is not None].append(window)
        reading = windows_to_reading(
            taken[False], self._applied.components.slo_thresholds, taken[True]
        )
        fronting = set(fronted.deployments) if fronted is not None else set()
        for gone in [k for k in self._routed if k[0] not in fronting]:
            del self._routed[gone]
        reading.gauges.update(self._routing(taken[True], time.monotonic()))
        reading.cursors = new_cursors
        return reading

    def _routing(self, windows: list[WorkerWindow], now: float) -> dict[str, float]:
        """Gauges `worker.<deployment>.<name>:<replica>` of where the gateway sends each
        deployment's requests and why: requests routed per second since the last window
        of the same gateway start, the TTFT it predicts there, whether it is up. Replicas
        a window no longer names are forgotten."""
        gauges: dict[str, float] = {}
        for window in windows:
            prefix = f"worker.{window.deployment_id}."
            named = {(window.deployment_id, r.replica_id) for r in window.replicas}
            for gone in [
                k for k in self._routed if k[0] == window.deployment_id and k not in named
            ]:
                del self._routed[gone]
            for replica in window.replicas:
                gauges[f"{prefix}up:{replica.replica_id}"] = float(replica.up)
                if replica.predicted_ttft_s is not None:
                    gauges[f"{prefix}predicted_ttft:{replica.replica_id}"] = (
                        replica.predicted_ttft_s
                    )
                key = (window.deployment_id, replica.replica_id)
                before = self._routed.get(key)
                self._routed[key] = (window.instance, replica.routed, now)
                if before is not None and before[0] == window.instance and now > before[2]:
                    rate = (replica.routed - before[1]) / (now - before[2])
                    gauges[f"{prefix}routed:{replica.replica_id}"] = rate
        return gauges

    async def _fetch(
        self, url: str, cursor: str | None, deployment: str | None, headers: dict[str, str]
    ) -> WorkerWindow | None:
        after = int(cursor.rpartition(":")[2]) if cursor else 0
        params: dict[str, str | int] = {"after": after}
        if deployment is not None:
            params["deployment"] = deployment
        try:
            response = await self._http.get(
                f"{url}/v1/internal/stats",
                params=params,
                headers=headers,
                timeout=self._timeout_s,
            )
            response.raise_for_status()
            return WorkerWindow.model_validate_json(response.content)
        except (httpx.HTTPError, ValidationError) as exc:
            log.debug("stats from %s unavailable: %s", url, exc)
            return None
