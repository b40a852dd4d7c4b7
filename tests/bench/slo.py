"""SLO benchmark: how exact the percentiles are, and how soon an outage pages.

`percentile_error`: how far a p99 read from a DDSketch, and one read from classic
Prometheus histogram buckets, land from the exact p99 of realistic TTFT samples. Each
scenario is a lognormal mixture (a fast mode and a slow, queued or cold-start tail), drawn
with several seeds. The sketch path is the production one: eight workers each fill a
sketch, ship its bytes, and the merged sketch answers. The bucket path counts the same
samples into vLLM's `time_to_first_token_seconds` buckets and applies PromQL's
`histogram_quantile` (linear interpolation inside the bucket). Figures are the worst
relative error over every scenario and seed (and the mean).

`detect_to_webhook`: from the first failing request of a full outage on a 99.9 %
availability SLO to its page (SLOBurnRatePage, firing) arriving at a webhook receiver.
Throwaway PostgreSQL and Redis, the control plane (uvicorn) and its Celery worker with
beat; this process plays a node agent (enrolled with a bootstrap token, one
TelemetryBatch a second over /ws/agent/) and the receiver (Alertmanager format, checked
with standardwebhooks). Each round takes a fresh SLO through healthy traffic until the
alerts' minimum-events guard is met, then fails every request until the page arrives.
The first failing request is taken at the start of the first failing batch's interval
(the worst case). Where the time goes, per stage: the batch interval; batch sent -> the
evaluation that fired (WebSocket, ingest flush and rollup commit, the `slo.evaluate` task
through Redis to Celery, the per-SLO debounce, and a later batch's turn when the first
one's evaluation was skipped); evaluation -> alert and outbox message written; outbox ->
the send starting (the group wait, commit, the delivery task through Celery); send -> the
receiver. `notifications_per_incident`: the most webhooks one round's outage queued to
the one endpoint (alerts are grouped per SLO and severity: a page and a ticket), with the
alerts' hold time (`keep_firing_for_s`) in force. Beside
the chain, `ingest_ack`: batch sent -> its ack, which the control plane sends once the
rollups are committed (the evaluation may start before the ack is back).

    .venv/bin/python -m tests.bench.slo --json
    .venv/bin/python -m tests.bench.slo --only detect_to_webhook --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import bisect
import contextlib
import itertools
import json
import math
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import numpy as np
from tqdm import tqdm
from websockets.asyncio.client import ClientConnection, connect

from agent.client import ControlPlaneClient
from agent.discovery.host import HostCollector
from agent.enroll import load_or_enroll
from agent.protocol import SeriesSketch, TelemetryAck, TelemetryBatch, ThresholdCount, UsageCount
from dataplane.sketch import LatencySketch
from tests.bench.common import (
    Processes,
    control_plane_environment,
    percentile,
    report,
    start_web,
    wait,
)

# vllm/v1/metrics/loggers.py, vllm:time_to_first_token_seconds
VLLM_TTFT_BUCKETS = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
    10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
]  # fmt: skip
WORKERS = 8


@dataclass(frozen=True)
class Mode:
    share: float
    median_s: float
    sigma: float


SCENARIOS: dict[str, list[Mode]] = {
    "chat": [Mode(0.95, 0.15, 0.5), Mode(0.05, 1.2, 0.6)],
    "long_prompts": [Mode(1.0, 0.6, 0.8)],
    "cold_start_tail": [Mode(0.99, 0.08, 0.3), Mode(0.01, 8.0, 0.5)],
    "saturated": [Mode(0.7, 0.3, 0.4), Mode(0.3, 3.0, 0.7)],
}


def draw(modes: list[Mode], n: int, rng: np.random.Generator) -> np.ndarray:
    counts = rng.multinomial(n, [m.share for m in modes])
    parts = [
        rng.lognormal(math.log(m.median_s), m.sigma, count)
        for m, count in zip(modes, counts, strict=True)
    ]
    samples = np.concatenate(parts)
    rng.shuffle(samples)
    return samples


def sketch_quantile(samples: np.ndarray, q: float) -> float:
    """Fill one sketch per worker, ship bytes, merge: what the control plane reads."""
    merged = LatencySketch()
    for part in np.array_split(samples, WORKERS):
        worker = LatencySketch()
        for value in part.tolist():
            worker.add(value)
        merged.merge(LatencySketch.from_bytes(worker.to_bytes()))
    value = merged.quantile(q)
    assert value is not None, "the merged sketch is empty"
    return value


def histogram_quantile(samples: np.ndarray, q: float, bounds: list[float]) -> float:
    """PromQL histogram_quantile over cumulative `le` buckets (+Inf last)."""
    counts = [0] * (len(bounds) + 1)
    for value in samples.tolist():
        counts[bisect.bisect_left(bounds, value)] += 1
    rank = q * len(samples)
    cumulative = 0
    for index, count in enumerate(counts):
        if cumulative + count >= rank:
            if index == len(bounds):  # the +Inf bucket: Prometheus answers the last bound
                return bounds[-1]
            lower = 0.0 if index == 0 else bounds[index - 1]
            upper = bounds[index]
            return lower + (upper - lower) * (rank - cumulative) / count
        cumulative += count
    return bounds[-1]


def percentile_error(args: argparse.Namespace, progress: tqdm) -> dict[str, Any]:
    sketch_errors: list[float] = []
    bucket_errors: list[float] = []
    for name, modes in SCENARIOS.items():
        for seed in range(args.seeds):
            rng = np.random.default_rng(seed)
            samples = draw(modes, args.samples, rng)
            exact = percentile(samples.tolist(), 99)
            sketch_errors.append(abs(sketch_quantile(samples, 0.99) - exact) / exact)
            bucket_errors.append(
                abs(histogram_quantile(samples, 0.99, VLLM_TTFT_BUCKETS) - exact) / exact
            )
            progress.set_postfix_str(f"{name} seed {seed}")
            progress.update()
    return {
        "p99_rel_err_sketch": max(sketch_errors),
        "p99_rel_err_prom_buckets": max(bucket_errors),
        "p99_rel_err_sketch_mean": float(np.mean(sketch_errors)),
        "p99_rel_err_prom_buckets_mean": float(np.mean(bucket_errors)),
        "scenarios": len(SCENARIOS),
        "seeds": args.seeds,
        "samples_per_run": args.samples,
    }


# --- detect_to_webhook ----------------------------------------------------------------------

PAGE = "SLOBurnRatePage"
BATCH_INTERVAL_S = 1.0
E2E_S = 0.8
"""What each completed request took; availability counts it good whatever it took."""
STAGES = (
    "batch_interval",
    "batch_to_evaluation",
    "evaluation_to_outbox",
    "outbox_to_send",
    "send_to_receiver",
)
"""The chain from the first failing request to the page, each stage's end the next's start."""


@dataclass
class Sent:
    """One batch the node sent and what came of it; times are wall-clock seconds."""

    seq: int
    interval_start: datetime
    interval_end: datetime
    slo_ids: tuple[UUID, ...]
    failing: bool
    sent_at: float
    acked_at: float | None = None
    outcome: str | None = None


class NodeFeed:
    """A node agent whose workers serve one deployment, played by this process.

    It enrolls with a bootstrap token through the agent's own enrollment code, then, on a
    thread of its own, streams one TelemetryBatch a second over /ws/agent/: the
    deployment's usage and an e2e series carrying the availability counts of `slo_ids`
    (good = completed, total = completed + failed + rejected). Each batch holds `rate`
    requests a second, all completed, or all failed while `failing`; other threads change
    these and the next batch follows.
    """

    def __init__(
        self,
        url: str,
        bootstrap_token: str,
        state_dir: Path,
        hostname: str,
        *,
        tenant_id: UUID,
        deployment_id: UUID,
        rate: int,
    ) -> None:
        self.tenant_id, self.deployment_id = tenant_id, deployment_id
        self.rate = rate
        self.failing = False
        self.slo_ids: tuple[UUID, ...] = ()
        self.sent: dict[int, Sent] = {}
        self.error: BaseException | None = None
        self.node_id, self._socket_url, self._headers = asyncio.run(
            self._enroll(url, bootstrap_token, state_dir, hostname)
        )
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._main, name=f"feed-{hostname}", daemon=True)

    @staticmethod
    async def _enroll(
        url: str, token: str, state_dir: Path, hostname: str
    ) -> tuple[UUID, str, dict[str, str]]:
        host = HostCollector().collect().model_copy(update={"hostname": hostname})
        async with httpx.AsyncClient(timeout=30) as http:
            client = ControlPlaneClient(http, url)
            identity = await load_or_enroll(client, state_dir, hostname, host, token)
        node = client.with_credential(identity.credential)
        return identity.node_id, node.telemetry_socket_url, node.auth_headers

    @contextlib.contextmanager
    def running(self) -> Iterator[NodeFeed]:
        self._thread.start()
        try:
            yield self
        finally:
            self._stopping.set()
            self._thread.join(timeout=10)

    def check(self) -> None:
        """Raise what stopped the stream, if it stopped."""
        if self.error is not None:
            raise RuntimeError(f"the node's telemetry stream stopped: {self.error!r}")

    def first_failing(self, slo_id: UUID) -> Sent | None:
        """The first batch that counted failures against the SLO."""
        return next(
            (s for _, s in sorted(self.sent.items()) if s.failing and slo_id in s.slo_ids), None
        )

    def _main(self) -> None:
        try:
            asyncio.run(self._stream())
        except BaseException as exc:  # told to the measuring thread by check()
            self.error = exc

    async def _stream(self) -> None:
        loop = asyncio.get_running_loop()
        async with connect(self._socket_url, additional_headers=self._headers) as ws:
            reader = asyncio.create_task(self._read_acks(ws))
            start, tick, seq = datetime.now(UTC), loop.time(), 0
            while not self._stopping.is_set():
                tick += BATCH_INTERVAL_S
                await asyncio.sleep(max(0.0, tick - loop.time()))
                if reader.done():
                    reader.result()
                    raise ConnectionError("the control plane closed the telemetry WebSocket")
                end, seq = datetime.now(UTC), seq + 1
                batch = self._batch(seq, start, end)
                await ws.send(batch.model_dump_json())
                start = end
            reader.cancel()

    def _batch(self, seq: int, start: datetime, end: datetime) -> TelemetryBatch:
        slo_ids, failing = self.slo_ids, self.failing
        requests = max(1, round(self.rate * (end - start).total_seconds()))
        completed, failed = (0, requests) if failing else (requests, 0)
        sketch = LatencySketch()
        for _ in range(completed):
            sketch.add(E2E_S)
        self.sent[seq] = Sent(seq, start, end, slo_ids, failing, sent_at=time.time())
        return TelemetryBatch(
            node_id=self.node_id,
            seq=seq,
            interval_start=start,
            interval_end=end,
            gauges={},
            series=[
                SeriesSketch(
                    tenant_id=self.tenant_id,
                    deployment_id=self.deployment_id,
                    metric="e2e",
                    sketch=base64.b64encode(sketch.to_bytes()).decode("ascii"),
                    thresholds=[
                        ThresholdCount(
                            slo_id=slo_id,
                            threshold_seconds=None,
                            good=completed,
                            total=completed + failed,
                        )
                        for slo_id in slo_ids
                    ],
                )
            ],
            counters={},
            usage=[
                UsageCount(
                    tenant_id=self.tenant_id,
                    deployment_id=self.deployment_id,
                    completed=completed,
                    failed=failed,
                    rejected=0,
                    cancelled=0,
                    input_tokens=100 * completed,
                    output_tokens=50 * completed,
                )
            ],
        )

    async def _read_acks(self, ws: ClientConnection) -> None:
        async for frame in ws:
            ack = TelemetryAck.model_validate_json(frame)
            sent = self.sent[ack.seq]
            sent.acked_at, sent.outcome = time.time(), ack.outcome


def page_receiver() -> Any:
    """The alert tests' webhook receiver (every delivery checked with standardwebhooks),
    also noting when each delivery first arrived. Built on call: its module needs Django."""
    from tests.controlplane.alerts_helpers import Receiver

    @dataclass
    class TimedReceiver(Receiver):
        arrived: dict[str, float] = field(default_factory=dict)  # webhook-id -> time.time()

        def _handle(self, handler: BaseHTTPRequestHandler) -> None:
            self.arrived.setdefault(handler.headers["webhook-id"], time.time())
            super()._handle(handler)

    return TimedReceiver(secrets=[])


def pages(deliveries: list[Any], slo_name: str, status: str) -> list[Any]:
    """The verified SLOBurnRatePage deliveries about one SLO in one status."""
    return [
        delivery
        for delivery in deliveries
        if delivery.verified_by
        and any(
            alert["status"] == status
            and alert["labels"].get("alertname") == PAGE
            and alert["labels"].get("slo") == slo_name
            for alert in delivery.body["alerts"]
        )
    ]


def notifications(slo_name: str) -> int:
    """Webhooks the SLO's incident sent or queued, to every endpoint (grouped: its page,
    and apart from it its tickets)."""
    from controlplane.alerts.models import OutboxMessage

    return OutboxMessage.objects.filter(group__labels__slo=slo_name).count()


def stored_events(slo_id: UUID) -> int:
    """Events of the SLO in its committed 10 s rollups."""
    from django.db.models import Sum

    from controlplane.telemetry.models import SloRollup

    rows = SloRollup.objects.filter(slo_id=slo_id, resolution=10)
    return int(rows.aggregate(n=Sum("total"))["n"] or 0)


def stages(feed: NodeFeed, receiver: Any, slo: Any) -> dict[str, float]:
    """Where one round's time went, from the first failing request to the first page."""
    from controlplane.alerts.models import Alert, OutboxMessage

    page = min(
        pages(receiver.deliveries, slo.name, "firing"),
        key=lambda d: receiver.arrived[d.headers["webhook-id"]],
    )
    webhook_id = page.headers["webhook-id"]
    message = OutboxMessage.objects.get(webhook_id=webhook_id)
    attempt = message.deliveries.order_by("started_at").first()
    alert = Alert.objects.get(labels__alertname=PAGE, labels__slo=slo.name)
    first = feed.first_failing(slo.pk)
    assert first is not None and first.acked_at is not None, "no failing batch was acked"
    assert first.outcome == "stored", f"the first failing batch was {first.outcome}"
    fired = alert.starts_at.timestamp()  # the `now` of the evaluation that fired
    marks = [
        first.interval_start.timestamp(),
        first.interval_end.timestamp(),
        fired,
        message.created_at.timestamp(),
        attempt.started_at.timestamp(),
        receiver.arrived[webhook_id],
    ]
    result = {stage: b - a for stage, (a, b) in zip(STAGES, itertools.pairwise(marks), strict=True)}
    result["total"] = marks[-1] - marks[0]
    result["ingest_ack"] = first.acked_at - first.sent_at
    return result


