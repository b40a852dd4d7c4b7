"""TTFT prediction from a replica's own state and costs, and the choice among replicas."""

from __future__ import annotations

from typing import Any

import pytest

from dataplane.gateway.config import ReplicaConfig
from dataplane.gateway.routing import Replica, ReplicaState, choose, choose_ahead
from dataplane.inference.config import TenantConfig


def replica(name: str = "r", **state: Any) -> Replica:
    message: dict[str, Any] = {
        "running": 0,
        "max_batch_size": 8,
        "free_slots": 8,
        "queued": [],
        "prefill_tokens": 0,
        "max_tokens_per_step": 512,
        "step_s": 0.01,
        "prefill_token_s": 0.0001,
        "mean_e2e_s": 1.0,
        "preempts": True,
        **state,
    }
    found = Replica(ReplicaConfig(replica_id=name, base_url="http://127.0.0.1:1"))
    found.update(ReplicaState.from_message(message))
    return found


def test_prompt_work_ahead_and_a_longer_prompt_predict_later() -> None:
    idle = replica().predict(100, 0)
    assert replica(prefill_tokens=1000).predict(100, 0) > idle
    assert (
        replica(queued=[{"priority": 0, "requests": 2, "prompt_tokens": 900}]).predict(100, 0)
        > idle
    )
    assert replica().predict(2000, 0) > idle


def test_only_work_of_the_same_class_or_higher_is_ahead() -> None:
    queued = [{"priority": 0, "requests": 20, "prompt_tokens": 9000}]
    busy_low = replica(queued=queued, free_slots=0, running=8)
    assert busy_low.predict(100, 1) == pytest.approx(
        replica(free_slots=0, running=8).predict(100, 1)
    )
    assert busy_low.predict(100, 0) > busy_low.predict(100, 1)


def test_a_full_batch_adds_the_wait_for_a_slot() -> None:
    full = replica(running=8, free_slots=0, mean_e2e_s=2.0)
    assert full.predict(10, 0) - replica(running=8).predict(10, 0) == pytest.approx(2.0 / 8)


def test_each_replica_is_predicted_from_its_own_costs() -> None:
    fast, slow = replica("fast", step_s=0.002), replica("slow", step_s=0.02, prefill_token_s=0.001)
    assert slow.predict(100, 0) > 5 * fast.predict(100, 0)
    assert choose([slow, fast], 100, 0, queue_ahead=0) is fast


def test_requests_sent_count_until_the_replica_can_show_them() -> None:
    one = replica(free_slots=1)
    before = one.predict(50, 0)
    streamed = one.routed("a", 50, streamed=True)
    assert one.room(0) == 0 and one.predict(50, 0) > before
    assert choose([one], 50, 0, queue_ahead=0) is None
    assert choose([one], 50, 0, queue_ahead=1) is one
    # A state message does not clear a streamed request: the first one after its
    # response started does.
    one.update(ReplicaState.from_message({**_message(one), "free_slots": 1}))
    assert one.room(0) == 0
    one.started(streamed)
    assert one.room(0) == 0
    one.update(ReplicaState.from_message(_message(one)))
    assert one.room(0) == 1
    # A whole (non-streamed) one counts for the next two state messages.
    one.routed("a", 50, streamed=False)
    one.update(ReplicaState.from_message(_message(one)))
    assert one.room(0) == 0
    one.update(ReplicaState.from_message(_message(one)))
    assert one.room(0) == 1


def _message(found: Replica) -> dict[str, Any]:
    state = found.state
    assert state is not None
    return {
        "running": state.running,
        "max_batch_size": state.max_batch_size,
        "free_slots": state.free_slots,
        "queued": [],
        "prefill_tokens": state.prefill_tokens,
        "max_tokens_per_step": state.max_tokens_per_step,
        "step_s": state.step_s,
        "prefill_token_s": state.prefill_token_s,
        "mean_e2e_s": state.mean_e2e_s,
    }


def test_a_down_replica_is_never_chosen_and_the_bias_is_learnt() -> None:
    down, up = replica("down", step_s=0.0001), replica("up")
    down.mark_down()
    assert choose([down, up], 10, 0, queue_ahead=0) is up
    model = up.model_ttft(10, 0)
    for _ in range(100):
        up.observed(model, model + 0.005)
    assert up.predict(10, 0) == pytest.approx(model + 0.005, rel=0.01)


def configs(**fields: dict[str, object]) -> dict[str, TenantConfig]:
    return {name: TenantConfig.model_validate(values) for name, values in fields.items()}


def test_a_full_worker_pauses_for_a_tenant_under_its_share_only() -> None:
    table = configs(a={}, b={})
    held = replica(running=8, free_slots=0, rows={"b": 8})
    # 8 slots, two tenants: a share of 4 each. b holds 8; a may take up to 4 of them.
    assert held.pauses_for("a", table) and not held.pauses_for("b", table)
    for _ in range(4):
        assert held.pauses_for("a", table)
        held.routed("a", 10, streamed=True)
    assert not held.pauses_for("a", table)
    # Nobody past its share: nothing to pause.
    even = replica(running=8, free_slots=0, rows={"a": 4, "b": 4})
    assert not even.pauses_for("a", table) and not even.pauses_for("b", table)


