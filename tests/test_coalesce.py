"""Coalescer: what one reactor turn submits goes out as one call (pure logic, a fake clock)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from taskserver.coalesce import Coalescer, TurnBuffer


class FakeSend:
    """Records each call; the test answers it through its Deferred."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], defer.Deferred[Sequence[str]]]] = []

    def __call__(self, items: list[str]) -> defer.Deferred[Sequence[str]]:
        d: defer.Deferred[Sequence[str]] = defer.Deferred()
        self.calls.append((items, d))
        return d


def results(ds: list[defer.Deferred[str]]) -> list[object]:
    out: list[object] = []
    for d in ds:
        d.addBoth(out.append)
    return out


def test_one_turn_is_one_call_and_replies_go_back_in_order() -> None:
    clock, send = Clock(), FakeSend()
    batch: Coalescer[str, str] = Coalescer(send, clock)
    answers = results([batch.submit(x) for x in "abc"])
    assert send.calls == [], "nothing is sent before the turn ends"
    clock.advance(0)
    assert [items for items, _ in send.calls] == [["a", "b", "c"]]
    send.calls[0][1].callback(["A", "B", "C"])
    assert answers == ["A", "B", "C"]
    batch.submit("d")
    clock.advance(0)
    assert [items for items, _ in send.calls] == [["a", "b", "c"], ["d"]], "next turn, next call"


def test_a_full_batch_goes_at_once() -> None:
    clock, send = Clock(), FakeSend()
    batch: Coalescer[str, str] = Coalescer(send, clock, most=2)
    results([batch.submit(x) for x in "abc"])
    assert [items for items, _ in send.calls] == [["a", "b"]]
    clock.advance(0)
    assert [items for items, _ in send.calls] == [["a", "b"], ["c"]]


def test_a_failed_call_fails_every_item_with_its_error() -> None:
    clock, send = Clock(), FakeSend()
    batch: Coalescer[str, str] = Coalescer(send, clock)
    answers = results([batch.submit(x) for x in "ab"])
    clock.advance(0)
    send.calls[0][1].errback(ConnectionError("down"))
    assert [type(f.value) for f in answers] == [ConnectionError, ConnectionError]  # type: ignore[attr-defined]


def test_a_reply_count_that_does_not_match_fails_every_item() -> None:
    clock, send = Clock(), FakeSend()
    batch: Coalescer[str, str] = Coalescer(send, clock)
    answers = results([batch.submit(x) for x in "ab"])
    clock.advance(0)
    send.calls[0][1].callback(["A"])
    assert [type(f.value) for f in answers] == [ValueError, ValueError]  # type: ignore[attr-defined]


def test_a_caller_that_gives_up_before_the_send_is_left_out() -> None:
    clock, send = Clock(), FakeSend()
    batch: Coalescer[str, str] = Coalescer(send, clock)
    first, second = batch.submit("a"), batch.submit("b")
    answers = results([first, second])
    first.cancel()
    clock.advance(0)
    assert [items for items, _ in send.calls] == [["b"]]
    send.calls[0][1].callback(["B"])
    assert isinstance(answers[0].value, defer.CancelledError)  # type: ignore[attr-defined]
    assert answers[1] == "B"


def test_a_caller_that_gives_up_after_the_send_is_not_answered_twice() -> None:
    clock, send = Clock(), FakeSend()
    batch: Coalescer[str, str] = Coalescer(send, clock)
    first = batch.submit("a")
    answers = results([first])
    clock.advance(0)
    first.cancel()
    send.calls[0][1].callback(["A"])  # must not raise AlreadyCalledError
    assert isinstance(answers[0].value, defer.CancelledError)  # type: ignore[attr-defined]


def test_everyone_gives_up_then_nothing_is_sent() -> None:
    clock, send = Clock(), FakeSend()
    batch: Coalescer[str, str] = Coalescer(send, clock)
    d = batch.submit("a")
    d.addErrback(lambda f: f.trap(defer.CancelledError))
    d.cancel()
    clock.advance(0)
    assert send.calls == []


@pytest.mark.parametrize("count", [1, 5])
def test_send_errors_raised_at_once_reach_the_callers(count: int) -> None:
    clock = Clock()

    def broken(items: list[str]) -> defer.Deferred[Sequence[str]]:
        raise RuntimeError("bug")

    batch: Coalescer[str, str] = Coalescer(broken, clock)
    answers = results([batch.submit(str(i)) for i in range(count)])
    clock.advance(0)
    assert [type(f.value) for f in answers] == [RuntimeError] * count  # type: ignore[attr-defined]


def test_a_turn_buffer_writes_a_turn_at_once_and_nothing_when_empty() -> None:
    clock, written = Clock(), []
    buffer: TurnBuffer[str] = TurnBuffer(written.append, clock)
    buffer.add("a")
    buffer.add("b")
    assert written == []
    clock.advance(0)
    assert written == [["a", "b"]]
    buffer.flush()
    clock.advance(0)
    assert written == [["a", "b"]], "nothing added, nothing written"
