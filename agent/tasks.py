"""The agent's Celery app and its one task, `agent.apply_revision`.

A worker controller runs in a thread and consumes only the node's own queue
(`agent.<node-id>`; the simulator consumes one per simulated node). The task hands
the signed document to the agent's event loop and returns: applying and reporting
happen there, and a message lost in between is recovered by the periodic pull.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from celery import Celery, Task
from celery.worker import WorkController
from celery.worker import state as worker_state

from agent.broker import broker_transport
from agent.protocol import broker_transport_options

log = logging.getLogger(__name__)

Receiver = Callable[[dict[str, Any]], None]

APPLY_TASK = "agent.apply_revision"


def consumer_transport_options(broker_url: str) -> dict[str, object]:
    """The shared transport options, and for Redis one key per queue. The control plane
    sends revisions without a priority, so they land on the queue's own key; a consumer
    watching the three priority keys of each queue too named four keys per queue in every
    blocking pop it sent, one pop per message taken (the simulator's one consumer of a
    thousand queues spent 6 ms a message on that, 2.5 ms with one key)."""
    options = broker_transport_options(broker_url)
    if broker_url.startswith(("redis://", "rediss://", "redis+socket://")):
        options["priority_steps"] = [0]
    return options


# No fix-ups: the Django one would set up Django in an agent started beside a control plane.
app = Celery("tailguard-agent", set_as_current=False, fixups=[])
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    task_acks_late=True,
    worker_prefetch_multiplier=16,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
    broker_connection_max_retries=None,
    task_ignore_result=True,
)
_receivers: dict[str, Receiver] = {}


@app.task(name=APPLY_TASK, bind=True)  # type: ignore[untyped-decorator]
def apply_revision(self: Task, document: dict[str, Any]) -> None:
    queue = (self.request.delivery_info or {}).get("routing_key", "")
    receiver = _receivers.get(queue)
    if receiver is None:
        log.error("a revision arrived on %r, which no agent here consumes; dropped", queue)
        return
    receiver(document)


class Consumer:
    """A Celery worker controller in a thread, consuming the given queues."""

    def __init__(self, broker_url: str, receivers: dict[str, Receiver], name: str) -> None:
        _receivers.update(receivers)
        app.conf.broker_url = broker_url
        app.conf.broker_transport = broker_transport(broker_url)
        app.conf.broker_transport_options = consumer_transport_options(broker_url)
        self._worker = WorkController(
            app=app,
            pool="solo",
            concurrency=1,
            queues=list(receivers),
            hostname=name,
            without_heartbeat=True,
            without_mingle=True,
            without_gossip=True,
            loglevel="WARNING",
            ready_callback=None,
        )
        self._thread = threading.Thread(
            target=self._worker.start, name="celery-consumer", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        worker_state.should_terminate = 0
        self._thread.join(timeout)
        worker_state.should_terminate = None
