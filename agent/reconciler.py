"""Desired vs actual: verify a signed desired state, then have each driver converge on it.

Drivers are idempotent: applying the same components twice changes nothing the second
time. The applied generation is kept on disk, so a restarted agent still refuses
older (stale) and already-applied (replayed) pushes.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol
from uuid import UUID

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.protocol import (
    AppliedStatus,
    ComponentResult,
    Components,
    SignatureError,
    SignedDesiredState,
    state_tag,
    verify_state,
)

log = logging.getLogger(__name__)
APPLIED_FILE = "applied.json"


class ComponentDriver(Protocol):
    """Makes one kind of component (workers, volumes, ...) match the desired components."""

    async def apply(self, components: Components) -> list[ComponentResult]: ...


@dataclass(frozen=True)
class Applied:
    generation: int = 0
    content_hash: str = ""


class Reconciler:
    def __init__(
        self,
        node_id: UUID,
        public_key: Ed25519PublicKey,
        drivers: list[ComponentDriver],
        state_dir: Path,
    ) -> None:
        self.node_id = node_id
        self._public_key = public_key
        self._drivers = drivers
        self._path = state_dir / APPLIED_FILE
        self._lock = asyncio.Lock()
        self.applied = (
            Applied(**json.loads(self._path.read_text())) if self._path.exists() else Applied()
        )
        # Whether this process applied a state yet: a restarted agent's drivers start empty,
        # so its first pull of the state it had applied converges on it again (adopting the
        # workers that kept serving) instead of taking it for the steady state.
        self._converged = False

    @property
    def applied_tag(self) -> str | None:
        """The entity tag of the state this process applied, for a conditional pull; None
        until it applied one (a restarted agent pulls the whole state to converge on it)."""
        if not self._converged:
            return None
        return state_tag(self.applied.generation, self.applied.content_hash)

    async def handle(self, signed: SignedDesiredState, *, pulled: bool) -> AppliedStatus | None:
        """Apply a pushed or pulled state; returns the report to send, or None if nothing to say.

        A pulled state no newer than the applied one is the steady state, not a replay,
        except the first one a restarted agent pulls: its drivers converge on it again.
        """
        async with self._lock:
            state = signed.state
            resuming = (
                pulled
                and not self._converged
                and (state.generation, state.content_hash)
                == (self.applied.generation, self.applied.content_hash)
            )
            if pulled and state.generation <= self.applied.generation and not resuming:
                return None  # steady state, or a push overtook the pull
            try:
                verify_state(
                    signed,
                    self._public_key,
                    node_id=self.node_id,
                    applied_generation=self.applied.generation - (1 if resuming else 0),
                )
            except SignatureError as exc:
                log.warning("rejected desired state generation %s: %s", state.generation, exc)
                return self._report(
                    state.generation, state.content_hash, "rejected", [], reason=exc
                )
            results = []
            for driver in self._drivers:
                results.extend(await driver.apply(state.components))
            self.applied = Applied(state.generation, state.content_hash)
            self._path.write_text(json.dumps(self.applied.__dict__))
            self._converged = True
            outcome = "applied" if all(r.ok for r in results) else "failed"
            log.info("generation %s %s (%d components)", state.generation, outcome, len(results))
            return self._report(state.generation, state.content_hash, outcome, results)

    def _report(
        self,
        generation: int,
        content_hash: str,
        outcome: str,
        results: list[ComponentResult],
        reason: SignatureError | None = None,
    ) -> AppliedStatus:
        return AppliedStatus.model_validate(
            {
                "node_id": self.node_id,
                "generation": generation,
                "content_hash": content_hash,
                "state": outcome,
                "components": results,
                "reported_at": datetime.now(UTC),
                "rejection_reason": reason.reason if reason else None,
                "detail": reason.detail if reason else None,
            }
        )
