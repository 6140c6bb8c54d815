"""A fake process reactor for the master's supervision logic, as Twisted's procmon tests use.

``spawnProcess`` returns a :class:`FakeProcess` that the test makes speak
(``say``) and die (``exit``); time is a ``MemoryReactorClock``.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import error
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure


class FakeProcess:
    """What spawnProcess returns: records signals and what is written to stdin."""

    def __init__(self, protocol: Any, pid: int) -> None:
        self.protocol = protocol
        self.pid = pid
        self.signals: list[str] = []
        self.stdin = b""
        self.stdin_closed = False

    def write(self, data: bytes) -> None:
        self.stdin += data

    def closeStdin(self) -> None:
        self.stdin_closed = True

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)

    def say(self, fd: int, data: bytes) -> None:
        self.protocol.childDataReceived(fd, data)

    def exit(self, code: int | None = 0, signal: int | None = None) -> None:
        if signal is not None:
            reason = error.ProcessTerminated(signal=signal)
        elif code:
            reason = error.ProcessTerminated(exitCode=code)
        else:
            reason = error.ProcessDone(0)
        self.protocol.processEnded(Failure(reason))


class FakeProcessReactor(MemoryReactorClock):
    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[FakeProcess, list[str], dict[int, Any]]] = []

    def spawnProcess(
        self,
        protocol: Any,
        executable: str,
        args: list[str],
        env: Any = None,
        childFDs: Any = None,
        **kwargs: Any,
    ) -> FakeProcess:
        process = FakeProcess(protocol, pid=1000 + len(self.spawned))
        self.spawned.append((process, args, childFDs))
        protocol.makeConnection(process)
        return process

    def process(self, n: int) -> FakeProcess:
        return self.spawned[n][0]
