# -*- test-case-name: tests.test_tasklog -*-
"""The task log: one line per finished task in ``LOG_DIR/tasks.log``.

Lines look like this (one line in the file, wrapped here)::

    2026-11-27T21:00:18.123Z user_id="user123" task_id=9f0c...
        status=completed duration_ms=0.412 pid=4242

A typed task's line ends with its type, `` type="email"`` (lines of untyped
tasks are as they were). The user id and the type are JSON-quoted with
every non-ASCII and control character escaped, so nothing a client sends
can split or forge a line.

One process writes the file: in a cluster, children format their lines
and send them to the master over a pipe of their own (whole lines only,
so lines never interleave; see child.records_pipe), and the master appends them
(:class:`TaskLogWriter` into :class:`TaskLogFile`, which rotates by size).
Several processes appending to one rotating file would lose lines at each
rotation.

A line may come late, never not at all: when the disk is full (or fails,
or goes read-only) the master keeps the lines and retries them, and past
:data:`TASK_LOG_BACKLOG_LINES` waiting lines the workers stop fetching
until the lines are out (see :class:`TaskLogWriter`). The kept lines are
in the master's memory only: a master that crashes meanwhile loses them
(their tasks stay completed in Redis; the README says how to tell).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from taskserver.backoff import backoff_delay
from taskserver.metrics import TASK_LOG_WRITE_ERRORS, Tally
from taskserver.task import iso_utc

TASK_LOG_NAME = "tasks.log"
TASK_LOG_ROTATED_FILES = 10
#: Lines kept unwritten past which the workers stop fetching (a few hundred KB of memory).
TASK_LOG_BACKLOG_LINES = 1000
#: The retries of a failed write: the first after this long, doubling up to the second.
RETRY_FIRST_S = 0.05
RETRY_MAX_S = 1.0
#: Most bytes handed to one write(2) (after an outage, the backlog goes out in pieces).
MOST_BYTES_PER_WRITE = 1 << 20


def task_line(
    *,
    finished: float,
    user_id: str,
    task_id: str,
    status: str,
    duration_ms: float,
    pid: int,
    task_type: str | None = None,
) -> str:
    """The log line of one finished task, without its newline."""
    line = (
        f"{iso_utc(finished)} "
        f"user_id={json.dumps(user_id, ensure_ascii=True)} "
        f"task_id={task_id} "
        f"status={status} "
        f"duration_ms={duration_ms:.3f} "
        f"pid={pid}"
    )
    if task_type is None:
        return line
    return f"{line} type={json.dumps(task_type, ensure_ascii=True)}"


class TaskLogSink(Protocol):
    """What :class:`TaskLogWriter` writes to: :class:`TaskLogFile`, or a test's faulty file."""

    def write(self, data: bytes) -> int: ...

    def reopen(self) -> bool:
        """Open the path again; True if it is not the file written before (deleted, emptied)."""
        ...

    def close(self) -> None: ...


