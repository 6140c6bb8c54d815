"""Redis memory stays flat under steady load: every per-task and per-user key expires.

Status records live STATUS_TTL, rate-limit counters one window, idempotency claims
24 h, dead letters are capped. Measured here with the TTLs scaled down (status 2 s,
rate windows 1 s and 3 s) so that the steady state is reached in seconds.
"""

from __future__ import annotations

from collections.abc import Callable
from statistics import mean
from typing import Any

import pytest_twisted
import treq
from twisted.internet import defer, reactor

from conftest import RunningServer, eventually, sleep
from taskserver.config import parse_rate_limits

RATE_PER_S = 100
LOAD_S = 8.0


async def count_keys(redis: Any, prefix: str) -> int:
    cursor, total = "0", 0
    while True:
        cursor, keys = await redis.execute_command(
            "SCAN", cursor, "MATCH", f"{prefix}:*", "COUNT", 1000
        )
        total += len(keys)
        if cursor == "0":
            return total


@pytest_twisted.ensureDeferred
async def test_keys_stay_flat_under_steady_load_and_go_away_after(
    start_server: Callable[..., RunningServer], redis: Any
) -> None:
    server = start_server(status_ttl_s=2, rate_limits=parse_rate_limits("1/1s,20/3s"))
    prefix = server.settings.key_prefix
    samples: list[tuple[float, int]] = []
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
        samples.append((elapsed, await count_keys(redis, prefix)))
        await sleep(max(0.0, 0.1 - (reactor.seconds() - started - elapsed)))

    steady = [keys for at, keys in samples if at >= LOAD_S / 2]
    early = [keys for at, keys in samples if LOAD_S / 4 <= at < LOAD_S / 2]
    print(
        f"\nretention: {sent} tasks at ~{RATE_PER_S}/s; keys under the prefix, by second: "
        + ", ".join(f"{keys}" for at, keys in samples[::10])
        + f"; steady mean {mean(steady):.0f}, max {max(steady)}"
    )
    assert max(steady) <= 1.3 * mean(early), "keys keep growing under steady load"

    async def back_to_baseline() -> bool:
        return await count_keys(redis, prefix) <= 3  # consumer registry and heartbeat

    await eventually(back_to_baseline, timeout=10.0)
