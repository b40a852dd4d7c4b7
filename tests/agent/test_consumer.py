"""The agent's Celery consumer takes revisions as the control plane sends them (a task on
the node's queue, no priority) from a real Redis and from the embedded filesystem broker,
handing each queue's messages to that queue's receiver (the simulator's one consumer serves
many queues)."""

from __future__ import annotations

import os
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from agent.broker import broker_transport
from agent.protocol import broker_transport_options
from agent.tasks import APPLY_TASK, Consumer, consumer_transport_options


@pytest.mark.parametrize("broker", ["redis", "filesystem"])
def test_the_consumer_delivers_each_queue_to_its_receiver(broker: str, tmp_path: Path) -> None:
    url = os.environ.get("REDIS_URL") if broker == "redis" else f"filesystem://localhost{tmp_path}"
    assert url, "run the tests with ./tailguard test, which starts Redis and sets REDIS_URL"
    queues = [f"agent.{uuid.uuid4()}" for _ in range(5)]
    got: dict[str, list[dict[str, Any]]] = {queue: [] for queue in queues}
    all_in = threading.Event()
    lock = threading.Lock()

    def receiver(queue: str) -> Any:
        def receive(document: dict[str, Any]) -> None:
            with lock:
                got[queue].append(document)
                if all(len(found) == 2 for found in got.values()):
                    all_in.set()

        return receive

    consumer = Consumer(url, {q: receiver(q) for q in queues}, name="test@here")
    consumer.start()
    # What the control plane does (fleet.services.push_after_commit), with its own app.
    producer = Celery("test-control-plane", broker=url, set_as_current=False, fixups=[])
    producer.conf.broker_transport = broker_transport(url)
    producer.conf.broker_transport_options = broker_transport_options(url)
    try:
        with producer.producer_or_acquire() as connection:
            for generation in (1, 2):
                for queue in queues:
                    producer.send_task(
                        APPLY_TASK,
                        args=[{"queue": queue, "generation": generation}],
                        queue=queue,
                        routing_key=queue,
                        producer=connection,
                    )
        assert all_in.wait(120), f"not every revision arrived: {got}"
    finally:
        consumer.stop()
    assert got == {
        queue: [{"queue": queue, "generation": 1}, {"queue": queue, "generation": 2}]
        for queue in queues
    }


def test_a_consumer_watches_one_redis_key_per_queue() -> None:
    """No priority keys: the control plane sends none, and each would lengthen every
    blocking pop the consumer sends by one key per queue."""
    assert consumer_transport_options("redis://broker.example/0")["priority_steps"] == [0]
    options = consumer_transport_options("filesystem://localhost/tmp/broker")
    assert "priority_steps" not in options and options["store_processed"] is False
