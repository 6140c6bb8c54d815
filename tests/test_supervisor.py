"""The supervisor's policy on a fake process reactor (no real processes), as procmon's tests do."""

from __future__ import annotations

import pytest
from fake_process import FakeProcess, FakeProcessReactor
from twisted.internet import defer
from twisted.logger import LogLevel, capturedLogs, formatEvent

from taskserver.backoff import FIRST_BACKOFF_S, MAX_BACKOFF_S, backoff_delay
from taskserver.cluster.supervisor import (
    KILL_GRACE_S,
    READY_TIMEOUT_S,
    Supervisor,
    Worker,
    WorkerDied,
)


class Recorder:
    def __init__(self) -> None:
        self.records: list[tuple[int, str, str]] = []
        self.exits: list[str] = []


@pytest.fixture
def reactor() -> FakeProcessReactor:
    return FakeProcessReactor()


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


def new_supervisor(reactor: FakeProcessReactor, recorder: Recorder, count: int) -> Supervisor:
    return Supervisor(
        reactor,
        count,
        argv=["python", "-m", "taskserver.cluster.child"],
        env={},
        extra_fds={3: 33, 4: 44},
        config_for=lambda worker: f"config {worker.slot} {worker.seat}\n".encode(),
        on_record=lambda worker, kind, body: recorder.records.append((worker.slot, kind, body)),
        on_exit=lambda worker: recorder.exits.append(worker.process_id),
        process_id_for=lambda slot, generation: f"p-w{slot}.{generation}",
        stop_timeout_s=10.0,
    )


@pytest.fixture
def supervisor(reactor: FakeProcessReactor, recorder: Recorder) -> Supervisor:
    supervisor = new_supervisor(reactor, recorder, 2)
    supervisor.startService()
    return supervisor


def ready(process: FakeProcess) -> None:
    process.say(5, b"ready\n")


def test_spawns_every_child_with_its_fds_and_configuration(
    supervisor: Supervisor, reactor: FakeProcessReactor
) -> None:
    assert len(reactor.spawned) == 2
    process, args, fds = reactor.spawned[1]
    assert args == ["python", "-m", "taskserver.cluster.child"]
    assert fds == {0: "w", 1: "r", 2: "r", 5: "r", 3: 33, 4: 44}
    assert process.stdin == b"config 1 1\n"


def test_records_are_split_into_lines_and_passed_on(
    supervisor: Supervisor, reactor: FakeProcessReactor, recorder: Recorder
) -> None:
    process = reactor.process(0)
    process.say(5, b"ready\ntask first li")
    process.say(5, b"ne\ntask second\n")
    assert recorder.records == [(0, "task", "first line"), (0, "task", "second")]
    assert supervisor.workers[0].ready


def test_a_ready_child_that_dies_is_replaced_at_once(
    supervisor: Supervisor, reactor: FakeProcessReactor, recorder: Recorder
) -> None:
    ready(reactor.process(0))
    reactor.process(0).exit(signal=9)
    assert recorder.exits == ["p-w0.0"]
    reactor.advance(0)
    assert len(reactor.spawned) == 3
    replacement = supervisor.workers[0]
    assert replacement.process_id == "p-w0.1"
    assert replacement.seat == 2, "the replacement takes the slot's other seat"


def current(supervisor: Supervisor, reactor: FakeProcessReactor, slot: int) -> FakeProcess:
    pid = supervisor.workers[slot].pid
    return next(process for process, *_ in reactor.spawned if process.pid == pid)


def test_a_child_dying_before_ready_backs_off_exponentially(
    supervisor: Supervisor, reactor: FakeProcessReactor
) -> None:
    delays = []
    for _ in range(9):
        spawned = len(reactor.spawned)
        current(supervisor, reactor, 0).exit(code=1)
        waited = 0.0
        while len(reactor.spawned) == spawned:
            reactor.advance(0.25)
            waited += 0.25
        delays.append(waited)
    assert delays[:4] == [FIRST_BACKOFF_S * 2**n for n in range(4)]
    assert max(delays) == MAX_BACKOFF_S
    ready(current(supervisor, reactor, 0))
    current(supervisor, reactor, 0).exit(signal=9)
    spawned = len(reactor.spawned)
    reactor.advance(0)
    assert len(reactor.spawned) == spawned + 1, "being ready once resets the back-off"


