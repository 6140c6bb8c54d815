"""Client addresses: X-Forwarded-For is believed only from trusted proxies."""

from __future__ import annotations

import pytest

from taskserver.clientip import client_address, parse_networks

PROXIES = parse_networks("10.0.0.1, 192.168.0.0/16")


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
    ],
)
def test_client_address(peer: str, forwarded: list[bytes] | None, client: str) -> None:
    assert client_address(peer, forwarded, PROXIES) == client


def test_bad_proxy_setting() -> None:
    with pytest.raises(ValueError, match=r"not an address or network: 'proxy\.local'"):
        parse_networks("10.0.0.1, proxy.local")
