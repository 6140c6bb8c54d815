# -*- test-case-name: tests.test_admin,tests.test_dashboard -*-
"""The dead-letter list: read it (whole or a page at a time), requeue from it, purge it.

One list, newest first, of the entries FAIL and RECLAIM write
(``lua/lib/dead_letter.lua``: ``{"error", "attempts", "failed_at_ms", "task"}``,
the task's own text last). ``taskserver-admin`` and the dashboard both act
on it through these functions. Every call is bounded: a page is one LRANGE
of at most its limit; requeueing all goes in calls of REQUEUE_BATCH.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet import defer

from taskserver.keys import Keys
from taskserver.scripts import load

#: Dead tasks back to the queue, each exactly the text that died (lua/requeue_dead.lua).
REQUEUE_DEAD = load("requeue_dead")
#: Most dead tasks one REQUEUE_DEAD call moves: Redis answers nothing else while it runs
#: (10,000, the default DEAD_LETTER_MAX, in 10 calls of a few ms each).
REQUEUE_BATCH = 1000
#: Most entries one REQUEUE_DEAD call scans for named tasks (a few ms of Redis time).
SCAN_BATCH = 5000
#: The dead-letter list deleted and counted at once (lua/purge_dead.lua).
PURGE_DEAD = load("purge_dead")
#: One page of the list and its length, in one call (lua/dead_page.lua).
DEAD_PAGE = load("dead_page")
#: The payload as the dashboard lists it: its JSON text cut to this many characters.
PAYLOAD_EXCERPT_CHARS = 200

#: How a multi-call operation awaits each of its Redis calls (with a deadline, say).
Bound = Callable[[defer.Deferred[Any]], Awaitable[Any]]


async def unbounded(call: defer.Deferred[Any]) -> Any:
    """Each call awaited as it is (taskserver-admin has one deadline for the whole command)."""
    return await call


async def dead_letters(redis: Any, keys: Keys, limit: int) -> list[Any]:
    """The newest ``limit`` entries, decoded."""
    return [json.loads(entry) for entry in await redis.lrange(keys.dead, 0, limit - 1)]


async def page(redis: Any, keys: Keys, offset: int, limit: int) -> tuple[int, list[dict[str, Any]]]:
    """The list's length and the entries ``offset`` to ``offset + limit - 1`` (newest first).

    Each item is what the dashboard shows of an entry (:func:`item`). One
    script call: the length and the page are read at the same moment.
    """
    total, entries = await DEAD_PAGE(redis, [keys.dead], [offset, limit])
    return int(total), [item(entry) for entry in entries]


def item(entry: str) -> dict[str, Any]:
    """An entry as the dashboard lists it: ids, attempts, error, time, a payload excerpt.

    An entry taskserver did not write (not an object with a task) is still
    listed, its text as the excerpt, so that the page accounts for every entry.
    """
    try:
        document = json.loads(entry)
        task = document["task"]
        return {
            "task_id": str(task["id"]),
            "user_id": str(task["user_id"]),
            "attempts": int(document.get("attempts", 0)),
            "error": str(document.get("error", "")),
            "failed_at_ms": int(document.get("failed_at_ms", 0)),
            "payload_excerpt": excerpt(
                json.dumps(task.get("payload"), ensure_ascii=False, separators=(",", ":"))
            ),
        }
    except (ValueError, TypeError, KeyError, AttributeError):
        return {
            "task_id": "",
            "user_id": "",
            "attempts": 0,
            "error": "not a dead-letter entry written by taskserver",
            "failed_at_ms": 0,
            "payload_excerpt": excerpt(entry),
        }


def excerpt(text: str) -> str:
    """At most PAYLOAD_EXCERPT_CHARS characters of ``text``, "…" appended when cut."""
    if len(text) <= PAYLOAD_EXCERPT_CHARS:
        return text
    return text[:PAYLOAD_EXCERPT_CHARS] + "…"


async def requeue(redis: Any, keys: Keys, task_ids: list[str], bound: Bound = unbounded) -> int:
    """Dead tasks back to the queue, oldest first (all if ``task_ids`` is empty); how many.

    "All" means the entries there when it starts, in calls of REQUEUE_BATCH: a
    task that dies again meanwhile (newest end) is not requeued a second time.
    ``bound`` awaits each call (the dashboard gives each one its deadline).
    """
    script_keys = [keys.dead, keys.pending]
    if task_ids:
        return await _requeue_named(redis, keys, list(dict.fromkeys(task_ids)), bound)
    total = 0
    budget = int(await bound(redis.llen(keys.dead)))
    while budget > 0:
        most = min(REQUEUE_BATCH, budget)
        moved, taken = await bound(REQUEUE_DEAD(redis, script_keys, [keys.status_prefix, most]))
        total, budget = total + int(moved), budget - int(taken)
        if int(taken) < most:
            break
    return total


async def _requeue_named(redis: Any, keys: Keys, wanted: list[str], bound: Bound) -> int:
    """Each named task's oldest entry back to the queue, scanning SCAN_BATCH entries a call.

    The scan goes from the oldest end, where deaths meanwhile (at the newest
    end) move nothing; an entry requeued in a call moves the ones after it
    one place, and the next call starts that much earlier. A requeue or trim
    elsewhere at the oldest end meanwhile can make it miss an entry (it
    then counts as not dead).
    """
    total, skip = 0, 0
    while wanted:
        arguments = [keys.status_prefix, 0, skip, SCAN_BATCH, *wanted]
        moved, scanned, *found = await bound(
            REQUEUE_DEAD(redis, [keys.dead, keys.pending], arguments)
        )
        total += int(moved)
        wanted = [task_id for task_id in wanted if task_id not in set(found)]
        if int(scanned) < SCAN_BATCH:
            break
        skip += int(scanned) - int(moved)
    return total


async def purge(redis: Any, keys: Keys) -> int:
    """Delete every dead task; returns how many were deleted."""
    return int(await PURGE_DEAD(redis, [keys.dead], []))
