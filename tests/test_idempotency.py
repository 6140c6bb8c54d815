"""Idempotency claims against a real Redis: how long they live, and who may release them."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import pytest_twisted
import treq
from twisted.internet import reactor

from conftest import RunningServer
from taskserver.idempotency import ABANDONED_AFTER_S, Claim, IdempotencyKeys, fingerprint
from taskserver.keys import Keys

STATUS_TTL_S = 3600


def claim_of(task_id: str) -> Claim:
    return Claim(task_id * 32, fingerprint("u", None), "2026-01-01T00:00:00.000Z")


async def pttl(redis: Any, name: str) -> int:
    return int(await redis.execute_command("PTTL", name))


@pytest_twisted.ensureDeferred
async def test_a_claim_never_outlives_the_status_record_of_its_task(
    start_server: Callable[..., RunningServer], redis: Any, keys: Keys
) -> None:
    """A retry reads "no status record" as "never created": the claim must expire first.

    With STATUS_TTL=3600 and claims kept 24 h, a retry an hour later took the key over
    and created a second task.
    """
    server = start_server(rate_limits=(), status_ttl_s=STATUS_TTL_S)
    response = await treq.post(
        server.url + "/api/v1/task",
        data=b'{"user_id": "u"}',
        headers={"Content-Type": "application/json", "Idempotency-Key": "order-1"},
    )
    assert response.code == 202
    task_id = (await response.json())["task_id"]
    claim_ms = await pttl(redis, keys.idempotency("u", "order-1"))
    status_ms = await pttl(redis, keys.status(task_id))
    assert 0 < claim_ms <= status_ms <= STATUS_TTL_S * 1000


@pytest_twisted.ensureDeferred
async def test_a_key_taken_over_keeps_the_shorter_ttl_and_only_its_holder_releases_it(
    redis: Any, keys: Keys
) -> None:
    claims = IdempotencyKeys(redis, keys, 1.0, reactor, status_ttl_s=60)
    name = keys.idempotency("u", "k")
    abandoned, ours = claim_of("a"), claim_of("b")
    assert await claims.claim("u", "k", abandoned) is None
    assert 0 < await pttl(redis, name) <= 60_000
    await redis.execute_command("PEXPIRE", name, int((60 - ABANDONED_AFTER_S - 1) * 1000))
    assert await claims.take_over("u", "k", abandoned, ours)
    assert 50_000 < await pttl(redis, name) <= 60_000

    # The request that made the abandoned claim was only slow: its late release must
    # not free a key whose task (ours) may exist.
    assert await claims.release("u", "k", abandoned) is False
    assert await redis.get(name) == ours.to_json()
    assert await claims.release("u", "k", ours) is True
    assert await redis.get(name) is None


def test_a_type_is_part_of_what_makes_two_requests_the_same() -> None:
    """A retry that names another handler is another request (422), not a replay;
    an untyped request's fingerprint is the one stored before tasks had types."""
    assert fingerprint("u", {"a": 1}, None) == fingerprint("u", {"a": 1})
    assert fingerprint("u", {"a": 1}) == hashlib.sha256(b'["u",{"a":1}]').hexdigest()
    assert fingerprint("u", {"a": 1}, "email") != fingerprint("u", {"a": 1})
    assert fingerprint("u", {"a": 1}, "email") != fingerprint("u", {"a": 1}, "resize")
