"""The agent proper: a few root asyncio tasks sharing one stop flag.

heartbeat   - liveness and the applied generation, every interval the control plane set,
              over the telemetry WebSocket while that is open (and the control plane
              takes them there), else by HTTP
inventory   - discovery at start and every inventory_interval_s
config      - applies pushed revisions (from the Celery consumer) and pulls the desired
              state at start, after a reconnect and every resync_interval_s
reports     - sends the status reports config makes, in order, each retried with backoff
              until the control plane acknowledges it (a repeat is acknowledged, not stored
              twice), so a report lost to a timeout under load is sent again, not lost
telemetry   - one batch every telemetry_interval_s into the disk buffer, shipped over the
              telemetry WebSocket (agent/shipper.py), when the agent is given a shipper
storage     - the storage report (agent/storage.py), which the CLI adds to the others

A root task that fails (raises, or ends before the stop flag is set) stops the others and
raises RootTaskFailed: the agent exits non-zero and systemd or the DaemonSet restarts it,
rather than heartbeats reporting a node that no longer applies or reports anything.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine, Mapping
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    wait_exponential_jitter,
)

from agent import __version__
from agent.client import ControlPlaneClient, ControlPlaneError
from agent.enroll import Identity
from agent.protocol import AppliedStatus, Heartbeat, Inventory, SignedDesiredState
from agent.reconciler import Reconciler
from agent.shipper import TelemetryShipper

log = logging.getLogger(__name__)

RootTask = Callable[[asyncio.Event], Coroutine[Any, Any, None]]
"""A coroutine function that runs until the stop flag is set."""

MAX_UNSENT_REPORTS = 64
"""Status reports kept while the control plane cannot take them; past that the oldest go
(a newer generation's report says more than an older one's)."""
REPORT_RETRY_INITIAL_S = 0.5
REPORT_RETRY_MAX_S = 30.0


def _worth_retrying(error: BaseException) -> bool:
    """Unreachable, timed out, overloaded or failing: try again. Any other 4xx is a report
    the control plane will never take: retrying cannot help."""
    return isinstance(error, ControlPlaneError) and (
        error.status == 0 or error.status >= 500 or error.status in (408, 429)
    )


class RootTaskFailed(Exception):
    """A root task raised (the cause) or ended before the agent was stopped."""

    def __init__(self, name: str, error: BaseException | None) -> None:
        super().__init__(
            f"root task {name} failed: {error!r}"
            if error is not None
            else f"root task {name} ended before the agent was stopped"
        )
        self.name = name


async def run_root_tasks(stop: asyncio.Event, tasks: Mapping[str, RootTask]) -> None:
    """Run each task until `stop`, then cancel what is left. The first to fail cancels the
    others and raises RootTaskFailed from its exception."""
    running = [asyncio.create_task(task(stop), name=name) for name, task in tasks.items()]
    stopped = asyncio.create_task(stop.wait())
    try:
        done, _ = await asyncio.wait([stopped, *running], return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
    for task in running:
        if task not in done:
            continue
        error = None if task.cancelled() else task.exception()
        if error is not None or not stop.is_set():
            raise RootTaskFailed(task.get_name(), error) from error


class NodeAgent:
    def __init__(
        self,
        identity: Identity,
        client: ControlPlaneClient,
        reconciler: Reconciler,
        discover: Callable[[], Inventory],
        *,
        inventory_interval_s: float,
        resync_interval_s: float,
        telemetry: TelemetryShipper | None = None,
    ) -> None:
        self.identity = identity
        self._client = client
        self._reconciler = reconciler
        self._discover = discover
        self._inventory_interval_s = inventory_interval_s
        self._resync_interval_s = resync_interval_s
        self.telemetry = telemetry
        self._pushed: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._resync = asyncio.Event()
        self._started = time.monotonic()
        self._unsent: deque[AppliedStatus] = deque(maxlen=MAX_UNSENT_REPORTS)
        self._report_ready = asyncio.Event()
        self._loop = asyncio.get_running_loop()

    def receive(self, document: dict[str, Any]) -> None:
        """Called from the Celery consumer's thread with a pushed revision."""
        self._loop.call_soon_threadsafe(self._pushed.put_nowait, document)

    async def run(self, stop: asyncio.Event, more: Mapping[str, RootTask] | None = None) -> None:
        """Run the root tasks, and `more` of them by name, until `stop`."""
        tasks: dict[str, RootTask] = {
            "heartbeat": self._heartbeat,
            "inventory": self._inventory,
            "config": self._config,
            "reports": self._send_reports,
        }
        if self.telemetry is not None:
            tasks["telemetry"] = self.telemetry.run
        await run_root_tasks(stop, {**tasks, **(more or {})})

    async def _heartbeat(self, stop: asyncio.Event) -> None:
        connected = True
        sender = self.telemetry.sender if self.telemetry is not None else None
        while not stop.is_set():
            heartbeat = Heartbeat(
                node_id=self.identity.node_id,
                sent_at=datetime.now(UTC),
                agent_version=__version__,
                applied_generation=self._reconciler.applied.generation,
                uptime_s=time.monotonic() - self._started,
            )
            try:
                # Over the telemetry WebSocket when the control plane takes it there: a
                # frame costs it far less than a request.
                if sender is None or not await sender.send_heartbeat(heartbeat):
                    await self._client.post_heartbeat(heartbeat)
                if not connected:
                    log.info("control plane reachable again; pulling desired state")
                    self._resync.set()
                connected = True
            except ControlPlaneError as exc:
                if connected:
                    log.warning("heartbeat failed: %s", exc)
                connected = False
            await _sleep(stop, self.identity.heartbeat_interval_s)

    async def _inventory(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                inventory = await asyncio.to_thread(self._discover)
                await self._client.post_inventory(inventory)
                wait = self._inventory_interval_s
            except ControlPlaneError as exc:
                log.warning("inventory report failed: %s", exc)
                wait = min(self._inventory_interval_s, 5.0)
            await _sleep(stop, wait)

    async def _config(self, stop: asyncio.Event) -> None:
        self._resync.set()  # pull once at start
        while not stop.is_set():
            pushed = asyncio.create_task(self._pushed.get())
            resync = asyncio.create_task(self._resync.wait())
            done, pending = await asyncio.wait(
                {pushed, resync},
                timeout=self._resync_interval_s,
                return_when=asyncio.FIRST_COMPLETED,
            )
            for task in pending:
                task.cancel()
            if pushed in done:
                await self._apply_pushed(pushed.result())
            elif pushed.done() and not pushed.cancelled():
                self._pushed.put_nowait(pushed.result())  # raced with resync: keep it
            if resync in done or not done:
                self._resync.clear()
                await self._pull()

    async def _apply_pushed(self, document: dict[str, Any]) -> None:
        try:
            signed = SignedDesiredState.model_validate(document)
        except ValidationError as exc:
            log.error("dropped a malformed revision message: %s", exc)
            return
        await self._report(await self._reconciler.handle(signed, pulled=False))

    async def _pull(self) -> None:
        try:
            signed = await self._client.desired_state(self._reconciler.applied_tag)
        except ControlPlaneError as exc:
            log.warning("desired state pull failed: %s", exc)
            return
        if signed is not None:
            await self._report(await self._reconciler.handle(signed, pulled=True))

    async def _report(self, status: AppliedStatus | None) -> None:
        """Queue a report for the reports task; applying never waits for the control plane."""
        if status is None:
            return
        if len(self._unsent) == self._unsent.maxlen:
            dropped = self._unsent[0]
            log.warning("status report for generation %s dropped unsent", dropped.generation)
        self._unsent.append(status)
        self._report_ready.set()

    @property
    def unsent_reports(self) -> int:
        return len(self._unsent)

    async def _send_reports(self, stop: asyncio.Event) -> None:
        """Send queued reports oldest first; each is retried with exponential backoff (and
        jitter, so a fleet that lost the control plane does not come back in step) until
        it is acknowledged or the agent stops."""

        async def pause(seconds: float) -> None:
            await _sleep(stop, seconds)

        def stopped(state: RetryCallState) -> bool:
            return stop.is_set()

        def logged(state: RetryCallState) -> None:
            if state.attempt_number == 1 and state.outcome is not None:
                log.warning(
                    "status report for generation %s failed, retrying: %s",
                    self._unsent[0].generation if self._unsent else "?",
                    state.outcome.exception(),
                )

        while not stop.is_set():
            if not self._unsent:
                self._report_ready.clear()
                await _wait_either(stop, self._report_ready)
                continue
            status = self._unsent[0]
            try:
                async for attempt in AsyncRetrying(
                    retry=retry_if_exception(_worth_retrying),
                    wait=wait_exponential_jitter(
                        multiplier=REPORT_RETRY_INITIAL_S,
                        max=REPORT_RETRY_MAX_S,
                        jitter=REPORT_RETRY_INITIAL_S,
                    ),
                    stop=stopped,
                    sleep=pause,
                    before_sleep=logged,
                    reraise=True,
                ):
                    with attempt:
                        await self._send_status(status)
            except ControlPlaneError as exc:
                if _worth_retrying(exc):
                    return  # stopped while retrying
                log.error(
                    "status report for generation %s refused, not sent again: %s",
                    status.generation,
                    exc,
                )
            if self._unsent and self._unsent[0] is status:
                self._unsent.popleft()

    async def _send_status(self, status: AppliedStatus) -> None:
        """Over the telemetry WebSocket where the control plane takes reports there (a
        frame costs it far less than a request), else by HTTP; its outcome as the HTTP
        answer would have been (a refused report raises a 4xx, one to retry a 503)."""
        sender = self.telemetry.sender if self.telemetry is not None else None
        ack = await sender.send_status(status) if sender is not None else None
        if ack is None:
            await self._client.post_status(status)
        elif ack.outcome == "rejected":
            raise ControlPlaneError(400, ack.reason or "status report rejected")
        elif ack.outcome == "retry":
            raise ControlPlaneError(503, ack.reason or "status report to be sent again")


async def _wait_either(stop: asyncio.Event, event: asyncio.Event) -> None:
    waiters = [asyncio.create_task(stop.wait()), asyncio.create_task(event.wait())]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


async def _sleep(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    except TimeoutError:
        pass
