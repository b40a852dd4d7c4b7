"""The reconciler: verify, apply through drivers, remember the generation, report."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.protocol import ComponentResult, Components, DesiredState, sign_state
from agent.reconciler import Reconciler
from tests.agent.samples import CONTROL_PLANE_KEY, NODE, NOW, components


class Recorder:
    """A driver that records what it was asked to converge on, failing when told to."""

    def __init__(self, fail: bool = False) -> None:
        self.seen: list[Components] = []
        self.fail = fail

    async def apply(self, wanted: Components) -> list[ComponentResult]:
        self.seen.append(wanted)
        return [
            ComponentResult(
                kind="worker",
                name=f"replica-{w.replica_id}",
                ok=not self.fail,
                error="model missing" if self.fail else None,
            )
            for w in wanted.workers
        ]


def signed(generation: int):  # noqa: ANN201
    return sign_state(DesiredState.build(NODE, generation, NOW, components()), CONTROL_PLANE_KEY)


def reconciler(tmp_path: Path, *drivers: Recorder) -> Reconciler:
    return Reconciler(NODE, CONTROL_PLANE_KEY.public_key(), list(drivers), tmp_path)


async def test_applies_reports_and_remembers_across_restarts(tmp_path: Path) -> None:
    driver = Recorder()
    status = await reconciler(tmp_path, driver).handle(signed(3), pulled=False)
    assert status is not None and status.state == "applied" and status.generation == 3
    assert len(driver.seen) == 1 and status.components[0].ok

    restarted = reconciler(tmp_path, driver)
    assert restarted.applied.generation == 3
    # A restarted agent's drivers converge on the state it had applied, once, and say so.
    resumed = await restarted.handle(signed(3), pulled=True)
    assert resumed is not None and resumed.state == "applied" and resumed.generation == 3
    assert len(driver.seen) == 2
    assert await restarted.handle(signed(3), pulled=True) is None  # steady state: nothing to say
    assert await restarted.handle(signed(2), pulled=True) is None  # a push overtook the pull
    replay = await restarted.handle(signed(3), pulled=False)
    assert replay is not None and replay.rejection_reason == "replayed"
    stale = await restarted.handle(signed(1), pulled=False)
    assert stale is not None and stale.rejection_reason == "stale_generation"
    assert "older than applied 3" in (stale.detail or "")
    assert len(driver.seen) == 2  # nothing rejected reached a driver


async def test_failures_are_reported_per_component(tmp_path: Path) -> None:
    status = await reconciler(tmp_path, Recorder(fail=True)).handle(signed(1), pulled=False)
    assert status is not None and status.state == "failed"
    assert status.components[0].error == "model missing"


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda s: s.model_copy(update={"signature": None}), "unsigned"),
        (
            lambda s: s.model_copy(update={"state": s.state.model_copy(update={"generation": 9})}),
            "bad_signature",
        ),
    ],
)
async def test_untrusted_states_never_reach_a_driver(tmp_path: Path, mutate, reason) -> None:  # noqa: ANN001
    driver = Recorder()
    status = await reconciler(tmp_path, driver).handle(mutate(signed(4)), pulled=False)
    assert status is not None and status.state == "rejected" and status.rejection_reason == reason
    assert driver.seen == []
