"""Routing by predicted TTFT: each replica's live state and its own measured costs.

A worker streams its scheduler's state (``GET /v1/internal/state``) whenever it changes:
requests and prompt tokens queued per priority class, running rows, free slots, the
smoothed decode step and prompt cost per token. Replicas differ in hardware, so the
prediction for a request uses only the costs that replica measured, plus a bias learnt
from the TTFTs this gateway saw from it (the network, and whatever the model misses).

A request's predicted TTFT on a replica: the wait for a batch slot (when the requests
queued ahead of it, and those this gateway sent that the replica's state may not show
yet, leave none free, running requests finish at about ``running / mean_e2e`` per second), then
the prompt tokens ahead of it and its own at the step's prompt budget, each step also
decoding the batch.

When every replica is full, a request of a tenant holding less than its share may still
go ahead to a replica whose worker would pause a row for it (``choose_ahead``): the
stream also says which tenants hold the batch's rows and its prompts under way, and the
worker's fair scheduler pauses a row of a lower class, or of a tenant past its weighted
share of the slots, for a tenant under its own. The request then starts at the worker's
next step instead of waiting here for a slot to free.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from dataplane.gateway.config import ReplicaConfig
from dataplane.inference.config import TenantConfig

# Weight of each measured TTFT in a replica's learnt bias.
_BIAS_SMOOTHING = 0.1
_DEFAULT_TENANT = TenantConfig.model_validate({})


@dataclass(frozen=True)
class ReplicaState:
    """One message of a worker's state stream."""

    running: int
    max_batch_size: int
    free_slots: int
    queued: tuple[tuple[int, int, int], ...]  # (priority, requests, prompt tokens)
    prefill_tokens: int
    max_tokens_per_step: int
    step_s: float
    prefill_token_s: float
    mean_e2e_s: float
    rows: Mapping[str, int] = field(default_factory=dict)  # decoding rows, by tenant
    # Slots of prompts under way and rows joining, by tenant: not paused, but counted
    # toward their tenants' shares.
    starting: Mapping[str, int] = field(default_factory=dict)
    row_cap: int = 0  # rows allowed now (a TPOT objective may hold it under the batch size)
    preempts: bool = False  # whether the worker's policy pauses rows at all
    # Tenants whose rows the worker's TPOT objective keeps from same-class tenants it
    # does not cover.
    protected: frozenset[str] = frozenset()

    @classmethod
    def from_message(cls, message: dict[str, Any]) -> ReplicaState:
        return cls(
            running=int(message["running"]),
            max_batch_size=int(message["max_batch_size"]),
            free_slots=int(message["free_slots"]),
            queued=tuple(
                (int(q["priority"]), int(q["requests"]), int(q["prompt_tokens"]))
                for q in message["queued"]
            ),
            prefill_tokens=int(message["prefill_tokens"]),
            max_tokens_per_step=int(message["max_tokens_per_step"]),
            step_s=float(message["step_s"]),
            prefill_token_s=float(message["prefill_token_s"]),
            mean_e2e_s=float(message["mean_e2e_s"]),
            rows={str(t): int(n) for t, n in message.get("rows", {}).items()},
            starting={str(t): int(n) for t, n in message.get("starting", {}).items()},
            row_cap=int(message.get("row_cap", message["max_batch_size"])),
            preempts=bool(message.get("preempts", False)),
            protected=frozenset(str(t) for t in message.get("protected", ())),
        )

    @property
    def queued_requests(self) -> int:
        return sum(count for _, count, _ in self.queued)


@dataclass(eq=False)
class Dispatch:
    """A request sent to a replica whose state may not show it yet: for the next
    ``messages`` state messages, a number set once its response starts for a streamed
    one (the worker queues a request before it answers, and sends a message when it
    does) and at once for a whole one, which answers only at the end."""

    tenant: str
    prompt_tokens: int
    messages: int | None


