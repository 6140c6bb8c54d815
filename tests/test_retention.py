"""Redis memory stays flat under steady load: every per-task and per-user key expires.

Status records live STATUS_TTL, a user's recent-tasks list STATUS_TTL after the user's
latest submission, rate-limit counters one window, idempotency claims
24 h (or STATUS_TTL, if shorter), dead letters are capped. Measured here with the
TTLs scaled down (status 2 s, rate windows 1 s and 3 s) so that the steady state is
reached in seconds. The bound checked at each sample follows from the answers
actually received and the tasks actually run, so a slow machine that sends less
makes the bound smaller, never the test flaky.
"""

from __future__ import annotations

from collections.abc import Callable
from statistics import mean
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet import defer, reactor

from conftest import RunningServer, eventually, sleep
from taskserver.config import parse_rate_limits
from taskserver.keys import Keys

#: A steady load against TTLs of seconds: run alone (`make test` runs `serial` tests last).
pytestmark = pytest.mark.serial

RATE_PER_S = 100
LOAD_S = 8.0
STATUS_TTL_S = 2
TIERS = parse_rate_limits("1/1s,20/3s")
#: Each task of a new user leaves one counter per tier, created by its admission.
COUNTER_LIFETIMES_S = tuple(tier.window_ms / 1000 for tier in TIERS)
#: Redis hides expired keys from SCAN at once; this only covers clocks read in ms.
EXPIRY_SLACK_S = 0.05
#: A status record's TTL starts again when its outcome is recorded: at the end of the
#: turn in which the handler ran, one round trip later. Far below the 1 s by which a
#: STATUS_TTL of 3 s instead of 2 s would exceed the bound.
COMPLETION_SLACK_S = 0.25
#: Keys that are not per task: consumer registry, heartbeat, pending and processing lists.
FIXED_KEYS = 4
#: What is left once the queue is empty: the consumer registry and the heartbeat.
IDLE_KEYS = 2


def monitoring_keys(prefix: str) -> set[str]:
    """Keys of a fixed size, not per task (metric totals, a capped history, one entry a child)."""
    keys = Keys(prefix)
    return {keys.metrics, keys.metrics_history, keys.metrics_sampled, keys.workers}


async def count_keys(redis: Any, prefix: str) -> int:
    """The keys under ``prefix`` but the monitoring keys (and each flusher's batch number)."""
    fixed = monitoring_keys(prefix)
    cursor, total = "0", 0
    while True:
        cursor, keys = await redis.execute_command(
            "SCAN", cursor, "MATCH", f"{prefix}:*", "COUNT", 1000
        )
        applied = Keys(prefix).metrics_applied("")  # one a process, not per task
        total += len({key for key in set(keys) - fixed if not key.startswith(applied)})
        if cursor == "0":
            return total


def keys_allowed(
    answered: list[tuple[float, int]], tasks: int, ran_at: list[float], now: float
) -> int:
    """The most keys there can be at ``now`` if every per-task key expires on time.

    ``answered`` holds (time all answers of a batch were in, batch size): each of a
    batch's counters was created before that time, so it is gone a window after it.
    Of the ``tasks`` status records, those of tasks that ran (``ran_at``: when their
    handler was called) are gone STATUS_TTL after their outcome was recorded. Each
    task is a new user's: its recent-tasks list, also made before that time, is gone
    STATUS_TTL after it.
    """
    counters = sum(
        size
        for at, size in answered
        for lifetime in COUNTER_LIFETIMES_S
        if now - at <= lifetime + EXPIRY_SLACK_S
    )
    lists = sum(size for at, size in answered if now - at <= STATUS_TTL_S + EXPIRY_SLACK_S)
    expired = sum(
        1 for at in ran_at if now - at > STATUS_TTL_S + COMPLETION_SLACK_S + EXPIRY_SLACK_S
    )
    return FIXED_KEYS + counters + lists + tasks - expired


@pytest_twisted.ensureDeferred
async def test_keys_stay_flat_under_steady_load_and_go_away_after(
    start_server: Callable[..., RunningServer], redis: Any
) -> None:
    ran_at: list[float] = []
    server = start_server(
        handler=lambda task: ran_at.append(reactor.seconds()),
        status_ttl_s=STATUS_TTL_S,
        rate_limits=TIERS,
    )
    prefix = server.settings.key_prefix
    samples: list[tuple[float, int, int]] = []
    answered: list[tuple[float, int]] = []
    started = reactor.seconds()
    sent = 0
    while (elapsed := reactor.seconds() - started) < LOAD_S:
        batch = [
            treq.post(
                server.url + "/api/v1/task",
                json={"user_id": f"steady-{sent + n}"},
                headers={"Content-Type": "application/json"},
            )
            for n in range(RATE_PER_S // 10)
        ]
        sent += len(batch)
        answers = await defer.gatherResults(batch)
        assert {answer.code for answer in answers} == {202}
        answered.append((reactor.seconds(), len(batch)))
        counted_from = reactor.seconds()  # a key seen by the count was alive by then
        keys = await count_keys(redis, prefix)
        samples.append((elapsed, keys, keys_allowed(answered, sent, ran_at, counted_from)))
        await sleep(max(0.0, 0.1 - (reactor.seconds() - started - elapsed)))  # pacing the load

    steady = [keys for at, keys, _ in samples if at >= LOAD_S / 2]
    print(
        f"\nretention: {sent} tasks at ~{RATE_PER_S}/s; keys under the prefix, by second: "
        + ", ".join(f"{keys}" for _, keys, _ in samples[::10])
        + f"; steady mean {mean(steady):.0f}, max {max(steady)}"
    )
    over = [(round(at, 1), keys, allowed) for at, keys, allowed in samples if keys > allowed]
    assert not over, f"keys outlive their lifetimes (at s, keys, allowed): {over[:5]}"
    assert max(keys for _, keys, _ in samples) >= RATE_PER_S, "the load left no keys to count"

    async def back_to_idle_keys() -> bool:
        return await count_keys(redis, prefix) == IDLE_KEYS

    await eventually(back_to_idle_keys, timeout=30.0)
