# -*- test-case-name: tests.test_clientip -*-
"""Which address a request comes from, for the per-IP rate-limit tier.

The socket's peer, unless that peer is a proxy named in TRUSTED_PROXY: then
the right-most address in ``X-Forwarded-For`` that is not itself a trusted
proxy. Headers from anyone else are ignored, or any client could claim to
be anyone (and escape its limit, or use up someone else's).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(text: str) -> tuple[Network, ...]:
    """``"10.0.0.1, 192.168.0.0/16, ::1"`` -> networks; ValueError names a bad entry."""
    networks = []
    for part in text.split(","):
        if part.strip():
            try:
                networks.append(ipaddress.ip_network(part.strip(), strict=False))
            except ValueError:
                raise ValueError(f"not an address or network: {part.strip()!r}") from None
    return tuple(networks)


def normalise(address: str) -> str:
    """``::ffff:1.2.3.4`` is 1.2.3.4."""
    try:
        parsed = ipaddress.ip_address(address.strip())
    except ValueError:
        return address.strip()
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        return str(parsed.ipv4_mapped)
    return str(parsed)


def _trusted(address: str, proxies: Sequence[Network]) -> bool:
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(parsed in network for network in proxies)


def client_address(
    peer: str, forwarded_for: Sequence[bytes] | None, proxies: Sequence[Network]
) -> str:
    """The client's address, trusting X-Forwarded-For only from ``proxies``."""
    peer = normalise(peer)
    if not forwarded_for or not _trusted(peer, proxies):
        return peer
    hops = [
        normalise(hop)
        for header in forwarded_for
        for hop in header.decode("latin-1").split(",")
        if hop.strip()
    ]
    for hop in reversed(hops):
        if not _trusted(hop, proxies):
            return hop
    return hops[0] if hops else peer
