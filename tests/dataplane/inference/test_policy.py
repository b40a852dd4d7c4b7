"""Queue order under the fair (VTC) and FCFS policies, without a model."""

from __future__ import annotations

from collections import Counter

from dataplane.inference.config import SchedulingConfig, TenantConfig
from dataplane.inference.engine import EngineSequence
from dataplane.inference.metrics import RequestTiming
from dataplane.inference.sampling import SamplingParams
from dataplane.inference.scheduler import FairPolicy, FcfsPolicy, GenerationRequest

PROMPT, OUTPUT = 20, 30


def request(tenant: str, arrival: float, priority: int = 0) -> GenerationRequest:
    return GenerationRequest(
        tenant=tenant,
        priority=priority,
        seq=EngineSequence([1] * PROMPT, SamplingParams(max_new_tokens=OUTPUT)),
        timing=RequestTiming(arrival=arrival, input_tokens=PROMPT),
    )


def fair(**tenants: TenantConfig) -> FairPolicy:
    return FairPolicy(tenants, SchedulingConfig())


def serve_one(policy: FairPolicy | FcfsPolicy) -> GenerationRequest:
    """Admit the next request (which charges its prompt) and charge its output."""
    head = policy.pop()
    policy.charge(head.tenant, 0, OUTPUT)
    return head


def test_vtc_serves_the_victim_before_the_aggressors_backlog() -> None:
    policy = fair()
    for i in range(20):
        policy.push(request("aggressor", arrival=i), active=())
    served = [serve_one(policy).tenant for _ in range(3)]
    policy.push(request("victim", arrival=100), active={"aggressor"})
    served.append(serve_one(policy).tenant)
    assert served == ["aggressor"] * 3 + ["victim"]


def test_fcfs_makes_the_victim_wait_behind_the_backlog() -> None:
    policy = FcfsPolicy()
    for i in range(20):
        policy.push(request("aggressor", arrival=i), active=())
    for _ in range(3):
        serve_one(policy)
    policy.push(request("victim", arrival=100), active={"aggressor"})
    order = [serve_one(policy).tenant for _ in range(len(policy))]
    assert order.index("victim") == 17
    assert policy.waiting("aggressor") == 0


def test_one_admission_round_shares_free_slots_by_weight() -> None:
    """Sixteen pops with no output charged in between (one round filling 16 free slots):
    the prompts charged at dispatch move the counters, so the tenant that was behind by
    40 catches up by two prompts and the rest alternate."""
    policy = fair()
    for i in range(16):
        policy.push(request("ahead", i), active=())
        policy.push(request("behind", i + 0.5), active=())
    policy.counters.update(ahead=40.0, behind=0.0)
    served = Counter(policy.pop().tenant for _ in range(16))
    assert served == {"behind": 9, "ahead": 7}
    assert policy.counters == {"ahead": 40.0 + 7 * PROMPT, "behind": 9.0 * PROMPT}


def test_one_admission_round_follows_the_weights() -> None:
    policy = fair(heavy=TenantConfig(weight=3.0), light=TenantConfig(weight=1.0))
    for i in range(16):
        policy.push(request("heavy", i), active=())
        policy.push(request("light", i + 0.5), active=())
    served = Counter(policy.pop().tenant for _ in range(16))
    assert served == {"heavy": 12, "light": 4}


def test_a_paused_request_resumes_without_a_second_prompt_charge() -> None:
    policy = fair()
    policy.push(request("a", 0), active=())
    paused = policy.pop()
    paused.seq.tokens.append(5)
    policy.requeue(paused)
    assert policy.pop() is paused
    assert policy.counters["a"] == PROMPT


def test_newly_backlogged_tenant_is_lifted_to_the_active_minimum() -> None:
    policy = fair()
    policy.push(request("a", 0), active=())
    for _ in range(1):
        serve_one(policy)
    policy.charge("a", 0, 500)
    policy.push(request("a", 1), active=())
    # b was idle all along: it gets no credit for idling, only a's current counter.
    policy.push(request("b", 2), active={"a"})
    assert policy.counters["b"] == policy.counters["a"]
    # A tenant already ahead of the minimum keeps its own counter.
    policy.charge("c", 0, 10_000)
    before = policy.counters["c"]
    policy.push(request("c", 3), active={"a"})
    assert policy.counters["c"] == before


def test_weights_split_tokens_served_among_backlogged_tenants() -> None:
    policy = fair(heavy=TenantConfig(weight=3.0), light=TenantConfig(weight=1.0))
    for i in range(200):
        policy.push(request("heavy", i), active=())
        policy.push(request("light", i + 0.5), active=())
    served = Counter(serve_one(policy).tenant for _ in range(120))
    assert served == {"heavy": 90, "light": 30}


def test_higher_priority_class_goes_first() -> None:
    policy = fair(batch=TenantConfig(priority=0), online=TenantConfig(priority=5))
    for i in range(5):
        policy.push(request("batch", i, priority=0), active=())
    policy.push(request("online", 10, priority=5), active=())
    policy.charge("online", 0, 1_000_000)
    assert serve_one(policy).tenant == "online"


