"""The volumes' read probes: started, re-rated and stopped with the desired state, and their
measurements shipped as each tenant's `storage_read` series.

A reconciler driver (after storage, which makes the volumes) and a telemetry collector in
one: the series carries a latency sketch per tenant (its probed volumes merged) and exact
good/total counts for each storage-read SLO threshold the node was given for that tenant.
A read that failed counts in total and never as good. Probes need volumes whose files are
on this host (the local engine); the control plane refuses them on SPDK pools.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import logging
from collections.abc import Mapping
from uuid import UUID

from agent.gauges import Reading
from agent.protocol import ComponentResult, Components, SeriesSketch, SloThreshold, ThresholdCount
from dataplane.storage.probe import ProbeVolumes, ProbeWindow, ReadProbe

log = logging.getLogger(__name__)


class ReadProbes:
    name = "read-probes"

    def __init__(self, volumes: ProbeVolumes | None) -> None:
        self._volumes = volumes
        self._probes: dict[str, tuple[UUID, ReadProbe]] = {}
        self._retired: list[tuple[UUID, ProbeWindow]] = []
        self._slos: list[SloThreshold] = []

    async def apply(self, components: Components) -> list[ComponentResult]:
        wanted = {v.name: v for v in components.volumes if v.read_probe_per_s}
        self._slos = [
            s
            for s in components.slo_thresholds
            if s.metric == "storage_read" and s.threshold_seconds is not None
        ]
        for name, (_, probe) in list(self._probes.items()):
            spec = wanted.get(name)
            if spec is None or spec.read_probe_per_s != probe.rate_per_s:
                await self._retire(name)
        if wanted and self._volumes is None:
            log.warning("read probes need the local engine; %d volume(s) not probed", len(wanted))
            return []
        volumes = self._volumes
        for name, spec in wanted.items():
            if name not in self._probes and volumes is not None:
                opener = functools.partial(volumes.open_probe_file, name)
                probe = ReadProbe(name, opener, spec.read_probe_per_s)
                probe.start()
                self._probes[name] = (spec.tenant_id, probe)
        for tenant, probe in self._probes.values():
            probe.count_against(self._bounds(tenant))
        return []  # the volumes' own results come from the storage driver

    def _bounds(self, tenant: UUID) -> list[float]:
        return [s.threshold_seconds or 0.0 for s in self._slos if s.tenant_id == tenant]

    async def _retire(self, name: str) -> None:
        tenant, probe = self._probes.pop(name)
        await asyncio.to_thread(probe.stop)
        self._retired.append((tenant, probe.take()))

    async def close(self) -> None:
        for name in list(self._probes):
            await self._retire(name)

    async def collect(self, cursors: Mapping[str, str]) -> Reading:
        windows = self._retired + [
            (tenant, probe.take()) for tenant, probe in self._probes.values()
        ]
        self._retired = []
        merged: dict[UUID, ProbeWindow] = {}
        for tenant, window in windows:
            into = merged.setdefault(tenant, ProbeWindow())
            into.sketch.merge(window.sketch)
            into.errors += window.errors
            for bound, counter in window.counters.items():
                if bound in into.counters:
                    into.counters[bound].merge(counter)
                else:
                    into.counters[bound] = counter
        return Reading(
            series=[
                self._series(tenant, window)
                for tenant, window in merged.items()
                if window.sketch.count or window.errors
            ]
        )

    def _series(self, tenant: UUID, window: ProbeWindow) -> SeriesSketch:
        counts = []
        for slo in self._slos:
            if slo.tenant_id != tenant or slo.threshold_seconds is None:
                continue
            counter = window.counters.get(slo.threshold_seconds)
            counts.append(
                ThresholdCount(
                    slo_id=slo.slo_id,
                    threshold_seconds=slo.threshold_seconds,
                    good=counter.good if counter else 0,
                    total=(counter.total if counter else 0) + window.errors,
                )
            )
        return SeriesSketch(
            tenant_id=tenant,
            deployment_id=None,
            metric="storage_read",
            sketch=base64.b64encode(window.sketch.to_bytes()).decode("ascii"),
            thresholds=counts,
        )
