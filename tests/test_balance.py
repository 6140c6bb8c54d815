"""Connection balancing: the allowance rule and the shared scoreboard."""

from __future__ import annotations

import time

import pytest

from taskserver.cluster.balance import STALE_AFTER_S, Scoreboard, Seat, accept_allowance


@pytest.mark.parametrize(
    ("own", "others", "allowance"),
    [
        (0, [], 1_000_000),  # alone: no limit
        (0, [0], 2),  # start: a little ahead is fine
        (2, [0], 0),  # ahead by the slack: wait for the other
        (30, [31], 5),  # slack: 10 % of the mean (30.5), rounded up: 4
        (34, [30], 0),
        (500, [480, 490], 29),  # the slack grows with the load: 49 here
    ],
)
def test_allowance(own: int, others: list[int], allowance: int) -> None:
    assert accept_allowance(own, others) == allowance


def test_the_least_loaded_child_may_always_accept() -> None:
    for own in range(0, 200, 7):
        assert accept_allowance(own, [own, own + 5, own + 50]) > 0


@pytest.fixture
def board() -> Scoreboard:
    board = Scoreboard.create(4)
    yield board
    board.close()


def test_a_second_mapping_sees_the_same_seats(board: Scoreboard) -> None:
    """Children map the same file through an inherited descriptor."""
    import os

    other = Scoreboard(os.dup(board.fd), 4)
    board.write(2, 17, True, 123.5)
    assert other.read(2) == (17, True, 123.5)
    other.close()


def test_stale_and_draining_seats_are_left_out(board: Scoreboard) -> None:
    now = time.monotonic()
    board.write(0, 5, True, now)  # live, accepting
    board.write(1, 1, True, now - STALE_AFTER_S - 1)  # stalled or dead
    board.write(2, 0, False, now)  # draining
    assert board.live_connections(now) == [5]
    assert board.live_connections(now, exclude=0) == []


def test_seat_counts_connections_and_retires(board: Scoreboard) -> None:
    seat = Seat(board, 3)
    seat.opened()
    seat.opened()
    seat.closed()
    connections, accepting, _ = board.read(3)
    assert (connections, accepting) == (1, True)
    seat.retire()
    assert board.read(3)[1] is False