class TaskLogFile:
    """``tasks.log``, appended with ``os.write``, rotating at ``max_bytes`` (``tasks.log.1``...).

    :meth:`write` is one ``write(2)``: it may write less than it was given
    (a disk filling up), and raises ``OSError`` when it writes nothing
    (ENOSPC, EIO, EROFS). Whatever it reports written is in the file, so a
    caller that carries on from there never writes a byte twice. It rotates
    only between lines, so a line cut short by a full disk is completed in
    the same file. A write that fails leaves the file as it was.
    """

    def __init__(self, log_dir: Path, max_bytes: int) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        self.path = log_dir / TASK_LOG_NAME
        self._max_bytes = max_bytes
        self._fd = self._open()
        self._size = os.fstat(self._fd).st_size
        self._at_line_end = True

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def write(self, data: bytes) -> int:
        """Append what ``data`` can of ``data`` in one system call; the bytes written (> 0).

        A rotation that fails raises ``OSError`` too, before anything is written.
        """
        if self._at_line_end and self._size >= self._max_bytes:
            self._rotate()
        written = os.write(self._fd, data)
        if not written and data:
            raise OSError(errno.ENOSPC, "the write wrote nothing")
        self._size += written
        self._at_line_end = data[written - 1 : written] == b"\n"
        return written

    def reopen(self) -> bool:
        """Open the path again (after a failure): a log deleted to free space is created anew.

        Writing on to a deleted file would hold its space and lose its lines.
        True if the path's file is not the one written before (deleted,
        moved, or emptied): a line begun in that one has lost its head.
        """
        fd = self._open()
        held, opened = os.fstat(self._fd), os.fstat(fd)
        os.close(self._fd)
        self._fd = fd
        self._size = opened.st_size
        another = (held.st_dev, held.st_ino) != (opened.st_dev, opened.st_ino) or not self._size
        if another:
            self._at_line_end = True
        return another

    def _holds_path(self) -> bool:
        """Is the file written still the one at :attr:`path` (not moved or deleted by someone)?"""
        try:
            at_path = os.stat(self.path)
        except FileNotFoundError:
            return False
        held = os.fstat(self._fd)
        return (at_path.st_dev, at_path.st_ino) == (held.st_dev, held.st_ino)

    def _rotate(self) -> None:
        """``tasks.log`` -> ``tasks.log.1`` -> ... -> ``tasks.log.10``, dropping the oldest.

        The new file is opened (as ``.tasks.log.next``) before anything is
        renamed, so a rotation that cannot open it (EMFILE, ENOSPC, EDQUOT,
        EACCES) raises ``OSError`` with every file as it was: the caller keeps
        its lines and tries again, as for a full disk. Only the file at
        :attr:`path` is rotated: if someone moved or deleted it, the path's
        file (created anew if need be) is written instead.
        """
        if not self._holds_path():
            self.reopen()
            if self._size < self._max_bytes:
                return
        next_path = self.path.with_name(f".{TASK_LOG_NAME}.next")
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
        try:
            fd = os.open(next_path, flags, 0o644)
        except OSError as e:
            raise OSError(e.errno, f"cannot rotate it: {e.strerror}") from e
        first_rotated = Path(f"{self.path}.1")
        try:
            for n in range(TASK_LOG_ROTATED_FILES, 0, -1):
                older = Path(f"{self.path}.{n}")
                if not older.exists():
                    continue
                if n == TASK_LOG_ROTATED_FILES:
                    older.unlink()
                else:
                    older.rename(f"{self.path}.{n + 1}")
            self.path.rename(first_rotated)
            try:
                next_path.rename(self.path)
            except OSError:
                first_rotated.rename(self.path)
                raise
        except OSError as e:
            os.close(fd)
            with contextlib.suppress(OSError):
                next_path.unlink()
            raise OSError(e.errno, f"cannot rotate it: {e.strerror}") from e
        os.close(self._fd)
        self._fd = fd
        self._size = 0

    def write_line(self, line: str) -> None:
        """Append one line (no newline inside it; callers pass task_line() output)."""
        self.write_lines([line])

    def write_lines(self, lines: list[str]) -> None:
        """Append several lines, in one system call unless the disk writes short; OSError if full.

        For tests and in-process servers; the master goes through :class:`TaskLogWriter`.
        """
        data = "".join(f"{line}\n" for line in lines).encode("utf-8")
        while data:
            data = data[self.write(data) :]

    def close(self) -> None:
        os.close(self._fd)


