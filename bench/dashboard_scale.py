"""``make bench``, part two: the dashboard and /metrics with 1,000,000 pending and 100,000 dead.

The issue's promise: at that scale every dashboard request answers in well
under a second (rq-dashboard took 5 s per request at 194k failed jobs). It
starts the real ``twistd -n taskserver`` (embedded Redis, loopback only),
whose children hold the one task each takes (so the queue stays full), fills
the queue and the dead letters with a few script calls, then times each
dashboard JSON endpoint and GET /metrics, 20 requests each, one at a time on
a kept-alive connection. It prints the median and the maximum of each and
exits 1 if any median is 0.5 s or more. Bounded: the server is stopped
whatever happens, and each step has a deadline.

``dashboard_scale:hold`` is also the TASK_HANDLER it runs the server with.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
PENDING = 1_000_000
DEAD = 100_000
#: Entries one fill call pushes: a call holds Redis up for a few tens of ms, not seconds.
FILL_BATCH = 50_000
REQUESTS = 20
MEDIAN_LIMIT_S = 0.5
PREFIX = "taskserver:{q}"

#: KEYS: the list. ARGV: first number, count, queued_at, dead (1: dead-letter entries).
#: Tasks as Task.to_json writes them; dead entries as lua/lib/dead_letter.lua does.
FILL = """
local first, count, queued_at, dead = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], ARGV[4]
local pad = string.rep('x', 150)
for n = first, first + count - 1 do
  local task = string.format(
    '{"id":"%08x%024d","user_id":"bench-%d","payload":{"n":%d,"pad":"%s"},'
    .. '"queued_at":"%s","attempts":0}', dead == '1' and 1 or 0, n, n % 1000, n, pad, queued_at)
  if dead == '1' then
    task = string.format('{"error":"RuntimeError: boom %d","attempts":3,"failed_at_ms":%d,'
      .. '"task":%s}', n, 1764600000000 + n, task)
  end
  redis.call('LPUSH', KEYS[1], task)
end
return redis.call('LLEN', KEYS[1])
"""


def hold(task: dict[str, Any]) -> Any:
    """The benchmark's handler: never finishes, so each consumer holds one task and no more."""
    from twisted.internet import defer

    return defer.Deferred()


