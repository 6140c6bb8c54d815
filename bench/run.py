"""``make bench``: taskserver against the floor, for 1 and for all workers, on loopback.

For each worker count it runs the floor (bench/floor.py) and then taskserver
(the real ``twistd -n taskserver``, embedded Redis, default settings), once
per DURABILITY mode (``write`` and ``fsync``, side by side), under the same
wrk load: 64 connections, every request from a distinct user. It
reports accepted requests/s, latency percentiles and non-2xx answers,
end-to-end tasks/s (accepted tasks over the time until the last one is in
the task log), the backlog when the load stops, CPU per accepted request
(server processes and Redis apart), Redis commands per accepted task
(INFO commandstats), and the connections each child held. Figures go to
bench-results/ and to standard output; ratios to the floor of the same run
are what to compare across runs.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import valkey

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from taskserver.cluster.embedded import (  # noqa: E402
    find_server_binary,
    read_embedded_address,
    server_arguments,
)

TICKS = os.sysconf("SC_CLK_TCK")
WORKER_STARTED = re.compile(r"worker-\d+ started \(pid (\d+)\)")
EMBEDDED_REDIS = re.compile(r"Redis: embedded \S+ \(pid (\d+)\) at [\d.]+:(\d+)")
LISTENING = re.compile(r"listening on http://\S+:(\d+)")


@dataclass
class Result:
    server: str
    workers: int
    #: taskserver's DURABILITY (and which Redis: the embedded one, or an external one).
    durability: str = "-"
    requests_per_s: float = 0.0
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p99_ms: float = 0.0
    requests: int = 0
    non_2xx: int = 0
    socket_errors: str = ""
    accepted: int = 0
    connections_per_child: list[int] = field(default_factory=list)
    server_cpu_ms_per_request: float = 0.0
    redis_cpu_ms_per_request: float = 0.0
    redis_calls_per_task: float = 0.0
    redis_round_trips_per_task: float = 0.0
    tasks_per_s_end_to_end: float = 0.0
    completed_during_load_pct: float = 0.0
    backlog_at_load_end: int = 0
    #: Requests held open in GET /api/v1/task/<id>?wait=60 during the load.
    open_waiters: int = 0
    #: ... of which answered before the load ended (should be none: their tasks never finish).
    waiters_answered_early: int = 0
    #: wrk's 64 connections per child, midway (``connections_per_child`` counts the waiters too).
    load_connections_per_child: list[int] = field(default_factory=list)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def cpu_ticks(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime + stime
    return total


def connections_per_pid(port: int) -> list[int]:
    """Established server-side connections on ``port``, counted per owning process."""
    out = subprocess.run(
        ["ss", "-tnpH", "state", "established", f"( sport = :{port} )"],
        capture_output=True,
        text=True,
    ).stdout
    counts: Counter[int] = Counter(int(pid) for pid in re.findall(r"pid=(\d+)", out))
    return sorted(counts.values(), reverse=True)


def load_connections_per_pid(port: int) -> list[int]:
    """Like :func:`connections_per_pid`, but only the connections wrk opened (not the waiters)."""
    query = ["ss", "-tnpH", "state", "established"]
    clients = subprocess.run([*query, f"( dport = :{port} )"], capture_output=True, text=True)
    wrk_ports = {
        fields[2].rsplit(":", 1)[1]
        for fields in map(str.split, clients.stdout.splitlines())
        if '(("wrk",' in fields[-1]
    }
    servers = subprocess.run([*query, f"( sport = :{port} )"], capture_output=True, text=True)
    counts: Counter[int] = Counter(
        int(pid)
        for fields in map(str.split, servers.stdout.splitlines())
        if fields[3].rsplit(":", 1)[1] in wrk_ports
        for pid in re.findall(r"pid=(\d+)", fields[-1])
    )
    return sorted(counts.values(), reverse=True)


def wait_for(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: {what} did not happen within {timeout} s")
        time.sleep(0.05)


def run_wrk(
    port: int, seconds: float, connections: int, on_midway: Any = None, script: str = "post.lua"
) -> dict[str, Any]:
    command = [
        "wrk", "-t2", f"-c{connections}", f"-d{int(seconds)}s", "--latency", "--timeout", "5s",
        "-s", str(ROOT / "bench" / script), f"http://127.0.0.1:{port}",
    ]  # fmt: skip
    wrk = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    midway = None
    if on_midway is not None:
        time.sleep(seconds / 2)  # the benchmark's own schedule: sample halfway through
        midway = on_midway()
    out, _ = wrk.communicate(timeout=seconds + 30)
    return {"text": out, "midway": midway, **parse_wrk(out)}


def parse_wrk(text: str) -> dict[str, Any]:
    def latency(label: str) -> float:
        match = re.search(rf"^\s+{label}\s+([\d.]+)(us|ms|s)\s*$", text, re.MULTILINE)
        if not match:
            return 0.0
        value, unit = float(match[1]), match[2]
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    requests = int(re.search(r"(\d+) requests in", text)[1])  # type: ignore[index]
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    errors = re.search(r"Socket errors: (.*)", text)
    return {
        "requests": requests,
        "requests_per_s": float(re.search(r"Requests/sec:\s+([\d.]+)", text)[1]),  # type: ignore[index]
        "p50_ms": latency("50%"),
        "p90_ms": latency("90%"),
        "p99_ms": latency("99%"),
        "non_2xx": int(non_2xx[1]) if non_2xx else 0,
        "socket_errors": errors[1].strip() if errors else "",
    }


def commandstats(client: valkey.Valkey) -> dict[str, int]:
    return {name: int(stats["calls"]) for name, stats in client.info("commandstats").items()}


#: Commands a client sends itself; the others in commandstats run inside scripts.
CLIENT_COMMANDS = {
    "cmdstat_evalsha", "cmdstat_eval", "cmdstat_brpoplpush", "cmdstat_lrem", "cmdstat_hmget",
    "cmdstat_smembers", "cmdstat_ping", "cmdstat_del", "cmdstat_select", "cmdstat_auth",
}  # fmt: skip


class Redis:
    """A Redis-protocol server like the embedded one (AOF, noeviction), for the floor."""

    def __init__(self, workdir: Path, appendfsync: str = "everysec") -> None:
        self.port = free_port()
        (workdir / "redis").mkdir()
        self.process = subprocess.Popen(
            server_arguments(
                find_server_binary(None), self.port, workdir / "redis", appendfsync=appendfsync
            ),
            stdout=subprocess.DEVNULL,
        )
        self.client = valkey.Valkey(port=self.port)
        wait_for(self._ping, 10, "the floor's Redis")

    def _ping(self) -> bool:
        try:
            return bool(self.client.ping())
        except valkey.ConnectionError:
            return False

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(20)


def bench_floor(workers: int, seconds: float, workdir: Path) -> Result:
    redis = Redis(workdir)
    port = free_port()
    log = open(workdir / "floor.out", "w+")  # noqa: SIM115
    floor = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "floor.py"), "--port", str(port),
         "--workers", str(workers), "--redis-port", str(redis.port)],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    try:
        wait_for(lambda: Path(log.name).read_text().count("ready") >= workers, 30, "floor ready")
        pids = [floor.pid, *map(int, WORKER_STARTED.findall(Path(log.name).read_text()))]
        run_wrk(port, 2, 64)  # warm-up
        result = Result("floor", workers)
        before = (cpu_ticks(pids), cpu_ticks([redis.process.pid]), redis.client.llen("floor:queue"))
        out = run_wrk(port, seconds, 64, on_midway=lambda: connections_per_pid(port))
        server_cpu = cpu_ticks(pids) - before[0]
        redis_cpu = cpu_ticks([redis.process.pid]) - before[1]
        result.accepted = redis.client.llen("floor:queue") - before[2]
        fill(result, out, server_cpu, redis_cpu)
        return result
    finally:
        floor.send_signal(signal.SIGTERM)
        floor.wait(20)
        redis.stop()


class Waiters:
    """``count`` connections, each in ``GET /api/v1/task/<id>?wait=60`` of a scheduled task.

    The records are written straight into Redis (a scheduled task far ahead, never due):
    nothing finishes them, so each request stays open until :meth:`close`.
    """

    def __init__(self, port: int, client: valkey.Valkey, count: int) -> None:
        ids = [uuid.uuid4().hex for _ in range(count)]
        with client.pipeline(transaction=False) as pipe:
            for task_id in ids:
                key = f"taskserver:{{q}}:task:{task_id}"
                pipe.hset(key, mapping={"status": "scheduled", "user_id": "bench", "attempts": 0})
                pipe.expire(key, 600)
            pipe.execute()
        self.sockets: list[socket.socket] = []
        for task_id in ids:
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(f"GET /api/v1/task/{task_id}?wait=60 HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            self.sockets.append(sock)

    def answered(self) -> int:
        """How many have an answer already (a readable socket)."""
        poller = select.poll()
        for sock in self.sockets:
            poller.register(sock, select.POLLIN)
        return len(poller.poll(0))

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


def bench_taskserver(
    workers: int,
    seconds: float,
    workdir: Path,
    durability: str,
    external: str | None,
    waiters: int = 0,
) -> Result:
    """``external``: run on a Redis of our own with that ``appendfsync`` (REDIS_URL), not the
    embedded one; there ``fsync`` is a WAITAOF after each turn's script. ``waiters``:
    requests held open in a wait (:class:`Waiters`) during the load."""
    twistd = str(Path(sys.executable).parent / "twistd")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "TASK_"))}
    env.update({"PORT": "0", "INTERFACE": "127.0.0.1", "WORKERS": str(workers)})
    env["DURABILITY"] = durability
    own_redis = Redis(workdir, external) if external else None
    if own_redis is not None:
        env["REDIS_URL"] = f"redis://127.0.0.1:{own_redis.port}/0"
    if waiters:  # their connections, beside wrk's, and room for them all in one child
        env["MAX_CONNECTIONS"] = str(waiters + 1000)
        env["MAX_WAITERS"] = str(waiters + 1000)
    env["TASK_LOG_MAX_BYTES"] = str(10**10)  # one file to count lines in: no rotation mid-run
    log = open(workdir / "twistd.out", "w+")  # noqa: SIM115
    server = subprocess.Popen(
        [twistd, "--pidfile=", "-n", "taskserver"], cwd=workdir, env=env,
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    tasks_log = workdir / "logs" / "tasks.log"

    def lines() -> int:
        return sum(1 for _ in tasks_log.open()) if tasks_log.exists() else 0

    try:
        output = lambda: Path(log.name).read_text()  # noqa: E731
        wait_for(lambda: output().count(") ready") >= workers, 60, "taskserver ready")
        port = int(LISTENING.search(output())[1])  # type: ignore[index]
        if own_redis is not None:
            redis_pid, client = own_redis.process.pid, own_redis.client
        else:
            redis_pid, redis_port = map(int, EMBEDDED_REDIS.search(output()).groups())  # type: ignore[union-attr]
            embedded = read_embedded_address(workdir / "data")  # its password
            password = embedded.password if embedded else None
            client = valkey.Valkey(port=redis_port, password=password)
        pids = [server.pid, *map(int, WORKER_STARTED.findall(output()))]
        run_wrk(port, 2, 64)  # warm-up
        wait_for(lambda: client.llen("taskserver:{q}:pending") == 0, 60, "warm-up drained")
        where = f", external Redis (appendfsync {external})" if external else ""
        where += f", {waiters} open waiters" if waiters else ""
        result = Result("taskserver", workers, durability + where)
        held = Waiters(port, client, waiters) if waiters else None
        if held is not None:
            time.sleep(2)  # pacing: let the children read the 5,000 requests before the load
        before_lines, before_calls = lines(), commandstats(client)
        before_cpu = (cpu_ticks(pids), cpu_ticks([redis_pid]))
        started = time.monotonic()
        out = run_wrk(
            port,
            seconds,
            64,
            on_midway=lambda: (connections_per_pid(port), load_connections_per_pid(port)),
        )
        out["midway"], result.load_connections_per_child = out["midway"]
        result.backlog_at_load_end = int(client.llen("taskserver:{q}:pending"))
        if held is not None:
            result.open_waiters = waiters
            result.waiters_answered_early = held.answered()
            held.close()
        done_during_load = lines() - before_lines
        accepted = out["requests"] - out["non_2xx"]
        wait_for(lambda: lines() - before_lines >= accepted, 120, "every task in the log")
        drained = time.monotonic() - started
        server_cpu = cpu_ticks(pids) - before_cpu[0]
        redis_cpu = cpu_ticks([redis_pid]) - before_cpu[1]
        calls = {k: v - before_calls.get(k, 0) for k, v in commandstats(client).items()}
        result.accepted = accepted
        fill(result, out, server_cpu, redis_cpu)
        result.tasks_per_s_end_to_end = accepted / drained
        result.completed_during_load_pct = 100 * done_during_load / max(1, accepted)
        result.redis_calls_per_task = sum(calls.values()) / max(1, accepted)
        result.redis_round_trips_per_task = sum(
            v for k, v in calls.items() if k in CLIENT_COMMANDS
        ) / max(1, accepted)
        return result
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
        if own_redis is not None:
            own_redis.stop()


@dataclass
class BatchResult:
    """Accepted tasks/s of single POSTs and of 100-task batches, on the same server."""

    workers: int
    single_tasks_per_s: float = 0.0
    batch_tasks_per_s: float = 0.0
    batch_requests_per_s: float = 0.0
    batch_p99_ms: float = 0.0
    batch_non_2xx: int = 0
    #: CPU time per accepted task (master and children; embedded Redis): what the
    #: figures above cost, less sensitive than throughput to other load on the machine.
    single_server_cpu_us_per_task: float = 0.0
    single_redis_cpu_us_per_task: float = 0.0
    batch_server_cpu_us_per_task: float = 0.0
    batch_redis_cpu_us_per_task: float = 0.0

    @property
    def ratio(self) -> float:
        return self.batch_tasks_per_s / max(1.0, self.single_tasks_per_s)


#: Batches in flight: each carries 100 tasks, so fewer connections than single POSTs.
BATCH_CONNECTIONS = 16
ACCEPTED_TASKS = re.compile(r"^accepted tasks: (\d+)$", re.MULTILINE)


def bench_batches(workers: int, seconds: float, workdir: Path) -> BatchResult:
    """One taskserver (DURABILITY write, embedded Redis): single POSTs, then 100-task
    batches (bench/post_batch.lua), each item from a distinct user, under the same load."""
    twistd = str(Path(sys.executable).parent / "twistd")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "TASK_"))}
    env.update({"PORT": "0", "INTERFACE": "127.0.0.1", "WORKERS": str(workers)})
    env["TASK_LOG_MAX_BYTES"] = str(10**10)
    log = open(workdir / "twistd.out", "w+")  # noqa: SIM115
    server = subprocess.Popen(
        [twistd, "--pidfile=", "-n", "taskserver"], cwd=workdir, env=env,
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        output = lambda: Path(log.name).read_text()  # noqa: E731
        wait_for(lambda: output().count(") ready") >= workers, 60, "taskserver ready")
        port = int(LISTENING.search(output())[1])  # type: ignore[index]
        redis_pid, redis_port = map(int, EMBEDDED_REDIS.search(output()).groups())  # type: ignore[union-attr]
        pids = [server.pid, *map(int, WORKER_STARTED.findall(output()))]
        embedded = read_embedded_address(workdir / "data")
        client = valkey.Valkey(port=redis_port, password=embedded.password if embedded else None)

        def drained() -> bool:
            return client.llen("taskserver:{q}:pending") == 0

        result = BatchResult(workers)
        run_wrk(port, 2, 64)  # warm-up
        wait_for(drained, 120, "warm-up drained")

        def cpu_us_per_task(before: tuple[int, int], tasks: int) -> tuple[float, float]:
            per_task = 1e6 / TICKS / max(1, tasks)
            server_ticks = cpu_ticks(pids) - before[0]
            return server_ticks * per_task, (cpu_ticks([redis_pid]) - before[1]) * per_task

        before = (cpu_ticks(pids), cpu_ticks([redis_pid]))
        single = run_wrk(port, seconds, 64)
        single_accepted = single["requests"] - single["non_2xx"]
        result.single_tasks_per_s = single_accepted / int(seconds)
        (
            result.single_server_cpu_us_per_task,
            result.single_redis_cpu_us_per_task,
        ) = cpu_us_per_task(before, single_accepted)
        wait_for(drained, 300, "single POSTs drained")
        before = (cpu_ticks(pids), cpu_ticks([redis_pid]))
        batch = run_wrk(port, seconds, BATCH_CONNECTIONS, script="post_batch.lua")
        accepted = ACCEPTED_TASKS.search(batch["text"])
        if accepted is None:
            raise SystemExit(f"bench: wrk printed no accepted tasks:\n{batch['text']}")
        result.batch_tasks_per_s = int(accepted[1]) / int(seconds)
        (
            result.batch_server_cpu_us_per_task,
            result.batch_redis_cpu_us_per_task,
        ) = cpu_us_per_task(before, int(accepted[1]))
        result.batch_requests_per_s = batch["requests_per_s"]
        result.batch_p99_ms = batch["p99_ms"]
        result.batch_non_2xx = batch["non_2xx"]
        wait_for(drained, 300, "batches drained")
        return result
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)


def batch_report(results: list[BatchResult]) -> str:
    lines = [
        "| workers | single POSTs: accepted tasks/s | 100-task batches: accepted tasks/s "
        "| batches/s | batch p99 ms | non-2xx | batch / single "
        "| CPU us/task during the load, single: server + Redis | batch: server + Redis |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.workers} | {r.single_tasks_per_s:,.0f} | {r.batch_tasks_per_s:,.0f} "
            f"| {r.batch_requests_per_s:,.0f} | {r.batch_p99_ms:.1f} | {r.batch_non_2xx} "
            f"| {r.ratio:.1f} x "
            f"| {r.single_server_cpu_us_per_task:.0f} + {r.single_redis_cpu_us_per_task:.0f} "
            f"| {r.batch_server_cpu_us_per_task:.0f} + {r.batch_redis_cpu_us_per_task:.0f} |"
        )
    return "\n".join(lines)


def fill(result: Result, out: dict[str, Any], server_ticks: int, redis_ticks: int) -> None:
    for name in (
        "requests_per_s",
        "p50_ms",
        "p90_ms",
        "p99_ms",
        "requests",
        "non_2xx",
        "socket_errors",
    ):
        setattr(result, name, out[name])
    result.connections_per_child = out["midway"] or []
    per_request = 1000 / TICKS / max(1, result.accepted)
    result.server_cpu_ms_per_request = server_ticks * per_request
    result.redis_cpu_ms_per_request = redis_ticks * per_request


def report(results: list[Result]) -> str:
    lines = [
        "| server | workers | durability | accepted req/s | p50 / p90 / p99 ms | non-2xx "
        "| conns per child | server CPU ms/req | Redis CPU ms/req | Redis calls/task (round trips) "
        "| tasks/s end to end | done during load | backlog at end |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    floors = {r.workers: r for r in results if r.server == "floor"}
    for r in results:
        ratio = ""
        if r.server == "taskserver" and r.workers in floors:
            ratio = f" ({r.requests_per_s / floors[r.workers].requests_per_s:.2f} x floor)"
        e2e = f"{r.tasks_per_s_end_to_end:,.0f}" if r.server == "taskserver" else "-"
        load_conns = (
            f" (wrk's: {'/'.join(map(str, r.load_connections_per_child))})"
            if r.open_waiters
            else ""
        )
        lines.append(
            f"| {r.server} | {r.workers} | {r.durability} | {r.requests_per_s:,.0f}{ratio} "
            f"| {r.p50_ms:.1f} / {r.p90_ms:.1f} / {r.p99_ms:.1f} | {r.non_2xx} "
            f"| {'/'.join(map(str, r.connections_per_child))}{load_conns} "
            f"| {r.server_cpu_ms_per_request:.3f} | {r.redis_cpu_ms_per_request:.3f} "
            f"| {r.redis_calls_per_task:.1f} ({r.redis_round_trips_per_task:.1f}) | {e2e} "
            f"| {r.completed_during_load_pct:.0f} % | {r.backlog_at_load_end} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="load per run")
    parser.add_argument("--workers", default=f"1,{os.cpu_count() or 1}")
    parser.add_argument(
        "--durability", default="write,fsync", help="taskserver's DURABILITY modes, side by side"
    )
    parser.add_argument(
        "--external-redis",
        choices=("everysec", "always"),
        help="run taskserver on a Redis of the bench's own with this appendfsync, not the embedded",
    )
    parser.add_argument("--no-floor", action="store_true", help="taskserver only")
    parser.add_argument(
        "--waiters",
        type=int,
        default=5000,
        help="also run each mode with this many open GET ...?wait=60 (0: not)",
    )
    parser.add_argument(
        "--batch-only", action="store_true", help="only the batch run (single POSTs vs batches)"
    )
    arguments = parser.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("bench: wrk is missing: apt-get install wrk (Debian's package)")
    counts = sorted({int(n) for n in arguments.workers.split(",")})
    results = []
    modes = [mode.strip() for mode in arguments.durability.split(",") if mode.strip()]
    for workers in [] if arguments.batch_only else counts:
        runs: list[Callable[[Path], Result]] = (
            []
            if arguments.no_floor
            else [functools.partial(bench_floor, workers, arguments.seconds)]
        )
        runs += [
            functools.partial(
                bench_taskserver, workers, arguments.seconds,
                durability=mode, external=arguments.external_redis,
            )
            for mode in modes
        ]  # fmt: skip
        if arguments.waiters:
            runs += [
                functools.partial(
                    bench_taskserver, workers, arguments.seconds, durability=modes[0],
                    external=arguments.external_redis, waiters=arguments.waiters,
                )
            ]  # fmt: skip
        for run in runs:
            with tempfile.TemporaryDirectory(prefix="taskserver-bench-") as workdir:
                result = run(Path(workdir))
                print(
                    f"{result.server} ({result.durability}), {workers} worker(s): "
                    f"{result.requests_per_s:,.0f} req/s, p99 {result.p99_ms:.1f} ms"
                    + (
                        f", {result.waiters_answered_early} of {result.open_waiters} waiters "
                        "answered before the load ended, wrk's connections per child "
                        + "/".join(map(str, result.load_connections_per_child))
                        if result.open_waiters
                        else ""
                    ),
                    flush=True,
                )
                results.append(result)
    batches = []
    for workers in counts:
        with tempfile.TemporaryDirectory(prefix="taskserver-bench-") as workdir:
            batches.append(bench_batches(workers, arguments.seconds, Path(workdir)))
            print(f"batches, {workers} worker(s): {batches[-1].ratio:.1f} x single", flush=True)
    table = (report(results) + "\n\n" if results else "") + batch_report(batches)
    stamp = time.strftime("%Y-%m-%dT%H%M%S")
    out_dir = ROOT / "bench-results"
    out_dir.mkdir(exist_ok=True)
    machine = f"{os.cpu_count()} cores, {os.uname().sysname} {os.uname().release}"
    (out_dir / f"{stamp}.json").write_text(
        json.dumps(
            {
                "when": stamp,
                "machine": machine,
                "results": [asdict(r) for r in results],
                "batches": [asdict(r) for r in batches],
            },
            indent=2,
        )
    )
    (out_dir / f"{stamp}.md").write_text(f"{stamp}, {machine}\n\n{table}\n")
    print(f"\n{stamp}, {machine}\n\n{table}\n\n(written to bench-results/{stamp}.md and .json)")


if __name__ == "__main__":
    main()
