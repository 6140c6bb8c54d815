"""The master's own sequencing on a fake process reactor: start, stop, and what a stop reports."""

from __future__ import annotations

import errno
import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fake_process import FakeProcess, FakeProcessReactor
from test_tasklog import FaultyFile
from twisted.logger import LogLevel, capturedLogs, formatEvent

from taskserver import tasklog
from taskserver.cluster.embedded import STOP_TIMEOUT_S, read_embedded_address
from taskserver.cluster.listener import bind_listener
from taskserver.cluster.master import Master, unless_the_disk_refuses
from taskserver.cluster.protocol import RECORDS_FD, task_record
from taskserver.cluster.supervisor import KILL_GRACE_S
from taskserver.config import Settings
from taskserver.tasklog import TASK_LOG_BACKLOG_LINES

WORKERS = 2
SHUTDOWN_TIMEOUT_S = 2.0


@pytest.fixture(autouse=True)
def keep_sighup() -> Iterator[None]:
    """The master installs a SIGHUP handler in this (the test) process: put the old one back."""
    old = signal.getsignal(signal.SIGHUP)
    yield
    signal.signal(signal.SIGHUP, old)


def make_master(tmp_path: Path, reactor: FakeProcessReactor) -> Master:
    settings = Settings(
        port=0,
        interface="127.0.0.1",
        log_dir=tmp_path / "logs",
        data_dir=tmp_path / "data",
        workers=WORKERS,
        shutdown_timeout_s=SHUTDOWN_TIMEOUT_S,
    )
    return Master(settings, bind_listener("127.0.0.1", 0), reactor, redis_binary="valkey-server")


def redis_ready(process: FakeProcess) -> None:
    process.say(1, b"1:M * Ready to accept connections tcp\n")


def started(tmp_path: Path) -> tuple[FakeProcessReactor, Master]:
    reactor = FakeProcessReactor()
    master = make_master(tmp_path, reactor)
    master.startService()
    redis_ready(reactor.process(0))
    assert len(reactor.spawned) == 1 + WORKERS
    return reactor, master


def test_a_stop_while_the_embedded_redis_starts_spawns_no_child(tmp_path: Path) -> None:
    reactor = FakeProcessReactor()
    master = make_master(tmp_path, reactor)
    master.startService()
    with capturedLogs() as logged:
        stopped = master.stopService()  # SIGTERM while Redis is starting
        assert reactor.process(0).signals == ["TERM"]
        redis_ready(reactor.process(0))  # it was ready before the TERM reached it
        assert len(reactor.spawned) == 1, "no child after the stop"
        assert not stopped.called, "Redis is still running"
        reactor.process(0).exit(0)
    assert stopped.called and master.supervisor is None
    assert not reactor.hasStopped and "after" not in reactor.triggers, "not a failed start"
    assert [e for e in logged if e["log_level"] >= LogLevel.error] == []


def test_sighup_is_handled_from_the_start(tmp_path: Path) -> None:
    """Before the embedded Redis is ready, SIGHUP's default action would kill the master."""
    reactor = FakeProcessReactor()
    master = make_master(tmp_path, reactor)
    master.startService()
    assert signal.getsignal(signal.SIGHUP) == master._on_sighup
    with capturedLogs() as logged:
        master._rolling_restart()
    assert [formatEvent(e) for e in logged] == [
        "SIGHUP before the workers started: nothing to restart"
    ]
    stopped = master.stopService()
    reactor.process(0).exit(0)
    assert stopped.called


def test_children_and_the_address_file_get_the_redis_password(tmp_path: Path) -> None:
    reactor, master = started(tmp_path)
    password = reactor.process(0).stdin.decode().split()[1]
    assert len(password) >= 24
    assert b'"password": "' + password.encode() + b'"' in reactor.process(1).stdin
    address = read_embedded_address(tmp_path / "data")
    assert address is not None and address.password == password
    assert master._pool is None, "no standing pool of the master's own"


def stop_all(reactor: FakeProcessReactor, master: Master, *, slow_child: bool) -> None:
    stopped = master.stopService()
    reactor.process(1).exit(0)
    if slow_child:
        reactor.advance(SHUTDOWN_TIMEOUT_S + KILL_GRACE_S)
        assert reactor.process(2).signals == ["TERM", "KILL"]
        reactor.process(2).exit(signal=9)
    else:
        reactor.process(2).exit(0)
    assert reactor.process(0).signals == ["TERM"], "Redis stops last"
    reactor.process(0).exit(0)
    assert stopped.called


def test_a_stop_that_had_to_kill_a_child_is_unclean(tmp_path: Path) -> None:
    reactor, master = started(tmp_path)
    with capturedLogs() as logged:
        stop_all(reactor, master, slow_child=True)
    errors = [formatEvent(e) for e in logged if e["log_level"] >= LogLevel.error]
    assert errors == ["taskserver stopped uncleanly: worker-1 (pid 1002) had to be killed"]
    assert reactor.triggers["after"]["shutdown"][0][0] == master._exit_uncleanly


def test_a_stop_that_had_to_kill_redis_is_unclean(tmp_path: Path) -> None:
    reactor, master = started(tmp_path)
    stopped = master.stopService()
    for n in (1, 2):
        reactor.process(n).exit(0)
    with capturedLogs() as logged:
        reactor.advance(STOP_TIMEOUT_S)
        reactor.process(0).exit(signal=9)
    assert stopped.called
    errors = [formatEvent(e) for e in logged if e["log_level"] >= LogLevel.error]
    assert errors == [
        "taskserver stopped uncleanly: the embedded Redis (its last writes may be lost) "
        "had to be killed"
    ]
    assert reactor.triggers["after"]["shutdown"][0][0] == master._exit_uncleanly


