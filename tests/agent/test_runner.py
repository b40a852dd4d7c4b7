"""The agent's root tasks: one that fails stops the agent non-zero; a signal stops it cleanly."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from agent import cli, runner
from agent.client import ControlPlaneClient
from agent.enroll import Identity
from agent.protocol import Inventory, SignedDesiredState, sign_state, state_tag
from agent.reconciler import Reconciler
from agent.runner import NodeAgent, RootTaskFailed, run_root_tasks
from agent.settings import AgentSettings
from agent.shipper import open_shipper
from tests.agent.fakes import TelemetryControlPlane
from tests.agent.samples import CONTROL_PLANE_KEY, NODE, desired_state, inventory
from tests.serving import serving


class ControlPlane:
    """Answers every agent call the way a healthy control plane does, and counts heartbeats."""

    def __init__(self) -> None:
        self.heartbeats = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/heartbeat/"):
            self.heartbeats += 1
        if request.url.path.endswith("/desired-state/"):
            return httpx.Response(204)
        return httpx.Response(200, json={})


@asynccontextmanager
async def node_agent(
    tmp_path: Path,
    discover: Callable[[], Inventory],
    control_plane: ControlPlane,
    resync_interval_s: float = 60,
) -> AsyncIterator[NodeAgent]:
    async with httpx.AsyncClient(transport=httpx.MockTransport(control_plane)) as http:
        identity = Identity(
            node_id=NODE,
            credential="tgn_test",
            control_plane_public_key="",
            queue=f"agent.{NODE}",
            broker_url="memory://",
            heartbeat_interval_s=0.02,
        )
        yield NodeAgent(
            identity,
            ControlPlaneClient(http, "http://cp.test", identity.credential),
            Reconciler(NODE, CONTROL_PLANE_KEY.public_key(), [], tmp_path),
            discover,
            inventory_interval_s=60,
            resync_interval_s=resync_interval_s,
        )


def broken_discovery() -> Inventory:
    raise RuntimeError("sysfs vanished")


async def test_a_failing_root_task_stops_the_others_and_names_itself(tmp_path: Path) -> None:
    control_plane = ControlPlane()
    async with node_agent(tmp_path, broken_discovery, control_plane) as agent:
        with pytest.raises(RootTaskFailed, match="root task inventory failed") as failed:
            await asyncio.wait_for(agent.run(asyncio.Event()), 10)
    assert failed.value.name == "inventory"
    assert isinstance(failed.value.__cause__, RuntimeError)
    heartbeats = control_plane.heartbeats
    await asyncio.sleep(0.1)
    assert control_plane.heartbeats == heartbeats, "heartbeats went on after the failure"


async def test_a_root_task_that_ends_before_the_stop_is_a_failure() -> None:
    async def forever(stop: asyncio.Event) -> None:
        await stop.wait()

    async def quits(stop: asyncio.Event) -> None:
        return None

    with pytest.raises(RootTaskFailed, match="quits ended before the agent was stopped"):
        await asyncio.wait_for(run_root_tasks(asyncio.Event(), {"a": forever, "quits": quits}), 5)


def test_the_agent_exits_non_zero_with_the_reason_logged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def run_agent(settings: AgentSettings) -> None:
        async with node_agent(tmp_path, broken_discovery, ControlPlane()) as agent:
            await agent.run(asyncio.Event())

    monkeypatch.setattr(cli, "run_agent", run_agent)
    with caplog.at_level(logging.CRITICAL, logger="agent"):
        assert cli.main(["run", "--state-dir", str(tmp_path)]) == 1
    (record,) = [r for r in caplog.records if r.levelno == logging.CRITICAL]
    assert "root task inventory failed" in record.getMessage()
    assert "sysfs vanished" in record.getMessage()
    assert record.exc_info and isinstance(record.exc_info[1], RuntimeError)


def test_sigterm_stops_the_agent_cleanly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    control_plane = ControlPlane()

    async def run_agent(settings: AgentSettings) -> None:
        stop = cli._stop_on_signals()  # noqa: SLF001
        asyncio.get_running_loop().call_later(0.2, os.kill, os.getpid(), signal.SIGTERM)
        async with node_agent(tmp_path, inventory, control_plane) as agent:
            await asyncio.wait_for(agent.run(stop), 10)

    monkeypatch.setattr(cli, "run_agent", run_agent)
    assert cli.main(["run", "--state-dir", str(tmp_path)]) == 0
    assert control_plane.heartbeats > 0


def signed_state(generation: int) -> SignedDesiredState:
    return sign_state(desired_state(generation), CONTROL_PLANE_KEY)


class LossyControlPlane(ControlPlane):
    """Answers status reports with the given codes first (0: the connection drops), then
    takes them; records every report it took."""

    def __init__(self, *answers: int) -> None:
        super().__init__()
        self.answers = list(answers)
        self.taken: list[dict[str, object]] = []
        self.took = asyncio.Event()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if not request.url.path.endswith("/status/"):
            return super().__call__(request)
        if self.answers:
            code = self.answers.pop(0)
            if code == 0:
                raise httpx.ReadTimeout("timed out", request=request)
            return httpx.Response(code, json={"detail": "no"})
        self.taken.append(json.loads(request.content))
        self.took.set()
        return httpx.Response(204)


@pytest.fixture
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner, "REPORT_RETRY_INITIAL_S", 0.001)
    monkeypatch.setattr(runner, "REPORT_RETRY_MAX_S", 0.002)


async def _applied_and_reported(agent: NodeAgent, control_plane: LossyControlPlane) -> None:
    stop = asyncio.Event()
    running = asyncio.create_task(agent.run(stop))
    agent.receive(signed_state(1).model_dump(mode="json"))
    await asyncio.wait_for(control_plane.took.wait(), 10)
    stop.set()
    await asyncio.wait_for(running, 10)


async def test_a_status_report_lost_on_the_way_is_sent_again_until_acknowledged(
    tmp_path: Path, quick_retries: None
) -> None:
    control_plane = LossyControlPlane(0, 503, 429, 0)  # timeouts and an overloaded server
    async with node_agent(tmp_path, inventory, control_plane) as agent:
        await _applied_and_reported(agent, control_plane)
        assert agent.unsent_reports == 0
    (report,) = control_plane.taken
    assert report["generation"] == 1 and report["state"] == "applied"
    assert control_plane.answers == []  # every failure was retried


async def test_a_status_report_the_control_plane_refuses_is_not_retried(
    tmp_path: Path, quick_retries: None
) -> None:
    control_plane = LossyControlPlane(400)
    async with node_agent(tmp_path, inventory, control_plane) as agent:
        stop = asyncio.Event()
        running = asyncio.create_task(agent.run(stop))
        agent.receive(signed_state(1).model_dump(mode="json"))
        agent.receive(signed_state(2).model_dump(mode="json"))
        await asyncio.wait_for(control_plane.took.wait(), 10)
        stop.set()
        await asyncio.wait_for(running, 10)
    # The refused report for generation 1 was dropped; generation 2's went through.
    assert [r["generation"] for r in control_plane.taken] == [2]


@pytest.mark.parametrize(
    ("script", "taken"),
    [(["retry", "recorded"], [1, 1]), (["rejected"], [1, 2])],
    ids=["retried", "refused"],
)
async def test_status_reports_over_the_websocket_go_as_their_acks_say(
    tmp_path: Path, quick_retries: None, script: list[str], taken: list[int]
) -> None:
    """With the telemetry WebSocket open to a control plane that takes reports there, a
    report answered `retry` is sent again and one answered `rejected` is dropped, as the
    same answers by HTTP would have it."""
    credential = "tgn_test"
    control_plane = TelemetryControlPlane(credential, statuses=True, status_script=script)
    async with serving(control_plane) as url, httpx.AsyncClient() as http:
        client = ControlPlaneClient(http, url, credential)
        shipper = open_shipper(NODE, tmp_path, client, [], interval_s=3600)
        assert shipper.sender is not None
        sender = shipper.sender
        identity = Identity(
            node_id=NODE,
            credential=credential,
            control_plane_public_key="",
            queue=f"agent.{NODE}",
            broker_url="memory://",
            heartbeat_interval_s=60,
        )
        agent = NodeAgent(
            identity,
            client,
            Reconciler(NODE, CONTROL_PLANE_KEY.public_key(), [], tmp_path),
            inventory,
            inventory_interval_s=60,
            resync_interval_s=60,
            telemetry=shipper,
        )
        stop = asyncio.Event()
        running = asyncio.create_task(agent.run(stop))
        async with asyncio.timeout(30):
            while not sender.connected:
                await asyncio.sleep(0.01)
            for generation in sorted(set(taken)):
                agent.receive(signed_state(generation).model_dump(mode="json"))
            while [s.generation for s in control_plane.statuses] != taken:
                await asyncio.sleep(0.01)
            while agent.unsent_reports:
                await asyncio.sleep(0.01)
        stop.set()
        await asyncio.wait_for(running, 10)
        shipper.close()


class PulledControlPlane(ControlPlane):
    """Serves one signed state to pulls, 304 to a pull that names it; records what each
    pull named and every status report."""

    def __init__(self, signed: SignedDesiredState) -> None:
        super().__init__()
        self.signed = signed
        self.tag = state_tag(signed.state.generation, signed.state.content_hash)
        self.named: list[str | None] = []
        self.reports = 0
        self.pulled_again = asyncio.Event()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/status/"):
            self.reports += 1
            return httpx.Response(204)
        if not request.url.path.endswith("/desired-state/"):
            return super().__call__(request)
        self.named.append(request.headers.get("If-None-Match"))
        if len(self.named) >= 3 and self.reports:
            self.pulled_again.set()
        if self.named[-1] == self.tag:
            return httpx.Response(304, headers={"ETag": self.tag})
        return httpx.Response(200, json=self.signed.model_dump(mode="json"))


async def test_pulls_after_applying_name_the_applied_state_and_change_nothing(
    tmp_path: Path,
) -> None:
    control_plane = PulledControlPlane(signed_state(1))
    async with node_agent(tmp_path, inventory, control_plane, resync_interval_s=0.01) as agent:
        stop = asyncio.Event()
        running = asyncio.create_task(agent.run(stop))
        await asyncio.wait_for(control_plane.pulled_again.wait(), 10)
        stop.set()
        await asyncio.wait_for(running, 10)
    # The first pull names nothing (this process applied nothing yet); the rest name the
    # state it applied, get 304 and apply and report nothing again.
    first, *later = control_plane.named
    assert first is None and later and set(later) == {control_plane.tag}
    assert control_plane.reports == 1 and agent.unsent_reports == 0
