"""The task log's line format, its single writer, and rotation."""

from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher

from taskserver import tasklog
from taskserver.metrics import Tally
from taskserver.tasklog import TaskLog, TaskLogFile, TaskLogWriter, task_line

LINE = re.compile(
    r'^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z user_id=("[^"\\]*(?:\\.[^"\\]*)*") '
    r"task_id=[0-9a-f]{32} status=(completed|retrying|dead) duration_ms=\d+\.\d{3} pid=\d+$"
)


def test_line_format(tmp_path: Path) -> None:
    log_file = TaskLogFile(tmp_path, 1_000_000)
    TaskLog(log_file.write_line, pid=77).record(
        finished=1_795_813_218.123,
        user_id="user123",
        task_id="ab" * 16,
        status="completed",
        duration_ms=0.4,
    )
    log_file.close()
    assert (tmp_path / "tasks.log").read_text() == (
        f'2026-11-27T21:00:18.123Z user_id="user123" task_id={"ab" * 16} '
        "status=completed duration_ms=0.400 pid=77\n"
    )


def test_nothing_in_a_user_id_can_break_or_forge_a_line() -> None:
    hostile = 'x" status=failed\n2026-01-01T00:00:00.000Z user_id="y\r\u2028ü'
    line = task_line(
        finished=0, user_id=hostile, task_id="0" * 32, status="completed", duration_ms=1, pid=1
    )
    assert "\n" not in line and "\r" not in line and line.isascii()
    match = LINE.match(line)
    assert match, line
    assert json.loads(match[1]) == hostile
    assert match[2] == "completed"


def test_rotates_by_size_without_losing_lines(tmp_path: Path) -> None:
    log_file = TaskLogFile(tmp_path, max_bytes=2048)
    log = TaskLog(log_file.write_line, pid=1)
    for n in range(100):
        log.record(
            finished=n, user_id=f"u{n}", task_id=f"{n:032x}", status="completed", duration_ms=1
        )
    log_file.close()
    files = sorted(tmp_path.glob("tasks.log*"))
    assert len(files) > 1
    lines = [line for f in files for line in f.read_text().splitlines()]
    assert len(lines) == 100 and len(set(lines)) == 100
    assert all(LINE.match(line) for line in lines)


