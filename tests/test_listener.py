"""The hand-made listening socket: bound, non-blocking, described, with clear errors."""

from __future__ import annotations

import socket

import pytest

from taskserver.cluster.listener import BACKLOG, bind_listener, describe
from taskserver.config import ConfigError


def test_binds_a_listening_non_blocking_socket() -> None:
    sock = bind_listener("127.0.0.1", 0)
    try:
        assert sock.getblocking() is False
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        port = sock.getsockname()[1]
        assert describe(sock) == f"http://127.0.0.1:{port}"
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass  # the kernel queues it: nobody has to accept
    finally:
        sock.close()
    assert BACKLOG >= 128


def test_every_interface_is_described_as_localhost() -> None:
    sock = bind_listener("", 0)
    try:
        assert describe(sock) == f"http://localhost:{sock.getsockname()[1]}"
    finally:
        sock.close()


def test_an_ipv6_address_is_bracketed() -> None:
    try:
        sock = bind_listener("::1", 0)
    except ConfigError:
        pytest.skip("no IPv6 loopback on this host")
    try:
        assert describe(sock) == f"http://[::1]:{sock.getsockname()[1]}"
    finally:
        sock.close()


def test_a_port_in_use_is_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=rf"^PORT \(--port\): port {port} is already in use$"):
            bind_listener("127.0.0.1", port)


def test_an_address_of_another_host_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match=r"^INTERFACE \(--interface\): '192.0.2.1' is not"):
        bind_listener("192.0.2.1", 0)
