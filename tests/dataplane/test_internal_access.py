"""Who a data-plane server answers. Internal endpoints: loopback clients when no stats key
is configured, holders of a stats key when one is, and holders of a peer key (another
node's gateway reading a worker's live state) from anywhere. An agent's worker
serves other hosts only with one (none before it has one), so no tenant calls it past its
deployment's gateways."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import pytest

from dataplane.asgi import PEER_KEY_HEADER, Call, check_internal, check_peer
from dataplane.inference.protocol import ApiError

PEER, STATS = "tg-peer-key-0123456789abcdef", "tg-stats-key-0123456789abcdef"
OTHER = "tg-some-other-key-0123456789"
HERE, ELSEWHERE = "127.0.0.1", "10.0.0.7"


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


async def _never() -> dict[str, object]:
    raise AssertionError("not read")


async def _unsent(message: dict[str, object]) -> None:
    raise AssertionError("not sent")


def call(client: str, bearer: str | None = None, peer: str | None = None) -> Call:
    headers = [(b"authorization", f"Bearer {bearer}".encode())] if bearer else []
    headers += [(PEER_KEY_HEADER.encode(), peer.encode())] if peer else []
    return Call(
        {"type": "http", "headers": headers, "client": (client, 40000)}, _never, _unsent, 0.0
    )


def status(check: Callable[[], None]) -> int:
    try:
        check()
    except ApiError as refused:
        return refused.status
    return 200


@pytest.mark.parametrize(
    ("client", "bearer", "peer", "stats", "expected"),
    [
        (HERE, None, None, [], 200),  # loopback, no stats key configured
        ("::ffff:127.0.0.1", None, None, [], 200),  # loopback on a dual-stack socket
        ("::1", None, None, [], 200),
        (ELSEWHERE, None, None, [], 403),
        (ELSEWHERE, None, PEER, [], 200),  # another node's gateway
        (ELSEWHERE, PEER, None, [], 403),  # a peer key is no bearer key
        (ELSEWHERE, None, OTHER, [], 403),
        (HERE, None, None, [digest(STATS)], 401),  # a stats key is configured
        (ELSEWHERE, STATS, None, [digest(STATS)], 200),
        (ELSEWHERE, None, PEER, [digest(STATS)], 200),
        (ELSEWHERE, OTHER, OTHER, [digest(STATS)], 401),
    ],
)
def test_internal_endpoints_open_to_loopback_stats_keys_and_peer_keys(
    client: str, bearer: str | None, peer: str | None, stats: list[str], expected: int
) -> None:
    request = call(client, bearer, peer)
    assert status(lambda: check_internal(request, stats, [digest(PEER)])) == expected


def test_without_peer_keys_a_peer_key_opens_nothing() -> None:
    assert status(lambda: check_internal(call(ELSEWHERE, peer=PEER), [], [])) == 403


@pytest.mark.parametrize(
    ("client", "peer", "peers", "expected"),
    [
        (HERE, None, [digest(PEER)], 200),  # the node's own gateway, over loopback
        (ELSEWHERE, PEER, [digest(PEER)], 200),  # another node's gateway
        (ELSEWHERE, None, [digest(PEER)], 403),  # a tenant calling the worker directly
        (ELSEWHERE, OTHER, [digest(PEER)], 403),
        (ELSEWHERE, None, [], 403),  # no peer key issued yet: other hosts wait for one
        ("::ffff:127.0.0.1", None, [], 200),
    ],
)
def test_a_worker_with_peer_keys_serves_other_hosts_through_gateways_only(
    client: str, peer: str | None, peers: list[str], expected: int
) -> None:
    request = call(client, "tg-tenant-key", peer)
    assert status(lambda: check_peer(request, peers)) == expected
