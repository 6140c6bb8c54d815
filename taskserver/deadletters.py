# -*- test-case-name: tests.test_admin,tests.test_dashboard -*-
"""The dead-letter list: read it (whole or a page at a time), requeue from it, purge it.

One list, newest first, of the entries FAIL and RECLAIM write
(``lua/lib/dead_letter.lua``: ``{"error", "attempts", "failed_at_ms", "task"}``,
the task's own text last). ``taskserver-admin`` and the dashboard both act
on it through these functions. Every call is bounded: a page is one LRANGE
of at most its limit; a requeue goes in calls of at most REQUEUE_BATCH entries
and SCAN_BYTES bytes each.
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
#: Most bytes of entries one REQUEUE_DEAD call reads (moving all, or scanning for named
#: tasks): each is copied into Lua, and 64 KiB payloads make entry counts meaningless.
SCAN_BYTES = 1024 * 1024
#: Entries per LRANGE of a scan for named tasks (the bytes are checked between them).
SCAN_CHUNK = 100
#: The dead-letter list deleted and counted at once (lua/purge_dead.lua).
PURGE_DEAD = load("purge_dead")
#: One page of the list and its length, in one call (lua/dead_page.lua).
DEAD_PAGE = load("dead_page")
#: The payload as the dashboard lists it: its JSON text cut to this many characters.
PAYLOAD_EXCERPT_CHARS = 200
#: Of a payload's text, what the page script sends: enough bytes for PAYLOAD_EXCERPT_CHARS
#: characters of any width, and one more to tell whether there were more.
EXCERPT_BYTES = 4 * PAYLOAD_EXCERPT_CHARS + 1

#: How a multi-call operation awaits each of its Redis calls (with a deadline, say).
Bound = Callable[[defer.Deferred[Any]], Awaitable[Any]]


class RequeueIncomplete(Exception):
    """A requeue's later call failed (no answer in time) after earlier ones had moved tasks.

    ``requeued`` is what the calls that answered moved: at least that many
    are back in the queue (the failed call may have moved more, or none).
    """

    def __init__(self, requeued: int, cause: Exception) -> None:
        super().__init__(f"requeued {requeued}, then: {cause}")
        self.requeued = requeued
        self.cause = cause


async def unbounded(call: defer.Deferred[Any]) -> Any:
    """Each call awaited as it is (taskserver-admin has one deadline for the whole command)."""
    return await call


async def dead_letters(redis: Any, keys: Keys, limit: int) -> list[Any]:
    """The newest ``limit`` entries, decoded."""
    return [json.loads(entry) for entry in await redis.lrange(keys.dead, 0, limit - 1)]


async def page(redis: Any, keys: Keys, offset: int, limit: int) -> tuple[int, list[dict[str, Any]]]:
    """The list's length and the entries ``offset`` to ``offset + limit - 1`` (newest first).

    Each item is what the dashboard shows of an entry (:func:`item`). One
    script call: the length and the page are read at the same moment, and of
    each payload only the first EXCERPT_BYTES leave Redis.
    """
    total, *flat = await DEAD_PAGE(redis, [keys.dead], [offset, limit, EXCERPT_BYTES])
    rows = [flat[i : i + 4] for i in range(0, len(flat), 4)]
    return int(total), [_page_item(*row) for row in rows]


def _page_item(fields: str, head: str, payload: str, cut: int) -> dict[str, Any]:
    """An item from the page script's parts of an entry (cut -1: the entry whole)."""
    if int(cut) < 0:
        return item(fields)
    try:
        shown = payload[:PAYLOAD_EXCERPT_CHARS]
        cut_short = int(cut) or len(payload) > len(shown)
        return _item(json.loads(fields), json.loads(head), shown + "…" if cut_short else shown)
    except (ValueError, TypeError, KeyError, AttributeError):
        return _unreadable(fields)


def item(entry: str) -> dict[str, Any]:
    """An entry as the dashboard lists it: ids, attempts, error, time, a payload excerpt.

    An entry taskserver did not write (not an object with a task) is still
    listed, its text as the excerpt, so that the page accounts for every entry.
    """
    try:
        document = json.loads(entry)
        task = document["task"]
        payload = json.dumps(task.get("payload"), ensure_ascii=False, separators=(",", ":"))
        return _item(document, task, excerpt(payload))
    except (ValueError, TypeError, KeyError, AttributeError):
        return _unreadable(entry)


def _item(document: dict[str, Any], task: dict[str, Any], payload_excerpt: str) -> dict[str, Any]:
    """The fields the dashboard lists of an entry (``document``) and its ``task``."""
    return {
        "task_id": str(task["id"]),
        "user_id": str(task["user_id"]),
        "attempts": int(document.get("attempts", 0)),
        "error": str(document.get("error", "")),
        "failed_at_ms": int(document.get("failed_at_ms", 0)),
        "payload_excerpt": payload_excerpt,
    }


def _unreadable(entry: str) -> dict[str, Any]:
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
    ``bound`` awaits each call (the dashboard gives each one its deadline). A
    call that fails after others moved tasks raises :class:`RequeueIncomplete`
    with their count; a first call that fails raises its own error (it may have
    moved tasks or not: a retry never moves a task twice, each call is atomic).
    """
    if task_ids:
        return await _requeue_named(redis, keys, list(dict.fromkeys(task_ids)), bound)
    total = 0
    budget = int(await bound(redis.llen(keys.dead)))
    while budget > 0:
        most = min(REQUEUE_BATCH, budget)
        arguments = [keys.status_prefix, most, SCAN_BYTES]
        moved, taken, at_end = await _call(redis, keys, arguments, bound, total)
        total, budget = total + int(moved), budget - int(taken)
        if int(at_end):
            break
    return total


async def _requeue_named(redis: Any, keys: Keys, wanted: list[str], bound: Bound) -> int:
    """Each named task's newest entry back to the queue, scanning from the newest end.

    Each call scans up to SCAN_BYTES, from an offset counted from the head,
    where deaths meanwhile only make the next call re-read entries; removals
    meanwhile by another requeue by id are counted (Keys.dead_removed), and
    the next call moves back by their number (see lua/requeue_dead.lua). A
    task that is in the list is found, unless it falls off the tail
    (DEAD_LETTER_MAX) first.
    """
    total, start, removed = 0, 0, 0  # from the head, nothing to move back by
    while wanted:
        arguments = [keys.status_prefix, 0, SCAN_BYTES, start, SCAN_CHUNK, removed, *wanted]
        moved, _, at_end, start, removed, *found = await _call(redis, keys, arguments, bound, total)
        total += int(moved)
        wanted = [task_id for task_id in wanted if task_id not in set(found)]
        if int(at_end):
            break
    return total


async def _call(redis: Any, keys: Keys, arguments: list[Any], bound: Bound, done: int) -> Any:
    """One REQUEUE_DEAD call; its failure after ``done`` tasks moved is RequeueIncomplete."""
    names = [keys.dead, keys.pending, keys.dead_removed]
    try:
        return await bound(REQUEUE_DEAD(redis, names, arguments))
    except Exception as e:
        if done:
            raise RequeueIncomplete(done, e) from e
        raise


async def purge(redis: Any, keys: Keys) -> int:
    """Delete every dead task; returns how many were deleted."""
    return int(await PURGE_DEAD(redis, [keys.dead], []))
