"""The ASGI handler takes each request's thread from a pool (requests one after another
share a thread, requests at the same time each have their own) and runs the middleware
chain and the view there in one synchronous call."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import httpx
from django.core.signals import request_started
from django.utils.deprecation import MiddlewareMixin

from controlplane.core.asgi import PooledThreadASGIHandler


async def test_requests_reuse_threads_and_still_run_side_by_side() -> None:
    handler = PooledThreadASGIHandler()
    served: list[threading.Thread] = []
    meeting: list[threading.Barrier] = []

    def started(**kwargs: Any) -> None:  # runs on the request's thread
        served.append(threading.current_thread())
        if meeting:
            meeting[0].wait()

    request_started.connect(started, weak=False, dispatch_uid="test_asgi")
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=handler), base_url="http://testserver"
        ) as client:
            for _ in range(3):
                assert (await client.get("/api/v1/no-such-thing/")).status_code == 404
            assert len(served) == 3 and len(set(served)) == 1, served

            # Two at once: each waits on its thread for the other to arrive, which only
            # threads of their own allow (one shared thread would break the barrier).
            meeting.append(threading.Barrier(2, timeout=60))
            answers = await asyncio.gather(
                client.get("/api/v1/no-such-thing/"), client.get("/api/v1/no-such-thing/")
            )
            assert [a.status_code for a in answers] == [404, 404]
            assert len(set(served[3:])) == 2 and served[0] in served[3:], served
    finally:
        request_started.disconnect(dispatch_uid="test_asgi")


class Probe(MiddlewareMixin):
    """Records whether Django hands it an asynchronous next step."""

    built: list[bool] = []

    def __init__(self, get_response: Any) -> None:
        super().__init__(get_response)
        Probe.built.append(asyncio.iscoroutinefunction(get_response))


async def test_middleware_and_view_run_in_one_synchronous_call(settings: Any) -> None:
    """Each synchronous middleware hook of Django's async chain is a hop between the event
    loop and the request's thread; the handler runs the chain synchronously instead."""
    settings.MIDDLEWARE = [*settings.MIDDLEWARE, f"{__name__}.Probe"]
    Probe.built.clear()
    handler = PooledThreadASGIHandler()
    assert Probe.built == [False]
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=handler), base_url="http://testserver"
    ) as client:
        response = await client.get("/api/v1/no-such-thing/")
    assert response.status_code == 404 and response.json()