def test_under_share_tenant_preempts_the_newest_request_of_the_over_share_one() -> None:
    policy = fair()
    running = [request("aggressor", i) for i in range(4)]
    for i, r in enumerate(running):
        r.timing.scheduled = float(i)
    policy.charge("aggressor", 0, 400)
    victim = request("victim", 10)
    policy.push(victim, active={"aggressor"})
    policy.charge("aggressor", 0, 10)
    paused = policy.preempt_for(victim, running, max_batch_size=4)
    assert paused is running[3]
    # The paused request waits at the head of its tenant's line; the victim still wins.
    assert policy.waiting("aggressor") == 1
    assert policy.pop() is victim
    assert policy.pop() is paused


def test_a_tenant_under_its_share_pauses_one_past_its_own_whatever_the_counters() -> None:
    policy = fair()
    running = [request("aggressor", i) for i in range(3)] + [request("victim", 3)]
    for i, r in enumerate(running):
        r.timing.scheduled = float(i)
    policy.charge("victim", 0, 1_000)  # far ahead of the aggressor on the counter
    candidate = request("victim", 10)
    policy.push(candidate, active={"aggressor", "victim"})
    assert policy.preempt_for(candidate, running, max_batch_size=4) is running[2]


def test_the_tenant_with_the_most_slots_per_weight_gives_one_up() -> None:
    policy = fair(b=TenantConfig(weight=2))
    running = [request("a", i) for i in range(5)] + [request("b", 5 + i) for i in range(5)]
    policy.charge("a", 0, 100)
    policy.charge("b", 0, 900)  # the counters would point at b
    candidate = request("c", 20)
    policy.push(candidate, active={"a", "b"})
    # Of 8 slots, shares of 2 (a), 4 (b) and 2 (c): both are past theirs, a furthest.
    paused = policy.preempt_for(candidate, running, max_batch_size=8)
    assert paused is not None and paused.tenant == "a"


def test_slots_held_by_prompts_under_way_count_toward_a_share() -> None:
    policy = fair()
    running = [request("a", i) for i in range(4)]
    held = [request("c", 10 + i) for i in range(4)]
    candidate = request("c", 20)
    policy.push(candidate, active={"a", "c"})
    # c's four prompts under way fill its share of 4: its fifth request pauses nothing.
    assert policy.preempt_for(candidate, running, max_batch_size=8, held=held) is None
    assert policy.preempt_for(candidate, running, max_batch_size=4) is not None


def test_requests_kept_are_paused_for_a_higher_class_only() -> None:
    policy = fair()
    running = [request("victim", i) for i in range(4)]
    for i, r in enumerate(running):
        r.timing.scheduled = float(i)
    kept = running[2:]
    policy.charge("victim", 0, 400)
    candidate = request("aggressor", 10)
    policy.push(candidate, active={"victim"})
    # Over its share, the victim gives up an unkept request, and none of the kept ones.
    assert policy.preempt_for(candidate, running, max_batch_size=4, keep=kept) is running[1]
    assert policy.preempt_for(candidate, running, max_batch_size=4, keep=running) is None
    # Another tenant over its share, with nothing kept, gives up its row instead.
    other = [*running, *(request("other", 12 + i) for i in range(3))]
    for i, r in enumerate(other):
        r.timing.scheduled = float(i)
    policy.charge("other", 0, 500)
    assert policy.preempt_for(candidate, other, max_batch_size=8, keep=running) is other[-1]
    urgent = request("urgent", 15, priority=1)
    policy.push(urgent, active={"victim"})
    assert policy.preempt_for(urgent, running, max_batch_size=4, keep=running) in running


def test_no_preemption_between_tenants_at_their_share() -> None:
    policy = fair()
    running = [request("a", 0), request("a", 1), request("b", 2), request("b", 3)]
    policy.charge("a", 0, 100)
    candidate = request("b", 4)
    policy.push(candidate, active={"a", "b"})
    assert policy.preempt_for(candidate, running, max_batch_size=4) is None


def test_priority_preempts_lower_classes_even_when_fairly_shared() -> None:
    policy = fair()
    running = [request("low", i, priority=0) for i in range(2)]
    candidate = request("high", 5, priority=1)
    policy.push(candidate, active={"low"})
    assert policy.preempt_for(candidate, running, max_batch_size=2) is not None


def test_fcfs_never_preempts_and_drains_in_arrival_order() -> None:
    policy = FcfsPolicy()
    reqs = [request(t, i) for i, t in enumerate(["a", "b", "a"])]
    for r in reqs:
        policy.push(r, active=())
    assert policy.preempt_for(reqs[0], reqs[1:], max_batch_size=2) is None
    assert policy.remove(reqs[1]) and not policy.remove(reqs[1])
    assert policy.drain() == [reqs[0], reqs[2]]
