# -*- test-case-name: tests.test_task -*-
"""The task record as it travels through the queue, and the timestamp format."""

from __future__ import annotations

import functools
import json
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

TASK_ID = re.compile(r"^[0-9a-f]{32}$")


def iso_utc(seconds: float) -> str:
    """ISO-8601 UTC with milliseconds, e.g. ``2026-11-27T21:00:18.123Z``.

    Every task needs several of these; the date and time up to the second
    are formatted once per second (what ``datetime.isoformat`` gives,
    microseconds rounded as ``datetime.fromtimestamp`` rounds them).
    """
    whole, micros = divmod(round(seconds * 1_000_000), 1_000_000)
    return f"{_second(whole)}.{micros // 1000:03d}Z"


@functools.lru_cache(maxsize=4)
def _second(whole: int) -> str:
    return datetime.fromtimestamp(whole, UTC).strftime("%Y-%m-%dT%H:%M:%S")


class MalformedTask(ValueError):
    """A queue entry that is not a task this server wrote."""


@dataclass(frozen=True)
class Task:
    """One unit of work. Serialised as JSON into the queue lists."""

    id: str
    user_id: str
    payload: Any
    queued_at: str
    attempts: int = 0
    #: The handler it is routed to (TASK_HANDLERS); None for the default TASK_HANDLER.
    type: str | None = None
    #: When a delayed task is due (its 202's run_at); None for one due at once. Its wait
    #: (metrics, the oldest pending age) counts from here, not from queued_at.
    run_at: str | None = None

    @classmethod
    def new(
        cls,
        user_id: str,
        payload: Any,
        now: float,
        type: str | None = None,
        run_at: str | None = None,
    ) -> Task:
        return cls(
            id=uuid.uuid4().hex,
            user_id=user_id,
            payload=payload,
            queued_at=iso_utc(now),
            type=type,
            run_at=run_at,
        )

    @property
    def due_at(self) -> str:
        """Since when it waits to run: run_at for a delayed task, else queued_at."""
        return self.run_at or self.queued_at

    def to_json(self) -> str:
        document = {
            "id": self.id,
            "user_id": self.user_id,
            "payload": self.payload,
            "queued_at": self.queued_at,
            "attempts": self.attempts,
        }
        if self.type is not None:  # untyped entries stay as they were
            document["type"] = self.type
        if self.run_at is not None:  # and so do undelayed ones
            document["run_at"] = self.run_at
        return json.dumps(document, separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_json(cls, raw: str) -> Task:
        try:
            data = json.loads(raw)
            task = cls(
                id=data["id"],
                user_id=data["user_id"],
                payload=data.get("payload"),
                queued_at=data["queued_at"],
                attempts=int(data.get("attempts", 0)),
                type=data.get("type"),
                run_at=data.get("run_at"),
            )
        except (ValueError, TypeError, KeyError) as e:
            raise MalformedTask(f"not a task: {e}") from None
        if not (isinstance(task.id, str) and TASK_ID.match(task.id)):
            raise MalformedTask("not a task: bad id")
        if not isinstance(task.user_id, str) or not isinstance(task.queued_at, str):
            raise MalformedTask("not a task: bad field types")
        if task.type is not None and not isinstance(task.type, str):
            raise MalformedTask("not a task: bad field types")
        if task.run_at is not None and not isinstance(task.run_at, str):
            raise MalformedTask("not a task: bad field types")
        return task

    def handler_argument(self, attempts: int) -> dict[str, Any]:
        """What TASK_HANDLER receives: the task as a dict, with this attempt's number.

        Built from the fields, not parsed again: the consumer parses each
        queue entry once (:meth:`from_json`), afresh for every attempt, so a
        handler that changes its payload changes nothing anyone else reads.
        """
        argument = {
            "id": self.id,
            "user_id": self.user_id,
            "payload": self.payload,
            "queued_at": self.queued_at,
            "attempts": attempts,
        }
        if self.type is not None:
            argument["type"] = self.type
        return argument
