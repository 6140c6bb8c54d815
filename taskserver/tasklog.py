# -*- test-case-name: tests.test_tasklog -*-
"""The task log: one line per finished task in ``LOG_DIR/tasks.log``.

Lines look like this (one line in the file, wrapped here)::

    2026-11-27T21:00:18.123Z user_id="user123" task_id=9f0c...
        status=completed duration_ms=0.412 pid=4242

The user id is JSON-quoted with every non-ASCII and control character
escaped, so nothing a client sends can split or forge a line.

One process writes the file: in a cluster, children format their lines
and send them to the master over a pipe of their own (whole lines only,
so lines never interleave; see child.records_pipe), and the master appends them
to a ``twisted.python.logfile.LogFile``, which rotates by size. Several
processes writing one ``LogFile`` would overwrite each other.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from twisted.python.logfile import LogFile

from taskserver.task import iso_utc

TASK_LOG_NAME = "tasks.log"
TASK_LOG_ROTATED_FILES = 10


def task_line(
    *, finished: float, user_id: str, task_id: str, status: str, duration_ms: float, pid: int
) -> str:
    """The log line of one finished task, without its newline."""
    return (
        f"{iso_utc(finished)} "
        f"user_id={json.dumps(user_id, ensure_ascii=True)} "
        f"task_id={task_id} "
        f"status={status} "
        f"duration_ms={duration_ms:.3f} "
        f"pid={pid}"
    )


class TaskLogFile:
    """The single writer of ``tasks.log``, rotating at ``max_bytes`` (``tasks.log.1``, ...)."""

    def __init__(self, log_dir: Path, max_bytes: int) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        self.path = log_dir / TASK_LOG_NAME
        self._file = LogFile(
            TASK_LOG_NAME,
            str(log_dir),
            rotateLength=max_bytes,
            maxRotatedFiles=TASK_LOG_ROTATED_FILES,
        )

    def write_line(self, line: str) -> None:
        """Append one line (no newline inside it; callers pass task_line() output)."""
        self.write_lines([line])

    def write_lines(self, lines: list[str]) -> None:
        """Append several lines in one write (the file is unbuffered: one system call).

        Bytes, so that the LogFile counts the size it rotates by in bytes.
        """
        self._file.write("".join(f"{line}\n" for line in lines).encode("utf-8"))

    def close(self) -> None:
        self._file.close()


class TaskLog:
    """What consumers call when a task finishes: formats the line and hands it on."""

    def __init__(self, sink: Callable[[str], None], pid: int) -> None:
        self._sink = sink
        self._pid = pid

    def record(
        self, *, finished: float, user_id: str, task_id: str, status: str, duration_ms: float
    ) -> None:
        self._sink(
            task_line(
                finished=finished,
                user_id=user_id,
                task_id=task_id,
                status=status,
                duration_ms=duration_ms,
                pid=self._pid,
            )
        )
