"""Enrollment: trade the bootstrap token for a node identity once, then keep it safe on disk."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from uuid import UUID

from tenacity import AsyncRetrying, RetryCallState, RetryError, retry_if_exception

from agent import __version__
from agent.client import ControlPlaneClient, ControlPlaneError
from agent.protocol import Enrollment, EnrollmentGrant, HostFacts
from agent.retry import backoff

IDENTITY_FILE = "identity.json"
MAX_BACKOFF_S = 30.0
log = logging.getLogger(__name__)


class EnrollmentError(Exception):
    """The agent cannot enroll: no token, or the control plane refused it."""


@dataclass(frozen=True)
class Identity:
    node_id: UUID
    credential: str
    control_plane_public_key: str
    queue: str
    broker_url: str
    heartbeat_interval_s: float

    def save(self, state_dir: Path) -> None:
        """Write with owner-only permissions: the credential is the node's password."""
        state_dir.mkdir(parents=True, exist_ok=True)
        state_dir.chmod(0o700)
        path = state_dir / IDENTITY_FILE
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump({**asdict(self), "node_id": str(self.node_id)}, handle)
        tmp.replace(path)

    @classmethod
    def load(cls, state_dir: Path) -> Identity | None:
        path = state_dir / IDENTITY_FILE
        if not path.exists():
            return None
        data = json.loads(path.read_text())
        return cls(**{**data, "node_id": UUID(data["node_id"])})


async def load_or_enroll(
    client: ControlPlaneClient,
    state_dir: Path,
    hostname: str,
    host: HostFacts,
    bootstrap_token: str | None,
    stop: asyncio.Event | None = None,
) -> Identity:
    """The saved identity, or a new one; waits out an unreachable or failing control plane
    (agents may start first), but gives up at once when the token is refused."""
    identity = Identity.load(state_dir)
    if identity is not None:
        return identity
    if not bootstrap_token:
        raise EnrollmentError(
            f"not enrolled yet ({state_dir / IDENTITY_FILE} is missing) and no bootstrap token "
            "given: create one with POST /api/v1/bootstrap-tokens/ and pass --bootstrap-token"
        )
    message = Enrollment(
        bootstrap_token=bootstrap_token,
        hostname=hostname,
        agent_version=__version__,
        host=host,
    )
    retrying = AsyncRetrying(
        retry=retry_if_exception(_unavailable),
        wait=backoff(0.5, MAX_BACKOFF_S),
        stop=lambda _: stop is not None and stop.is_set(),
        before_sleep=_log_retry,
    )
    try:
        grant: EnrollmentGrant = await retrying(client.enroll, message)
    except ControlPlaneError as exc:
        raise EnrollmentError(f"enrollment refused: {exc}") from exc
    except RetryError:
        raise EnrollmentError("stopped before enrollment completed") from None
    identity = Identity(
        node_id=grant.node_id,
        credential=grant.node_credential,
        control_plane_public_key=grant.control_plane_public_key,
        queue=grant.queue,
        broker_url=grant.broker_url,
        heartbeat_interval_s=grant.heartbeat_interval_s,
    )
    identity.save(state_dir)
    return identity


def _unavailable(exc: BaseException) -> bool:
    """Unreachable or failing (5xx): wait it out. A 4xx refusal is final."""
    return isinstance(exc, ControlPlaneError) and not 400 <= exc.status < 500


def _log_retry(state: RetryCallState) -> None:
    error = state.outcome.exception() if state.outcome else None
    log.warning("enrollment failed, retrying in %.1f s: %s", state.upcoming_sleep, error)
