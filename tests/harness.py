"""Running the real ``twistd -n taskserver`` as a subprocess, for end-to-end tests.

The server runs the installed plugin from a scratch working directory (not
the source tree), the way a user runs it. Helpers here are synchronous:
they poll conditions with deadlines, never sleep-and-hope.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from taskserver.config import OPTIONS

TWISTD = str(Path(sys.executable).parent / "twistd")
TESTS_DIR = str(Path(__file__).parent)
LISTENING = re.compile(r"taskserver listening on (http://\S+?) ")
WORKER_STARTED = re.compile(r"worker-\d+ started \(pid (\d+)\)")
EMBEDDED_REDIS = re.compile(r"Redis: embedded \S+ \(pid (\d+)\)")
WORKER_READY = re.compile(r"worker-\d+ \(pid (\d+)\) ready")
TASK_LINE = re.compile(
    r'^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z user_id="(?:[^"\\]|\\.)*" '
    r"task_id=([0-9a-f]{32}) status=(completed|retrying|dead) duration_ms=\d+\.\d{3} pid=\d+"
    r'(?: type="(?:[^"\\]|\\.)*")?$'
)
#: A deadline, not an expectation: start-up takes a second or two, longer on a loaded machine.
START_TIMEOUT_S = 60.0
OPTION_VARIABLES = frozenset(option.env for option in OPTIONS)
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
        # The caller's settings only: none leak in from the environment that runs the tests.
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in OPTION_VARIABLES and not k.startswith(("REDIS_", "TASK_"))
        }
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

        self.url = wait_for(url, timeout=START_TIMEOUT_S, what="twistd listening")
        return self.url

    def worker_pids(self) -> list[int]:
        """Pids of every child the master has started so far."""
        return [int(pid) for pid in WORKER_STARTED.findall(self.output)]

    def redis_pid(self) -> int:
        """The embedded Redis's pid (its process title does not name our folders)."""
        match = EMBEDDED_REDIS.search(self.output)
        assert match, "no embedded Redis in the log"
        return int(match[1])

    def ready_pids(self) -> list[int]:
        """Pids of every child that has said it is ready, in order."""
        return [int(pid) for pid in WORKER_READY.findall(self.output)]

    def wait_until_ready(self, count: int) -> list[int]:
        """Wait until ``count`` children (in all) have been ready; returns their pids."""
        self.wait_until_listening()
        return wait_for(
            lambda: self.ready_pids() if len(self.ready_pids()) >= count else None,
            timeout=START_TIMEOUT_S,
            what=f"{count} ready children",
        )

    def post_task(self, user_id: str, idempotency_key: str | None = None) -> str | None:
        """POST a task; its id if accepted (202, or 200 for a replay), None otherwise."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        try:
            code, document = self.request("POST", "/api/v1/task", {"user_id": user_id}, headers)
        except OSError:
            return None
        return document["task_id"] if code in (200, 202) else None

    def spread(self, connections: int) -> Counter[int]:
        """Open ``connections`` at once, ask each which child serves it; count per pid."""
        port = int(self.url.rpartition(":")[2])
        sockets = [
            socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(connections)
        ]
        try:
            for sock in sockets:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            counts: Counter[int] = Counter()
            for sock in sockets:
                data = b""
                while not data.endswith(b"}\n"):
                    chunk = sock.recv(4096)
                    assert chunk, "connection closed before the answer"
                    data += chunk
                counts[int(re.search(rb'"pid":(\d+)', data)[1])] += 1  # type: ignore[index]
            return counts
        finally:
            for sock in sockets:
                sock.close()

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        timeout: float = 5.0,
    ) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            self.url + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json", **(headers or {})},
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def status_of(self, task_id: str) -> str | None:
        """The task's status; None if unknown or if the serving child died mid-request."""
        try:
            code, document = self.request("GET", f"/api/v1/task/{task_id}")
        except OSError:
            return None
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


def logged_task_ids(log_dir: Path) -> Counter[str]:
    """How often each task id appears in tasks.log and its rotations; every line must be whole.

    The text after the last newline is not judged: it is a write still being copied in
    (a read of a file may see part of a concurrent write(2)), and its line is whole on
    the next read.
    """
    counts: Counter[str] = Counter()
    for path in sorted(log_dir.glob("tasks.log*")):
        for line in path.read_text().split("\n")[:-1]:
            match = TASK_LINE.match(line)
            assert match, f"not a whole task line in {path.name}: {line!r}"
            counts[match[1]] += 1
    return counts


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError):
        state = Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0]
        if state == "Z":  # exited, not yet reaped by its parent
            return False
    return True


def wait_until_logged(log_dir: Path, task_ids: set[str], timeout: float = 30.0) -> Counter[str]:
    """Wait until every one of ``task_ids`` has a line in the task log; returns all counts."""

    def logged() -> Counter[str] | None:
        counts = logged_task_ids(log_dir)
        return counts if task_ids <= set(counts) else None

    return wait_for(logged, timeout=timeout, what=f"{len(task_ids)} tasks in the log")


class Load:
    """A bounded stream of POSTs from distinct users on a few threads (loopback only)."""

    def __init__(
        self, server: Twistd, threads: int = 4, limit: int = 400, users: str = "load"
    ) -> None:
        """``users`` names the users (``<users>-<n>``): give concurrent loads different ones."""
        self.server = server
        self._users = users
        self.accepted: list[str] = []
        self.failed = 0
        self._limit = limit
        self._next = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]
        for thread in self._threads:
            thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                if self._next >= self._limit:
                    return
                n, self._next = self._next, self._next + 1
            task_id = self.server.post_task(f"{self._users}-{os.getpid()}-{n}")
            with self._lock:
                if task_id:
                    self.accepted.append(task_id)
                else:
                    self.failed += 1

    def done(self) -> bool:
        return not any(thread.is_alive() for thread in self._threads)

    def finish(self, timeout: float = 60.0) -> None:
        for thread in self._threads:
            thread.join(timeout)
        self._stop.set()
