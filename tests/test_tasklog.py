"""The task log's line format, its single writer, and rotation."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

import pytest
from twisted.python import logfile

from taskserver.tasklog import TaskLog, TaskLogFile, task_line

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
    """One system call per write_lines(): counted where the bytes leave Python.

    The LogFile opens its file unbuffered, so each ``write`` of that raw file is
    one write(2); what the lines go through on their way there does not matter.
    """
    writes: list[int] = []

    class CountingFile(io.FileIO):
        def write(self, data: Any) -> int:
            writes.append(len(data))
            return super().write(data)

    def counting_open(path: str, mode: str, buffering: int) -> io.FileIO:
        assert buffering == 0, "unbuffered: one write(2) per write"
        return CountingFile(path, mode)

    monkeypatch.setattr(logfile, "open", counting_open, raising=False)
    log_file = TaskLogFile(tmp_path, 1_000_000)
    log_file.write_lines(["first line", "second line"])
    log_file.write_line("third line")
    log_file.close()
    assert writes == [len("first line\nsecond line\n"), len("third line\n")], "one per call"
    assert (tmp_path / "tasks.log").read_text() == "first line\nsecond line\nthird line\n"
