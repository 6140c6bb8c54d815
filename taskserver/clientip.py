# -*- test-case-name: tests.test_clientip -*-
"""Where a request comes from: its client's address, and whether it is a loopback request.

The socket's peer, unless that peer is a proxy named in TRUSTED_PROXY: then
the client that proxy forwards for, as ``X-Forwarded-For``, ``Forwarded``
(RFC 7239) and ``X-Real-IP`` name it: in each, the right-most hop that is not
itself a trusted proxy. Every one of these headers that the request carries
must name the same client; if they differ (a proxy that sets one passes on
another that the client wrote), the request counts as the proxy's own.
Headers from anyone else are ignored for the address, or any client could
claim to be anyone (and escape its limit, or use up someone else's).

Each header line is read on its own (a quote never spans lines), and a
``Forwarded`` line is split from its right end, where a proxy appends: a
client's unbalanced quote cannot swallow the element a proxy added after it.
A hop that is not exactly an address (an unbalanced quote, junk after ``]``,
a port that is not a number) is kept as it was sent: an untrusted client
that is not loopback.

A request that carries any of these headers is a loopback request only when
its peer is a trusted proxy and every such header names a loopback client:
behind a proxy on the same host every peer is 127.0.0.1, so the peer alone
says nothing about who is asking (:func:`is_loopback_request`, the one check
of every route open to loopback clients only).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Sequence

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
#: ``name -> raw values or None``, e.g. ``request.requestHeaders.getRawHeaders``.
HeaderLookup = Callable[[bytes], Sequence[bytes] | None]

#: The headers in which proxies name the client they forward for.
FORWARDING_HEADERS = (b"x-forwarded-for", b"forwarded", b"x-real-ip")

#: ``[v6]``, ``[v6]:port`` (group 1), or ``v4:port`` (group 2); a port is 1 to 5 digits.
_BRACKETED = re.compile(r"\[([^\[\]]*)\](?::[0-9]{1,5})?")
_WITH_PORT = re.compile(r"([^:]*):[0-9]{1,5}")
_LOCALHOST = re.compile(r"localhost\.?(?::[0-9]{1,5})?", re.IGNORECASE)


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
    """An address as peers and proxies write it, or None if it is not exactly one.

    Accepts ``1.2.3.4``, ``1.2.3.4:80``, ``::1``, ``[::1]``, ``[::1]:80``,
    and any of them in one pair of double quotes. Nothing else: no
    unbalanced quote, nothing after ``]`` but a numeric port, no zone
    (``%eth0``); what a client may append must not make it a different
    client. ``::ffff:1.2.3.4`` (IPv4-mapped) is 1.2.3.4, so that the two
    spellings of one client are one client everywhere.
    """
    text = text.strip()
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        text = text[1:-1]
    version = None
    if bracketed := _BRACKETED.fullmatch(text):
        text, version = bracketed.group(1), 6
    elif with_port := _WITH_PORT.fullmatch(text):
        text, version = with_port.group(1), 4
    if "%" in text:
        return None
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if version is not None and address.version != version:
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


def _split_from_the_right(text: str, separator: str) -> list[str]:
    """``text`` split at each ``separator`` outside double quotes, counted from the right.

    Quotes pair up from the right end, where proxies append: an unbalanced
    quote stays in the left-most part (a client's), it never joins a part
    with the well-formed ones after it.
    """
    parts: list[str] = []
    end = len(text)
    quoted = False
    for index in range(len(text) - 1, -1, -1):
        character = text[index]
        if character == '"':
            quoted = not quoted
        elif character == separator and not quoted:
            parts.append(text[index + 1 : end])
            end = index
    parts.append(text[:end])
    parts.reverse()
    return parts


def _forwarded_for(element: str) -> str:
    """The ``for=`` of one RFC 7239 element; ``unknown`` if it has none.

    An element whose quotes do not pair up is returned whole: not an address.
    """
    if element.count('"') % 2:
        return element.strip()
    for pair in _split_from_the_right(element, ";"):
        name, _, value = pair.partition("=")
        if name.strip().lower() == "for":
            return value.strip()
    return "unknown"


def hops(name: bytes, values: Sequence[bytes]) -> list[str]:
    """The addresses a forwarding header names, client first, each normalised.

    Each header line is split on its own: a quote a client left open ends
    with its line, and the lines a proxy added after it are read as sent.
    """
    found: list[str] = []
    for value in values:
        text = value.decode("latin-1")
        if name == b"forwarded":
            found += [_forwarded_for(element) for element in _split_from_the_right(text, ",")]
        else:
            found += text.split(",")
    return [normalise(hop) for hop in found if hop.strip()]


def _client_in(chain: list[str], proxies: Sequence[Network]) -> str | None:
    """The right-most hop that is not a trusted proxy (the left part is the client's claim)."""
    for hop in reversed(chain):
        if not _trusted(hop, proxies):
            return hop
    return chain[0] if chain else None


def _forwarded_clients(headers: HeaderLookup, proxies: Sequence[Network]) -> list[str | None]:
    """For each forwarding header the request carries (empty or not), the client it names."""
    clients = []
    for name in FORWARDING_HEADERS:
        values = headers(name)
        if values is not None and len(values):
            clients.append(_client_in(hops(name, values), proxies))
    return clients


def client_address(peer: str, headers: HeaderLookup, proxies: Sequence[Network]) -> str:
    """The client's address, believing forwarding headers only from ``proxies``.

    From a trusted proxy: the client its forwarding headers name, if they
    all name the same one; otherwise (they differ, or one names nobody) the
    proxy itself, so that no client chooses whom it counts as.
    """
    peer = normalise(peer)
    if not _trusted(peer, proxies):
        return peer
    clients = set(_forwarded_clients(headers, proxies))
    if len(clients) == 1:
        client = clients.pop()
        if client is not None:
            return client
    return peer


def is_loopback_host(values: Sequence[bytes] | None) -> bool:
    """Does the Host header name this machine's loopback (``localhost``, 127.x, ``[::1]``)?

    A page whose own name an attacker re-resolves to 127.0.0.1 (DNS
    rebinding) sends loopback requests that the browser calls same-origin,
    but with the attacker's name as Host. No Host at all (HTTP/1.0) is no
    browser's request.
    """
    if values is None:
        return True
    if len(values) != 1:
        return False
    host = values[0].decode("latin-1").strip()
    return _LOCALHOST.fullmatch(host) is not None or is_loopback(host)


def is_loopback_request(peer: str, headers: HeaderLookup, proxies: Sequence[Network]) -> bool:
    """Did this request come from this host? The guard of every loopback-only route.

    The peer must be loopback and the Host a loopback name
    (:func:`is_loopback_host`); a request that carries a forwarding header
    must also come from a trusted proxy, and each such header must name a
    loopback client (a proxy on this host forwards for anyone).
    """
    if not is_loopback(peer) or not is_loopback_host(headers(b"host")):
        return False
    clients = _forwarded_clients(headers, proxies)
    if not clients:
        return True
    return _trusted(peer, proxies) and all(
        client is not None and is_loopback(client) for client in clients
    )


def is_cross_site(headers: HeaderLookup) -> bool:
    """Did a web page make this request? (``<img src=http://localhost:8000/kill>``)

    Browsers say so: ``Sec-Fetch-Site`` other than ``none`` (typed by the
    user) or ``same-origin``, or an ``Origin`` (sent with every cross-origin
    fetch). curl and other programs send neither. A loopback-only route
    refuses such requests: every page a local user opens runs on loopback.
    """
    if headers(b"origin") is not None:
        return True
    fetch_site = headers(b"sec-fetch-site")
    return fetch_site is not None and any(
        value.strip().lower() not in (b"none", b"same-origin") for value in fetch_site
    )
