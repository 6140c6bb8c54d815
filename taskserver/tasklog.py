# -*- test-case-name: tests.test_tasklog -*-
"""The task log: one line per finished task in ``LOG_DIR/tasks.log``.

Written through twisted.logger with a private observer, so task lines stay
out of twistd's own log and the formatting lives in one function. Lines
look like::

    2026-11-27T21:00:18.123Z user_id="user123" task_id=9f0c...
        status=completed duration_ms=0.412 pid=4242

(one line in the file; wrapped here).

The user id is JSON-quoted with every non-ASCII and control character
escaped, so nothing a client sends can split or forge a line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO, cast

from twisted.logger import FileLogObserver, LogEvent, Logger
from twisted.python.logfile import LogFile

from taskserver.task import iso_utc

TASK_LOG_NAME = "tasks.log"
TASK_LOG_ROTATED_FILES = 10


def format_task_line(event: LogEvent) -> str | None:
    """The line for one task event; None (skip) for events that are not ours."""
    if event.get("log_namespace") != TaskLog.namespace or "task_id" not in event:
        return None
    return (
        f"{iso_utc(event['finished'])} "
        f"user_id={json.dumps(event['user_id'], ensure_ascii=True)} "
        f"task_id={event['task_id']} "
        f"status={event['status']} "
        f"duration_ms={event['duration_ms']:.3f} "
        f"pid={event['pid']}\n"
    )


class TaskLog:
    """Appends task lines to ``tasks.log``, rotating by size (``tasks.log.1``, ...)."""

    namespace = "taskserver.tasks"

    def __init__(self, log_dir: Path, max_bytes: int, pid: int) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        self._file = LogFile(
            TASK_LOG_NAME,
            str(log_dir),
            rotateLength=max_bytes,
            maxRotatedFiles=TASK_LOG_ROTATED_FILES,
        )
        self._log = Logger(
            namespace=self.namespace,
            observer=FileLogObserver(cast(IO[str], self._file), format_task_line),
        )
        self._pid = pid

    def record(
        self, *, finished: float, user_id: str, task_id: str, status: str, duration_ms: float
    ) -> None:
        self._log.info(
            "task {task_id} {status}",
            finished=finished,
            user_id=user_id,
            task_id=task_id,
            status=status,
            duration_ms=duration_ms,
            pid=self._pid,
        )

    def close(self) -> None:
        self._file.close()
