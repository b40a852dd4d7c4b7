"""The demo's tour: two tenants sharing one deployment, one of them noisy, SLOs, webhooks.

`seed_tour` adds what the tour needs beside the demo's `acme` tenant: the noisy tenant
`globex`, with acme's `chat` deployment shared with it (so both tenants' requests are
batched together by the same worker, each under its own tenant policy), TTFT and TPOT
SLOs for acme, and a webhook endpoint for acme pointing at a receiver inside the demo
process, which verifies every delivery's Standard Webhooks signature and prints it.
`LoadGenerator` sends both tenants' traffic: acme a steady trickle of short chats, globex
long generations from many clients at once.

Fair queuing admits acme's requests ahead of globex's backlog, so acme's TTFT holds
either way; but every sequence in a batch makes each decode step longer, so without
globex's concurrency and token-rate limits acme's time per output token (TPOT) grows
several times over, and the TPOT SLO pages. The worker can hold acme's TPOT itself: with
the deployment's steps sized to acme's TPOT objective (`tpot_steps`), globex's rows beyond
what keeps a step inside it wait, at a cost in throughput the tour prints beside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
from django.conf import settings
from django.db import transaction
from django.utils import timezone
from standardwebhooks import Webhook, WebhookVerificationError

from controlplane.alerts import services as alerts
from controlplane.alerts.models import WebhookEndpoint
from controlplane.fleet import services as fleet
from controlplane.fleet.models import Deployment
from controlplane.slo import selectors as slo_selectors
from controlplane.slo import services as slo
from controlplane.slo.models import Slo, SloStatus
from controlplane.slo.sli import burn_rules, duration_label
from controlplane.telemetry.choices import Resolution
from controlplane.telemetry.pipeline.merge import bucket_of
from controlplane.tenancy.models import InferenceKey, Tenant
from controlplane.tenancy.services import create_tenant, issue_inference_key, revoke

NOISY_SLUG = "globex"
SLOS = (
    {
        "name": "chat-ttft",
        "display_name": "Chat: 99% of requests see a first token within 250 ms",
        "sli": "ttft",
        "threshold_seconds": 0.25,
    },
    {
        "name": "chat-tpot",
        "display_name": "Chat: 99% of requests stream at 50 ms or less per output token",
        "sli": "tpot",
        "threshold_seconds": 0.05,
    },
)
"""acme's SLOs as seeded. chat-tpot's threshold is loose on purpose: the tour fits it to the
machine, in a new revision, before its story counts on it."""


@dataclass
class TourTenants:
    quiet: Tenant
    noisy: Tenant
    quiet_key: str
    noisy_key: str
    webhook_secret: str


TPOT_HEADROOM = 3.0
"""chat-tpot's threshold, in multiples of acme's TPOT p90 while globex is capped: far
enough above it that other work on the machine does not keep the page firing once globex
is capped again, and below the several-fold TPOT globex causes uncapped."""


def calibrate_tpot_slo(quiet: Tenant, since: datetime) -> tuple[float, float] | None:
    """Fit acme's TPOT threshold to this machine: TPOT_HEADROOM times the p90 measured
    since `since` (globex capped); returns (p90, threshold), or None without enough data.
    Either way chat-tpot starts a new revision now, the one the story is told against:
    nothing counted before it (against another threshold) carries over.

    A CPU twice as fast halves every decode step, capped or not, so a fixed threshold
    would page on a slow machine before globex is let loose, or never on a fast one.
    """
    now = timezone.now()
    p90 = next(
        (
            row["p90"]
            for row in slo_selectors.latency_percentiles(quiet.pk, since, now, now)
            if row["metric"] == "tpot" and row["deployment_name"] == "chat" and row["count"] >= 50
        ),
        None,
    )
    tpot = Slo.objects.get(tenant=quiet, name="chat-tpot")
    if p90 is None:
        slo.update_slo(tpot, new_revision=True, now=now)
        return None
    threshold = round(TPOT_HEADROOM * p90, 4)
    slo.update_slo(
        tpot,
        new_revision=True,
        now=now,
        threshold_seconds=threshold,
        display_name=f"Chat: 99% of requests stream at {threshold * 1000:.1f} ms or less "
        "per output token",
    )
    return p90, threshold


MEASURED_S = 30
"""A span `tpot_and_throughput` reads: whole rollup buckets of ten seconds."""
SETTLED_S = 10.0
"""How long after a span's end its telemetry has arrived from every node."""


