"""Enrollment waits out an unreachable or failing control plane and gives up on a refusal."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from agent.client import ControlPlaneClient
from agent.enroll import EnrollmentError, Identity, load_or_enroll
from agent.protocol import EnrollmentGrant, encode_public_key, queue_name
from tests.agent.samples import CONTROL_PLANE_KEY, NODE, host

GRANT = EnrollmentGrant(
    node_id=NODE,
    node_credential="tgn_" + "x" * 40,
    control_plane_public_key=encode_public_key(CONTROL_PLANE_KEY.public_key()),
    queue=queue_name(NODE),
    broker_url="memory://",  # stored at enrollment, never connected to here
    heartbeat_interval_s=15.0,
)


async def enroll(
    tmp_path: Path, answers: list[int], stop: asyncio.Event | None = None
) -> tuple[Identity, list[int]]:
    """Enroll against a control plane that answers `answers` in turn (200: the grant)."""
    seen: list[int] = []

    def answer(request: httpx.Request) -> httpx.Response:
        status = answers[min(len(seen), len(answers) - 1)]
        seen.append(status)
        if status == 0:
            raise httpx.ConnectError("connection refused", request=request)
        if status == 200:
            return httpx.Response(200, content=GRANT.model_dump_json())
        return httpx.Response(status, text="no")

    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as http:
        client = ControlPlaneClient(http, "http://cp.test")
        identity = await asyncio.wait_for(
            load_or_enroll(client, tmp_path, "gpu-node-01", host(), "tgb_" + "t" * 32, stop), 10
        )
    return identity, seen


async def test_an_unreachable_or_failing_control_plane_is_waited_out(tmp_path: Path) -> None:
    identity, seen = await enroll(tmp_path, [0, 503, 200])
    assert seen == [0, 503, 200]
    assert identity.node_id == NODE
    assert Identity.load(tmp_path) == identity


async def test_a_refused_token_gives_up_at_once(tmp_path: Path) -> None:
    with pytest.raises(EnrollmentError, match="enrollment refused: control plane answered 403"):
        await enroll(tmp_path, [403, 200])
    assert Identity.load(tmp_path) is None


async def test_a_stop_during_the_wait_gives_up(tmp_path: Path) -> None:
    stop = asyncio.Event()
    stop.set()
    with pytest.raises(EnrollmentError, match="stopped before enrollment completed"):
        await enroll(tmp_path, [503], stop)
