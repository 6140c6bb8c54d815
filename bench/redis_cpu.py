"""``make bench``, part three: Redis CPU per task, so how many tasks/s one primary carries.

The queue lives in one hash slot (``{q}``), so one Redis primary carries all
of it, and Redis runs every command and script on one thread: that thread's
CPU per task sets the ceiling. This starts the real ``twistd -n taskserver``
(embedded Redis, default settings, 2 children) on loopback and, for a few
rounds, reads the embedded Redis's ``INFO cpu`` before and after:

- **running**: a bounded wrk load of POSTs (distinct users) with the consumers
  running, then until every accepted task is in the task log: CPU over tasks
  completed (admission, fetch, start, completion: a task's whole life);
- **admit only**: the same load with the consumers held (the handler waits on a
  gate file, so each child holds CONCURRENCY tasks and fetches no more): CPU
  over tasks accepted;
- **drain**: the gate opens and the consumers run the backlog: CPU over tasks
  completed.

``used_cpu_sys + used_cpu_user`` (all of Redis's threads) and the same for the
main thread alone (``used_cpu_*_main_thread``), which is the one that cannot
be spread over cores. It prints each round and the medians, and the tasks/s
one primary's main thread could carry at 100 % (and at 50 %) of one core.
The background (timers: promote, heartbeats, metrics) is measured idle
and shown, not subtracted. Bounded: each load is ``--seconds`` long, each
wait has a deadline, the server is stopped whatever happens.

``redis_cpu:gated`` is also the TASK_HANDLER it runs the server with.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import valkey

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))

from run import EMBEDDED_REDIS, LISTENING, run_wrk, wait_for  # noqa: E402

from taskserver.cluster.embedded import read_embedded_address  # noqa: E402

PENDING = "taskserver:{q}:pending"
GATE_ENV = "REDIS_CPU_GATE"


def gated(task: dict[str, Any]) -> Any:
    """The benchmark's handler: finishes at once if the gate file exists, else once it does."""
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    gate = os.environ[GATE_ENV]

    def check() -> Any:
        if os.path.exists(gate):
            return None
        return deferLater(reactor, 0.05, check)  # type: ignore[arg-type]

    return check()


@dataclass
class Cpu:
    """Redis's CPU seconds so far: all threads, and the main thread alone."""

    total: float
    main: float

    @classmethod
    def read(cls, client: valkey.Valkey) -> Cpu:
        info = client.info("cpu")
        return cls(
            float(info["used_cpu_sys"]) + float(info["used_cpu_user"]),
            float(info["used_cpu_sys_main_thread"]) + float(info["used_cpu_user_main_thread"]),
        )

    def __sub__(self, other: Cpu) -> Cpu:
        return Cpu(self.total - other.total, self.main - other.main)


@dataclass
class Phase:
    name: str
    tasks: int
    seconds: float
    cpu_ms_per_task: float
    main_ms_per_task: float
    requests_per_s: float = 0.0