def detect_to_webhook(args: argparse.Namespace, progress: tqdm) -> dict[str, Any]:
    with control_plane_environment() as work, Processes(work) as procs:
        from django.conf import settings

        from controlplane import processes
        from controlplane.alerts.models import OutboxMessage
        from controlplane.alerts.services import create_endpoint, send_test
        from controlplane.fleet.services import create_deployment
        from controlplane.inventory.models import Node
        from controlplane.inventory.services import create_bootstrap_token
        from controlplane.slo.services import create_slo, delete_slo
        from controlplane.tenancy.services import create_tenant
        from tests.controlplane.alerts_helpers import receiving
        from tests.controlplane.telemetry_helpers import place

        progress.set_postfix_str("starting the control plane")
        url = start_web(procs, args.port)
        procs.spawn("celery", processes.celery_worker(work / "beat-schedule"))
        tenant = create_tenant(slug="bench", name="Bench")
        deployment = create_deployment(
            tenant=tenant, name="chat", model_name="chat", artifact_uri="synthetic://chat"
        )
        rounds: list[dict[str, float]] = []
        with receiving(page_receiver()) as receiver:
            endpoint = create_endpoint(
                tenant=tenant, name="pager", url=receiver.url, allow_private_targets=True
            )
            receiver.secrets.append(endpoint.secret)
            send_test(endpoint.obj)  # the Celery worker is up once this arrives
            wait(lambda: receiver.verified(), 120, "the Celery worker to deliver a test", procs)
            feed = NodeFeed(
                url,
                create_bootstrap_token(name="bench").secret,
                work / "node",
                "slo-bench-node",
                tenant_id=tenant.pk,
                deployment_id=deployment.pk,
                rate=args.rate,
            )
            place(
                Node.objects.get(pk=feed.node_id), deployment
            )  # a node reports only what it serves
            with feed.running():
                for index in range(args.rounds):
                    slo = create_slo(
                        tenant=tenant,
                        name=f"availability-{index}",
                        sli="availability",
                        objective=0.999,
                        scope="deployment",
                        deployment=deployment,
                    )
                    feed.slo_ids = (slo.pk,)
                    progress.set_postfix_str(f"round {index}: healthy traffic")

                    def warmed(slo_id: UUID = slo.pk) -> bool:
                        feed.check()
                        return stored_events(slo_id) >= settings.SLO_ALERT_MIN_EVENTS

                    wait(warmed, 120, "the minimum events for alerts", procs)
                    feed.failing = True
                    progress.set_postfix_str(f"round {index}: outage")

                    def paged(name: str = slo.name) -> bool:
                        feed.check()
                        return bool(pages(receiver.deliveries, name, "firing"))

                    wait(paged, args.page_timeout, "the page", procs)
                    feed.failing, feed.slo_ids = False, ()

                    def page_recorded(name: str = slo.name) -> bool:
                        return OutboxMessage.objects.filter(
                            group__labels__slo=name,
                            group__labels__severity="page",
                            status="delivered",
                        ).exists()

                    wait(  # the attempt is recorded once the receiver has answered
                        page_recorded,
                        60,
                        "the page's delivery to be recorded",
                        procs,
                    )
                    rounds.append(
                        {**stages(feed, receiver, slo), "notifications": notifications(slo.name)}
                    )
                    delete_slo(slo)  # resolves its alerts; the next round starts afresh
                    progress.set_postfix_str(f"round {index}: {rounds[-1]['total']:.2f} s")
                    progress.update()
    totals = [r["total"] for r in rounds]
    results: dict[str, Any] = {
        "detect_to_webhook_s": max(totals),
        "detect_to_webhook_p50_s": percentile(totals, 50),
        "detect_goal_s": 60.0,
        "detect_rounds": len(rounds),
        "detect_requests_per_s": args.rate,
        "notifications_per_incident": max(r["notifications"] for r in rounds),
        "keep_firing_for_s": settings.ALERTS_KEEP_FIRING_FOR_S,
        "group_wait_s": settings.ALERTS_GROUP_WAIT_S,
    }
    for stage in (*STAGES, "ingest_ack"):
        values = [r[stage] for r in rounds]
        results[f"detect_{stage}_p50_s"] = percentile(values, 50)
        results[f"detect_{stage}_max_s"] = max(values)
    return results


