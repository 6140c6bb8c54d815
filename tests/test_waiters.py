"""Waiters: the registry with a fake clock and fake reads; the subscription on a real Redis."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.task import Clock

from conftest import eventually
from taskserver.config import RedisAddress
from taskserver.keys import Keys
from taskserver.queue import TaskQueue
from taskserver.redisclient import (
    KEEPALIVE_IDLE_S,
    RedisUnavailable,
    connect,
    connect_subscriber,
)
from taskserver.waiters import TooManyWaiters, Waiters

ID = "a" * 32


class Records:
    """Fake TaskQueue.status: a dict of records; counts the reads."""

    def __init__(self, **records: str) -> None:
        self.status = {task_id: status for task_id, status in records.items()}
        self.reads = 0

    async def __call__(self, task_id: str) -> dict[str, str] | None:
        self.reads += 1
        status = self.status.get(task_id)
        return None if status is None else {"status": status}


def waiting(records: Records, clock: Clock, max_waiters: int = 10, live: bool = True) -> Waiters:
    waiters = Waiters(records, clock, "chan", max_waiters, timeout_s=2.0)
    if live:
        waiters.subscribed()
    return waiters


def wait(waiters: Waiters, task_id: str, seconds: float) -> tuple[defer.Deferred[Any], list[Any]]:
    d = defer.Deferred.fromCoroutine(waiters.wait(task_id, seconds))
    answers: list[Any] = []
    d.addBoth(answers.append)
    return d, answers


def test_a_finished_task_is_answered_at_once() -> None:
    clock, records = Clock(), Records(**{ID: "completed"})
    waiters = waiting(records, clock)
    _, answers = wait(waiters, ID, 30)
    assert answers == [{"status": "completed"}]
    assert waiters.count == 0


def test_an_unknown_task_is_none_at_once() -> None:
    waiters = waiting(Records(), Clock())
    _, answers = wait(waiters, ID, 30)
    assert answers == [None] and waiters.count == 0


def test_the_timeout_answers_the_current_record() -> None:
    clock, records = Clock(), Records(**{ID: "queued"})
    waiters = waiting(records, clock)
    _, answers = wait(waiters, ID, 1.5)
    clock.advance(1.4)
    assert answers == [] and waiters.count == 1
    records.status[ID] = "processing"
    clock.advance(0.1)
    assert answers == [{"status": "processing"}], "the record as it is at the timeout"
    assert waiters.count == 0 and clock.getDelayedCalls() == []


def test_news_of_the_task_answers_its_waiters_only() -> None:
    clock, other = Clock(), "b" * 32
    records = Records(**{ID: "processing", other: "queued"})
    waiters = waiting(records, clock)
    _, mine = wait(waiters, ID, 30)
    _, also_mine = wait(waiters, ID, 30)
    _, theirs = wait(waiters, other, 30)
    records.status[ID] = "completed"
    waiters.message(f"{'c' * 32} {ID}")  # one message may name several ids
    assert mine == also_mine == [{"status": "completed"}]
    assert theirs == [] and waiters.count == 1
    assert [c for c in clock.getDelayedCalls() if c.active()] != [], "theirs still times out"


def test_news_that_is_not_final_keeps_it_waiting() -> None:
    """A message without a finished record (a replay, a reconnect's re-read): wait on."""
    clock, records = Clock(), Records(**{ID: "retrying"})
    waiters = waiting(records, clock)
    _, answers = wait(waiters, ID, 5)
    waiters.message(ID)
    assert answers == [] and records.reads == 3, "the first look, the read once waiting, news"
    clock.advance(5)
    assert answers == [{"status": "retrying"}]


def test_news_during_the_read_is_not_lost() -> None:
    """The task finishes while its first read is under way: it reads again at once."""
    clock = Clock()
    replies: list[defer.Deferred[dict[str, str] | None]] = []

    def read(task_id: str) -> defer.Deferred[dict[str, str] | None]:
        replies.append(defer.Deferred())
        return replies[-1]

    waiters = Waiters(read, clock, "chan", 10, 2.0)
    waiters.subscribed()
    _, answers = wait(waiters, ID, 30)
    waiters.message(ID)  # published after our read was sent, before its reply
    replies[0].callback({"status": "processing"})
    assert len(replies) == 2, "read again: the news may be newer than the reply"
    replies[1].callback({"status": "completed"})
    assert answers == [{"status": "completed"}]


def test_it_reads_only_once_the_subscription_is_live() -> None:
    clock, records = Clock(), Records(**{ID: "queued"})
    waiters = waiting(records, clock, live=False)
    _, answers = wait(waiters, ID, 30)
    assert records.reads == 1 and waiters.count == 1, "looked once, then registered, waiting"
    records.status[ID] = "completed"
    waiters.subscribed()
    assert answers == [{"status": "completed"}]


def test_a_finished_task_is_answered_without_the_subscription_or_a_place() -> None:
    """While the subscription is down, or every place is taken, a finished task still is."""
    clock, records = Clock(), Records(**{ID: "completed", "b" * 32: "queued"})
    waiters = waiting(records, clock, max_waiters=1, live=False)
    wait(waiters, "b" * 32, 30)  # takes the one place, waiting for the subscription
    _, answers = wait(waiters, ID, 30)
    assert answers == [{"status": "completed"}]
    _, unknown = wait(waiters, "c" * 32, 30)
    assert unknown == [None]


def test_no_subscription_within_the_redis_timeout_is_unavailable() -> None:
    clock, records = Clock(), Records(**{ID: "queued"})
    waiters = waiting(records, clock, live=False)
    _, answers = wait(waiters, ID, 30)
    clock.advance(2.0)
    assert isinstance(answers[0].value, RedisUnavailable) and waiters.count == 0


def test_a_resubscription_rereads_every_waiter() -> None:
    """A publish may be missed while the subscription was down: each waiter reads again."""
    clock, records = Clock(), Records(**{ID: "processing"})
    waiters = waiting(records, clock)
    _, answers = wait(waiters, ID, 30)
    waiters.unsubscribed()
    records.status[ID] = "dead"  # its message went nowhere
    assert answers == []
    waiters.subscribed()
    assert answers == [{"status": "dead"}]


def test_a_client_that_goes_away_frees_its_place() -> None:
    clock, records = Clock(), Records(**{ID: "queued"})
    waiters = waiting(records, clock, max_waiters=1)
    d, answers = wait(waiters, ID, 30)
    d.cancel()  # what Klein does when the request's connection is lost
    assert isinstance(answers[0].value, defer.CancelledError)
    assert waiters.count == 0 and [c for c in clock.getDelayedCalls() if c.active()] == []
    _, again = wait(waiters, ID, 1)
    assert again == [] and waiters.count == 1, "the place is free again"


def test_beyond_max_waiters_it_refuses() -> None:
    clock, records = Clock(), Records(**{ID: "queued"})
    waiters = waiting(records, clock, max_waiters=2)
    wait(waiters, ID, 30)
    wait(waiters, ID, 30)
    _, third = wait(waiters, ID, 30)
    assert isinstance(third[0].value, TooManyWaiters) and waiters.count == 2


def test_stopping_answers_everyone_with_the_current_record() -> None:
    clock, records = Clock(), Records(**{ID: "queued"})
    waiters = waiting(records, clock)
    waiters.startService()
    _, first = wait(waiters, ID, 30)
    _, second = wait(waiters, "b" * 32, 30)
    stopped: list[Any] = []
    waiters.stopService().addBoth(stopped.append)
    assert first == [{"status": "queued"}] and second == [None]
    assert stopped == [None] and waiters.count == 0


def test_stopping_answers_those_waiting_for_the_subscription() -> None:
    clock, records = Clock(), Records(**{ID: "queued"})
    waiters = waiting(records, clock, live=False)
    waiters.startService()
    _, answers = wait(waiters, ID, 30)
    stopped: list[Any] = []
    waiters.stopService().addBoth(stopped.append)
    assert answers == [{"status": "queued"}] and stopped == [None]


class FailingRecords(Records):
    """Records whose reads of the ids in ``failing`` raise RedisUnavailable."""

    def __init__(self, **records: str) -> None:
        super().__init__(**records)
        self.failing: set[str] = set()

    async def __call__(self, task_id: str) -> dict[str, str] | None:
        if task_id in self.failing:
            raise RedisUnavailable("no answer")
        return await super().__call__(task_id)


def test_the_count_is_each_open_wait_until_it_ends_whichever_way() -> None:
    """What ``taskserver_waiters`` reports: up by one per wait, down by one per end
    (answered, timed out, a failed read, the client gone, the stop), never below zero."""
    clock = Clock()
    answered, timed_out, failed, gone, stopped = ("1" * 32, "2" * 32, "3" * 32, "4" * 32, "5" * 32)
    records = FailingRecords(
        **dict.fromkeys((answered, timed_out, failed, gone, stopped), "queued")
    )
    waiters = waiting(records, clock)
    waiters.startService()
    answers: dict[str, list[Any]] = {}
    deferreds: dict[str, defer.Deferred[Any]] = {}
    for n, task_id in enumerate((answered, timed_out, failed, gone, stopped), start=1):
        deferreds[task_id], answers[task_id] = wait(
            waiters, task_id, 5 if task_id == timed_out else 30
        )
        assert waiters.count == n, f"the wait for {task_id[0]} counted"

    records.status[answered] = "completed"
    waiters.message(answered)
    assert answers[answered] == [{"status": "completed"}] and waiters.count == 4

    clock.advance(5)
    assert answers[timed_out] == [{"status": "queued"}] and waiters.count == 3

    records.failing.add(failed)
    waiters.message(failed)  # news, then a read that fails
    assert isinstance(answers[failed][0].value, RedisUnavailable) and waiters.count == 2

    deferreds[gone].cancel()  # the client hung up
    assert isinstance(answers[gone][0].value, defer.CancelledError) and waiters.count == 1

    done: list[Any] = []
    waiters.stopService().addBoth(done.append)
    assert answers[stopped] == [{"status": "queued"}] and done == [None]
    assert waiters.count == 0
    waiters.message(answered)  # late news of a gone waiter counts nothing
    assert waiters.count == 0


def test_a_wait_that_needs_no_place_is_never_counted() -> None:
    """Answered at the first read (finished, unknown, stopping) or refused: count unchanged."""
    clock = Clock()
    records = Records(**{ID: "dead", "b" * 32: "queued"})
    waiters = waiting(records, clock, max_waiters=1)
    wait(waiters, ID, 30)
    wait(waiters, "c" * 32, 30)
    assert waiters.count == 0
    wait(waiters, "b" * 32, 30)
    _, refused = wait(waiters, "b" * 32, 30)
    assert isinstance(refused[0].value, TooManyWaiters) and waiters.count == 1


# ------------------------------------------------------------ against a real Redis


async def until(condition: Callable[[], object], timeout: float = 10.0) -> None:
    """Wait (with a deadline) until ``condition()`` holds."""

    async def check() -> object:
        return condition()

    await eventually(check, timeout)


async def _subscribed_client_id(redis: Any) -> str:
    """The CLIENT id of the one connection in subscriber mode (to kill it)."""
    listing = await redis.execute_command("CLIENT", "LIST")
    for line in str(listing).splitlines():
        fields = dict(part.split("=", 1) for part in line.split() if "=" in part)
        if fields.get("sub") == "1" or "subscribe" in fields.get("cmd", ""):
            return fields["id"]
    raise AssertionError(f"no subscribed client in {listing}")


@pytest_twisted.ensureDeferred
async def test_a_real_subscription_wakes_a_waiter_and_survives_a_killed_connection(
    redis_server: RedisAddress, redis: Any, keys: Keys
) -> None:
    """The scripts' PUBLISH reaches the waiter; after CLIENT KILL, a completion whose
    message was missed while the subscription was down is still answered at once."""
    api = connect(redis_server, 1, 2.0)
    queue = TaskQueue(api, keys, 60, 2.0, reactor, 3, 100)
    subscriber = connect_subscriber(redis_server, 2.0)
    waiters = Waiters(queue.status, reactor, keys.finished, 10, 2.0, subscriber=subscriber)
    waiters.startService()
    first, second = "1" * 32, "2" * 32
    try:
        for task_id in (first, second):
            await redis.hset(keys.status(task_id), "status", "processing")
        started = reactor.seconds()
        _, answers = wait(waiters, first, 20)
        await until(lambda: waiters.count == 1 and waiters._live)
        await redis.hset(keys.status(first), "status", "completed")
        await redis.publish(keys.finished, first)
        await until(lambda: answers)
        assert answers == [await queue.status(first)]
        assert reactor.seconds() - started < 5, "woken, not timed out"

        _, answers = wait(waiters, second, 20)
        await until(lambda: waiters.count == 1)
        await redis.execute_command("CLIENT", "KILL", "ID", await _subscribed_client_id(redis))
        await until(lambda: not waiters._live)
        # finished while nobody listens: its message is lost
        await redis.hset(keys.status(second), "status", "dead")
        assert await redis.publish(keys.finished, second) == 0, "no subscriber got it"
        await until(lambda: answers, timeout=10)
        assert answers[0]["status"] == "dead", "re-read when the subscription came back"
        assert waiters._live
    finally:
        await waiters.stopService()
        await api.disconnect()


@pytest_twisted.ensureDeferred
async def test_the_subscriber_has_the_kernel_probe_its_silent_connection(
    redis_server: RedisAddress,
) -> None:
    """It writes nothing while it listens: keepalive is what notices a vanished primary."""
    subscriber = connect_subscriber(redis_server, 2.0)
    try:
        connection = await subscriber.getConnection(peek=True)
        handle = connection.transport.getHandle()
        assert handle.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert handle.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == KEEPALIVE_IDLE_S
    finally:
        await subscriber.disconnect()