def test_a_clean_stop_exits_0(tmp_path: Path) -> None:
    reactor, master = started(tmp_path)
    with capturedLogs() as logged:
        stop_all(reactor, master, slow_child=False)
    assert "taskserver stopped" in [formatEvent(e) for e in logged]
    assert "after" not in reactor.triggers


def config_of(master: Master) -> dict[str, Any]:
    """The configuration a child spawned now would get."""
    assert master.supervisor is not None
    return json.loads(master._config_for(master.supervisor.workers[0]))  # type: ignore[no-any-return]


def test_a_full_task_log_pauses_every_child_and_resumes_them_once_its_lines_are_out(
    tmp_path: Path,
) -> None:
    """The master's side of back-pressure: the pause and resume records on each child's fd 0."""
    reactor, master = started(tmp_path)
    writer = master._task_log
    assert writer is not None
    disk = FaultyFile()
    writer._file = disk
    opened: list[bool] = []
    master._queue_for_reclaims = lambda: opened.append(True)  # type: ignore[method-assign]
    configured = {n: len(reactor.process(n).stdin) for n in (1, 2)}
    disk.failing = errno.ENOSPC
    with capturedLogs():
        for n in range(TASK_LOG_BACKLOG_LINES):
            reactor.process(1 + n % 2).say(RECORDS_FD, task_record(f"line {n}").encode() + b"\n")
        reactor.advance(0)
        assert opened, "the pool opens so that the write errors reach the metrics"
        said = {n: reactor.process(n).stdin[configured[n] :] for n in (1, 2)}
        assert said[1] == said[2] and said[1].startswith(b"pause the task log cannot be written")
        assert said[1].endswith(b"\n") and said[1].count(b"\n") == 1
        assert config_of(master)["fetch_paused"].startswith("the task log cannot be written")
        disk.failing = None
        reactor.advance(tasklog.RETRY_MAX_S)
    said = {n: reactor.process(n).stdin[configured[n] :] for n in (1, 2)}
    assert said[1].endswith(b"\nresume\n") and said[2].endswith(b"\nresume\n")
    assert disk.lines() == [f"line {n}" for n in range(TASK_LOG_BACKLOG_LINES)]
    assert config_of(master)["fetch_paused"] is None, "a child started now fetches"
    counted = master.tally.take()
    kept = master._metrics._batch or {}  # what a flush on no pool kept for the next
    assert counted.get("task_log_write_errors", 0) + kept.get("task_log_write_errors", 0) >= 1


def test_a_full_disk_drops_twistd_log_events_without_a_traceback_each() -> None:
    seen: list[str] = []

    def full_disk(event: Any) -> None:
        seen.append(event["log_format"])
        if event["log_format"] == "refused":
            raise OSError(errno.ENOSPC, "No space left on device")

    observer = unless_the_disk_refuses(full_disk)
    observer({"log_format": "refused"})
    observer({"log_format": "taken"})
    assert seen == ["refused", "taken"]


def stop_with_a_full_disk(tmp_path: Path, frees_up: bool) -> tuple[FaultyFile, list[str]]:
    """Three lines the disk refuses, then a stop; the disk frees up halfway through, or not."""
    reactor, master = started(tmp_path)
    assert master._task_log is not None
    disk = FaultyFile()
    master._task_log._file = disk
    master._queue_for_reclaims = lambda: None  # type: ignore[method-assign,assignment,return-value]
    disk.failing = errno.ENOSPC
    records = b"".join(task_record(f"line {n}").encode() + b"\n" for n in range(3))
    with capturedLogs() as logged:
        reactor.process(1).say(RECORDS_FD, records)
        stopped = master.stopService()
        for n in (1, 2):
            reactor.process(n).exit(0)
        reactor.advance(SHUTDOWN_TIMEOUT_S / 2)
        assert reactor.process(0).signals == [], "Redis waits: the master is still writing"
        if frees_up:
            disk.failing = None
        for _ in range(int(SHUTDOWN_TIMEOUT_S / tasklog.RETRY_MAX_S) + 1):
            reactor.advance(tasklog.RETRY_MAX_S)
        assert reactor.process(0).signals == ["TERM"]
        reactor.process(0).exit(0)
    assert stopped.called
    return disk, [formatEvent(e) for e in logged if e["log_level"] >= LogLevel.warn]


def test_a_stop_waits_for_the_lines_a_full_disk_holds_back(tmp_path: Path) -> None:
    disk, warnings = stop_with_a_full_disk(tmp_path, frees_up=True)
    assert disk.lines() == ["line 0", "line 1", "line 2"]
    assert "waiting up to 2 s for 3 task-log line(s) the disk has not taken yet" in warnings
    assert not [w for w in warnings if "lost" in w]


def test_a_stop_gives_up_on_a_disk_that_stays_full_and_says_so(tmp_path: Path) -> None:
    disk, warnings = stop_with_a_full_disk(tmp_path, frees_up=False)
    assert disk.lines() == [] and disk.closed
    assert "3 task-log line(s) could not be written before the stop and are lost" in warnings