Measurement = Callable[[argparse.Namespace, tqdm], dict[str, Any]]
MEASUREMENTS: dict[str, tuple[Measurement, Callable[[argparse.Namespace], int]]] = {
    # name: (run, progress steps)
    "percentile_error": (percentile_error, lambda args: len(SCENARIOS) * args.seeds),
    "detect_to_webhook": (detect_to_webhook, lambda args: args.rounds),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tailguard bench slo", description=__doc__.splitlines()[0] if __doc__ else None
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--samples", type=int, default=100_000, help="samples per run")
    parser.add_argument("--seeds", type=int, default=5, help="runs per scenario")
    parser.add_argument("--rounds", type=int, default=5, help="outages to page on")
    parser.add_argument("--rate", type=int, default=20, help="requests a second on the node")
    parser.add_argument(
        "--page-timeout", type=float, default=180, help="seconds to wait for a page"
    )
    parser.add_argument("--port", type=int, default=18767, help="the control plane's port")
    parser.add_argument(
        "--only", choices=sorted(MEASUREMENTS), action="append", help="run just these"
    )
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.rate < 1:
        parser.error("--rounds and --rate must be at least 1")
    chosen = args.only or list(MEASUREMENTS)
    results: dict[str, Any] = {}
    steps = sum(MEASUREMENTS[name][1](args) for name in chosen)
    with tqdm(total=steps, file=sys.stderr, unit="run") as progress:
        for name in chosen:
            results.update(MEASUREMENTS[name][0](args, progress))
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        report(results, as_json=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
