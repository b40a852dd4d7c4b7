"""Where webhooks may go: public addresses only, unless an endpoint is allowed private ones.

A tenant's webhook URL must not become a way into the control plane's own network (cloud
metadata at 169.254.169.254, databases on 10/8, services on loopback). The host is resolved
and every address checked, on create and again at each send (DNS can change), and the
request then goes to the address that was checked, so a second lookup cannot swap it.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import Any

import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class RefusedTarget(Exception):
    """The URL's host cannot be resolved or resolves to an address webhooks may not reach."""


def _kind(address: IPAddress) -> str | None:
    """What makes an address unreachable for webhooks, or None for a public one."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    for kind, flag in (
        ("loopback", address.is_loopback),
        ("link-local", address.is_link_local),
        ("unspecified", address.is_unspecified),
        ("multicast", address.is_multicast),
        ("private", address.is_private),
        ("reserved", address.is_reserved),
    ):
        if flag:
            return kind
    return None if address.is_global else "non-public"


def resolve(url: str, *, allow_private: bool) -> list[IPAddress]:
    """Every address the URL's host resolves to; refused if any is not public (unless allowed)."""
    parsed = httpx.URL(url)
    host = parsed.host
    if not host:
        raise RefusedTarget("The URL names no host.")
    try:
        infos = socket.getaddrinfo(host, parsed.port or 443, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise RefusedTarget(f"Cannot resolve {host}: {exc}.") from None
    addresses: list[IPAddress] = []
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        if address not in addresses:
            addresses.append(address)
    if not allow_private:
        for address in addresses:
            kind = _kind(address)
            if kind is not None:
                raise RefusedTarget(
                    f"{host} resolves to {address}, a {kind} address; webhooks may only reach "
                    "public addresses (a platform admin may allow private targets for an endpoint)."
                )
    return addresses


@dataclass(frozen=True)
class PinnedRequest:
    """Arguments for httpx that connect to a checked address while naming the real host
    (Host header, TLS SNI and certificate check)."""

    url: httpx.URL
    headers: dict[str, str]
    extensions: dict[str, Any]


def pin(url: str, address: IPAddress) -> PinnedRequest:
    parsed = httpx.URL(url)
    host = parsed.host
    netloc = parsed.netloc.decode("ascii")
    return PinnedRequest(
        url=parsed.copy_with(host=str(address)),
        headers={"Host": netloc},
        extensions={"sni_hostname": host} if parsed.scheme == "https" else {},
    )