def test_several_lines_in_one_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One system call per write_lines(): counted where the bytes leave Python."""
    log_file = TaskLogFile(tmp_path, 1_000_000)
    writes: list[int] = []
    real_write = os.write

    def counting_write(fd: int, data: Any) -> int:
        writes.append(len(data))
        return real_write(fd, data)

    monkeypatch.setattr(tasklog.os, "write", counting_write)
    log_file.write_lines(["first line", "second line"])
    log_file.write_line("third line")
    log_file.close()
    assert writes == [len("first line\nsecond line\n"), len("third line\n")], "one per call"
    assert (tmp_path / "tasks.log").read_text() == "first line\nsecond line\nthird line\n"


def test_a_deleted_log_is_created_again_on_reopen(tmp_path: Path) -> None:
    """An operator who deletes tasks.log to free space gets a new one, not a held inode."""
    log_file = TaskLogFile(tmp_path, 1_000_000)
    log_file.write_line("before")
    (tmp_path / "tasks.log").unlink()
    log_file.reopen()
    log_file.write_line("after")
    log_file.close()
    assert (tmp_path / "tasks.log").read_text() == "after\n"


def test_reopen_says_whether_the_file_is_another_one(tmp_path: Path) -> None:
    log_file = TaskLogFile(tmp_path, 1_000_000)
    log_file.write_line("kept")
    assert log_file.reopen() is False, "the same file"
    (tmp_path / "tasks.log").unlink()
    assert log_file.reopen() is True, "deleted: created anew"
    log_file.write_line("more")
    os.truncate(tmp_path / "tasks.log", 0)
    assert log_file.reopen() is True, "emptied"
    log_file.close()


def test_deleting_the_log_mid_line_leaves_no_headless_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Half a line written, the disk full, the operator deletes tasks.log: the line comes whole."""
    clock = Clock()
    writer = TaskLogWriter(TaskLogFile(tmp_path, 1_000_000), clock)
    real_write = os.write
    outcomes = ["half", "full"]

    def filling_write(fd: int, data: Any) -> int:
        what = outcomes.pop(0) if outcomes else "room"
        if what == "half":
            return real_write(fd, data[: len(data) // 2])
        if what == "full":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(tasklog.os, "write", filling_write)
    writer.write_lines(numbered(0, 1))
    assert writer.backlog == 1
    (tmp_path / "tasks.log").unlink()
    writer.write_lines(numbered(1, 2))
    retry_until_written(clock, writer)
    writer.close()
    assert (tmp_path / "tasks.log").read_text().splitlines() == numbered(0, 2)


# ---------------------------------------------------------------- a full disk, faked


class FaultyFile:
    """A task-log file whose writes do what the test scripts, then write whole.

    Each scripted outcome is an ``OSError`` errno (the write fails, nothing
    written) or an int ``n`` (a short write: only ``n`` bytes land).
    """

    def __init__(self) -> None:
        self.data = bytearray()
        self.script: list[tuple[str, int]] = []
        self.attempts = 0
        self.reopened = 0
        self.closed = False
        self.failing: int | None = None  # every write fails with this errno until cleared
        self.deleted = bytearray()  # what an operator deleted (the file is created anew on reopen)
        self._another = False

    def write(self, data: bytes) -> int:
        self.attempts += 1
        if self.failing is not None:
            raise OSError(self.failing, os.strerror(self.failing))
        if self.script:
            what, n = self.script.pop(0)
            if what == "fail":
                raise OSError(n, os.strerror(n))
            self.data += data[:n]
            return n
        self.data += data
        return len(data)

    def reopen(self) -> bool:
        self.reopened += 1
        another, self._another = self._another, False
        return another

    def delete(self) -> None:
        """The operator deletes tasks.log (to free space): what it held is gone."""
        self.deleted += self.data
        self.data = bytearray()
        self._another = True

    def close(self) -> None:
        self.closed = True

    def lines(self) -> list[str]:
        text = self.data.decode()
        assert not text or text.endswith("\n"), f"a torn last line: {text[-40:]!r}"
        return text.splitlines()


def writer_for(
    file: FaultyFile, bound: int = 10, tally: Tally | None = None
) -> tuple[TaskLogWriter, Clock, list[tuple[str | None, bool]]]:
    clock = Clock()
    changes: list[tuple[str | None, bool]] = []
    writer = TaskLogWriter(file, clock, bound=bound, tally=tally)
    writer._on_change = lambda: changes.append((writer.unwritable, writer.pressing))
    return writer, clock, changes


def numbered(first: int, last: int) -> list[str]:
    return [f"line {n:04d} of a task" for n in range(first, last)]


def retry_until_written(clock: Clock, writer: TaskLogWriter, most_s: float = 60.0) -> None:
    waited = 0.0
    while writer.backlog and waited < most_s:
        clock.advance(0.05)
        waited += 0.05


def test_failed_writes_are_retried_in_order_and_once() -> None:
    file = FaultyFile()
    tally = Tally()
    writer, clock, changes = writer_for(file, tally=tally)
    file.script = [("fail", errno.ENOSPC)] * 3
    writer.write_lines(numbered(0, 3))
    assert writer.unwritable == "No space left on device" and writer.backlog == 3
    writer.write_lines(numbered(3, 5))  # waits behind, no write of its own
    assert file.attempts == 1, "a line arriving during the back-off does not write"
    retry_until_written(clock, writer)
    assert file.lines() == numbered(0, 5)
    assert file.attempts == 4 and file.reopened == 3
    assert tally.take() == {"task_log_write_errors": 3}
    assert changes == [("No space left on device", False), (None, False)]
    assert writer.unwritable is None


def test_a_line_cut_short_is_completed_not_written_again() -> None:
    file = FaultyFile()
    writer, clock, _ = writer_for(file)
    # Half of the first line lands, then the disk is full, twice.
    file.script = [("short", 7), ("fail", errno.ENOSPC), ("short", 30), ("fail", errno.EIO)]
    writer.write_lines(numbered(0, 4))
    assert file.data == numbered(0, 1)[0][:7].encode()
    retry_until_written(clock, writer)
    assert file.lines() == numbered(0, 4), "no torn line, no line twice"


def test_a_line_cut_short_in_a_deleted_file_is_written_whole_in_the_new_one() -> None:
    file = FaultyFile()
    writer, clock, _ = writer_for(file)
    file.script = [("short", 7), ("fail", errno.ENOSPC)]
    writer.write_lines(numbered(0, 2))
    file.delete()
    retry_until_written(clock, writer)
    assert file.lines() == numbered(0, 2), "the line whole, not its headless tail"


def test_the_retries_back_off_up_to_a_cap() -> None:
    file = FaultyFile()
    writer, clock, _ = writer_for(file)
    file.failing = errno.EROFS
    writer.write_lines(numbered(0, 1))
    clock.advance(60.0)  # 60 s of a read-only file system: attempts at most RETRY_MAX_S apart
    for _ in range(100):
        clock.advance(tasklog.RETRY_MAX_S)
    attempts = file.attempts
    assert 100 <= attempts <= 100 + 60 / tasklog.RETRY_MAX_S + 10, attempts
    file.failing = None
    clock.advance(tasklog.RETRY_MAX_S)
    assert file.lines() == numbered(0, 1)


def test_past_the_bound_fetching_pauses_and_resumes_once_the_lines_are_out() -> None:
    file = FaultyFile()
    writer, clock, changes = writer_for(file, bound=10)
    file.failing = errno.ENOSPC
    for first in range(0, 9, 3):
        writer.write_lines(numbered(first, first + 3))
    assert not writer.pressing and writer.backlog == 9
    writer.write_lines(numbered(9, 10))
    assert writer.pressing, "the bound is reached: back-pressure"
    # Tasks that were running still finish: their lines are kept, past the bound.
    writer.write_lines(numbered(10, 25))
    assert writer.backlog == 25
    clock.advance(10.0)
    assert writer.pressing, "still unwritable"
    file.failing = None
    retry_until_written(clock, writer)
    assert not writer.pressing and writer.unwritable is None
    assert file.lines() == numbered(0, 25)
    assert changes == [
        ("No space left on device", False),
        ("No space left on device", True),
        (None, False),
    ]


def test_one_log_line_when_unwritable_and_one_when_it_recovers() -> None:
    file = FaultyFile()
    writer, clock, _ = writer_for(file, bound=1000)
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        file.failing = errno.ENOSPC
        writer.write_lines(numbered(0, 5))
        for _ in range(30):
            clock.advance(1.0)
        file.failing = None
        retry_until_written(clock, writer)
    finally:
        globalLogPublisher.removeObserver(events.append)
    ours = [e for e in events if e.get("log_namespace", "").startswith("taskserver.tasklog")]
    assert file.attempts > 10
    assert [e["log_level"] for e in ours] == [LogLevel.error, LogLevel.info], ours
    assert not any("log_failure" in e for e in ours), "no traceback"


def test_large_backlogs_go_out_in_bounded_writes() -> None:
    file = FaultyFile()
    writer, clock, _ = writer_for(file, bound=10**9)
    file.failing = errno.ENOSPC
    line = "x" * 999
    writer.write_lines([line] * 3000)  # about 3 MB
    file.failing = None
    attempts = file.attempts
    retry_until_written(clock, writer)
    assert file.attempts - attempts == 3
    assert file.lines() == [line] * 3000


def test_close_tries_once_more_and_says_what_is_lost() -> None:
    file = FaultyFile()
    writer, clock, _ = writer_for(file)
    file.failing = errno.ENOSPC
    writer.write_lines(numbered(0, 2))
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        writer.close()
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert file.closed and not clock.getDelayedCalls()
    assert any("lost" in e.get("log_format", "") and e.get("n") == 2 for e in events)


def test_drained_fires_once_the_waiting_lines_are_out() -> None:
    file = FaultyFile()
    writer, clock, _ = writer_for(file)
    assert writer.drained().called, "nothing waits"
    file.failing = errno.EIO
    writer.write_lines(numbered(0, 3))
    drained = writer.drained()
    clock.advance(5.0)
    assert not drained.called
    file.failing = None
    retry_until_written(clock, writer)
    assert drained.called and file.lines() == numbered(0, 3)


# ---------------------------------------------------------------- rotation that fails


def rotated_in_order(log_dir: Path) -> list[Path]:
    """tasks.log.10 ... tasks.log.1, tasks.log: oldest first, numbers compared as numbers."""

    def age(path: Path) -> int:
        suffix = path.name[len("tasks.log") :].lstrip(".")
        return int(suffix) if suffix else 0

    return sorted(log_dir.glob("tasks.log*"), key=age, reverse=True)


def all_lines(log_dir: Path) -> list[str]:
    return [line for path in rotated_in_order(log_dir) for line in path.read_text().splitlines()]


def failing_opens(monkeypatch: pytest.MonkeyPatch, error: int) -> dict[str, bool]:
    """While the returned switch is on, opening any file fails with ``error`` (EMFILE, ENOSPC)."""
    switch = {"on": False}
    real_open = os.open

    def open_or_fail(path: Any, *args: Any, **kwargs: Any) -> int:
        if switch["on"]:
            raise OSError(error, os.strerror(error))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(tasklog.os, "open", open_or_fail)
    return switch


def test_a_rotation_that_cannot_open_the_new_file_keeps_the_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No new tasks.log (EMFILE): nothing is renamed or lost; the lines wait, then go out once."""
    line_bytes = len(numbered(0, 1)[0]) + 1
    clock = Clock()
    changes: list[tuple[str | None, bool]] = []
    writer = TaskLogWriter(TaskLogFile(tmp_path, 5 * line_bytes), clock, bound=10)
    writer._on_change = lambda: changes.append((writer.unwritable, writer.pressing))
    for n in range(15):  # tasks.log.2, tasks.log.1 and tasks.log, full: the next line rotates
        writer.write_lines(numbered(n, n + 1))
    before = {path.name: path.read_text() for path in tmp_path.glob("tasks.log*")}
    assert sorted(before) == ["tasks.log", "tasks.log.1", "tasks.log.2"]
    opens = failing_opens(monkeypatch, errno.EMFILE)
    opens["on"] = True
    for n in range(15, 35):
        writer.write_lines(numbered(n, n + 1))
        clock.advance(0.05)
    writer.write_lines(numbered(35, 36))
    assert {path.name: path.read_text() for path in tmp_path.glob("tasks.log*")} == before, (
        "a failed rotation leaves every file as it was"
    )
    assert writer.backlog == 21 and writer.unwritable is not None and writer.pressing
    opens["on"] = False
    retry_until_written(clock, writer)
    assert writer.backlog == 0 and not writer.pressing and writer.unwritable is None
    assert all_lines(tmp_path) == numbered(0, 36), "all, in order, once"
    assert [pressing for _, pressing in changes] == [False, True, False]
    writer.close()


def test_a_backlog_rotates_as_it_drains_even_when_a_rotation_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A backlog written after a full disk rotates between its writes; a failed one only delays."""
    line_bytes = len(numbered(0, 1)[0]) + 1
    monkeypatch.setattr(tasklog, "MOST_BYTES_PER_WRITE", 5 * line_bytes)
    clock = Clock()
    writer = TaskLogWriter(TaskLogFile(tmp_path, 5 * line_bytes), clock, bound=1000)
    real_write, real_open = os.write, os.open
    disk_full = {"on": True}
    rotations = {"opened": 0}

    def write_or_fail(fd: int, data: Any) -> int:
        if disk_full["on"]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    def second_rotation_fails(path: Any, *args: Any, **kwargs: Any) -> int:
        if str(path).endswith(".next"):
            rotations["opened"] += 1
            if rotations["opened"] == 2:
                raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(tasklog.os, "write", write_or_fail)
    monkeypatch.setattr(tasklog.os, "open", second_rotation_fails)
    writer.write_lines(numbered(0, 30))
    assert writer.backlog == 30 and list(tmp_path.glob("tasks.log*")) == [tmp_path / "tasks.log"]
    disk_full["on"] = False
    clock.advance(tasklog.RETRY_FIRST_S)  # 5 lines, a rotation, 5 lines, a rotation that fails
    assert writer.backlog == 20 and writer.unwritable is not None
    assert all_lines(tmp_path) == numbered(0, 10)
    retry_until_written(clock, writer)
    assert writer.backlog == 0 and writer.unwritable is None
    assert all_lines(tmp_path) == numbered(0, 30), "all, in order, once"
    assert len(list(tmp_path.glob("tasks.log*"))) == 6
    writer.close()
