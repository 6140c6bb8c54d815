"""The child's record pipe to the master (a real pipe, a fake clock)."""

from __future__ import annotations

import os

from twisted.internet.task import Clock

from taskserver.child import records_pipe
from taskserver.protocol import (
    READY,
    TASK,
    consumer_ids_of,
    new_process_id,
    parse_record,
    process_of,
    task_record,
    worker_process_id,
)


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


def test_records_and_ids_read_back_as_written() -> None:
    """Both ends of the pipe use taskserver.protocol: what one writes the other parses."""
    assert parse_record(task_record('{"id": "a b"}')) == (TASK, '{"id": "a b"}')
    assert parse_record(READY) == (READY, "")
    process_id = worker_process_id("abc123", slot=1, generation=4)
    assert process_id.endswith(":abc123-w1.4")
    assert [process_of(c) for c in consumer_ids_of(process_id)] == [process_id]
    assert process_of(consumer_ids_of(new_process_id())[0]).count(":") == 2
