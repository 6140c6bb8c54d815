"""Task handlers used by the tests (TASK_HANDLER=sample_handlers:...)."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer


def hang(task: dict[str, Any]) -> defer.Deferred[None]:
    """Never finishes: the task stays in flight until the process stops or dies."""
    return defer.Deferred()


def fail(task: dict[str, Any]) -> None:
    raise RuntimeError(f"cannot do {task['id']}")
