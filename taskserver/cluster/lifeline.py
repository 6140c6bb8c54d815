# -*- test-case-name: tests.test_cluster -*-
"""Tying a child process's life to its parent's.

Children run in a session of their own, so a Ctrl-C or a signal sent to
the master's process group reaches the master only, and the master stops
them in order. In exchange they must notice when the master is gone, or a
SIGKILLed master would leave orphans: on Linux the kernel signals them
(``PR_SET_PDEATHSIG``), and everywhere they watch a pipe from the master
for end-of-file (:class:`ParentWatch`).

``python -m taskserver.cluster.lifeline <parent pid> <program> [args...]`` does the
same for a program that is not ours (the embedded Redis), then execs it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from twisted.internet import abstract, fdesc
from twisted.python.failure import Failure

PR_SET_PDEATHSIG = 1


def detach_from_parent_session(expected_parent: int) -> None:
    """New session; SIGTERM when the parent dies (Linux); exit if it already has."""
    os.setsid()
    with contextlib.suppress(AttributeError, OSError):  # not Linux: ParentWatch still works
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != expected_parent:
        sys.exit(1)


def tied_command(arguments: list[str]) -> list[str]:
    """``arguments`` run detached from our session and tied to our lifetime."""
    return [sys.executable, "-m", "taskserver.cluster.lifeline", str(os.getpid()), *arguments]


class ParentWatch(abstract.FileDescriptor):
    """Reads a pipe from the parent; calls ``on_gone`` at end-of-file (the parent exited).

    Each whole line the parent writes goes to ``on_line`` (without its
    newline); ``already_read`` is what was read from the pipe before, after
    the last line consumed (it is handled as soon as reading starts).
    """

    def __init__(
        self,
        fd: int,
        on_gone: Callable[[], None],
        reactor: Any,
        on_line: Callable[[str], None] = lambda line: None,
        already_read: bytes = b"",
    ) -> None:
        super().__init__(reactor)
        self._fd = fd
        self._on_gone = on_gone
        self._on_line = on_line
        self._partial = b""
        self._already_read = already_read
        fdesc.setNonBlocking(fd)

    def fileno(self) -> int:
        return self._fd

    def startReading(self) -> None:
        already, self._already_read = self._already_read, b""
        if already:
            self._received(already)
        super().startReading()

    def doRead(self) -> Any:
        return fdesc.readFromFD(self._fd, self._received)

    def _received(self, data: bytes) -> None:
        *lines, self._partial = (self._partial + data).split(b"\n")
        for line in lines:
            self._on_line(line.decode("utf-8", "replace"))

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        self._on_gone()


if __name__ == "__main__":
    detach_from_parent_session(int(sys.argv[1]))
    os.execv(sys.argv[2], sys.argv[2:])
