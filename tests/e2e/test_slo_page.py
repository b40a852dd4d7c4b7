"""An outage on a 99.9 % availability SLO pages, and healthy traffic resolves the page,
through the real pipeline: telemetry over /ws/agent/ -> rollups -> `slo.evaluate` on
Celery -> alert and outbox -> a signed webhook.

The control plane (uvicorn) and its Celery worker with beat run for real; the test plays
the node agent (`NodeFeed`: enrolled with a bootstrap token, one batch a second) and the
receiver (Alertmanager format, checked with standardwebhooks). Burn-rate windows judge the
ratio of bad to all events, so at the outage's own rate the page windows would take 70
(1 h rule) to 170 (6 h rule) times the outage's length to clear; traffic returns heavier,
as a drained backlog does, and clears them within a few batches; the page then resolves
once its hold time (shortened here) has passed.
"""

from __future__ import annotations

from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings

from controlplane.alerts.models import Alert, OutboxMessage
from controlplane.fleet.services import create_deployment
from controlplane.inventory.models import Node
from controlplane.inventory.services import create_bootstrap_token
from controlplane.slo.models import SloStatus
from controlplane.slo.services import create_slo
from controlplane.tenancy.services import create_tenant
from tests.bench.slo import PAGE, NodeFeed, pages, stored_events
from tests.controlplane.alerts_helpers import Receiver, make_endpoint, receiving
from tests.controlplane.telemetry_helpers import place
from tests.e2e.stack import running_stack, wait_for

OUTAGE_RATE = 20  # requests a second
RECOVERY_RATE = 5000


def _fingerprints(deliveries: list[Any]) -> Counter[str]:
    """How many distinct messages (webhook ids) came for each page's fingerprint."""
    unique = {d.headers["webhook-id"]: d for d in deliveries}
    return Counter(
        a["fingerprint"]
        for d in unique.values()
        for a in d.body["alerts"]
        if a["labels"]["alertname"] == PAGE
    )


@pytest.mark.e2e
def test_an_outage_pages_once_and_healthy_traffic_resolves_it(
    transactional_db: Any, tmp_path: Path, free_port: int
) -> None:
    tenant = create_tenant(slug="acme", name="Acme")
    deployment = create_deployment(
        tenant=tenant, name="chat", model_name="chat-8b", artifact_uri="synthetic://chat"
    )
    slo = create_slo(
        tenant=tenant,
        name="availability",
        sli="availability",
        objective=0.999,
        scope="deployment",
        deployment=deployment,
    )
    with (
        receiving(Receiver(secrets=[])) as receiver,
        running_stack(  # a short hold and group timing: the test waits less
            tmp_path,
            free_port,
            ALERTS_KEEP_FIRING_FOR_S="5",
            ALERTS_GROUP_WAIT_S="1",
            ALERTS_GROUP_INTERVAL_S="1",
        ) as stack,
    ):
        issued = make_endpoint(tenant, receiver.url, name="pager")
        receiver.secrets.append(issued.secret)
        feed = NodeFeed(
            stack.url,
            create_bootstrap_token(name="e2e").secret,
            tmp_path / "node",
            "slo-node",
            tenant_id=tenant.pk,
            deployment_id=deployment.pk,
            rate=OUTAGE_RATE,
        )
        place(Node.objects.get(pk=feed.node_id), deployment)  # a node reports only what it serves
        feed.slo_ids = (slo.pk,)

        def stored(count: int) -> bool:
            feed.check()
            return stored_events(slo.pk) >= count

        def delivered(status: str) -> list[Any]:
            feed.check()
            return pages(receiver.deliveries, slo.name, status)

        with feed.running():
            wait_for(
                lambda: stored(settings.SLO_ALERT_MIN_EVENTS), 60, "the minimum events for alerts"
            )
            feed.failing = True
            wait_for(lambda: delivered("firing"), 120, "the page")
            feed.failing, feed.rate = False, RECOVERY_RATE
            paged = {a.fingerprint for a in Alert.objects.filter(labels__alertname=PAGE)}
            wait_for(
                lambda: set(_fingerprints(delivered("resolved"))) >= paged,
                120,
                "every page to resolve",
            )
            # healthy traffic goes on being evaluated: nothing pages again
            resolved_at = max(a.ends_at for a in Alert.objects.filter(labels__alertname=PAGE))
            wait_for(
                lambda: (
                    SloStatus.objects.get(slo=slo).evaluated_at > resolved_at + timedelta(seconds=3)
                ),
                60,
                "evaluations after the resolution",
            )
            wait_for(
                lambda: (
                    not OutboxMessage.objects.filter(
                        status="pending", group__labels__severity="page"
                    ).exists()
                ),
                60,
                "the page's outbox to drain",
            )

    episodes = list(Alert.objects.filter(labels__alertname=PAGE))
    assert len(episodes) == len(paged) == 1  # both fast-burn rules folded into one page
    assert all(a.state == "resolved" for a in episodes)
    assert all(a.labels["deployment"] == "chat" and a.severity == "page" for a in episodes)
    assert _fingerprints(delivered("firing")) == dict.fromkeys(paged, 1)
    assert _fingerprints(delivered("resolved")) == dict.fromkeys(paged, 1)
    assert all(d.verified_by == [issued.secret] for d in receiver.deliveries)
