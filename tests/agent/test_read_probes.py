"""The agent's read probes on a real local engine: started, re-rated and stopped by desired
states, their reads shipped as the tenant's storage_read series with exact SLO counts."""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from pathlib import Path

from agent.probes import ReadProbes
from agent.protocol import Components, PoolSpec, SeriesSketch, SloThreshold, VolumeSpec
from agent.storage import StorageDriver
from dataplane.sketch import LatencySketch
from dataplane.storage.local import LocalEngine

MIB = 1 << 20
ACME, GLOBEX = uuid.uuid4(), uuid.uuid4()
LOOSE, TIGHT, OTHER = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()


def components(pool: Path, acme_rate: int, globex_rate: int = 0) -> Components:
    return Components(
        pools=[PoolSpec(name="p", kind="local", directory=str(pool), capacity_bytes=64 * MIB)],
        volumes=[
            VolumeSpec(
                name="a", tenant_id=ACME, pool="p", size_bytes=4 * MIB, read_probe_per_s=acme_rate
            ),
            VolumeSpec(
                name="b", tenant_id=ACME, pool="p", size_bytes=4 * MIB, read_probe_per_s=acme_rate
            ),
            VolumeSpec(
                name="g",
                tenant_id=GLOBEX,
                pool="p",
                size_bytes=4 * MIB,
                read_probe_per_s=globex_rate,
            ),
        ],
        slo_thresholds=[
            SloThreshold(
                slo_id=LOOSE,
                tenant_id=ACME,
                deployment_id=None,
                metric="storage_read",
                threshold_seconds=3600.0,
            ),
            SloThreshold(
                slo_id=TIGHT,
                tenant_id=ACME,
                deployment_id=None,
                metric="storage_read",
                threshold_seconds=1e-12,
            ),
            SloThreshold(
                slo_id=OTHER,
                tenant_id=GLOBEX,
                deployment_id=None,
                metric="storage_read",
                threshold_seconds=3600.0,
            ),
        ],
    )


def _reads(series: SeriesSketch) -> int:
    return LatencySketch.from_bytes(base64.b64decode(series.sketch)).count


async def collected(probes: ReadProbes, tenant: uuid.UUID, reads: int) -> list[SeriesSketch]:
    """Series of `tenant` collected until they hold `reads` reads."""
    got: list[SeriesSketch] = []
    deadline = time.monotonic() + 120  # a guard against a probe that never reads
    while sum(_reads(s) for s in got) < reads:
        assert time.monotonic() < deadline, "no reads measured"
        got += [s for s in (await probes.collect({})).series if s.tenant_id == tenant]
        await asyncio.sleep(0.05)
    return got


def counts(series: list[SeriesSketch]) -> dict[uuid.UUID, tuple[int, int]]:
    out: dict[uuid.UUID, tuple[int, int]] = {}
    for s in series:
        for c in s.thresholds:
            good, total = out.get(c.slo_id, (0, 0))
            out[c.slo_id] = (good + c.good, total + c.total)
    return out


async def test_probes_follow_the_desired_state_and_count_exactly(tmp_path: Path) -> None:
    driver = StorageDriver(LocalEngine(tmp_path / "root"), "local")
    probes = ReadProbes(driver.probe_volumes)
    wanted = components(tmp_path / "pool", acme_rate=200)
    assert all(r.ok for r in await driver.apply(wanted))
    assert await probes.apply(wanted) == []
    try:
        series = await collected(probes, ACME, 50)
        assert {(s.deployment_id, s.metric) for s in series} == {(None, "storage_read")}
        reads = sum(_reads(s) for s in series)
        assert counts(series) == {LOOSE: (reads, reads), TIGHT: (0, reads)}

        # globex's volume starts reading; acme's stop, and what they read last still ships
        wanted = components(tmp_path / "pool", acme_rate=0, globex_rate=100)
        await probes.apply(wanted)
        tail = [s for s in (await probes.collect({})).series if s.tenant_id == ACME]
        assert not [s for s in (await probes.collect({})).series if s.tenant_id == ACME]
        assert counts(tail).keys() <= {LOOSE, TIGHT}
        globex = await collected(probes, GLOBEX, 20)
        g_reads = sum(_reads(s) for s in globex)
        assert counts(globex) == {OTHER: (g_reads, g_reads)}
    finally:
        await probes.close()
    final = (await probes.collect({})).series
    await asyncio.sleep(0.1)
    assert (await probes.collect({})).series == []  # every probe stopped
    assert all(s.tenant_id == GLOBEX for s in final)


async def test_without_files_on_this_host_nothing_is_probed(tmp_path: Path) -> None:
    probes = ReadProbes(None)
    assert await probes.apply(components(tmp_path / "pool", acme_rate=200)) == []
    assert (await probes.collect({})).series == []
