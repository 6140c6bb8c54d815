"""Built-in task handlers (``TASK_HANDLER=module:function``).

A handler receives the task as a dict (``id``, ``user_id``, ``payload``,
``queued_at``, ``attempts``) and returns a value, a Deferred or an
awaitable. Raising fails the attempt: the task is retried, up to MAX_ATTEMPTS,
then dead-lettered.
"""

from __future__ import annotations

from typing import Any


def complete(task: dict[str, Any]) -> None:
    """The original server's task: nothing to do, so it completes at once."""
    return None
