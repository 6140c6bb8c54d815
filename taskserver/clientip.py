# -*- test-case-name: tests.test_clientip -*-
"""Where a request comes from: its client's address, and whether it is a loopback request.

The socket's peer, unless that peer is a proxy named in TRUSTED_PROXY: then
the client that proxy forwards for, read from the first of
``X-Forwarded-For``, ``Forwarded`` (RFC 7239) and ``X-Real-IP`` that the
request carries: the right-most hop that is not itself a trusted proxy.
Headers from anyone else are ignored for the address, or any client could
claim to be anyone (and escape its limit, or use up someone else's).

A request that carries any of these headers is a loopback request only when
its peer is a trusted proxy and every such header names a loopback client:
behind a proxy on the same host every peer is 127.0.0.1, so the peer alone
says nothing about who is asking (:func:`is_loopback_request`, the one check
of every route open to loopback clients only).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
#: ``name -> raw values or None``, e.g. ``request.requestHeaders.getRawHeaders``.
HeaderLookup = Callable[[bytes], Sequence[bytes] | None]

#: The headers in which proxies name the client they forward for, in the order believed.
FORWARDING_HEADERS = (b"x-forwarded-for", b"forwarded", b"x-real-ip")


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


def parse_address(text: str) -> Address | None:
    """An address as peers and proxies write it, or None.

    Accepts ``1.2.3.4``, ``1.2.3.4:80``, ``[::1]``, ``[::1]:80``, quoted or not;
    ``::ffff:1.2.3.4`` (IPv4-mapped) is 1.2.3.4, so that the two spellings of
    one client are one client everywhere.
    """
    text = text.strip().strip('"')
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def normalise(text: str) -> str:
    """The canonical spelling of an address (a hop that is none stays as it was sent)."""
    address = parse_address(text)
    return text.strip() if address is None else str(address)


def is_loopback(text: str) -> bool:
    """127.0.0.0/8, ::1, and their IPv4-mapped spellings."""
    address = parse_address(text)
    return address is not None and address.is_loopback


def _trusted(hop: str, proxies: Sequence[Network]) -> bool:
    address = parse_address(hop)
    return address is not None and any(address in network for network in proxies)


def _split_outside_quotes(text: str, separator: str) -> list[str]:
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    for character in text:
        if character == '"':
            quoted = not quoted
        if character == separator and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(character)
    parts.append("".join(current))
    return parts


def _forwarded_for(element: str) -> str:
    """The ``for=`` of one RFC 7239 element; ``unknown`` if it has none."""
    for pair in _split_outside_quotes(element, ";"):
        name, _, value = pair.partition("=")
        if name.strip().lower() == "for":
            return value.strip().strip('"')
    return "unknown"


def hops(name: bytes, values: Sequence[bytes]) -> list[str]:
    """The addresses a forwarding header names, client first, each normalised."""
    text = ",".join(value.decode("latin-1") for value in values)
    if name == b"forwarded":
        found = [_forwarded_for(element) for element in _split_outside_quotes(text, ",")]
    else:
        found = text.split(",")
    return [normalise(hop) for hop in found if hop.strip()]


def _client_in(chain: list[str], proxies: Sequence[Network]) -> str | None:
    """The right-most hop that is not a trusted proxy (the left part is the client's claim)."""
    for hop in reversed(chain):
        if not _trusted(hop, proxies):
            return hop
    return chain[0] if chain else None


def _forwarded_clients(headers: HeaderLookup, proxies: Sequence[Network]) -> list[str | None]:
    """For each forwarding header the request carries, the client it names."""
    clients = []
    for name in FORWARDING_HEADERS:
        values = headers(name)
        if values:
            clients.append(_client_in(hops(name, values), proxies))
    return clients


def client_address(peer: str, headers: HeaderLookup, proxies: Sequence[Network]) -> str:
    """The client's address, believing forwarding headers only from ``proxies``."""
    peer = normalise(peer)
    if not _trusted(peer, proxies):
        return peer
    for client in _forwarded_clients(headers, proxies):
        if client is not None:
            return client
    return peer


def is_loopback_request(peer: str, headers: HeaderLookup, proxies: Sequence[Network]) -> bool:
    """Did this request come from this host? The guard of every loopback-only route.

    The peer must be loopback; a request that carries a forwarding header
    must also come from a trusted proxy, and each such header must name a
    loopback client (a proxy on this host forwards for anyone).
    """
    if not is_loopback(peer):
        return False
    clients = _forwarded_clients(headers, proxies)
    if not clients:
        return True
    return _trusted(peer, proxies) and all(
        client is not None and is_loopback(client) for client in clients
    )
