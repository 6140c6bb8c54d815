"""The task log on a full disk: a real cluster with LOG_DIR on a 256 KB tmpfs.

Fill the file system, send tasks: the lines wait in the master, past the
bound the workers stop fetching and /readyz says why; free it: every
accepted task's line is in the log exactly once, each worker's lines in
the order it finished them, and /readyz is 200 again. Needs a tmpfs mount
(root, or a machine that allows it); skipped with the reason otherwise.
Every wait has a deadline; together they stay under 60 s after start-up.
"""

from __future__ import annotations

import contextlib
import errno
import re
import subprocess
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from harness import TASK_LINE, Load, Twistd, logged_task_ids, wait_for, wait_until_logged
from taskserver.tasklog import TASK_LOG_BACKLOG_LINES, task_line

#: Past the bound, so the workers must stop with tasks queued; all lines fit in 256 KB.
TASKS = TASK_LOG_BACKLOG_LINES + 200
WORKERS = 2
CONCURRENCY = 4
LINE_PID = re.compile(r" pid=(\d+)$")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 KB tmpfs at tmp_path/logs, unmounted afterwards whatever happens."""
    mount_point = tmp_path / "logs"
    mount_point.mkdir()
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount_point)],
            check=True,
            capture_output=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", b"") or b""
        pytest.skip(f"cannot mount a tmpfs here ({e} {detail.decode(errors='replace').strip()})")
    try:
        yield mount_point
    finally:
        result = subprocess.run(["umount", str(mount_point)], capture_output=True, timeout=10)
        if result.returncode:  # something still holds a file there: detach it anyway
            subprocess.run(["umount", "-l", str(mount_point)], capture_output=True, timeout=10)


def fill(disk: Path) -> Path:
    """Write a filler file until the file system refuses more; returns it."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as out:
        try:
            while True:
                out.write(b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
        with contextlib.suppress(OSError):
            while True:
                out.write(b"\0")
    return filler


def readyz(server: Twistd) -> tuple[int, dict[str, str]]:
    try:
        return server.request("GET", "/readyz")
    except OSError:
        return 0, {}


def test_a_full_disk_delays_lines_never_loses_them(
    twistd: Callable[..., Twistd], small_disk: Path
) -> None:
    server = twistd(
        LOG_DIR=str(small_disk),
        WORKERS=str(WORKERS),
        CONCURRENCY=str(CONCURRENCY),
        TASK_HANDLER="sample_handlers:slow",
        SLOW_HANDLER_S="0.001",
    )
    try:
        server.wait_until_ready(WORKERS)
        filler = fill(small_disk)
        load = Load(server, threads=4, limit=TASKS, users="fulldisk")
        load.finish(timeout=15)
        assert load.done() and len(load.accepted) == TASKS, f"{load.failed} POSTs failed"

        _, document = wait_for(
            lambda: (answer := readyz(server))[0] == 503 and answer,
            timeout=10,
            what="/readyz answering 503 once the bound is reached",
        )
        assert document["error"] == "task_log_unwritable", document
        assert "task log" in document["message"]
        # Back-pressure, not loss: tasks are still waiting in the queue, unfetched.
        statuses = [server.status_of(task_id) for task_id in load.accepted[-50:]]
        assert "queued" in statuses, statuses
        assert logged_task_ids(small_disk) == {}, "nothing reached the full disk"

        filler.unlink()
        counts = wait_until_logged(small_disk, set(load.accepted), timeout=15)
        assert set(counts) == set(load.accepted)
        assert [t for t, n in counts.items() if n != 1] == [], "each line exactly once"
        wait_for(
            lambda: all(readyz(server)[0] == 200 for _ in range(6)),
            timeout=5,
            what="/readyz 200 again on every worker",
        )
        assert_in_order_per_worker(small_disk)
        wait_for(
            lambda: write_errors(server) >= 1,
            timeout=5,
            what="taskserver_task_log_write_errors_total counted in /metrics",
        )
        assert_logged_once(server.output, THE_OUTAGE_LOG_LINES)
    finally:
        server.stop()


def write_errors(server: Twistd) -> float:
    with urllib.request.urlopen(server.url + "/metrics", timeout=5) as response:
        text = response.read().decode()
    match = re.search(r"^taskserver_task_log_write_errors_total (\S+)$", text, re.MULTILINE)
    return float(match[1]) if match else 0.0


#: The outage's three lines in twistd.log (tasklog.TaskLogWriter): unwritable, pressing, recovered.
THE_OUTAGE_LOG_LINES = (
    "cannot be written (No space left on device): its lines are kept and retried",
    "task-log lines wait to be written: the workers stop fetching until they are",
    "the task log is writable again after",
)


def assert_logged_once(output: str, fragments: tuple[str, ...]) -> None:
    counts = {fragment: output.count(fragment) for fragment in fragments}
    assert all(n == 1 for n in counts.values()), f"each line once: {counts}\n{output}"


def oldest_first(log_dir: Path) -> list[Path]:
    """tasks.log.10 ... tasks.log.2, tasks.log.1, tasks.log: rotated numbers compared as numbers."""

    def age(path: Path) -> int:
        number = path.name.removeprefix("tasks.log").lstrip(".")
        return int(number) if number else 0

    return sorted(log_dir.glob("tasks.log*"), key=age, reverse=True)


def assert_in_order_per_worker(log_dir: Path) -> None:
    """Each worker's lines are in the order it finished its tasks (their timestamps)."""
    finished: dict[str, list[str]] = defaultdict(list)
    for path in oldest_first(log_dir):
        for line in path.read_text().splitlines():
            assert TASK_LINE.match(line), line
            match = LINE_PID.search(line)
            assert match, line
            finished[match[1]].append(line.split(" ", 1)[0])
    assert len(finished) == WORKERS
    for pid, stamps in finished.items():
        assert stamps == sorted(stamps), f"worker {pid}'s lines out of order"


def test_rotated_files_are_read_oldest_first_by_number(tmp_path: Path) -> None:
    """tasks.log.10 is older than tasks.log.2 (a text sort puts it first the wrong way)."""
    for number, name in enumerate(["tasks.log", *(f"tasks.log.{n}" for n in range(1, 11))]):
        stamp = 1_795_813_218.0 - number
        (tmp_path / name).write_text(
            "".join(
                task_line(
                    finished=stamp + pid / 10,
                    user_id="u",
                    task_id=f"{number:032x}",
                    status="completed",
                    duration_ms=1,
                    pid=pid,
                )
                + "\n"
                for pid in range(1, WORKERS + 1)
            )
        )
    assert [path.name for path in oldest_first(tmp_path)][:3] == [
        "tasks.log.10",
        "tasks.log.9",
        "tasks.log.8",
    ]
    assert_in_order_per_worker(tmp_path)


def test_each_outage_line_must_be_logged_exactly_once() -> None:
    once = "\n".join(THE_OUTAGE_LOG_LINES)
    assert_logged_once(once, THE_OUTAGE_LOG_LINES)
    for missing_or_twice in (once.replace(THE_OUTAGE_LOG_LINES[1], ""), once + "\n" + once):
        with pytest.raises(AssertionError):
            assert_logged_once(missing_or_twice, THE_OUTAGE_LOG_LINES)
