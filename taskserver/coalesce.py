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
from typing import Any, Generic, TypeVar

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
    Used as it is for writes nobody waits on (task-log lines on their way to
    the file), and by :class:`Coalescer` for calls whose callers wait.
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

    def add_all(self, items: Sequence[Item]) -> None:
        """Add ``items`` together: a full buffer is written only after the last of them,
        so they always leave in the same write (which may then hold more than ``most``)."""
        if not items:
            return
        self._items.extend(items)
        if self._most is not None and len(self._items) >= self._most:
            self.flush()
        elif self._scheduled is None:
            self._scheduled = self._clock.callLater(0, self.flush)

    def discard(self, unwanted: Callable[[Item], bool]) -> None:
        """Leave out the items not written yet for which ``unwanted`` is true."""
        self._items = [item for item in self._items if not unwanted(item)]

    def flush(self) -> None:
        """Write what was added now (also what stopping code calls last)."""
        if self._scheduled is not None and self._scheduled.active():
            self._scheduled.cancel()
        self._scheduled = None
        items, self._items = self._items, []
        if items:
            self._write(items)


class Coalescer(Generic[Item, Reply]):
    """Collects the items submitted during one reactor turn and sends them in one call.

    ``send(items)`` must answer one reply per item, in order; if it fails,
    every item of that call fails with the same error. An item whose caller
    gives up (cancels) before the call is sent is left out of it.
    """

    def __init__(
        self,
        send: Callable[[list[Item]], Send[Sequence[Reply]]],
        clock: IReactorTime,
        most: int = MOST_PER_CALL,
    ) -> None:
        self._send = send
        self._waiting: TurnBuffer[tuple[Item, defer.Deferred[Reply]]] = TurnBuffer(
            self._send_batch, clock, most
        )

    def submit(self, item: Item) -> defer.Deferred[Reply]:
        """The reply for ``item``, once the call that carries it has answered."""
        answer: defer.Deferred[Reply] = defer.Deferred(self._withdraw)
        self._waiting.add((item, answer))
        return answer

    def submit_all(self, items: Sequence[Item]) -> list[defer.Deferred[Reply]]:
        """The replies for ``items``, all sent in the same call (a batch of the API).

        The call may carry other items of the turn too, and more than ``most``.
        """
        answers: list[defer.Deferred[Reply]] = [defer.Deferred(self._withdraw) for _ in items]
        self._waiting.add_all(list(zip(items, answers, strict=True)))
        return answers

    def flush(self) -> None:
        """Send what is waiting now."""
        self._waiting.flush()

    def _send_batch(self, batch: list[tuple[Item, defer.Deferred[Reply]]]) -> None:
        sent: defer.Deferred[Sequence[Reply]]
        try:
            sent = defer.ensureDeferred(self._send([item for item, _ in batch]))
        except Exception:
            sent = defer.fail()
        sent.addCallback(self._answer, batch).addErrback(self._fail, batch)

    def _withdraw(self, answer: defer.Deferred[Reply]) -> None:
        """A cancelled caller: leave its item out if it has not been sent yet."""
        self._waiting.discard(lambda waiting: waiting[1] is answer)

    @staticmethod
    def _answer(replies: Sequence[Reply], batch: list[tuple[Item, defer.Deferred[Reply]]]) -> None:
        if len(replies) != len(batch):
            raise ValueError(f"{len(replies)} replies for {len(batch)} items")
        for (_, answer), reply in zip(batch, replies, strict=True):
            if not answer.called:
                answer.callback(reply)

    @staticmethod
    def _fail(failure: Failure, batch: list[tuple[Any, defer.Deferred[Any]]]) -> None:
        """Fail every caller not answered yet (also when answering itself went wrong)."""
        for _, answer in batch:
            if not answer.called:
                answer.errback(failure)
