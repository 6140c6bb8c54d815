# -*- test-case-name: tests.test_batch -*-
"""Batches of tasks (``POST /api/v1/tasks``): the envelope, the item ids, the answer.

The envelope is ``{"tasks": [item, ...]}``, 1 to BATCH_MAX items; each item
is validated by the single POST's own validator (:func:`taskserver.api.
parse_task_document`), and a bad item is refused alone, not the batch. The
item task ids are derived from the batch's id, so a batch's claim on an
Idempotency-Key names every task it created.
"""

from __future__ import annotations

import hashlib
from typing import Any

from taskserver.httpserver import ApiError
from taskserver.ratelimit import Decision

#: The identity a batch claims its Idempotency-Key under: no user id can be it
#: (user ids hold no control characters), so batch and single claims never meet.
BATCH_IDENTITY = "\x00batch"


def batch_items(document: Any, most: int) -> list[Any]:
    """The items of a batch document; ApiError 400 if the envelope is not one."""
    if not isinstance(document, dict):
        raise ApiError(400, "invalid_batch", 'the body must be a JSON object like {"tasks": [...]}')
    unknown = sorted(set(document) - {"tasks"})
    if unknown:
        raise ApiError(
            400, "invalid_batch", f"unknown field(s): {', '.join(map(repr, unknown))}"[:300]
        )
    if "tasks" not in document:
        raise ApiError(400, "invalid_batch", "tasks is required: a list of task objects")
    items = document["tasks"]
    if not isinstance(items, list):
        raise ApiError(400, "invalid_batch", "tasks must be a list of task objects")
    if not items:
        raise ApiError(400, "empty_batch", "tasks must hold at least one task")
    if len(items) > most:
        raise ApiError(
            400, "batch_too_large", f"a batch holds at most {most} tasks, not {len(items)}"
        )
    return items


def item_task_id(batch_id: str, index: int) -> str:
    """The task id of item ``index`` of batch ``batch_id``: 32 hex digits, like any task id."""
    return hashlib.sha256(f"{batch_id}:{index}".encode("ascii")).hexdigest()[:32]


def accepted(task: dict[str, Any]) -> dict[str, Any]:
    """An item admitted: the document a single POST's 202 has."""
    return {"status": 202, "task": task}


def invalid(error: ApiError) -> dict[str, Any]:
    """An item the validator refused (400), as a single POST's body would be."""
    return {"status": error.status, **error.document()}


def refused(decision: Decision) -> dict[str, Any]:
    """An item its user's rate limit refused (429), with the seconds to wait."""
    problem = decision.problem()
    return {
        "status": 429,
        "error": problem["error"],
        "message": problem["message"],
        "retry_after_s": decision.retry_after_s,
        "violated-policies": problem["violated-policies"],
    }
