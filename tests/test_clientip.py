"""Client addresses and loopback requests: forwarding headers count only from trusted proxies."""

from __future__ import annotations

import pytest

from taskserver.clientip import (
    HeaderLookup,
    client_address,
    hops,
    is_cross_site,
    is_loopback,
    is_loopback_request,
    parse_address,
    parse_networks,
)

PROXIES = parse_networks("10.0.0.1, 192.168.0.0/16")
LOCAL_PROXY = parse_networks("127.0.0.1")


def headers(**values: str) -> HeaderLookup:
    """A header lookup like ``Headers.getRawHeaders``: ``x_real_ip="1.2.3.4"``."""
    raw = {name.replace("_", "-").encode(): [value.encode()] for name, value in values.items()}
    return raw.get


@pytest.mark.parametrize(
    ("peer", "forwarded", "client"),
    [
        ("203.0.113.9", None, "203.0.113.9"),
        ("203.0.113.9", [b"1.2.3.4"], "203.0.113.9"),  # not a proxy: header ignored
        ("10.0.0.1", [b"1.2.3.4"], "1.2.3.4"),
        ("10.0.0.1", [b"6.6.6.6, 1.2.3.4"], "1.2.3.4"),  # the left part is the client's claim
        ("10.0.0.1", [b"1.2.3.4, 192.168.3.3"], "1.2.3.4"),  # skips trusted hops
        ("10.0.0.1", [b"5.5.5.5", b"1.2.3.4"], "1.2.3.4"),  # several header lines
        ("10.0.0.1", [b"192.168.1.1"], "192.168.1.1"),  # all trusted: the left-most
        ("::ffff:10.0.0.1", [b"1.2.3.4"], "1.2.3.4"),
        ("10.0.0.1", [b"garbage, 1.2.3.4"], "1.2.3.4"),
        ("10.0.0.1", [b"1.2.3.4, garbage"], "garbage"),  # an untrusted hop, even if odd
        ("10.0.0.1", [b"1.2.3.4:5678, [2001:db8::1]:80"], "2001:db8::1"),  # with ports
    ],
)
def test_client_address_from_x_forwarded_for(
    peer: str, forwarded: list[bytes] | None, client: str
) -> None:
    raw = {} if forwarded is None else {b"x-forwarded-for": forwarded}
    assert client_address(peer, raw.get, PROXIES) == client


@pytest.mark.parametrize(
    ("value", "chain"),
    [
        ("for=192.0.2.60;proto=http;by=203.0.113.43", ["192.0.2.60"]),
        ('for="[2001:db8:cafe::17]:4711"', ["2001:db8:cafe::17"]),
        ('For="192.0.2.43:47011", for=198.51.100.17', ["192.0.2.43", "198.51.100.17"]),
        ("for=unknown, for=_hidden", ["unknown", "_hidden"]),
        ('proto=https;host="a,b", for=1.2.3.4', ["unknown", "1.2.3.4"]),  # no for=; quoted comma
        ('for="[::1], for=1.2.3.4', ['for="[::1]', "1.2.3.4"]),  # an open quote: kept whole
        ('for="[::1]:80', ['for="[::1]:80']),
    ],
)
def test_forwarded_header_hops(value: str, chain: list[str]) -> None:
    assert hops(b"forwarded", [value.encode()]) == chain


@pytest.mark.parametrize(
    ("request_headers", "client"),
    [
        (headers(forwarded="for=1.2.3.4"), "1.2.3.4"),
        (headers(x_real_ip="1.2.3.4"), "1.2.3.4"),
        (headers(x_forwarded_for="5.5.5.5", x_real_ip="5.5.5.5"), "5.5.5.5"),  # they agree
        # They differ: one of them is the client's own, passed on; the proxy is the client.
        (headers(x_forwarded_for="5.5.5.5", forwarded="for=6.6.6.6"), "10.0.0.1"),
        (headers(forwarded="for=6.6.6.6", x_real_ip="7.7.7.7"), "10.0.0.1"),
        (headers(x_forwarded_for="", x_real_ip="7.7.7.7"), "10.0.0.1"),  # empty, yet present
    ],
)
def test_client_address_from_the_other_headers(request_headers: HeaderLookup, client: str) -> None:
    assert client_address("10.0.0.1", request_headers, PROXIES) == client
    assert client_address("203.0.113.9", request_headers, PROXIES) == "203.0.113.9"