def test_stop_terminates_then_kills_and_waits_for_every_child(
    supervisor: Supervisor, reactor: FakeProcessReactor
) -> None:
    first, second = reactor.process(0), reactor.process(1)
    stopped = supervisor.stopService()
    assert first.signals == ["TERM"] and second.signals == ["TERM"]
    first.exit(0)
    assert not stopped.called
    reactor.advance(10.0 + KILL_GRACE_S)
    assert second.signals == ["TERM", "KILL"]
    second.exit(signal=9)
    assert stopped.called
    reactor.advance(60)
    assert len(reactor.spawned) == 2, "nothing is restarted while stopping"


def test_rolling_restart_replaces_one_child_at_a_time(
    supervisor: Supervisor, reactor: FakeProcessReactor
) -> None:
    for n in (0, 1):
        ready(reactor.process(n))
    done = defer.Deferred.fromCoroutine(supervisor.rolling_restart())
    assert len(reactor.spawned) == 3, "the new worker-0 starts first"
    assert reactor.process(0).signals == [], "the old one waits until the new one is ready"
    ready(reactor.process(2))
    assert reactor.process(0).signals == ["TERM"]
    assert len(reactor.spawned) == 3, "worker-1 waits until the old worker-0 has exited"
    reactor.process(0).exit(0)
    assert len(reactor.spawned) == 4
    ready(reactor.process(3))
    reactor.process(1).exit(0)
    assert done.called
    assert {w.pid for w in supervisor.workers.values()} == {1002, 1003}


def test_worker_names() -> None:
    assert Worker(slot=3, generation=0, seat=3, process_id="p").name == "worker-3"


def start_rolling(
    supervisor: Supervisor, reactor: FakeProcessReactor
) -> tuple[defer.Deferred[None], Worker]:
    for n in (0, 1):
        ready(reactor.process(n))
    old = supervisor.workers[0]
    done = defer.Deferred.fromCoroutine(supervisor.rolling_restart())
    assert len(reactor.spawned) == 3, "the new worker-0 started"
    return done, old


def test_rolling_restart_stops_when_the_new_child_dies_before_ready(
    supervisor: Supervisor, reactor: FakeProcessReactor
) -> None:
    """A broken build: the old child keeps serving and worker-1 is not touched."""
    done, old = start_rolling(supervisor, reactor)
    with capturedLogs() as logged:
        reactor.process(2).exit(code=1)
    assert done.called, "the roll is over"
    assert reactor.process(0).signals == [], "the old worker-0 was not retired"
    assert supervisor.workers[0] is old
    reactor.advance(MAX_BACKOFF_S * 4)
    assert len(reactor.spawned) == 3, "worker-1 was not rolled and nothing replaces the old one"
    assert reactor.process(1).signals == []
    messages = [formatEvent(event) for event in logged if event["log_level"] == LogLevel.error]
    assert messages == [
        "rolling restart stopped: worker-0 exited with status 1 before it was ready; "
        "the old worker-0 (pid 1000) keeps serving"
    ]


