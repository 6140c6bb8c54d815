# -*- test-case-name: tests.test_waiters -*-
"""Waiting for a task to finish: one Pub/Sub subscription per process, many local waiters.

The scripts that finish a task (COMPLETE, FAIL and GIVE_BACK when dead, RECLAIM for
the tasks it makes dead, CANCEL) publish its id on :attr:`Keys.finished`; a
child subscribes once and wakes the requests waiting on that id here
(``GET /api/v1/task/<id>?wait=...``). A task may finish in any child, on any host.

What is promised: a waiter answers with the task's record as soon as it is
finished (completed, dead, cancelled), when its time is up, or when the service
stops; never later. No message can be missed unseen: a waiter is registered and
the subscription is live *before* the record is first read, and every time
the subscription comes back after a drop, every waiter reads its record again.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from taskserver.redisclient import within

#: The statuses after which nothing changes a task: a waiter answers at once.
FINISHED_STATUSES = frozenset({"completed", "dead", "cancelled"})
#: After an unexpected error, the subscription is tried again this much later.
FOLLOW_RETRY_S = 1.0
#: Retry-After sent with 503 too_many_waiters.
TOO_MANY_WAITERS_RETRY_AFTER_S = 1

ReadStatus = Callable[[str], Awaitable[dict[str, str] | None]]


class TooManyWaiters(Exception):
    """This process already holds MAX_WAITERS waiters."""


class _Waiter:
    """One waiting request: ``woken`` is set by any news, ``wake`` fires while it sleeps."""

    __slots__ = ("task_id", "wake", "woken")

    def __init__(self, task_id: str) -> None:
        self.task_id = task_id
        self.woken = False
        self.wake: defer.Deferred[None] | None = None

    def notify(self) -> None:
        self.woken = True
        wake, self.wake = self.wake, None
        if wake is not None and not wake.called:
            wake.callback(None)


class Waiters(Service):
    """The registry of this process's waiters, and the subscription that wakes them.

    ``subscriber`` is a txredisapi factory from
    :func:`taskserver.redisclient.connect_subscriber` (None: the caller drives
    :meth:`subscribed`, :meth:`unsubscribed` and :meth:`message` itself, as unit
    tests do). ``read_status(task_id)`` reads a record (TaskQueue.status).
    """

    log = Logger()

    def __init__(
        self,
        read_status: ReadStatus,
        clock: IReactorTime,
        channel: str,
        max_waiters: int,
        timeout_s: float,
        subscriber: Any = None,
    ) -> None:
        self._read_status = read_status
        self._clock = clock
        self._channel = channel
        self._max_waiters = max_waiters
        self._timeout_s = timeout_s
        self._subscriber = subscriber
        self._by_task: dict[str, set[_Waiter]] = {}
        self._count = 0
        self._live = False
        self._until_live: list[defer.Deferred[None]] = []
        self._stopping = False
        self._follow: defer.Deferred[None] | None = None
        self._all_gone: defer.Deferred[None] | None = None
        if subscriber is not None:
            subscriber.on_message = lambda channel, text: self.message(text)

    @property
    def count(self) -> int:
        """How many requests wait now."""
        return self._count

    # ------------------------------------------------------------ waiting

    async def wait(self, task_id: str, timeout_s: float) -> dict[str, str] | None:
        """The task's record once it is finished, or after ``timeout_s``; None if unknown.

        Raises TooManyWaiters beyond MAX_WAITERS, RedisUnavailable if the
        subscription or a read does not come within the Redis timeout.
        """
        deadline = self._clock.seconds() + timeout_s
        # A finished or unknown task is answered at once, needing neither a place nor
        # the subscription.
        record = await self._read_status(task_id)
        if record is None or record.get("status") in FINISHED_STATUSES or self._stopping:
            return record
        if self._count >= self._max_waiters:
            raise TooManyWaiters(f"this process already has {self._max_waiters} waiters")
        waiter = self._add(task_id)
        try:
            await self._until_subscribed()
            while True:
                waiter.woken = False
                record = await self._read_status(task_id)
                now = self._clock.seconds()  # read once: the timer's delay is never negative
                if (
                    record is None
                    or record.get("status") in FINISHED_STATUSES
                    or self._stopping
                    or now >= deadline
                ):
                    return record
                if waiter.woken:  # news came while we read: read again
                    continue
                await self._sleep(waiter, deadline - now)
        finally:
            self._remove(waiter)

    async def _sleep(self, waiter: _Waiter, seconds: float) -> None:
        waiter.wake = defer.Deferred()
        timer: IDelayedCall = self._clock.callLater(seconds, waiter.notify)
        try:
            await waiter.wake
        finally:
            waiter.wake = None
            if timer.active():
                timer.cancel()

    async def _until_subscribed(self) -> None:
        if self._live:
            return
        if self._stopping:
            return  # the record is read once and answered
        live: defer.Deferred[None] = defer.Deferred()
        self._until_live.append(live)
        try:
            await within(live, self._timeout_s, self._clock)
        finally:
            if live in self._until_live:
                self._until_live.remove(live)

    def _add(self, task_id: str) -> _Waiter:
        waiter = _Waiter(task_id)
        self._by_task.setdefault(task_id, set()).add(waiter)
        self._count += 1
        return waiter

    def _remove(self, waiter: _Waiter) -> None:
        waiters = self._by_task.get(waiter.task_id)
        if waiters is None or waiter not in waiters:
            return
        waiters.discard(waiter)
        if not waiters:
            del self._by_task[waiter.task_id]
        self._count -= 1
        if self._count == 0 and self._all_gone is not None:
            all_gone, self._all_gone = self._all_gone, None
            all_gone.callback(None)

    # ------------------------------------------------------------ news

    def message(self, text: str) -> None:
        """A message on the finished channel: one or more task ids, separated by spaces."""
        for task_id in text.split():
            for waiter in list(self._by_task.get(task_id, ())):
                waiter.notify()

    def subscribed(self) -> None:
        """The subscription is live (again): every waiter reads its record (news may be lost)."""
        self._live = True
        until_live, self._until_live = self._until_live, []
        for live in until_live:
            if not live.called:
                live.callback(None)
        self._wake_everyone()

    def unsubscribed(self) -> None:
        self._live = False

    def _wake_everyone(self) -> None:
        for waiters in list(self._by_task.values()):
            for waiter in list(waiters):
                waiter.notify()

    # ------------------------------------------------------------ service

    def startService(self) -> None:
        super().startService()
        if self._subscriber is not None:
            self._follow = defer.Deferred.fromCoroutine(self._follow_subscription())

    async def _follow_subscription(self) -> None:
        """Subscribe on each new connection of the pool (it reconnects with back-off)."""
        while not self._stopping:
            try:
                await self._subscribe_once()
            except defer.CancelledError:
                raise
            except Exception:
                self.log.failure("following the finished channel; again in a second")
                await task.deferLater(self._clock, FOLLOW_RETRY_S)

    async def _subscribe_once(self) -> None:
        """Wait for the pool's connection, subscribe on it, and return once it is lost."""
        assert self._subscriber is not None
        connection = await self._subscriber.getConnection(peek=True)
        lost = connection.whenDisconnected()
        try:
            await within(
                connection.execute_command("SUBSCRIBE", self._channel, apply_timeout=False),
                self._timeout_s,
                self._clock,
            )
        except Exception as e:
            if not self._stopping:
                self.log.warn("could not subscribe to the finished channel: {e}", e=e)
            connection.transport.loseConnection()
            await lost
            return
        self.subscribed()
        try:
            await lost
        finally:
            self.unsubscribed()

    def stopService(self) -> defer.Deferred[None]:
        """Answer every waiter with its record now; the subscription closes after them."""
        super().stopService()
        return defer.Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        self._stopping = True
        until_live, self._until_live = self._until_live, []
        for live in until_live:
            if not live.called:
                live.callback(None)
        if self._count:
            self._all_gone = defer.Deferred()
            all_gone = self._all_gone
            self._wake_everyone()
            await all_gone
        if self._subscriber is not None:
            await self._subscriber.disconnect()
        if self._follow is not None:
            follow, self._follow = self._follow, None
            follow.cancel()  # it may wait for a connection that will never come
            try:
                await follow
            except defer.CancelledError:
                pass
            except Exception:
                self.log.failure("following the subscription")