class Server:
    """``twistd -n taskserver`` in a scratch directory, on its embedded Redis."""

    def __init__(self, workdir: Path, workers: int) -> None:
        self.workdir = workdir
        self.gate = workdir / "gate"
        twistd = str(Path(sys.executable).parent / "twistd")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "TASK_"))}
        for name in ("DURABILITY", "WAIT_REPLICAS", "CONCURRENCY", "KEY_PREFIX"):
            env.pop(name, None)
        env.update(
            {
                "PORT": "0",
                "INTERFACE": "127.0.0.1",
                "WORKERS": str(workers),
                "TASK_HANDLER": "redis_cpu:gated",
                "TASK_TIMEOUT": "600",
                "SHUTDOWN_TIMEOUT": "1",
                "TASK_LOG_MAX_BYTES": str(10**10),  # one file to count lines in
                GATE_ENV: str(self.gate),
                "PYTHONPATH": os.pathsep.join([str(BENCH), env.get("PYTHONPATH", "")]),
            }
        )
        self.log = workdir / "twistd.out"
        self.tasks_log = workdir / "logs" / "tasks.log"
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(
                [twistd, "--pidfile=", "-n", "taskserver"],
                cwd=workdir,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        output = lambda: self.log.read_text(errors="replace")  # noqa: E731
        wait_for(lambda: output().count(") ready") >= workers, 60, "taskserver ready")
        self.port = int(LISTENING.search(output())[1])  # type: ignore[index]
        redis_port = int(EMBEDDED_REDIS.search(output())[2])  # type: ignore[index]
        embedded = read_embedded_address(workdir / "data")
        self.client = valkey.Valkey(port=redis_port, password=embedded and embedded.password)

    def completed(self) -> int:
        if not self.tasks_log.exists():
            return 0
        with self.tasks_log.open() as lines:
            return sum(1 for _ in lines)

    def wait_completed(self, count: int) -> None:
        wait_for(lambda: self.completed() >= count, 180, f"{count} tasks in the task log")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def phase(name: str, tasks: int, started: float, before: Cpu, after: Cpu) -> Phase:
    used = after - before
    per = 1000 / max(1, tasks)
    return Phase(name, tasks, time.monotonic() - started, used.total * per, used.main * per)


def one_round(server: Server, seconds: float, connections: int) -> list[Phase]:
    phases = []
    # Running: consumers run while the load comes in, and until the backlog is done.
    server.gate.touch()
    done, before, started = server.completed(), Cpu.read(server.client), time.monotonic()
    out = run_wrk(server.port, seconds, connections)
    accepted = out["requests"] - out["non_2xx"]
    server.wait_completed(done + accepted)
    running = phase("running", accepted, started, before, Cpu.read(server.client))
    running.requests_per_s = out["requests_per_s"]
    phases.append(running)
    # Admit only: the gate is shut, each consumer holds what it took and fetches no more.
    server.gate.unlink()
    done, before, started = server.completed(), Cpu.read(server.client), time.monotonic()
    out = run_wrk(server.port, seconds, connections)
    accepted = out["requests"] - out["non_2xx"]
    admit = phase("admit only", accepted, started, before, Cpu.read(server.client))
    admit.requests_per_s = out["requests_per_s"]
    phases.append(admit)
    # Drain: the gate opens; what was queued (and held) runs.
    before, started = Cpu.read(server.client), time.monotonic()
    server.gate.touch()
    server.wait_completed(done + accepted)
    phases.append(phase("drain", accepted, started, before, Cpu.read(server.client)))
    return phases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="load per phase")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--connections", type=int, default=64)
    arguments = parser.parse_args()
    rounds: list[list[Phase]] = []
    with tempfile.TemporaryDirectory(prefix="taskserver-redis-cpu-") as workdir:
        server = Server(Path(workdir), arguments.workers)
        try:
            server.gate.touch()
            run_wrk(server.port, 2, arguments.connections)  # warm-up
            wait_for(lambda: server.client.llen(PENDING) == 0, 60, "warm-up drained")
            before = Cpu.read(server.client)
            time.sleep(2)  # the benchmark's own schedule: the background's rate, idle
            idle = Cpu.read(server.client) - before
            idle_ms_per_s = idle.total * 1000 / 2
            for number in range(arguments.rounds):
                phases = one_round(server, arguments.seconds, arguments.connections)
                rounds.append(phases)
                print(
                    f"round {number + 1}: "
                    + "; ".join(
                        f"{p.name} {p.tasks:,} tasks, {p.cpu_ms_per_task:.4f} ms/task "
                        f"(main thread {p.main_ms_per_task:.4f})"
                        for p in phases
                    ),
                    flush=True,
                )
        finally:
            server.stop()
    print(report(rounds, idle_ms_per_s, arguments))
    out_dir = ROOT / "bench-results"
    out_dir.mkdir(exist_ok=True)
    stamp = time.strftime("%Y-%m-%dT%H%M%S")
    (out_dir / f"{stamp}-redis-cpu.json").write_text(
        json.dumps(
            {
                "when": stamp,
                "machine": machine(),
                "idle_redis_cpu_ms_per_s": idle_ms_per_s,
                "rounds": [[asdict(p) for p in phases] for phases in rounds],
            },
            indent=2,
        )
    )


def machine() -> str:
    return f"{os.cpu_count()} cores, {os.uname().sysname} {os.uname().release}"


def report(rounds: list[list[Phase]], idle_ms_per_s: float, arguments: Any) -> str:
    lines = [
        "",
        f"Redis CPU per task, {arguments.workers} children, wrk {arguments.connections} "
        f"connections x {arguments.seconds:g} s per phase, {len(rounds)} rounds ({machine()}); "
        f"background idle: {idle_ms_per_s:.1f} ms of CPU per second",
        "",
        "| phase | tasks per round | req/s | Redis CPU ms/task (rounds) | median "
        "| main thread ms/task, median | tasks/s at 100 % / 50 % of one core |",
        "|---|---|---|---|---|---|---|",
    ]
    for index, name in enumerate(p.name for p in rounds[0]):
        column = [phases[index] for phases in rounds]
        total = statistics.median(p.cpu_ms_per_task for p in column)
        main = statistics.median(p.main_ms_per_task for p in column)
        rate = (
            "/".join(f"{p.requests_per_s:,.0f}" for p in column)
            if column[0].requests_per_s
            else "-"
        )
        lines.append(
            f"| {name} | {'/'.join(f'{p.tasks:,}' for p in column)} | {rate} "
            f"| {', '.join(f'{p.cpu_ms_per_task:.4f}' for p in column)} | {total:.4f} "
            f"| {main:.4f} | {1000 / max(main, 1e-9):,.0f} / {500 / max(main, 1e-9):,.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