def test_prompts_under_way_count_toward_shares_but_are_not_paused() -> None:
    table = configs(a={}, b={})
    # a's 2 prompts under way count toward its share of 4: room for 2 more, not 4.
    starting = replica(running=8, free_slots=0, rows={"b": 6}, starting={"a": 2})
    for _ in range(2):
        assert starting.pauses_for("a", table)
        starting.routed("a", 10, streamed=True)
    assert not starting.pauses_for("a", table)
    # b is past its share by prompts under way: one of its decoding rows is paused for
    # a, but where it has none there is nothing to pause.
    assert replica(running=8, free_slots=0, rows={"a": 1, "b": 1}, starting={"b": 6}).pauses_for(
        "a", table
    )
    assert not replica(running=8, free_slots=0, rows={"a": 2}, starting={"b": 6}).pauses_for(
        "a", table
    )


def test_no_pause_is_expected_where_the_worker_would_not_make_one() -> None:
    table = configs(a={}, b={})
    full = {"running": 8, "free_slots": 0, "rows": {"b": 8}}
    assert not replica(**full, preempts=False).pauses_for("a", table)
    # Something of a's class is queued there already: it takes the row a pause frees.
    queued = [{"priority": 0, "requests": 1, "prompt_tokens": 10}]
    assert not replica(**full, queued=queued).pauses_for("a", table)
    # Shares are of the rows allowed now: a TPOT objective holding them at 4 makes b's
    # 3 of them past its share of 2, where of 8 they would be within its share of 4.
    split = {"running": 4, "free_slots": 0, "rows": {"a": 1, "b": 3}}
    assert replica(**split, row_cap=4).pauses_for("a", table)
    assert not replica(**split, row_cap=8).pauses_for("a", table)


def test_rows_a_tpot_objective_protects_are_not_expected_to_pause() -> None:
    table = configs(a={}, b={}, c={})
    full = {"running": 8, "free_slots": 0, "rows": {"b": 7, "c": 1}}
    assert replica(**full).pauses_for("a", table)
    # b's rows are what the worker's TPOT objective protects: a cannot take one of
    # them, while c, covered by the same objective, can.
    assert not replica(**full, protected=["b", "c"]).pauses_for("a", table)
    assert replica(**full, protected=["b", "c"]).pauses_for("c", table)


def test_a_protected_tenant_is_expected_to_claim_rows_up_to_its_share_of_the_batch() -> None:
    """A TPOT objective holding the rows at 4 of 8: a, whose objective it is, already
    holds its share of the 4 rows, but not of the 8, so the worker pauses one of b's
    rows for it; at its share of the 8 it waits."""
    table = configs(a={}, b={})
    held = {"running": 4, "free_slots": 0, "row_cap": 4, "protected": ["a"]}
    assert replica(**held, rows={"a": 2, "b": 2}).pauses_for("a", table)
    assert replica(**held, rows={"a": 3, "b": 1}).pauses_for("a", table)
    assert not replica(**held, rows={"a": 4, "b": 0}).pauses_for("a", table)
    # Without the objective's protection a holds its share of the 4 already.
    unprotected = {**held, "protected": []}
    assert not replica(**unprotected, rows={"a": 2, "b": 2}).pauses_for("a", table)


def test_weights_set_the_shares_a_worker_pauses_by() -> None:
    table = configs(a={"weight": 1}, b={"weight": 3})
    # b's share of 8 is 6: at 6 it is not past it, at 7 it is (for one row of a).
    assert not replica(running=8, free_slots=0, rows={"a": 2, "b": 6}).pauses_for("a", table)
    assert replica(running=8, free_slots=0, rows={"a": 1, "b": 7}).pauses_for("a", table)
    assert replica(running=8, free_slots=0, rows={"a": 5, "b": 3}).pauses_for("b", table)


def test_a_lower_class_row_is_paused_for_a_higher_class_once_per_row() -> None:
    table = configs(hi={"priority": 1}, lo={})
    held = replica(running=8, free_slots=0, rows={"lo": 2, "hi": 6})
    assert not held.pauses_for("lo", table)
    for _ in range(2):
        assert held.pauses_for("hi", table)
        held.routed("hi", 10, streamed=True)
    assert not held.pauses_for("hi", table)


def test_going_ahead_picks_where_the_tenant_holds_fewest_rows() -> None:
    table = configs(a={}, b={})
    fast_but_mine = replica("fast", running=8, free_slots=0, rows={"a": 2, "b": 6}, step_s=0.001)
    slow = replica("slow", running=8, free_slots=0, rows={"b": 8}, step_s=0.05)
    assert choose_ahead([fast_but_mine, slow], "a", 10, table) is slow
    slow.mark_down()
    assert choose_ahead([fast_but_mine, slow], "a", 10, table) is fast_but_mine
    assert choose_ahead([fast_but_mine, slow], "b", 10, table) is None