def test_a_client_s_own_header_does_not_win_over_the_one_its_proxy_sets() -> None:
    """A proxy that sets only X-Real-IP passes on the X-Forwarded-For its client wrote."""
    request_headers = headers(x_forwarded_for="198.51.100.1", x_real_ip="203.0.113.9")
    assert client_address("10.0.0.1", request_headers, PROXIES) != "198.51.100.1"


@pytest.mark.parametrize(
    "text",
    ['"[::1]', '[::1]junk', '[::1]:', '[::1]:80x', '"127.0.0.1', '127.0.0.1:', '127.0.0.1:ab',
     '127.0.0.1:123456', '[127.0.0.1]', '""', '"', 'fe80::1%eth0', '::1%lo', '[::1]"'],
)  # fmt: skip
def test_what_is_not_exactly_an_address_is_none(text: str) -> None:
    assert parse_address(text) is None


@pytest.mark.parametrize(
    ("text", "address"),
    [('1.2.3.4', "1.2.3.4"), ('1.2.3.4:80', "1.2.3.4"), ('"1.2.3.4:80"', "1.2.3.4"),
     ('::1', "::1"), ('[::1]', "::1"), ('[::1]:80', "::1"), ('"[2001:db8::1]:4711"', "2001:db8::1"),
     ('[::ffff:1.2.3.4]:80', "1.2.3.4"), (' 1.2.3.4 ', "1.2.3.4")],
)  # fmt: skip
def test_addresses_as_proxies_write_them(text: str, address: str) -> None:
    assert str(parse_address(text)) == address


#: A client's own Forwarded value, with a quote it left open, then the proxy's.
CLIENT_SPELLINGS = ['for="[::1]', 'for="127.0.0.1:', 'for="[::1]junk, for=127.0.0.1', 'for="::1']
PROXY_LINE = b"for=203.0.113.9"


@pytest.mark.parametrize("spelling", CLIENT_SPELLINGS)
def test_an_open_quote_does_not_swallow_the_proxy_s_line(spelling: str) -> None:
    """The /kill bypass: each header line is read on its own, the proxy's included."""
    lines = {b"forwarded": [spelling.encode(), PROXY_LINE]}
    assert hops(b"forwarded", lines[b"forwarded"])[-1] == "203.0.113.9"
    assert client_address("127.0.0.1", lines.get, LOCAL_PROXY) == "203.0.113.9"
    assert is_loopback_request("127.0.0.1", lines.get, LOCAL_PROXY) is False


@pytest.mark.parametrize("spelling", CLIENT_SPELLINGS)
def test_an_open_quote_does_not_swallow_what_the_proxy_appends_to_its_line(
    spelling: str,
) -> None:
    """A proxy that appends ``, for=...`` to the client's line: read from the right end."""
    lines = {b"forwarded": [spelling.encode() + b", " + PROXY_LINE]}
    assert client_address("127.0.0.1", lines.get, LOCAL_PROXY) == "203.0.113.9"
    assert is_loopback_request("127.0.0.1", lines.get, LOCAL_PROXY) is False


@pytest.mark.parametrize("spelling", CLIENT_SPELLINGS)
def test_an_open_quote_alone_is_not_a_loopback_client(spelling: str) -> None:
    lines = {b"forwarded": [spelling.encode()]}
    assert is_loopback_request("127.0.0.1", lines.get, LOCAL_PROXY) is False


def test_a_client_cannot_choose_its_address_with_an_open_quote() -> None:
    """``for="[2001:db8::7]`` would have been the client's own choice of address."""
    lines = {b"forwarded": [b'for="[2001:db8::7]', PROXY_LINE]}
    assert client_address("127.0.0.1", lines.get, LOCAL_PROXY) == "203.0.113.9"
    same_line = {b"forwarded": [b'for="[2001:db8::7], ' + PROXY_LINE]}
    assert client_address("127.0.0.1", same_line.get, LOCAL_PROXY) == "203.0.113.9"