def test_rolling_restart_stops_when_the_new_child_never_becomes_ready(
    supervisor: Supervisor, reactor: FakeProcessReactor
) -> None:
    done, old = start_rolling(supervisor, reactor)
    with capturedLogs() as logged:
        reactor.advance(READY_TIMEOUT_S - 0.1)
        assert not done.called and reactor.process(2).signals == []
        reactor.advance(0.1)
    assert reactor.process(2).signals == ["TERM"], "the new child is stopped"
    assert reactor.process(0).signals == [], "the old worker-0 was not retired"
    reactor.process(2).exit(0)
    assert done.called
    assert supervisor.workers[0] is old
    reactor.advance(MAX_BACKOFF_S * 4)
    assert len(reactor.spawned) == 3, "worker-1 was not rolled"
    messages = [formatEvent(event) for event in logged if event["log_level"] == LogLevel.error]
    assert messages == [
        f"rolling restart stopped: worker-0 was not ready within {READY_TIMEOUT_S:g} s; "
        "the old worker-0 (pid 1000) keeps serving"
    ]


def test_every_waiter_sees_a_child_die_before_ready(
    supervisor: Supervisor, reactor: FakeProcessReactor
) -> None:
    worker = supervisor.workers[0]
    first, second = worker.wait_ready(), worker.wait_ready()
    reactor.process(0).exit(code=1)
    for waiter in (first, second, worker.wait_ready()):
        failure = waiter.result
        assert isinstance(failure.value, WorkerDied), failure
        waiter.addErrback(lambda _: None)


def test_the_back_off_doubles_from_nothing_to_its_cap() -> None:
    assert [backoff_delay(n) for n in range(5)] == [0.0, 0.5, 1.0, 2.0, 4.0]
    assert backoff_delay(10_000) == MAX_BACKOFF_S
    assert backoff_delay(3, first_s=0.05, max_s=0.1) == 0.1


# ------------------------------------------------ stopping during a roll, back-off, forks


def test_a_stop_during_a_roll_stops_the_old_child_too(
    supervisor: Supervisor, reactor: FakeProcessReactor
) -> None:
    """SIGTERM while the new worker-0 starts: the old one is stopped and waited for as well."""
    done, _ = start_rolling(supervisor, reactor)
    with capturedLogs() as logged:
        stopped = supervisor.stopService()
        assert [reactor.process(n).signals for n in range(3)] == [["TERM"]] * 3
        reactor.process(2).exit(0)  # the new one, before it was ready
        reactor.process(1).exit(0)
        assert done.called, "the roll is over"
        assert not stopped.called, "the old worker-0 is still running"
        reactor.process(0).exit(0)
    assert stopped.called and supervisor.killed == []
    errors = [formatEvent(event) for event in logged if event["log_level"] >= LogLevel.error]
    assert errors == [], "a failure the stop caused is not a broken build"
    reactor.advance(MAX_BACKOFF_S * 4)
    assert len(reactor.spawned) == 3, "nothing is started after the stop"


def test_a_new_child_ready_during_the_stop_ends_the_roll(
    supervisor: Supervisor, reactor: FakeProcessReactor
) -> None:
    done, _ = start_rolling(supervisor, reactor)
    stopped = supervisor.stopService()
    ready(reactor.process(2))  # it was ready just before the TERM reached it
    assert done.called, "the roll ends: no worker-1 is rolled"
    assert reactor.process(0).signals == ["TERM"], "the stop's signal only"
    for n in (2, 1):
        reactor.process(n).exit(0)
    assert not stopped.called
    reactor.process(0).exit(0)
    assert stopped.called and len(reactor.spawned) == 3


def test_a_roll_while_a_slot_backs_off_starts_one_child_for_it(
    supervisor: Supervisor, reactor: FakeProcessReactor
) -> None:
    ready(reactor.process(1))
    reactor.process(0).exit(code=1)
    reactor.advance(backoff_delay(1))
    reactor.process(2).exit(code=1)  # the next restart is pending, 1 s away
    assert len(reactor.spawned) == 3
    defer.Deferred.fromCoroutine(supervisor.rolling_restart())
    assert len(reactor.spawned) == 4, "the roll starts worker-0"
    reactor.advance(MAX_BACKOFF_S)
    assert len(reactor.spawned) == 4, "the pending back-off restart was cancelled"
    reactor.process(3).exit(code=1)  # the roll's child dies too, with no old one to keep
    reactor.advance(MAX_BACKOFF_S * 2)
    assert len(reactor.spawned) == 5, "one restart for the slot, not two"
    stopped = supervisor.stopService()
    assert reactor.process(4).signals == ["TERM"] and reactor.process(1).signals == ["TERM"]
    reactor.process(4).exit(0)
    reactor.process(1).exit(0)
    assert stopped.called


