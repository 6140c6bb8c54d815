# -*- test-case-name: tests.test_coalesce -*-
"""Calls made in the same turn of the reactor, sent to Redis as one.

Under load a process parses many requests in one turn of the reactor, and
each needs the same script. Sent together they cost one round trip, one
script invocation in Redis and one reply to parse instead of one each. The
first caller of a turn schedules the send for the end of that turn
(``callLater(0)``), after the reactor has handled every ready socket, so
nobody waits longer than one turn.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Generic, NamedTuple, TypeVar

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

Item = TypeVar("Item")
Reply = TypeVar("Reply")

#: What ``send`` returns: a coroutine or a Deferred of the replies.
Send = Coroutine[Any, Any, Reply] | defer.Deferred[Reply]

#: Most items in one call (bounds the size of one script invocation).
MOST_PER_CALL = 256


class TurnBuffer(Generic[Item]):
    """Items added during one reactor turn, handed to ``write`` together at its end.

    With ``most``, a buffer that reaches that many items is written at once.
    For writes nobody waits on (task-log lines on their way to the file);
    :class:`Coalescer` does the same for calls whose callers wait.
    """

    def __init__(
        self, write: Callable[[list[Item]], None], clock: IReactorTime, most: int | None = None
    ) -> None:
        self._write = write
        self._clock = clock
        self._most = most
        self._items: list[Item] = []
        self._scheduled: IDelayedCall | None = None

    def add(self, item: Item) -> None:
        self._items.append(item)
        if self._most is not None and len(self._items) >= self._most:
            self.flush()
        elif self._scheduled is None:
            self._scheduled = self._clock.callLater(0, self.flush)

    def flush(self) -> None:
        """Write what was added now (also what stopping code calls last)."""
        if self._scheduled is not None and self._scheduled.active():
            self._scheduled.cancel()
        self._scheduled = None
        items, self._items = self._items, []
        if items:
            self._write(items)


class _Waiting(NamedTuple, Generic[Item]):
    """One caller's items in a Coalescer, and the Deferred it waits on (its reply, or
    the list of replies of a :meth:`Coalescer.submit_all`)."""

    items: Sequence[Item]
    answer: defer.Deferred[Any]
    #: From :meth:`Coalescer.submit`: one item, answered with its reply itself.
    alone: bool


class Coalescer(Generic[Item, Reply]):
    """Collects the items submitted during one reactor turn and sends them in one call.

    ``send(items)`` must answer one reply per item, in order; if it fails,
    every item of that call fails with the same error. An item whose caller
    gives up (cancels) before the call is sent is left out of it. A call
    carries at most ``most`` items, except that the items of one
    :meth:`submit_all` always leave together.
    """

    def __init__(
        self,
        send: Callable[[list[Item]], Send[Sequence[Reply]]],
        clock: IReactorTime,
        most: int = MOST_PER_CALL,
    ) -> None:
        self._send = send
        self._clock = clock
        self._most = most
        #: The turn's callers so far: their items, and the Deferred each waits on.
        self._waiting: list[_Waiting[Item]] = []
        self._count = 0
        self._scheduled: IDelayedCall | None = None

    def submit(self, item: Item) -> defer.Deferred[Reply]:
        """The reply for ``item``, once the call that carries it has answered."""
        answer: defer.Deferred[Reply] = defer.Deferred(self._withdraw)
        self._add(_Waiting((item,), answer, alone=True))
        return answer

    def submit_all(self, items: Sequence[Item]) -> defer.Deferred[list[Reply]]:
        """The replies for ``items``, in order, all sent in the same call (a batch of the API).

        One Deferred for them all, not one each: a batch of 500 costs one
        callback, not 500. The call may carry other items of the turn too,
        and more than ``most``.
        """
        answer: defer.Deferred[list[Reply]] = defer.Deferred(self._withdraw)
        if not items:
            answer.callback([])
            return answer
        self._add(_Waiting(items, answer, alone=False))
        return answer

    def flush(self) -> None:
        """Send what is waiting now."""
        if self._scheduled is not None and self._scheduled.active():
            self._scheduled.cancel()
        self._scheduled = None
        waiting, self._waiting, self._count = self._waiting, [], 0
        if waiting:
            self._send_batch(waiting)

    def _add(self, waiting: _Waiting[Item]) -> None:
        self._waiting.append(waiting)
        self._count += len(waiting.items)
        if self._count >= self._most:
            self.flush()
        elif self._scheduled is None:
            self._scheduled = self._clock.callLater(0, self.flush)

    def _send_batch(self, batch: list[_Waiting[Item]]) -> None:
        sent: defer.Deferred[Sequence[Reply]]
        items = [item for waiting in batch for item in waiting.items]
        try:
            sent = defer.ensureDeferred(self._send(items))
        except Exception:
            sent = defer.fail()
        sent.addCallback(self._answer, batch, len(items)).addErrback(self._fail, batch)

    def _withdraw(self, answer: defer.Deferred[Any]) -> None:
        """A cancelled caller: leave its items out if they have not been sent yet."""
        kept = [waiting for waiting in self._waiting if waiting.answer is not answer]
        if len(kept) != len(self._waiting):
            self._waiting = kept
            self._count = sum(len(waiting.items) for waiting in kept)

    @staticmethod
    def _answer(replies: Sequence[Reply], batch: list[_Waiting[Any]], items: int) -> None:
        if len(replies) != items:
            raise ValueError(f"{len(replies)} replies for {items} items")
        start = 0
        for waiting in batch:
            end = start + len(waiting.items)
            if not waiting.answer.called:
                waiting.answer.callback(
                    replies[start] if waiting.alone else list(replies[start:end])
                )
            start = end

    @staticmethod
    def _fail(failure: Failure, batch: list[_Waiting[Any]]) -> None:
        """Fail every caller not answered yet (also when answering itself went wrong)."""
        for waiting in batch:
            if not waiting.answer.called:
                waiting.answer.errback(failure)