class Replica:
    """A replica as one gateway sees it: up or down, its last state, and what this
    gateway sent it that the state may not show yet."""

    def __init__(self, config: ReplicaConfig) -> None:
        self.config = config
        self.up = False
        self.state: ReplicaState | None = None
        self._unseen: list[Dispatch] = []
        # Requests through this gateway now, and ever.
        self.inflight = 0
        self.routed_total = 0
        self.bias = 0.0

    @property
    def replica_id(self) -> str:
        return self.config.replica_id

    @property
    def sent(self) -> int:
        return len(self._unseen)

    @property
    def sent_tokens(self) -> int:
        return sum(d.prompt_tokens for d in self._unseen)

    def update(self, state: ReplicaState, messages: int = 1) -> None:
        """The newest state, read with ``messages - 1`` older ones it supersedes."""
        self.state = state
        self.up = True
        for dispatch in self._unseen:
            if dispatch.messages is not None:
                dispatch.messages -= messages
        self._unseen = [d for d in self._unseen if d.messages is None or d.messages > 0]

    def mark_down(self) -> None:
        self.up = False
        self.state = None
        self._unseen = []

    def room(self, queue_ahead: int) -> int:
        """Requests this replica can take now without queueing beyond ``queue_ahead``."""
        if not self.up or self.state is None:
            return 0
        state = self.state
        return state.free_slots + queue_ahead - state.queued_requests - self.sent

    def routed(self, tenant: str, prompt_tokens: int, streamed: bool) -> Dispatch:
        self.routed_total += 1
        dispatch = Dispatch(tenant, prompt_tokens, None if streamed else 2)
        self._unseen.append(dispatch)
        return dispatch

    def started(self, dispatch: Dispatch) -> None:
        """The request's response started: the replica has it queued, and the next state
        message read shows it."""
        dispatch.messages = 1

    def seen(self, dispatch: Dispatch) -> None:
        """The request is over (or failed): nothing of it is left to show."""
        if dispatch in self._unseen:
            self._unseen.remove(dispatch)

    def predict(self, prompt_tokens: int, priority: int, slot_wait: bool = True) -> float:
        """Predicted TTFT (seconds) of a request sent now; inf when down."""
        if not self.up or self.state is None:
            return math.inf
        return self.model_ttft(prompt_tokens, priority, slot_wait) + self.bias

    def model_ttft(self, prompt_tokens: int, priority: int, slot_wait: bool = True) -> float:
        """The prediction before the learnt bias; without ``slot_wait`` for a request the
        worker pauses a row for."""
        state = self.state
        assert state is not None, "predict only for a replica with a state"
        ahead = [(count, tokens) for p, count, tokens in state.queued if p >= priority]
        requests_ahead = sum(count for count, _ in ahead) + self.sent
        tokens = sum(t for _, t in ahead) + self.sent_tokens + state.prefill_tokens + prompt_tokens
        step = state.step_s
        per_token = state.prefill_token_s or step / max(1, state.max_tokens_per_step)
        wait = 0.0
        excess = requests_ahead + 1 - state.free_slots
        if slot_wait and excess > 0:
            wait = excess * state.mean_e2e_s / max(1, state.running)
        budget = max(1, state.max_tokens_per_step - state.running)
        steps = math.ceil(tokens / budget)
        return wait + step / 2 + tokens * per_token + steps * step

    def slots_of(self, tenant: str) -> int:
        """The tenant's slots here (rows decoding, prompts under way, rows joining),
        with what this gateway sent that the state does not show yet."""
        state = self.state
        shown = state.rows.get(tenant, 0) + state.starting.get(tenant, 0) if state else 0
        return shown + sum(1 for d in self._unseen if d.tenant == tenant)

    def pauses_for(self, tenant: str, tenants: Mapping[str, TenantConfig]) -> bool:
        """Whether this replica's worker would pause a decoding row for one more request
        of ``tenant``, as its fair scheduler decides: only where its policy preempts and
        nothing of the tenant's class or above is queued there already (the worker may
        still pause for it past queued requests that can neither take nor free a row,
        which the state does not show; a gateway does not count on it); a row of a lower
        class (one not already claimed by a request this gateway sent), or, within the
        class, a row of a tenant past its weighted share of the rows allowed while
        ``tenant`` stays within its own (not a row the worker's TPOT objective protects,
        unless it protects ``tenant`` too); for a tenant that objective protects, any row
        of its class or below it does not protect, while the tenant stays within its
        share of the batch size. Shares count a tenant's slots: its decoding rows, its
        prompts under way and rows joining (which are not paused), and what this
        gateway sent that the state does not show yet. A request it does not pause for
        waits in its queue for the next free row."""
        state = self.state
        if not self.up or state is None or not state.preempts:
            return False

        def config(name: str) -> TenantConfig:
            return tenants.get(name, _DEFAULT_TENANT)

        mine = config(tenant).priority
        if any(p >= mine and count for p, count, _ in state.queued):
            return False  # requests queued there ahead of it take what a pause frees first
        rows = state.rows
        slots = Counter(rows) + Counter(state.starting)
        slots[tenant] = self.slots_of(tenant)
        peers = {t: n for t, n in slots.items() if n and config(t).priority == mine}
        lower = sum(n for t, n in rows.items() if config(t).priority < mine)
        if lower > self.sent:  # a lower-class row is left to pause for each sent here
            return True
        total = sum(config(t).weight for t in peers.keys() | {tenant})
        if tenant in state.protected:
            claimable = sum(
                n
                for t, n in rows.items()
                if t != tenant and t not in state.protected and config(t).priority <= mine
            )
            batch_share = state.max_batch_size * config(tenant).weight / total
            if claimable > self.sent and peers.get(tenant, 0) + 1 <= batch_share:
                return True

        def share(name: str) -> float:
            return state.row_cap * config(name).weight / total

        if peers.get(tenant, 0) + 1 > share(tenant):
            return False
        kept = frozenset() if tenant in state.protected else state.protected
        return any(
            n > share(t) and rows.get(t, 0)
            for t, n in peers.items()
            if t != tenant and t not in kept
        )

    def observed(self, predicted_model_ttft: float, measured: float) -> None:
        """Learn the bias from a TTFT this gateway measured (dispatch to first token)."""
        self.bias += _BIAS_SMOOTHING * (measured - predicted_model_ttft - self.bias)


def choose(
    replicas: list[Replica], prompt_tokens: int, priority: int, queue_ahead: int
) -> Replica | None:
    """The replica with room and the lowest predicted TTFT (fewest streams on a tie)."""
    best: Replica | None = None
    best_key: tuple[float, int] | None = None
    for replica in replicas:
        if replica.room(queue_ahead) <= 0:
            continue
        key = (replica.predict(prompt_tokens, priority), replica.inflight)
        if best_key is None or key < best_key:
            best, best_key = replica, key
    return best


def choose_ahead(
    replicas: list[Replica], tenant: str, prompt_tokens: int, tenants: Mapping[str, TenantConfig]
) -> Replica | None:
    """Where a request of ``tenant`` may go while no replica has room: a replica whose
    worker would pause a row for it, with the fewest of the tenant's slots there, then the
    lowest predicted TTFT."""
    priority = tenants.get(tenant, _DEFAULT_TENANT).priority
    willing = [r for r in replicas if r.pauses_for(tenant, tenants)]
    return min(
        willing,
        key=lambda r: (r.slots_of(tenant), r.predict(prompt_tokens, priority, slot_wait=False)),
        default=None,
    )
