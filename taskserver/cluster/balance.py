# -*- test-case-name: tests.test_balance -*-
"""Spreading connections over children that share one listening socket.

Linux wakes the most recently waiting process first and Twisted accepts up
to ~100 connections per wake-up, so with a plainly inherited socket one
child can take every connection. Here each child keeps a seat in a small
shared-memory scoreboard (its load, whether it is accepting, a heartbeat)
and accepts only while its load is no more than the least-loaded live,
accepting child's plus a small slack, like nginx's ``accept_disabled``.

A child's load is its open connections except those parked in a
``GET ...?wait=``: such a connection can carry no other request until its
wait ends and costs next to nothing meanwhile, so counting it would let
thousands of waiters decide where the busy connections go (and the slack,
10 % of thousands, would let one child take them all). Every other open
connection counts, an idle keep-alive one too: it may send a request at
any moment. ``MAX_CONNECTIONS`` still bounds all open connections.

The socket stays shared, so what it buys is kept: a child that dies or
stalls takes no queued connection with it. A stalled child stops beating;
after :data:`STALE_AFTER_S` the others leave it out of the comparison and
accept what it cannot.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet import tcp
from twisted.internet.interfaces import IReactorTime

#: One seat: load (int64, see :class:`Seat`), accepting (int64, 0/1),
#: heartbeat (float64, monotonic s).
_SEAT = struct.Struct("=qqd")
#: A seat whose heartbeat is older than this is ignored (its child died or stalls).
STALE_AFTER_S = 0.5
#: How often a child refreshes its heartbeat.
BEAT_EVERY_S = 0.1
#: While it may not accept, a child looks again this often (and whenever a connection closes).
RECHECK_EVERY_S = 0.005


def accept_allowance(own: int, others: Sequence[int]) -> int:
    """How many connections a child whose load is ``own`` may accept now.

    ``others`` are the loads of the other live, accepting children. The
    slack grows with the load (10 % of the mean) so a busy cluster does not
    stop accepting over a difference of one connection.
    """
    if not others:
        return 1_000_000
    mean = (own + sum(others)) / (len(others) + 1)
    slack = max(2, math.ceil(0.1 * mean))
    return min(others) + slack - own


class Scoreboard:
    """A shared array of seats, backed by a file every child maps (fd inherited)."""

    def __init__(self, fd: int, seats: int) -> None:
        self.fd = fd
        self.seats = seats
        self._map = mmap.mmap(fd, seats * _SEAT.size)

    @classmethod
    def create(cls, seats: int) -> Scoreboard:
        """A new zeroed scoreboard in an anonymous (already unlinked) file."""
        with tempfile.TemporaryFile() as backing:
            fd = os.dup(backing.fileno())
        os.ftruncate(fd, seats * _SEAT.size)
        os.set_inheritable(fd, True)
        return cls(fd, seats)

    def write(self, seat: int, load: int, accepting: bool, beat: float) -> None:
        _SEAT.pack_into(self._map, seat * _SEAT.size, load, int(accepting), beat)

    def read(self, seat: int) -> tuple[int, bool, float]:
        load, accepting, beat = _SEAT.unpack_from(self._map, seat * _SEAT.size)
        return load, bool(accepting), beat

    def clear(self, seat: int) -> None:
        self.write(seat, 0, False, 0.0)

    def live_loads(self, now: float, exclude: int = -1) -> list[int]:
        """Loads of the live, accepting seats (other than ``exclude``)."""
        loads = []
        for seat in range(self.seats):
            if seat == exclude:
                continue
            load, accepting, beat = self.read(seat)
            if accepting and now - beat <= STALE_AFTER_S:
                loads.append(load)
        return loads

    def close(self) -> None:
        self._map.close()
        os.close(self.fd)


class Seat:
    """One child's place on the scoreboard: counts its load, decides when it may accept.

    ``parked`` says how many of the open connections wait in a ``?wait=`` now
    (the child's waiters); they are left out of the load. It is read at each
    :meth:`publish`: on every open and close, and on the heartbeat, so a
    connection that starts or ends a wait is seen within :data:`BEAT_EVERY_S`.
    A new connection counts at once, before its request is read.

    A seat holding ``max_connections`` (set by the :class:`BalancedPort` that
    enforces it) is published as not accepting: full of waiters its load is
    small, and the others must not hold back for a child that takes nothing.
    """

    def __init__(self, scoreboard: Scoreboard, index: int) -> None:
        self.scoreboard = scoreboard
        self.index = index
        self.connections = 0
        self.accepting = True
        self.parked: Callable[[], int] = lambda: 0
        self.max_connections = 1_000_000

    @property
    def load(self) -> int:
        """Open connections, less those parked in a wait."""
        return self.connections - min(max(0, self.parked()), self.connections)

    def publish(self) -> None:
        accepting = self.accepting and self.connections < self.max_connections
        self.scoreboard.write(self.index, self.load, accepting, time.monotonic())

    def allowance(self) -> int:
        others = self.scoreboard.live_loads(time.monotonic(), exclude=self.index)
        return accept_allowance(self.load, others)

    def opened(self) -> None:
        self.connections += 1
        self.publish()

    def closed(self) -> None:
        self.connections -= 1
        self.publish()

    def retire(self) -> None:
        """Stop counting as an accepting child (we are draining)."""
        self.accepting = False
        self.publish()


class BalancedPort(tcp.Port):
    """An adopted listening port that accepts only its fair share, and never too many.

    Before each accept loop it works out how many connections it may take:
    its seat's allowance (if it shares the socket with other children), and
    what is left under ``max_connections``. At zero it stops reading the
    socket (new connections wait in the shared accept queue, or go to other
    children) and looks again shortly, or as soon as a connection closes
    (call :meth:`recheck`).
    """

    seat: Seat | None = None
    clock: IReactorTime
    max_connections: int = 1_000_000
    _recheck_call: Any = None

    @classmethod
    def adopt(
        cls,
        reactor: Any,
        fd: int,
        family: int,
        factory: Any,
        seat: Seat | None,
        max_connections: int,
    ) -> BalancedPort:
        """Listen on the inherited socket ``fd``; ``factory`` must have a ``channels`` set."""
        port: BalancedPort = cls._fromListeningDescriptor(reactor, fd, family, factory)
        port.seat = seat
        port.clock = reactor
        port.max_connections = max_connections
        if seat is not None:
            seat.max_connections = max_connections
        port.startListening()
        return port

    def allowance(self) -> int:
        room = self.max_connections - len(self.factory.channels)  # type: ignore[union-attr]
        return min(room, self.seat.allowance()) if self.seat is not None else room

    def doRead(self) -> None:
        allowance = self.allowance()
        if allowance <= 0:
            self.stopReading()
            self._schedule_recheck()
            return None
        self.numberAccepts = min(allowance, 100)
        return super().doRead()

    def _schedule_recheck(self) -> None:
        if self._recheck_call is None or not self._recheck_call.active():
            self._recheck_call = self.clock.callLater(RECHECK_EVERY_S, self.recheck)

    def recheck(self) -> None:
        """Start reading the socket again if we may accept."""
        if self.disconnecting or not self.connected:
            return
        if self.allowance() > 0:
            self.startReading()
        else:
            self._schedule_recheck()

    def connectionLost(self, reason: Any) -> None:
        if self._recheck_call is not None and self._recheck_call.active():
            self._recheck_call.cancel()
        super().connectionLost(reason)