@pytest.mark.parametrize(
    ("text", "loopback"),
    [("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("::ffff:127.0.0.1", True),
     ("::FFFF:127.0.0.1", True), ("[::1]:8000", True), ("10.0.0.1", False),
     ("192.168.1.5", False), ("::ffff:10.0.0.1", False), ("", False), ("localhost", False)],
)  # fmt: skip
def test_loopback_detection(text: str, loopback: bool) -> None:
    assert is_loopback(text) is loopback


def test_ipv4_mapped_addresses_are_one_client() -> None:
    assert parse_address("::ffff:192.0.2.1") == parse_address("192.0.2.1")
    assert client_address("::ffff:203.0.113.9", headers(), PROXIES) == "203.0.113.9"


@pytest.mark.parametrize(
    ("peer", "request_headers", "proxies", "loopback"),
    [
        ("127.0.0.1", headers(), (), True),
        ("::ffff:127.0.0.1", headers(), (), True),
        ("203.0.113.9", headers(), (), False),
        # A proxy on this host, not trusted: whatever it forwards, not a loopback request.
        ("127.0.0.1", headers(x_forwarded_for="203.0.113.9"), (), False),
        ("127.0.0.1", headers(forwarded="for=203.0.113.9"), (), False),
        ("127.0.0.1", headers(x_real_ip="203.0.113.9"), (), False),
        ("127.0.0.1", headers(x_forwarded_for="127.0.0.1"), (), False),
        ("127.0.0.1", headers(x_forwarded_for=""), (), False),
        # A trusted proxy on this host: loopback only if it forwards for a loopback client.
        ("127.0.0.1", headers(x_forwarded_for="127.0.0.1"), LOCAL_PROXY, True),
        ("127.0.0.1", headers(forwarded='for="[::1]:5000"'), LOCAL_PROXY, True),
        ("127.0.0.1", headers(x_forwarded_for="203.0.113.9"), LOCAL_PROXY, False),
        ("127.0.0.1", headers(x_forwarded_for="127.0.0.1, 203.0.113.9"), LOCAL_PROXY, False),
        ("127.0.0.1", headers(forwarded="for=203.0.113.9"), LOCAL_PROXY, False),
        ("127.0.0.1", headers(x_real_ip="203.0.113.9"), LOCAL_PROXY, False),
        ("127.0.0.1", headers(forwarded="for=unknown"), LOCAL_PROXY, False),
        # Every header must name a loopback client, not only the one believed first.
        (
            "127.0.0.1",
            headers(x_forwarded_for="127.0.0.1", forwarded="for=203.0.113.9"),
            LOCAL_PROXY,
            False,
        ),
        ("10.0.0.1", headers(x_forwarded_for="127.0.0.1"), PROXIES, False),  # peer not local
    ],
)
def test_loopback_requests(
    peer: str, request_headers: HeaderLookup, proxies: tuple, loopback: bool
) -> None:
    assert is_loopback_request(peer, request_headers, proxies) is loopback


def test_bad_proxy_setting() -> None:
    with pytest.raises(ValueError, match=r"not an address or network: 'proxy\.local'"):
        parse_networks("10.0.0.1, proxy.local")


@pytest.mark.parametrize(
    ("request_headers", "cross_site"),
    [
        ({}, False),  # curl
        ({b"sec-fetch-site": [b"none"]}, False),  # typed into the address bar
        ({b"sec-fetch-site": [b"same-origin"]}, False),
        ({b"sec-fetch-site": [b"cross-site"]}, True),  # <img src=http://localhost:8000/kill>
        ({b"sec-fetch-site": [b"same-site"]}, True),  # another port of localhost
        ({b"origin": [b"https://example.com"]}, True),
        ({b"origin": [b"null"]}, True),
    ],
)
def test_requests_a_web_page_made(
    request_headers: dict[bytes, list[bytes]], cross_site: bool
) -> None:
    assert is_cross_site(request_headers.get) is cross_site


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        (None, True),
        ("localhost:8000", True),
        ("LOCALHOST", True),
        ("localhost.:8000", True),
        ("127.0.0.1:8000", True),
        ("127.9.9.9", True),
        ("[::1]:8000", True),
        ("attacker.example:8000", False),
        ("localhost.attacker.example", False),
        ("10.0.0.1:8000", False),
        ("", False),
    ],
)
def test_a_loopback_request_names_a_loopback_host(host: str | None, loopback: bool) -> None:
    """DNS rebinding: a page re-resolved to 127.0.0.1 sends same-origin requests with its name."""
    lines = {} if host is None else {b"host": [host.encode()]}
    assert is_loopback_request("127.0.0.1", lines.get, ()) is loopback