def span_at_or_after(moment: datetime) -> datetime:
    """The start of the first span of whole buckets that begins at or after ``moment``."""
    start = bucket_of(moment, Resolution.TEN_SECONDS)
    return start if start == moment else start + timedelta(seconds=Resolution.TEN_SECONDS)


def last_settled_span(now: datetime) -> datetime:
    """The start of the latest span whose telemetry has all arrived by ``now``."""
    end = bucket_of(now - timedelta(seconds=SETTLED_S), Resolution.TEN_SECONDS)
    return end - timedelta(seconds=MEASURED_S)


def settled(start: datetime) -> datetime:
    """When the span from ``start`` has all its telemetry."""
    return start + timedelta(seconds=MEASURED_S + SETTLED_S)


def tpot_and_throughput(quiet: Tenant, start: datetime) -> tuple[float | None, float]:
    """Over the span from ``start``: acme's TPOT p90 on chat (None with too few requests)
    and chat's output tokens per second, both tenants' together."""
    now = timezone.now()
    end = start + timedelta(seconds=MEASURED_S)
    chat = Deployment.objects.get(tenant=quiet, name="chat")
    p90 = next(
        (
            row["p90"]
            for row in slo_selectors.latency_percentiles(quiet.pk, start, end, now)
            if row["metric"] == "tpot" and row["deployment_name"] == "chat" and row["count"] >= 10
        ),
        None,
    )
    return p90, slo_selectors.output_tokens(chat.pk, start, end, now) / MEASURED_S


def size_steps_to_tpot(quiet: Tenant) -> float:
    """Have chat's workers size each decode step to the tightest TPOT objective of the
    requests running (acme's chat-tpot threshold, which they are sent): rows beyond what
    keeps a step inside it wait, globex's first. Returns that threshold."""
    fleet.update_deployment(Deployment.objects.get(tenant=quiet, name="chat"), tpot_steps=True)
    threshold = Slo.objects.get(tenant=quiet, name="chat-tpot").threshold_seconds
    assert threshold is not None, "chat-tpot is a latency SLO"
    return threshold


def tpot_burn(quiet: Tenant) -> tuple[float, float]:
    """chat-tpot evaluated now: its highest burn rate over the page rules' short windows
    (the ones that calm first once globex is capped again), and the page factor."""
    tpot = Slo.objects.get(tenant=quiet, name="chat-tpot")
    now = timezone.now()
    SloStatus.objects.filter(slo=tpot).update(evaluated_at=None)  # not skipped as too recent
    slo.evaluate([tpot.pk], now=now)
    rates = SloStatus.objects.get(slo=tpot).burn_rates
    page = [r for r in burn_rules(tpot.window, now) if r.severity == "page"]
    shorts = [duration_label(r.short) for r in page]
    return max((rates.get(label, 0.0) for label in shorts), default=0.0), page[0].factor


def page_resolves_after(quiet: Tenant) -> str:
    """In words, what a page of chat-tpot waits for before it resolves."""
    tpot = Slo.objects.get(tenant=quiet, name="chat-tpot")
    page = [r for r in burn_rules(tpot.window, timezone.now()) if r.severity == "page"]
    longest = max(page, key=lambda r: r.short)
    hold = duration_label(timedelta(seconds=settings.ALERTS_KEEP_FIRING_FOR_S))
    interval = duration_label(timedelta(seconds=settings.ALERTS_GROUP_INTERVAL_S))
    return (
        f"every page window must be calm (the {duration_label(longest.short)} one holds the "
        f"slow requests longest, and it must fall under {longest.factor:g}x) and stay calm for "
        f"the hold time ({hold}); the resolved webhook then goes out with the page's next "
        f"notification (at most one every {interval})"
    )


class WebhookReceiver:
    """An HTTP receiver on 127.0.0.1 that verifies signatures, reports each alert, and keeps
    the verified ones (status, alert) in `received`, in order of arrival. `port` 0 takes any
    free port."""

    def __init__(self, on_alert: Callable[[str, dict[str, Any]], None], port: int = 0) -> None:
        self.secret = ""
        self.received: list[tuple[str, dict[str, Any]]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                try:
                    payload = Webhook(receiver.secret).verify(body, dict(self.headers))
                except WebhookVerificationError as exc:
                    self.send_response(401)
                    self.end_headers()
                    on_alert("unverified", {"error": str(exc)})
                    return
                for alert in payload.get("alerts", []):  # kept before the sender hears back
                    on_alert(alert["status"], alert)
                    receiver.received.append((alert["status"], alert))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                """Deliveries are reported through on_alert, not access logs."""

        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_port}/alerts"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def got(
        self, status: str, alertname: str, since: int = 0, started_after: datetime | None = None
    ) -> bool:
        """Whether a verified delivery of that status and alert arrived after the first
        `since` ones (about an alert that started after `started_after`, when given)."""
        return any(
            got == status
            and alert.get("labels", {}).get("alertname") == alertname
            and (
                started_after is None
                or datetime.fromisoformat(alert.get("startsAt", "0001-01-01T00:00:00Z"))
                >= started_after
            )
            for got, alert in self.received[since:]
        )

    def close(self) -> None:
        self._server.shutdown()


