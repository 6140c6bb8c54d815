"""The child: its record pipe to the master (a real pipe, a fake clock), the protocol, its stop."""

from __future__ import annotations

import io
import os
from collections.abc import Callable

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor
from twisted.logger import Logger

from taskserver.cluster.child import (
    DRAIN_TIMEOUT_S,
    ChildService,
    _read_config_line,
    log_observer,
    master_record,
    records_pipe,
)
from taskserver.cluster.lifeline import ParentWatch
from taskserver.cluster.protocol import (
    READY,
    RESUME,
    TASK,
    parse_record,
    pause_record,
    task_record,
    worker_process_id,
)
from taskserver.ids import consumer_ids_of, new_process_id, process_of


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
    """Both ends of the pipe use taskserver.cluster.protocol: what one writes the other parses."""
    assert parse_record(task_record('{"id": "a b"}')) == (TASK, '{"id": "a b"}')
    assert parse_record(READY) == (READY, "")
    process_id = worker_process_id("abc123", slot=1, generation=4)
    assert process_id.endswith(":abc123-w1.4")
    assert [process_of(c) for c in consumer_ids_of(process_id)] == [process_id]
    assert process_of(consumer_ids_of(new_process_id())[0]).count(":") == 2


class FakeSite:
    """The part of TaskSite a stopping child uses: open channels and when_closed."""

    def __init__(self, channels: int) -> None:
        self.channels = set(range(channels))
        self._waiters: dict[int, list[Callable[[], None]]] = {}

    def when_closed(self, channel: int, callback: Callable[[], None]) -> None:
        self._waiters.setdefault(channel, []).append(callback)

    def close(self, channel: int) -> None:
        self.channels.discard(channel)
        for callback in self._waiters.pop(channel, []):
            callback()


def stopping_child(site: FakeSite, clock: Clock) -> ChildService:
    child = ChildService(
        settings=None,  # type: ignore[arg-type]
        redis=None,  # type: ignore[arg-type]
        listener_fd=-1,
        address_family=0,
        handler=lambda task: None,
        reactor=clock,
        task_sink=lambda line: None,
    )
    child.site = site  # type: ignore[assignment]
    return child


def test_shutdown_waits_for_the_last_connection_without_polling() -> None:
    clock, site = Clock(), FakeSite(2)
    waited = defer.Deferred.fromCoroutine(
        stopping_child(site, clock)._connections_closed(DRAIN_TIMEOUT_S)
    )
    site.close(0)
    assert not waited.called
    assert clock.getDelayedCalls() and len(clock.getDelayedCalls()) == 1, "only the deadline"
    site.close(1)
    assert waited.called and not clock.getDelayedCalls()


def test_shutdown_stops_waiting_at_the_drain_deadline() -> None:
    clock, site = Clock(), FakeSite(1)
    waited = defer.Deferred.fromCoroutine(
        stopping_child(site, clock)._connections_closed(DRAIN_TIMEOUT_S)
    )
    clock.advance(DRAIN_TIMEOUT_S - 0.01)
    assert not waited.called
    clock.advance(0.01)
    assert waited.called and waited.result is None
    site.close(0)  # late: harmless


def test_a_child_logs_info_and_above_without_reconnect_attempts() -> None:
    out = io.StringIO()
    observer = log_observer(out)
    log = Logger(namespace="taskserver.consumer.ConsumerService", observer=observer)
    log.debug("promoting retries failed: Redis did not answer within 1.0 s")
    log.info("consumer c is fetching again")
    log.warn("heartbeat failed: Redis did not answer within 1.0 s")
    retry = Logger(namespace="twisted.application._client_service.ClientService", observer=observer)
    retry.info("Scheduling retry {attempt} to connect", attempt=1)
    assert out.getvalue().splitlines() == [
        "[taskserver.consumer.ConsumerService#info] consumer c is fetching again",
        "[taskserver.consumer.ConsumerService#warn] heartbeat failed: Redis did not answer "
        "within 1.0 s",
    ]


def test_records_after_the_configuration_reach_the_child_in_order() -> None:
    """fd 0: the configuration line, then pause/resume records, however the reads cut them."""
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, b'{"seat": 1}\n' + pause_record("the disk is full").encode() + b"\nres")
        config, rest = _read_config_line(read_end)
        assert config == {"seat": 1}
        lines: list[str] = []
        gone: list[bool] = []
        watch = ParentWatch(
            read_end, lambda: gone.append(True), MemoryReactor(), lines.append, already_read=rest
        )
        watch.startReading()
        assert lines == ["pause the disk is full"], "what came with the configuration"
        os.write(write_end, b"ume\n")
        watch.doRead()
        assert lines == ["pause the disk is full", RESUME]
        os.close(write_end)
        write_end = -1
        assert watch.doRead() is not None, "end-of-file: the master is gone"
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)


def test_pause_and_resume_records_switch_readiness() -> None:
    child = stopping_child(FakeSite(0), Clock())
    assert child._not_ready() is None
    master_record(child, pause_record("the task log cannot be written (No space left on device)"))
    refusal = child._not_ready()
    assert refusal is not None and refusal.status == 503
    assert refusal.document() == {
        "error": "task_log_unwritable",
        "message": "the task log cannot be written (No space left on device)",
    }
    master_record(child, "something new")  # a record this child does not know: ignored
    assert child._not_ready() is not None
    master_record(child, RESUME)
    assert child._not_ready() is None
