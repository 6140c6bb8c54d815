"""Rate limits: header arithmetic (pure) and the Lua script against a real Redis."""

from __future__ import annotations

import ast
import inspect
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from conftest import connect_raw, sleep
from taskserver import ratelimit
from taskserver.config import RateTier, RedisAddress, parse_rate_limits
from taskserver.keys import Keys
from taskserver.ratelimit import Decision, RateLimiter, RatePolicy, TierState

SECOND, MINUTE = RateTier("1s", 1, 1000), RateTier("60s", 20, 60_000)


# ------------------------------------------------------------------ pure logic


def test_headers_of_an_accepted_request() -> None:
    decision = Decision(True, (TierState(SECOND, 1, 1000), TierState(MINUTE, 5, 42_000)))
    assert dict(decision.headers(now=1_795_813_218.4)) == {
        "RateLimit-Policy": '"1s";q=1;w=1, "60s";q=20;w=60',
        "RateLimit": '"1s";r=0;t=1, "60s";r=15;t=42',
        "X-RateLimit-Limit": "1",
        "X-RateLimit-Remaining": "0",
        "X-RateLimit-Reset": "1795813220",
    }


def test_rejected_request_names_the_violated_tier_and_rounds_retry_after_up() -> None:
    decision = Decision(False, (TierState(SECOND, 1, 600), TierState(MINUTE, 5, 42_000)))
    headers = dict(decision.headers(now=100.0))
    assert headers["Retry-After"] == "1"
    assert headers["RateLimit"] == '"1s";r=0;t=1, "60s";r=15;t=42'
    problem = decision.problem()
    assert problem["violated-policies"] == ["1s"]
    assert problem["status"] == 429 and problem["error"] == "rate_limited"


def test_retry_after_waits_for_every_violated_tier() -> None:
    decision = Decision(False, (TierState(SECOND, 1, 300), TierState(MINUTE, 20, 12_001)))
    assert [s.tier.name for s in decision.violated] == ["1s", "60s"]
    assert decision.retry_after_s == 13
    assert dict(decision.headers(now=0))["X-RateLimit-Reset"] == "13"  # binding: resets last


def test_retry_after_is_at_least_one_second() -> None:
    decision = Decision(False, (TierState(SECOND, 1, 0),))
    assert decision.retry_after_s == 1


def test_no_tiers_means_no_headers() -> None:
    assert Decision(True, ()).headers(now=0) == []


def test_a_policy_names_its_counters_and_reads_a_reply() -> None:
    keys = Keys("p")
    policy = RatePolicy(keys, (SECOND, MINUTE))
    assert policy.arguments == (2, 1, 1000, 20, 60_000)
    assert policy.counters("alice") == [keys.rate("alice", "1s"), keys.rate("alice", "60s")]
    assert policy.decide([0, 1, 400, 7, 30_000]) == Decision(
        False, (TierState(SECOND, 1, 400), TierState(MINUTE, 7, 30_000))
    )