@transaction.atomic
def seed_tour(quiet: Tenant, receiver_url: str) -> TourTenants:
    """Idempotent: the noisy tenant sharing acme's chat, acme's SLOs and webhook endpoint.

    A run on kept data starts a fresh story: acme's SLOs go back to their seeded
    definitions in a new revision (what an earlier run counted and fired is history),
    chat's steps are no longer sized to acme's TPOT objective, and the endpoint is made
    anew, so nothing queued for an earlier run's receiver is sent."""
    noisy = Tenant.objects.filter(slug=NOISY_SLUG).first() or create_tenant(
        slug=NOISY_SLUG, name="Globex Batch", description="Demo tenant with heavy batch traffic"
    )
    chat = Deployment.objects.get(tenant=quiet, name="chat")
    fleet.share_deployment(chat, [noisy])
    if chat.tpot_steps:  # the story starts with steps that no objective sizes
        fleet.update_deployment(chat, tpot_steps=False)
    for spec in SLOS:
        seeded = {
            "scope": "deployment",
            "deployment": chat,
            "objective": 0.99,
            "window": "rolling_7d",
            **spec,
        }
        existing = Slo.objects.filter(tenant=quiet, name=spec["name"]).first()
        if existing is None:
            slo.create_slo(tenant=quiet, **seeded)
        else:
            slo.update_slo(existing, new_revision=True, **seeded)
    WebhookEndpoint.objects.filter(tenant=quiet, name="demo receiver").delete()
    endpoint = alerts.create_endpoint(
        tenant=quiet, name="demo receiver", url=receiver_url, allow_private_targets=True
    )
    keys = {}
    for tenant in (quiet, noisy):
        for old in InferenceKey.objects.filter(tenant=tenant, name="tour", revoked_at__isnull=True):
            revoke(old)
        keys[tenant.slug] = issue_inference_key(tenant=tenant, name="tour").secret
    return TourTenants(quiet, noisy, keys[quiet.slug], keys[NOISY_SLUG], endpoint.secret)


class LoadGenerator:
    """Both tenants' traffic, on a thread of its own: acme's chats one after another,
    globex's long generations from `noisy_clients` clients at once."""

    def __init__(
        self, quiet: tuple[str, str, str], noisy: tuple[str, str, str], noisy_clients: int = 12
    ) -> None:
        self._quiet, self._noisy, self._clients = quiet, noisy, noisy_clients
        self.sent = {"quiet": 0, "noisy": 0}
        self.failed = {"quiet": 0, "noisy": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    async def _run(self) -> None:
        """Until stopped; the requests under way then are abandoned, not waited for (one
        of globex's, capped and behind its steps, may take longer than a stop should)."""
        async with httpx.AsyncClient(timeout=60) as http:
            clients = asyncio.gather(
                self._client(http, "quiet", self._quiet, max_tokens=16, pause_s=0.2),
                *(
                    self._client(http, "noisy", self._noisy, max_tokens=256, pause_s=0.0)
                    for _ in range(self._clients)
                ),
            )
            while not (self._stop.is_set() or clients.done()):
                await asyncio.sleep(0.1)
            clients.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await clients

    async def _client(
        self,
        http: httpx.AsyncClient,
        who: str,
        target: tuple[str, str, str],
        *,
        max_tokens: int,
        pause_s: float,
    ) -> None:
        url, key, model = target
        body = json.dumps(
            {
                "model": model,
                "messages": [{"role": "user", "content": "Tell me about tail latency."}],
                "max_tokens": max_tokens,
            }
        )
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        while not self._stop.is_set():
            try:
                response = await http.post(
                    f"{url}/v1/chat/completions", content=body, headers=headers
                )
                ok = response.status_code == 200
                retry_after = float(response.headers.get("retry-after", 0) or 0)
            except httpx.HTTPError:
                ok, retry_after = False, 1.0
            self.sent[who] += 1
            self.failed[who] += 0 if ok else 1
            await asyncio.sleep(max(pause_s, retry_after if not ok else 0.0))
