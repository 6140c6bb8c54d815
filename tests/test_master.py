"""The master's own sequencing on a fake process reactor: start, stop, and what a stop reports."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_process import FakeProcess, FakeProcessReactor
from twisted.logger import LogLevel, capturedLogs, formatEvent

from taskserver.cluster.embedded import STOP_TIMEOUT_S, read_embedded_address
from taskserver.cluster.listener import bind_listener
from taskserver.cluster.master import Master
from taskserver.cluster.supervisor import KILL_GRACE_S
from taskserver.config import Settings

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