def test_the_limiter_does_not_depend_on_the_queue() -> None:
    """Admission flows one way: the queue applies a policy; the policy knows no queue."""
    tree = ast.parse(inspect.getsource(ratelimit))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)} | {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    assert "taskserver.queue" not in imported and "taskserver.coalesce" not in imported


# ------------------------------------------------------------------ real Redis


def limiter(redis: Any, keys: Keys, spec: str) -> RateLimiter:
    return RateLimiter(redis, keys, parse_rate_limits(spec), timeout_s=2.0, clock=reactor)


@pytest_twisted.ensureDeferred
async def test_rejected_request_charges_no_tier(redis: Any, keys: Keys) -> None:
    rl = limiter(redis, keys, "1/1s,20/60s")
    first = await rl.check("alice")
    second = await rl.check("alice")
    third = await rl.check("alice")
    assert (first.allowed, second.allowed, third.allowed) == (True, False, False)
    assert [s.used for s in third.tiers] == [1, 1]
    assert await redis.get(keys.rate("alice", "60s")) == "1"
    assert 0 < int(await redis.execute_command("PTTL", keys.rate("alice", "60s"))) <= 60_000


@pytest_twisted.ensureDeferred
async def test_users_are_limited_separately(redis: Any, keys: Keys) -> None:
    rl = limiter(redis, keys, "1/1s,20/60s")
    assert (await rl.check("alice")).allowed
    assert (await rl.check("bob")).allowed


@pytest_twisted.ensureDeferred
async def test_every_counter_is_created_with_its_ttl(redis: Any, keys: Keys) -> None:
    rl = limiter(redis, keys, "1/1s,20/60s")
    await rl.check("carol")
    for tier in ("1s", "60s"):
        assert int(await redis.execute_command("PTTL", keys.rate("carol", tier))) > 0


@pytest_twisted.ensureDeferred
async def test_a_leftover_key_without_ttl_starts_a_new_window(redis: Any, keys: Keys) -> None:
    await redis.set(keys.rate("dave", "60s"), "20")  # the classic INCR/EXPIRE bug's leftover
    rl = limiter(redis, keys, "1/1s,20/60s")
    decision = await rl.check("dave")
    assert decision.allowed
    assert await redis.get(keys.rate("dave", "60s")) == "1"
    assert 0 < int(await redis.execute_command("PTTL", keys.rate("dave", "60s"))) <= 60_000


@pytest_twisted.ensureDeferred
async def test_simultaneous_requests_of_a_new_user_admit_exactly_one(
    redis_server: RedisAddress, keys: Keys
) -> None:
    clients = [connect_raw(redis_server, poolsize=4) for _ in range(4)]
    try:
        limiters = [limiter(client, keys, "1/1s,20/60s") for client in clients]
        decisions = await defer.gatherResults(
            [defer.Deferred.fromCoroutine(limiters[i % 4].check("eve")) for i in range(40)]
        )
        assert sum(d.allowed for d in decisions) == 1
    finally:
        for client in clients:
            await client.disconnect()


@pytest.mark.serial  # paced in real seconds against real windows
@pytest_twisted.ensureDeferred
async def test_paced_client_gets_the_minute_quota_then_waits_for_the_window(
    redis: Any, keys: Keys
) -> None:
    """The 1/1 s + 20/60 s story, scaled down: 1/66 ms + 20/8 s, one request per 73 ms.

    The client waits 73 ms after each answer, so consecutive requests reach
    Redis at least 73 ms apart and the short tier never rejects. Expected:
    exactly 20 accepted, then 429s (the long tier) until its window, which
    began when Redis ran the first request, ends. Redis ran request k between
    its sending and its answer, which gives exact bounds without margins. The
    20 requests take about 1.5 s of the 8 s window, so a loaded machine has
    room to be slow; the deadline only stops a test that would never end.
    """
    rl = limiter(redis, keys, "1/66ms,20/8000ms")
    window_s, pace_s = 8.0, 0.073
    outcomes: list[tuple[float, float, Decision]] = []  # (sent, answered, decision)
    while True:
        sent = reactor.seconds()
        decision = await rl.check("paced")
        outcomes.append((sent, reactor.seconds(), decision))
        if len(outcomes) > 20 and decision.allowed:
            break
        assert sent - outcomes[0][0] < window_s + 60.0, "the long window never ended"
        await sleep(pace_s)
    assert all(d.allowed for _, _, d in outcomes[:20])
    rejected = outcomes[20:-1]
    assert rejected, "the 21st request should have been rejected"
    assert all(
        not d.allowed and [s.tier.name for s in d.violated] == ["8000ms"] for *_, d in rejected
    )
    first_sent, first_answered, _ = outcomes[0]
    last_rejected_sent = rejected[-1][0]
    reopened_answered = outcomes[-1][1]
    assert last_rejected_sent < first_answered + window_s, "rejected after the window ended"
    assert reopened_answered >= first_sent + window_s, "accepted before the window ended"