class TaskLogWriter:
    """The master's way into the task log: every line written, once, in order, whatever the disk.

    A write that fails (ENOSPC, EIO, a read-only remount) keeps the lines it
    could not write, and tries again after a capped back-off, reopening the
    file first, from the first byte not written; lines that arrive meanwhile
    wait behind them. A line cut short is kept whole until it is all out:
    if the reopened file is another one (the old one deleted to free space),
    the line is written again from its start, not as a headless tail.
    Nothing is ever dropped: past ``bound`` unwritten lines, ``on_change``
    is called with :attr:`pressing` set, and the master tells
    the children to stop fetching; lines of tasks already running still
    arrive and are kept. Once every kept line is out, :attr:`pressing` and
    :attr:`unwritable` clear and ``on_change`` is called again.

    Logged once when the log becomes unwritable, once when back-pressure
    starts, and once when it recovers; each failed attempt counts
    ``task_log_write_errors`` in ``tally``.
    """

    log = Logger()

    def __init__(
        self,
        file: TaskLogSink,
        clock: IReactorTime,
        *,
        bound: int = TASK_LOG_BACKLOG_LINES,
        on_change: Callable[[], None] = lambda: None,
        tally: Tally | None = None,
    ) -> None:
        self._file = file
        self._clock = clock
        self._bound = bound
        self._on_change = on_change
        self._tally = tally if tally is not None else Tally()
        #: Encoded lines not written yet, whole: the first :attr:`_written` bytes of the
        #: first one are in the file (a write the disk cut short).
        self._pending: deque[bytes] = deque()
        self._written = 0
        self._failures = 0
        self._retry: IDelayedCall | None = None
        self._unwritable_since: float | None = None
        self._late = 0
        #: Why the task log is unwritable (the last error), None while it is writable.
        self.unwritable: str | None = None
        #: Past the bound: the children should not fetch.
        self.pressing = False
        self._drain_waiters: list[defer.Deferred[None]] = []

    @property
    def backlog(self) -> int:
        """Lines waiting to be written (a line half written counts)."""
        return len(self._pending)

    def write_lines(self, lines: list[str]) -> None:
        """Write ``lines`` now, or keep them behind the lines already waiting."""
        if self._retry is not None:
            self._pending.extend(f"{line}\n".encode() for line in lines)
            self._late += len(lines)
            self._check_pressure()
            return
        if self._pending:
            self._pending.extend(f"{line}\n".encode() for line in lines)
            self._drain()
            return
        # Nothing waits (the usual case): the whole turn's lines in one buffer, one write.
        data = "".join(f"{line}\n" for line in lines).encode()
        try:
            written = self._file.write(data)
        except OSError as e:
            self._pending.extend(data.splitlines(keepends=True))
            self._failed(e)
            return
        if written < len(data):
            self._pending.extend(data.splitlines(keepends=True))
            self._consume(written)
            self._drain()

    def _drain(self) -> None:
        pending = self._pending
        while pending:
            count, size = 0, 0
            for line in pending:
                if count and size + len(line) > MOST_BYTES_PER_WRITE:
                    break
                count += 1
                size += len(line)
            chunk = pending[0] if count == 1 else b"".join(itertools.islice(pending, count))
            try:
                written = self._file.write(chunk[self._written :])
            except OSError as e:
                self._failed(e)
                return
            self._consume(written)
        self._recovered()

    def _consume(self, written: int) -> None:
        """Drop the lines the last write completed; remember how much of the next it wrote."""
        written += self._written
        pending = self._pending
        while pending and written >= len(pending[0]):
            written -= len(pending.popleft())
        self._written = written

    def _failed(self, error: OSError) -> None:
        self._tally.count(TASK_LOG_WRITE_ERRORS)
        self._failures += 1
        self.unwritable = error.strerror or str(error)
        if self._unwritable_since is None:
            self._unwritable_since = self._clock.seconds()
            self._late = len(self._pending)
            self.log.error(
                "the task log {path} cannot be written ({error}): its lines are kept and "
                "retried; past {bound} waiting, the workers stop fetching",
                path=getattr(self._file, "path", "?"),
                error=self.unwritable,
                bound=self._bound,
            )
            self._on_change()
        self._check_pressure()
        delay = backoff_delay(self._failures, RETRY_FIRST_S, RETRY_MAX_S)
        self._retry = self._clock.callLater(delay, self._try_again)

    def _try_again(self) -> None:
        self._retry = None
        try:
            another_file = self._file.reopen()
        except OSError as e:
            self._failed(e)
            return
        if another_file:
            self._written = 0  # the head of a line cut short went with the old file
        self._drain()

    def _check_pressure(self) -> None:
        if not self.pressing and len(self._pending) >= self._bound:
            self.pressing = True
            self.log.warn(
                "{n} task-log lines wait to be written: the workers stop fetching until they are",
                n=len(self._pending),
            )
            self._on_change()

    def drained(self) -> defer.Deferred[None]:
        """Fires once no line waits (at once if none does); what a stopping master awaits."""
        if not self._pending:
            return defer.succeed(None)
        waiter: defer.Deferred[None] = defer.Deferred(self._drain_waiters.remove)
        self._drain_waiters.append(waiter)
        return waiter

    def _recovered(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            waiter.callback(None)
        if self._unwritable_since is None:
            return
        self.log.info(
            "the task log is writable again after {s:.1f} s: the {n} line(s) that waited are "
            "written{resume}",
            s=self._clock.seconds() - self._unwritable_since,
            n=self._late,
            resume="; the workers fetch again" if self.pressing else "",
        )
        self._unwritable_since = None
        self._failures = 0
        self._late = 0
        self.unwritable = None
        self.pressing = False
        self._on_change()

    def close(self) -> None:
        """One last try for what waits (logged if it fails: those lines are lost), then close."""
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self._pending:
            self._drain()
            if self._retry is not None:
                self._retry.cancel()
                self._retry = None
        if self._pending:
            self.log.error(
                "{n} task-log line(s) could not be written before the stop and are lost",
                n=len(self._pending),
            )
        self._file.close()


class TaskLog:
    """What consumers call when a task finishes: formats the line and hands it on."""

    def __init__(self, sink: Callable[[str], None], pid: int) -> None:
        self._sink = sink
        self._pid = pid

    def record(
        self,
        *,
        finished: float,
        user_id: str,
        task_id: str,
        status: str,
        duration_ms: float,
        task_type: str | None = None,
    ) -> None:
        self._sink(
            task_line(
                finished=finished,
                user_id=user_id,
                task_id=task_id,
                status=status,
                duration_ms=duration_ms,
                pid=self._pid,
                task_type=task_type,
            )
        )