def wait_for(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise SystemExit(f"dashboard_scale: {what} did not happen within {timeout} s")
        time.sleep(0.05)


class Server:
    """``twistd -n taskserver`` in a scratch directory, its children holding their tasks."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        twistd = str(Path(sys.executable).parent / "twistd")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "TASK_"))}
        env.update(
            {
                "PORT": "0",
                "INTERFACE": "127.0.0.1",
                "TASK_HANDLER": "dashboard_scale:hold",
                "TASK_TIMEOUT": "86400",
                "CONCURRENCY": "1",
                "SHUTDOWN_TIMEOUT": "1",
                "DEAD_LETTER_MAX": str(2 * DEAD),
                "PYTHONPATH": os.pathsep.join([str(BENCH), env.get("PYTHONPATH", "")]),
            }
        )
        for name in ("ADMIN_TOKEN", "METRICS_TOKEN", "DASHBOARD_READ_ONLY", "WORKERS"):
            env.pop(name, None)
        self.log = workdir / "twistd.out"
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(
                [twistd, "--pidfile=", "-n", "taskserver"],
                cwd=workdir,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_until_ready(self) -> int:
        def port() -> int | None:
            if self.process.poll() is not None:
                raise SystemExit(f"dashboard_scale: twistd exited:\n{self.output()}")
            text = self.output()
            if ") ready" not in text or "listening on http://" not in text:
                return None
            return int(text.split("listening on http://", 1)[1].split(" ", 1)[0].rsplit(":", 1)[1])

        return int(wait_for(port, 60, "taskserver ready"))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def fill(client: Any, key: str, count: int, dead: bool, queued_at: str) -> None:
    script = client.register_script(FILL)
    for first in range(0, count, FILL_BATCH):
        script(keys=[key], args=[first, min(FILL_BATCH, count - first), queued_at, int(dead)])


def script_calls(client: Any) -> tuple[int, int]:
    """Script calls so far and the microseconds Redis spent in them."""
    stats = client.info("commandstats")
    found = [stats.get(name, {}) for name in ("cmdstat_evalsha", "cmdstat_eval")]
    return sum(int(s.get("calls", 0)) for s in found), sum(int(s.get("usec", 0)) for s in found)


def get(connection: http.client.HTTPConnection, path: str) -> tuple[int, bytes, float]:
    started = time.perf_counter()
    connection.request("GET", path)
    response = connection.getresponse()
    body = response.read()
    return response.status, body, time.perf_counter() - started


def post(connection: http.client.HTTPConnection, path: str, csrf: str) -> tuple[int, float]:
    started = time.perf_counter()
    connection.request("POST", path, headers={"X-CSRF-Token": csrf, "Content-Length": "0"})
    response = connection.getresponse()
    response.read()
    return response.status, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=REQUESTS, help="per endpoint")
    arguments = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    import valkey

    from taskserver.cluster.embedded import read_embedded_address
    from taskserver.task import iso_utc

    with tempfile.TemporaryDirectory(prefix="taskserver-dashboard-bench-") as scratch:
        server = Server(Path(scratch))
        try:
            port = server.wait_until_ready()
            address = read_embedded_address(Path(scratch) / "data")
            assert address is not None, "the master writes the embedded Redis's address"
            client = valkey.Valkey(host=address.host, port=address.port, password=address.password)
            started = time.monotonic()
            queued_at = iso_utc(time.time() - 60)
            fill(client, f"{PREFIX}:pending", PENDING, False, queued_at)
            fill(client, f"{PREFIX}:dead", DEAD, True, queued_at)
            took = time.monotonic() - started
            print(f"filled {PENDING:,} pending and {DEAD:,} dead in {took:.1f} s", flush=True)
            results, (calls, usec) = measure(port, arguments.requests, client)
        finally:
            server.stop()
    print(report(results))
    print(
        f"\nthe requeues took {calls} script calls, {usec / max(1, calls) / 1000:.1f} ms of Redis"
        " time each on average (Redis answers nothing else while one runs)"
    )
    slow = [name for name, times in results.items() if statistics.median(times) >= MEDIAN_LIMIT_S]
    if slow:
        raise SystemExit(f"dashboard_scale: a median of {MEDIAN_LIMIT_S} s or more: {slow}")


def measure(
    port: int, requests: int, client: Any
) -> tuple[dict[str, list[float]], tuple[int, int]]:
    """The timings; and the script calls and Redis microseconds of the requeues."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    status, body, _ = get(connection, "/dashboard/api/overview")
    overview = json.loads(body)
    assert status == 200, body[:300]
    queue = overview["queue"]
    assert queue["pending"] + queue["processing"] == PENDING, queue  # each child holds one
    assert queue["dead"] == DEAD, queue
    dead = queue["dead"]
    connection.request(
        "POST",
        "/api/v1/task",
        body=json.dumps({"user_id": "bench-lookup"}),
        headers={"Content-Type": "application/json"},
    )
    response = connection.getresponse()
    task_id = json.loads(response.read())["task_id"]
    csrf = json.loads(get(connection, "/dashboard/api/session")[1])["csrf_token"]
    paths = {
        "overview": "/dashboard/api/overview",
        "dead, first page": "/dashboard/api/dead?offset=0&limit=50",
        "dead, last page": f"/dashboard/api/dead?offset={dead - 50}&limit=50",
        "task lookup": f"/dashboard/api/task/{task_id}",
        "session": "/dashboard/api/session",
        "/metrics": "/metrics",
    }
    results: dict[str, list[float]] = {name: [] for name in paths}
    for name, path in paths.items():
        for _ in range(requests):
            status, body, seconds = get(connection, path)
            assert status == 200, (name, status, body[:300])
            results[name].append(seconds)
    # The newest dead letters (the first page's first rows): where requeue's scan starts.
    newest = json.loads(get(connection, "/dashboard/api/dead?limit=5")[1])["items"]
    results["requeue one (newest)"] = []
    before = script_calls(client)
    for item in newest:
        status, seconds = post(connection, f"/dashboard/api/dead/{item['task_id']}/requeue", csrf)
        assert status == 200, ("requeue", status)
        results["requeue one (newest)"].append(seconds)
    # The oldest ones (the last page's last rows): the whole list scanned, ~1 MB a call.
    last = json.loads(get(connection, f"/dashboard/api/dead?offset={dead - 10}&limit=10")[1])
    results["requeue one (oldest)"] = []
    for item in last["items"][-5:]:
        status, seconds = post(connection, f"/dashboard/api/dead/{item['task_id']}/requeue", csrf)
        assert status == 200, ("requeue", status)
        results["requeue one (oldest)"].append(seconds)
    after = script_calls(client)
    connection.close()
    return results, (after[0] - before[0], after[1] - before[1])


def report(results: dict[str, list[float]]) -> str:
    lines = [
        f"dashboard at {PENDING:,} pending and {DEAD:,} dead "
        f"({os.cpu_count()} cores, {os.uname().sysname} {os.uname().release})",
        "",
        "| request | n | median ms | max ms |",
        "|---|---|---|---|",
    ]
    for name, times in results.items():
        lines.append(
            f"| {name} | {len(times)} | {statistics.median(times) * 1000:.1f} "
            f"| {max(times) * 1000:.1f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
