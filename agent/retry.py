"""The agent's backoff: exponential, capped, each delay jittered between half and all of
itself, so nodes that lost the control plane together do not come back in lockstep."""

from __future__ import annotations

from tenacity import wait_exponential, wait_random_exponential
from tenacity.wait import wait_base


def backoff(initial_s: float, max_s: float) -> wait_base:
    """A tenacity wait: about `initial_s`, then twice that, ... up to `max_s`."""
    half, cap = initial_s / 2, max_s / 2
    return wait_exponential(multiplier=half, max=cap) + wait_random_exponential(
        multiplier=half, max=cap
    )
