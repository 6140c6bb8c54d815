"""The child's record pipe to the master (a real pipe, a fake clock)."""

from __future__ import annotations

import os

from twisted.internet.task import Clock

from taskserver.child import records_pipe


def test_the_records_of_one_turn_go_in_one_write() -> None:
    read_end, write_end = os.pipe()
    try:
        clock = Clock()
        pipe = records_pipe(write_end, clock)
        for n in range(3):
            pipe.add(f"task line {n}")
        os.set_blocking(read_end, False)
        assert _available(read_end) == b"", "nothing before the turn ends"
        clock.advance(0)
        assert _available(read_end) == b"task line 0\ntask line 1\ntask line 2\n"
        pipe.add("ready")
        pipe.flush()
        assert _available(read_end) == b"ready\n", "flush writes at once"
        pipe.add("task after the flush")
        clock.advance(0)
        assert _available(read_end) == b"task after the flush\n", "a new turn, a new write"
    finally:
        os.close(read_end)
        os.close(write_end)


def _available(fd: int) -> bytes:
    try:
        return os.read(fd, 65536)
    except BlockingIOError:
        return b""
