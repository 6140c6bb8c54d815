"""The consumer's timers, on a fake clock: how soon a dead process's tasks come back.

The end-to-end tests (tests/test_e2e.py, tests/test_faults.py) only check that a
crashed host's tasks are run again, with generous deadlines; how soon is pure
scheduling logic, checked here with ``twisted.internet.task.Clock`` and a queue
that records when it is called: the heartbeat is renewed every third of
``HEARTBEAT_TTL``, and the reaper runs at start and every half of it, so a
process that dies is reaped at most one and a half ``HEARTBEAT_TTL`` later.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from taskserver.consumer import ConsumerService
from taskserver.keys import Keys
from taskserver.queue import Reclaimed

TTL_S = 10.0
STEP_S = 0.05


class RecordingQueue:
    """When the service beats and reaps; one dead process whose heartbeat expires at a set time."""

    def __init__(self, clock: Clock, dead_heartbeat_expires_at: float | None = None) -> None:
        self.keys = Keys("timers")
        self.clock = clock
        self.beats: list[float] = []
        self.reaped_at: float | None = None
        self.expires_at = dead_heartbeat_expires_at

    async def heartbeat(self, process_id: str, consumer_ids: Any, ttl_s: float) -> None:
        assert ttl_s == TTL_S
        self.beats.append(self.clock.seconds())

    async def reap(self, own_process_id: str) -> Reclaimed:
        now = self.clock.seconds()
        if self.reaped_at is None and self.expires_at is not None and now >= self.expires_at:
            self.reaped_at = now
            return Reclaimed(1, 0)
        return Reclaimed(0, 0)

    async def promote(self) -> None:
        pass

    def fetch_batch(self, *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
        """Never answers: the dispatcher waits, as on an empty queue."""
        return defer.Deferred()


def start(queue: RecordingQueue, clock: Clock) -> ConsumerService:
    service = ConsumerService(
        queue=queue,  # type: ignore[arg-type]
        blocking_redis=None,
        handler=lambda task: None,
        task_log=None,  # type: ignore[arg-type]
        concurrency=2,
        heartbeat_ttl_s=TTL_S,
        shutdown_timeout_s=1.0,
        clock=clock,
    )
    service.startService()
    return service


def run_for(clock: Clock, seconds: float) -> None:
    for _ in range(round(seconds / STEP_S)):
        clock.advance(STEP_S)


def test_the_heartbeat_is_renewed_long_before_it_expires() -> None:
    clock = Clock()
    queue = RecordingQueue(clock)
    start(queue, clock)
    run_for(clock, 6 * TTL_S)
    assert queue.beats[0] == 0, "a new process says it is alive at once"
    gaps = [later - earlier for earlier, later in zip(queue.beats, queue.beats[1:], strict=False)]
    assert len(gaps) >= 17
    assert max(gaps) <= TTL_S / 3 + STEP_S


@pytest.mark.parametrize("died_at", [0.0, 1.7, 4.9, 7.3])
def test_a_dead_process_is_reaped_within_one_and_a_half_heartbeat_ttl(died_at: float) -> None:
    """Its last beat was at most when it died, so its heartbeat is gone a TTL later."""
    clock = Clock()
    queue = RecordingQueue(clock, dead_heartbeat_expires_at=died_at + TTL_S)
    start(queue, clock)
    run_for(clock, died_at + 3 * TTL_S)
    assert queue.reaped_at is not None
    assert queue.reaped_at - died_at <= 1.5 * TTL_S + STEP_S
