"""A user's recent tasks (GET /api/v1/tasks): the list ADMIT keeps, read in one call."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest_twisted
import treq
from twisted.internet import defer, reactor

from conftest import RunningServer, eventually
from taskserver.config import parse_rate_limits
from taskserver.keys import Keys
from taskserver.queue import TaskQueue
from taskserver.ratelimit import RatePolicy
from taskserver.task import Task, iso_utc

STATUS_TTL_S = 3600


def listing_queue(redis: Any, keys: Keys, most: int) -> TaskQueue:
    return TaskQueue(redis, keys, STATUS_TTL_S, 2.0, reactor, user_tasks_max=most)


def new_task(user: str) -> Task:
    return Task.new(user, {"n": 1}, now=reactor.seconds())


@pytest_twisted.ensureDeferred
async def test_the_list_keeps_the_latest_ids_newest_first_across_turns_and_in_one_turn(
    redis: Any, keys: Keys
) -> None:
    queue = listing_queue(redis, keys, most=3)
    first = [new_task("ann") for _ in range(2)]
    for task in first:  # one turn each
        await queue.enqueue(task)
    together = [new_task("ann") for _ in range(3)] + [new_task("bob")]
    await defer.gatherResults([defer.ensureDeferred(queue.enqueue(t)) for t in together])

    listed = await queue.user_tasks("ann", 10)
    assert [task_id for task_id, _ in listed] == [t.id for t in reversed(together[:3])]
    assert all(record["status"] == "queued" for _, record in listed)
    assert await redis.llen(keys.user_tasks("ann")) == 3, "trimmed to USER_TASKS_MAX"
    assert [task_id for task_id, _ in await queue.user_tasks("bob", 10)] == [together[3].id]
    assert [task_id for task_id, _ in await queue.user_tasks("ann", 1)] == [together[2].id]
    assert await queue.user_tasks("nobody", 10) == []
    ttl_ms = await redis.execute_command("PTTL", keys.user_tasks("ann"))
    assert STATUS_TTL_S * 1000 - 5000 < ttl_ms <= STATUS_TTL_S * 1000


@pytest_twisted.ensureDeferred
async def test_expired_records_are_left_out_and_a_scheduled_task_keeps_the_list_longer(
    redis: Any, keys: Keys
) -> None:
    queue = listing_queue(redis, keys, most=10)
    gone, kept = new_task("cat"), new_task("cat")
    await queue.enqueue(gone)
    await queue.enqueue(kept)
    await redis.delete(keys.status(gone.id))  # as if its record had expired
    assert [task_id for task_id, _ in await queue.user_tasks("cat", 10)] == [kept.id]

    policy = RatePolicy(keys, ())
    later = new_task("cat")
    await queue.admit(later, policy, 600_000, iso_utc(reactor.seconds() + 600))
    longer = await redis.execute_command("PTTL", keys.user_tasks("cat"))
    assert longer > STATUS_TTL_S * 1000 + 590_000, "the list lives as long as its records"
    await queue.enqueue(new_task("cat"))  # a plain task must not shorten it again
    assert (
        await redis.execute_command("PTTL", keys.user_tasks("cat")) > STATUS_TTL_S * 1000 + 590_000
    )
    listed = await queue.user_tasks("cat", 10)
    assert listed[1][0] == later.id and listed[1][1]["status"] == "scheduled"


@pytest_twisted.ensureDeferred
async def test_a_refused_task_is_not_listed_and_max_0_writes_no_list(
    redis: Any, keys: Keys
) -> None:
    queue = listing_queue(redis, keys, most=10)
    policy = RatePolicy(keys, parse_rate_limits("1/60s"))
    admitted, refused = new_task("dan"), new_task("dan")
    assert (await queue.admit(admitted, policy)).allowed
    assert not (await queue.admit(refused, policy)).allowed
    assert [task_id for task_id, _ in await queue.user_tasks("dan", 10)] == [admitted.id]

    unlisted = listing_queue(redis, keys, most=0)
    await unlisted.enqueue(new_task("eve"))
    assert await redis.exists(keys.user_tasks("eve")) == 0


async def get_json(url: str) -> tuple[int, dict[str, Any]]:
    answer = await treq.get(url)
    return answer.code, await answer.json()


@pytest_twisted.ensureDeferred
async def test_the_route_lists_what_get_task_shows_and_refuses_bad_queries(
    start_server: Callable[..., RunningServer],
) -> None:
    server = start_server(
        handler=lambda task: {"done": True},
        rate_limits=parse_rate_limits("100/1s"),
        user_tasks_max=5,
    )
    ids = []
    for n in range(3):
        answer = await treq.post(
            server.url + "/api/v1/task", json={"user_id": "fay", "payload": {"n": n}}
        )
        assert answer.code == 202
        ids.append((await answer.json())["task_id"])

    async def all_completed() -> bool:
        code, listed = await get_json(server.url + "/api/v1/tasks?user_id=fay")
        return code == 200 and [t["status"] for t in listed["tasks"]] == ["completed"] * 3

    await eventually(all_completed)
    code, listed = await get_json(server.url + "/api/v1/tasks?user_id=fay&limit=2")
    assert code == 200 and listed["user_id"] == "fay"
    assert [t["task_id"] for t in listed["tasks"]] == ids[:0:-1], "newest first, limit 2"
    code, one = await get_json(f"{server.url}/api/v1/task/{ids[2]}")
    assert one["result"] == {"done": True}
    without_result = {name: value for name, value in one.items() if name != "result"}
    assert listed["tasks"][0] == without_result, "each as GET shows it, but its result"
    code, empty = await get_json(server.url + "/api/v1/tasks?user_id=nobody")
    assert (code, empty["tasks"]) == (200, [])

    for query, error in [
        ("", "missing_user_id"),
        ("?limit=2", "missing_user_id"),
        ("?user_id=", "invalid_user_id"),
        ("?user_id=a&user_id=b", "invalid_user_id"),
        ("?user_id=%ff", "invalid_user_id"),
        ("?user_id=%07", "invalid_user_id"),
        ("?user_id=fay&limit=0", "invalid_limit"),
        ("?user_id=fay&limit=6", "invalid_limit"),
        ("?user_id=fay&limit=-1", "invalid_limit"),
        ("?user_id=fay&limit=2.5", "invalid_limit"),
        ("?user_id=fay&limit=%EF%BC%92", "invalid_limit"),  # a full-width digit
    ]:
        code, problem = await get_json(server.url + "/api/v1/tasks" + query)
        assert (code, problem["error"]) == (400, error), query


@pytest_twisted.ensureDeferred
async def test_the_route_is_off_when_user_tasks_max_is_0(
    start_server: Callable[..., RunningServer],
) -> None:
    server = start_server(user_tasks_max=0)
    code, problem = await get_json(server.url + "/api/v1/tasks?user_id=fay")
    assert (code, problem["error"]) == (404, "user_tasks_off")
