"""A real webhook receiver and builders shared by the alert, webhook, isolation and e2e tests."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from django.utils import timezone
from standardwebhooks import Webhook, WebhookVerificationError

from controlplane.alerts import services as alerts
from controlplane.alerts.models import DeliveryAttempt, OutboxMessage
from controlplane.core.secrets import Issued

PUBLIC_URL = "https://93.184.216.34/hook"  # a public address: accepted without a lookup


@dataclass
class Delivery:
    headers: dict[str, str]
    body: dict[str, Any]
    verified_by: list[str]  # which of the receiver's secrets verify it


@dataclass
class Receiver:
    """An HTTP server on 127.0.0.1 that answers as scripted (200 once the script runs out)
    and checks every request with standardwebhooks' `Webhook(secret).verify`."""

    secrets: list[str]
    script: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    deliveries: list[Delivery] = field(default_factory=list)
    hold: threading.Event | None = None  # when set up, requests wait for it before answering
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def verified(self) -> list[Delivery]:
        return [d for d in self.deliveries if d.verified_by]

    def ids(self) -> set[str]:
        return {d.headers["webhook-id"] for d in self.verified()}

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        raw = handler.rfile.read(int(handler.headers["Content-Length"]))
        headers = {k.lower(): v for k, v in handler.headers.items()}
        verified_by = []
        for secret in self.secrets:
            try:
                Webhook(secret).verify(raw, headers)
                verified_by.append(secret)
            except WebhookVerificationError:
                pass
        self.deliveries.append(Delivery(headers, json.loads(raw), verified_by))
        if self.hold is not None:
            self.hold.wait(60)
        status, extra = self.script.pop(0) if self.script else (200, {})
        handler.send_response(status)
        for name, value in extra.items():
            handler.send_header(name, value)
        handler.send_header("Content-Length", "2")
        handler.end_headers()
        handler.wfile.write(b"ok")


@contextmanager
def receiving(receiver: Receiver) -> Iterator[Receiver]:
    """Serve `receiver` (on its port, or a free one) until the block ends."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            receiver._handle(self)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", receiver.port), Handler)
    server.daemon_threads = True
    receiver.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        if receiver.hold is not None:
            receiver.hold.set()
        server.shutdown()
        server.server_close()


def make_endpoint(tenant: Any, url: str = PUBLIC_URL, **fields: Any) -> Issued:
    """An endpoint; a loopback `url` is allowed through the endpoint's own flag."""
    fields.setdefault("allow_private_targets", url != PUBLIC_URL)
    return alerts.create_endpoint(tenant=tenant, name=fields.pop("name", "hook"), url=url, **fields)


def fire(tenant: Any, alertname: str = "HighTTFT", firing: bool = True, **labels: str) -> Any:
    return alerts.sync_alert(
        tenant=tenant,
        labels={"alertname": alertname, **labels},
        annotations={"summary": f"{alertname} is burning the error budget"},
        severity="page",
        firing=firing,
    )


def make_message(tenant: Any) -> OutboxMessage:
    endpoint = make_endpoint(tenant, name=f"hook-{tenant.slug}").obj
    fire(tenant, alertname=f"Alert-{tenant.slug}")
    return OutboxMessage.objects.get(endpoint=endpoint)


def make_attempt(tenant: Any) -> DeliveryAttempt:
    """A logged attempt; its endpoint's address refuses (nothing listens on port 9)."""
    endpoint = make_endpoint(tenant, "http://127.0.0.1:9/", name=f"down-{tenant.slug}").obj
    fire(tenant, alertname=f"Down-{tenant.slug}")
    message = OutboxMessage.objects.get(endpoint=endpoint)
    make_due(message)  # past its group wait
    alerts.deliver(message.pk)
    return DeliveryAttempt.objects.get(message=message)


def make_due(*messages: OutboxMessage) -> None:
    """Let the backoff elapse: the messages become due now."""
    OutboxMessage.objects.filter(pk__in=[m.pk for m in messages]).update(
        next_attempt_at=timezone.now()
    )
