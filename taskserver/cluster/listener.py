# -*- test-case-name: tests.test_listener -*-
"""The listening socket, made by hand so that it can be shared with child processes.

Twisted's listenTCP cannot hand its socket to another process; a socket we
bind ourselves can be adopted by this process's reactor now and inherited
by child processes later (``adoptStreamPort``).
"""

from __future__ import annotations

import errno
import socket

from taskserver.config import ConfigError

BACKLOG = 1024


def bind_listener(interface: str, port: int) -> socket.socket:
    """A bound, listening, non-blocking TCP socket.

    An empty interface means every interface: IPv6 and IPv4 (dual stack)
    where the host has IPv6, IPv4 only where it has not.
    """
    if interface:
        family = socket.AF_INET6 if ":" in interface else socket.AF_INET
        candidates = [(family, interface)]
    else:
        candidates = [(socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")]
    last_error: OSError | None = None
    for family, host in candidates:
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as e:  # no IPv6 on this host
            last_error = e
            continue
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and not interface:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind((host, port))
            sock.listen(BACKLOG)
            sock.setblocking(False)
            return sock
        except OSError as e:
            sock.close()
            if e.errno == errno.EADDRINUSE:
                raise ConfigError(f"PORT (--port): port {port} is already in use") from None
            if e.errno == errno.EADDRNOTAVAIL or (interface and e.errno == errno.EINVAL):
                raise ConfigError(
                    f"INTERFACE (--interface): {interface!r} is not an address of this host"
                ) from None
            last_error = e
    raise ConfigError(f"cannot listen on port {port}: {last_error}")


def describe(sock: socket.socket) -> str:
    """``http://host:port`` for the start-up log."""
    host, port = sock.getsockname()[:2]
    if host in ("::", "0.0.0.0"):
        host = "localhost"
    elif ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"
