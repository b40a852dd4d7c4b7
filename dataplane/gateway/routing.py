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
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from dataplane.gateway.config import ReplicaConfig

# Weight of each measured TTFT in a replica's learnt bias.
_BIAS_SMOOTHING = 0.1


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

    def routed(self, prompt_tokens: int, streamed: bool) -> Dispatch:
        self.routed_total += 1
        dispatch = Dispatch(prompt_tokens, None if streamed else 2)
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

    def predict(self, prompt_tokens: int, priority: int) -> float:
        """Predicted TTFT (seconds) of a request sent now; inf when down."""
        if not self.up or self.state is None:
            return math.inf
        return self.model_ttft(prompt_tokens, priority) + self.bias

    def model_ttft(self, prompt_tokens: int, priority: int) -> float:
        state = self.state
        assert state is not None, "predict only for a replica with a state"
        ahead = [(count, tokens) for p, count, tokens in state.queued if p >= priority]
        requests_ahead = sum(count for count, _ in ahead) + self.sent
        tokens = sum(t for _, t in ahead) + self.sent_tokens + state.prefill_tokens + prompt_tokens
        step = state.step_s
        per_token = state.prefill_token_s or step / max(1, state.max_tokens_per_step)
        slot_wait = 0.0
        excess = requests_ahead + 1 - state.free_slots
        if excess > 0:
            slot_wait = excess * state.mean_e2e_s / max(1, state.running)
        budget = max(1, state.max_tokens_per_step - state.running)
        steps = math.ceil(tokens / budget)
        return slot_wait + step / 2 + tokens * per_token + steps * step

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
