"""End to end: the real ``twistd -n taskserver`` as a subprocess, over loopback HTTP.

These run the installed plugin from a scratch working directory (not the
source tree), the way a user runs it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pytest

from taskserver.config import RedisAddress

TWISTD = str(Path(sys.executable).parent / "twistd")
TESTS_DIR = str(Path(__file__).parent)
LISTENING = re.compile(r"taskserver listening on (http://\S+?) ")
WORKER_STARTED = re.compile(r"worker-\d+ started \(pid (\d+)\)")
T = TypeVar("T")


def wait_for(check: Callable[[], T], timeout: float = 15.0, what: str = "condition") -> T:
    """Poll ``check`` until truthy; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.02)


class Twistd:
    """One ``twistd -n taskserver`` process in ``workdir``."""

    def __init__(self, workdir: Path, environ: dict[str, str]) -> None:
        self.workdir = workdir
        self.output_path = workdir / f"twistd-{time.monotonic_ns()}.out"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "TASK_"))}
        env.update({"PORT": "0", "INTERFACE": "127.0.0.1", "PYTHONPATH": TESTS_DIR, **environ})
        with open(self.output_path, "wb") as output:
            self.process = subprocess.Popen(
                [TWISTD, "--pidfile=", "-n", "taskserver"],
                cwd=workdir,
                env=env,
                stdout=output,
                stderr=subprocess.STDOUT,
            )

    @property
    def output(self) -> str:
        return self.output_path.read_text(errors="replace")

    def wait_until_listening(self) -> str:
        def url() -> str | None:
            if self.process.poll() is not None:
                raise AssertionError(f"twistd exited early:\n{self.output}")
            match = LISTENING.search(self.output)
            return match[1] if match else None

        self.url = wait_for(url, what="twistd listening")
        return self.url

    def worker_pids(self) -> list[int]:
        """Pids of every child the master has started so far."""
        return [int(pid) for pid in WORKER_STARTED.findall(self.output)]

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def status_of(self, task_id: str) -> str | None:
        code, document = self.request("GET", f"/api/v1/task/{task_id}")
        return document.get("status") if code == 200 else None

    def crash(self) -> None:
        """SIGKILL the master and every child at once: a host losing power, say."""
        for pid in [self.process.pid, *self.worker_pids()]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout)


@pytest.fixture
def twistd(tmp_path: Path) -> Iterator[Callable[..., Twistd]]:
    running: list[Twistd] = []

    def start(**environ: str) -> Twistd:
        server = Twistd(tmp_path, environ)
        running.append(server)
        return server

    yield start
    for server in running:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait(10)


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that mention ``text`` (e.g. a data folder)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if text in cmdline:
                found.append(cmdline)
    return found


def test_post_a_task_and_find_its_line_in_the_log(
    twistd: Callable[..., Twistd], tmp_path: Path
) -> None:
    """No Redis configured: the embedded one starts, the task is processed and logged."""
    server = twistd()
    server.wait_until_listening()
    assert "Redis: embedded" in server.output
    code, created = server.request("POST", "/api/v1/task", {"user_id": "user123"})
    assert code == 202, created
    task_id = created["task_id"]
    log = tmp_path / "logs" / "tasks.log"

    def logged() -> str | None:
        lines = log.read_text().splitlines() if log.exists() else []
        return next((line for line in lines if f"task_id={task_id}" in line), None)

    line = wait_for(logged, what="the task's log line")
    assert f'user_id="user123" task_id={task_id} status=completed' in line
    assert int(line.rpartition("pid=")[2]) in server.worker_pids()
    assert server.status_of(task_id) == "completed"
    assert (tmp_path / "logs" / "twistd.log").exists()

    assert server.stop() == 0
    assert processes_mentioning(str(tmp_path / "data")) == [], "embedded Redis left running"
    assert "taskserver stopped" in server.output


def test_invalid_configuration_stops_start_up_with_one_line(
    twistd: Callable[..., Twistd],
) -> None:
    server = twistd(CONCURRENCY="lots")
    assert server.process.wait(20) == 1
    assert server.output.strip() == (
        "taskserver: CONCURRENCY (--concurrency): expected a whole number, got 'lots'"
    )


def test_sigterm_returns_the_running_task_and_a_restart_completes_it(
    twistd: Callable[..., Twistd], tmp_path: Path
) -> None:
    """Graceful stop gives the unfinished task back; the embedded Redis's AOF keeps it."""
    first = twistd(TASK_HANDLER="sample_handlers:hang", SHUTDOWN_TIMEOUT="0.5")
    first.wait_until_listening()
    _, created = first.request("POST", "/api/v1/task", {"user_id": "patient"})
    task_id = created["task_id"]
    wait_for(lambda: first.status_of(task_id) == "processing", what="task processing")
    assert first.stop() == 0
    assert "gave 1 unfinished task(s) back to the queue" in first.output

    second = twistd()
    second.wait_until_listening()
    wait_for(lambda: second.status_of(task_id) == "completed", what="task completed after restart")
    lines = (tmp_path / "logs" / "tasks.log").read_text().splitlines()
    assert [line for line in lines if task_id in line and "status=completed" in line]
    assert second.stop() == 0


def test_a_crashed_instances_task_is_run_by_another(
    twistd: Callable[..., Twistd], redis_server: RedisAddress, tmp_path: Path
) -> None:
    """Two instances on one (external) Redis, as two hosts: the survivor reaps the dead one's task."""
    shared = {
        "REDIS_URL": f"redis://{redis_server.host}:{redis_server.port}/0",
        "KEY_PREFIX": f"e2e{time.monotonic_ns()}",
        "HEARTBEAT_TTL": "1",
    }
    doomed = twistd(TASK_HANDLER="sample_handlers:hang", **shared)
    doomed.wait_until_listening()
    _, created = doomed.request("POST", "/api/v1/task", {"user_id": "victim"})
    task_id = created["task_id"]
    wait_for(lambda: doomed.status_of(task_id) == "processing", what="task processing")
    doomed.crash()

    survivor = twistd(**shared)
    survivor.wait_until_listening()
    started = time.monotonic()
    wait_for(lambda: survivor.status_of(task_id) == "completed", what="task rerun by survivor")
    assert time.monotonic() - started < 5.0
    _, document = survivor.request("GET", f"/api/v1/task/{task_id}")
    assert document["attempts"] == 2
    assert survivor.stop() == 0


def test_simultaneous_requests_across_processes_admit_exactly_one(
    twistd: Callable[..., Twistd], redis_server: RedisAddress
) -> None:
    """40 requests of a new user at once, spread over two server processes: one 202."""
    shared = {
        "REDIS_URL": f"redis://{redis_server.host}:{redis_server.port}/0",
        "KEY_PREFIX": f"e2e{time.monotonic_ns()}",
    }
    servers = [twistd(**shared), twistd(**shared)]
    for server in servers:
        server.wait_until_listening()
    with ThreadPoolExecutor(max_workers=40) as pool:
        answers = list(
            pool.map(
                lambda n: servers[n % 2].request("POST", "/api/v1/task", {"user_id": "crowd"}),
                range(40),
            )
        )
    assert sorted(code for code, _ in answers) == [202] + [429] * 39
    for server in servers:
        assert server.stop() == 0
