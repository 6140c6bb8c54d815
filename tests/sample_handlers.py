"""Task handlers used by the tests (TASK_HANDLER=sample_handlers:...)."""

from __future__ import annotations

import os
import signal
from typing import Any

from twisted.internet import defer, reactor, task


def hang(task_: dict[str, Any]) -> defer.Deferred[None]:
    """Never finishes: the task stays in flight until the process stops or dies."""
    return defer.Deferred()


def fail(task_: dict[str, Any]) -> None:
    raise RuntimeError(f"cannot do {task_['id']}")


def slow(task_: dict[str, Any]) -> defer.Deferred[None]:
    """Takes SLOW_HANDLER_S seconds (default 0.2) without blocking the reactor."""
    return task.deferLater(reactor, float(os.environ.get("SLOW_HANDLER_S", "0.2")), lambda: None)


def suicide(task_: dict[str, Any]) -> None:
    """A poison pill: running this task kills the process running it."""
    os.kill(os.getpid(), signal.SIGKILL)


def poison_or_slow(task_: dict[str, Any]) -> defer.Deferred[None] | None:
    """``{"poison": true}`` kills the process running it; any other task is slow."""
    if task_["payload"] == {"poison": True}:
        suicide(task_)
    return slow(task_)


def echo(task_: dict[str, Any]) -> dict[str, Any]:
    """A result: what it was given, and the type it ran as."""
    return {"echo": task_["payload"], "type": task_.get("type")}


def not_json(task_: dict[str, Any]) -> set[int]:
    """A result that is not JSON: it is not stored, and the record says why."""
    return {1, 2, 3}


def too_large(task_: dict[str, Any]) -> str:
    """A result over RESULT_MAX_BYTES (70,002 bytes of JSON at the default 65,536)."""
    return "x" * 70_000