class FlakyForkReactor(FakeProcessReactor):
    """spawnProcess raises OSError (EAGAIN) while ``failing``, as fork does after an OOM kill."""

    failing = False

    def spawnProcess(self, *args: object, **kwargs: object) -> FakeProcess:
        if self.failing:
            raise OSError(11, "Resource temporarily unavailable")
        return super().spawnProcess(*args, **kwargs)  # type: ignore[arg-type]


def test_a_failed_fork_is_retried_with_the_back_off_and_does_not_block_the_stop(
    recorder: Recorder,
) -> None:
    reactor = FlakyForkReactor()
    supervisor = new_supervisor(reactor, recorder, 1)
    supervisor.startService()
    ready(reactor.process(0))
    reactor.failing = True
    with capturedLogs() as logged:
        reactor.process(0).exit(signal=9)
        reactor.advance(0)  # the replacement's fork fails
        assert 0 not in supervisor.workers, "no placeholder for a child that does not exist"
        reactor.failing = False
        reactor.advance(backoff_delay(1))
    assert len(reactor.spawned) == 2, "tried again after the back-off"
    errors = [formatEvent(event) for event in logged if event["log_level"] == LogLevel.error]
    assert errors == ["worker-0 could not be started: [Errno 11] Resource temporarily unavailable"]
    reactor.failing = True
    reactor.process(1).exit(signal=9)
    reactor.advance(0)
    stopped = supervisor.stopService()
    assert stopped.called, "nothing to wait for"
    reactor.advance(MAX_BACKOFF_S * 2)
    assert len(reactor.spawned) == 2


def test_a_stop_that_had_to_kill_says_so(
    supervisor: Supervisor, reactor: FakeProcessReactor
) -> None:
    stopped = supervisor.stopService()
    reactor.process(0).exit(0)
    reactor.advance(10.0 + KILL_GRACE_S)
    reactor.process(1).exit(signal=9)
    assert stopped.called
    assert supervisor.killed == ["worker-1 (pid 1001)"]


def test_a_stop_while_a_roll_retires_the_old_child_signals_it_once(
    supervisor: Supervisor, reactor: FakeProcessReactor
) -> None:
    done, _ = start_rolling(supervisor, reactor)
    ready(reactor.process(2))
    assert reactor.process(0).signals == ["TERM"], "the roll retires the old worker-0"
    stopped = supervisor.stopService()
    assert reactor.process(0).signals == ["TERM"]
    for n in (1, 2):
        reactor.process(n).exit(0)
    reactor.advance(10.0 + KILL_GRACE_S)
    assert reactor.process(0).signals == ["TERM", "KILL"]
    reactor.process(0).exit(signal=9)
    assert stopped.called and done.called
    assert supervisor.killed == ["worker-0 (pid 1000)"], "killed once, counted once"


def test_a_roll_after_a_failed_fork_still_gives_the_new_child_the_other_seat(
    recorder: Recorder,
) -> None:
    """A fork that failed uses up no generation: seats alternate with generations."""
    reactor = FlakyForkReactor()
    supervisor = new_supervisor(reactor, recorder, 1)
    supervisor.startService()
    ready(reactor.process(0))
    old = supervisor.workers[0]
    reactor.failing = True
    failed_roll = defer.Deferred.fromCoroutine(supervisor.rolling_restart())
    assert failed_roll.called and supervisor.workers[0] is old, "the old child keeps serving"
    reactor.failing = False
    defer.Deferred.fromCoroutine(supervisor.rolling_restart())
    new = supervisor.workers[0]
    assert new is not old and new.seat != old.seat
