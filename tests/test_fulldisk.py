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
from taskserver.tasklog import TASK_LOG_BACKLOG_LINES

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
        output = server.output
        assert output.count("the task log") and output.count("cannot be written") == 1, output
        assert output.count("is writable again") == 1
        assert output.count("workers stop fetching until") == 1
    finally:
        server.stop()


def write_errors(server: Twistd) -> float:
    with urllib.request.urlopen(server.url + "/metrics", timeout=5) as response:
        text = response.read().decode()
    match = re.search(r"^taskserver_task_log_write_errors_total (\S+)$", text, re.MULTILINE)
    return float(match[1]) if match else 0.0


def assert_in_order_per_worker(log_dir: Path) -> None:
    """Each worker's lines are in the order it finished its tasks (their timestamps)."""
    finished: dict[str, list[str]] = defaultdict(list)
    for path in sorted(log_dir.glob("tasks.log*"), reverse=True):  # .1 is older than tasks.log
        for line in path.read_text().splitlines():
            assert TASK_LINE.match(line), line
            match = LINE_PID.search(line)
            assert match, line
            finished[match[1]].append(line.split(" ", 1)[0])
    assert len(finished) == WORKERS
    for pid, stamps in finished.items():
        assert stamps == sorted(stamps), f"worker {pid}'s lines out of order"
