"""Fault injection: a few thousand tasks while children are SIGKILLed, /kill is called and
Redis restarts; afterwards every accepted task has completed or is dead-lettered.

The figures are printed (run with -s) and quoted in the README's reliability section;
what the design promises about them (nothing lost, duplicates only of tasks given back,
task-log lines lost only at the end of a crashed host's log) is asserted.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import valkey
from twisted.internet import reactor
from twisted.logger import formatEvent, globalLogPublisher

from conftest import connect_raw, sleep, unused_port
from harness import Load, Twistd, alive, logged_task_ids, wait_for
from taskserver.cluster.embedded import find_server_binary, server_arguments
from taskserver.config import RedisAddress
from taskserver.redisclient import (
    RedisUnavailable,
    connect,
    within,
    without_reconnect_attempts,
)

#: Kills and outages under load: run alone (`make test` runs `serial` tests last).
pytestmark = pytest.mark.serial

TASKS = 8000
CONCURRENCY = 16
REAPED = re.compile(r"dead consumers' tasks: (\d+) back to the queue")
RECLAIMED = re.compile(r"gave (\d+) in-flight task\(s\) of worker-\d+ back to the queue")
SEED = 20261127


class ExternalRedis:
    """A Redis-protocol server with an append-only file, restarted on the same port."""

    def __init__(self, data_dir: Path) -> None:
        self.port = unused_port()
        self.data_dir = data_dir
        self.binary = find_server_binary(None)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            server_arguments(self.binary, self.port, self.data_dir),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(self._answers, what="Redis answering")

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        """SIGTERM: the server syncs its append-only file, as a clean restart does."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(20)

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[ExternalRedis]:
    server = ExternalRedis(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


def test_nothing_accepted_is_lost_under_faults(
    twistd: Callable[..., Twistd], redis: ExternalRedis, tmp_path: Path
) -> None:
    rng = random.Random(SEED)
    prefix = f"faults{time.monotonic_ns()}"
    server = twistd(
        WORKERS="2",
        REDIS_URL=f"redis://127.0.0.1:{redis.port}/0",
        KEY_PREFIX=prefix,
        CONCURRENCY=str(CONCURRENCY),
        HEARTBEAT_TTL="2",
        SHUTDOWN_TIMEOUT="2",
        TASK_HANDLER="sample_handlers:slow",
        SLOW_HANDLER_S="0.005",
    )
    server.wait_until_ready(2)
    started = time.monotonic()
    load = Load(server, threads=6, limit=TASKS)
    faults: Counter[str] = Counter()
    while not load.done():
        time.sleep(rng.uniform(0.1, 0.4))  # when to strike: test input, not synchronisation
        action = rng.choice(["sigkill", "/kill", "redis restart"])
        if action == "sigkill":
            victims = [pid for pid in server.ready_pids() if alive(pid)]
            if victims:
                os.kill(rng.choice(victims), signal.SIGKILL)
        elif action == "/kill":
            with contextlib.suppress(OSError):
                server.request("GET", "/kill")
        else:
            redis.restart()
        faults[action] += 1
        assert time.monotonic() - started < 180, "the load never finished"
    load.finish()
    loaded_in = time.monotonic() - started

    accepted = set(load.accepted)
    client = valkey.Valkey(port=redis.port)

    def outcome() -> tuple[Counter[str], set[str], set[str]]:
        completed = logged_task_ids(tmp_path / "logs")
        dead_entries = client.lrange(f"{prefix}:{{q}}:dead", 0, -1)
        dead = {json.loads(entry)["task"]["id"] for entry in dead_entries}
        return completed, dead, accepted - set(completed) - dead

    with contextlib.suppress(AssertionError):  # a timeout is reported below, with the count
        wait_for(lambda: not outcome()[2], timeout=90, what="every accepted task settled")
    completed, dead, lost = outcome()
    duplicates = sum(count - 1 for task_id, count in completed.items() if task_id in accepted)
    # A task runs twice only if it was moved back from a processing list (a dead child's,
    # by the master; an expired heartbeat's, by a reaper), and such a list holds at most
    # the CONCURRENCY running tasks and as many awaiting their acknowledgement.
    reclaimed = [int(n) for n in RECLAIMED.findall(server.output)]
    given_back = sum(reclaimed) + sum(int(n) for n in REAPED.findall(server.output))
    print(
        f"\nfault injection: {len(accepted)} accepted of {TASKS} attempted "
        f"({load.failed} refused or cut off) in {loaded_in:.1f} s; faults {dict(faults)}; "
        f"completed {len(accepted & set(completed))}, dead-lettered {len(accepted & dead)}, "
        f"lost {len(lost)}, duplicate runs {duplicates}, "
        f"tasks given back by the master or a reaper {given_back}"
    )
    assert lost == set()
    assert faults["redis restart"] >= 1 and faults["sigkill"] + faults["/kill"] >= 2
    deaths = server.output.count(" died: ")
    assert deaths <= faults["sigkill"] + faults["/kill"], "a Redis restart killed a process"
    assert len(reclaimed) <= deaths, "one give-back per dead child"
    assert all(n <= 2 * CONCURRENCY for n in reclaimed), reclaimed
    assert duplicates <= given_back, f"{duplicates} duplicates, {given_back} tasks given back"
    assert server.stop() == 0


def test_a_crashed_hosts_tasks_are_finished_by_the_other_host(
    twistd: Callable[..., Twistd], redis: ExternalRedis, tmp_path: Path
) -> None:
    """Two instances on one Redis, as two hosts; one loses power (all SIGKILLed) under load."""
    shared = {
        "REDIS_URL": f"redis://127.0.0.1:{redis.port}/0",
        "KEY_PREFIX": f"hosts{time.monotonic_ns()}",
        "HEARTBEAT_TTL": "2",
        "WORKERS": "1",
        "TASK_HANDLER": "sample_handlers:slow",
        "SLOW_HANDLER_S": "0.05",
        "CONCURRENCY": "8",
    }
    (tmp_path / "host-a").mkdir()
    (tmp_path / "host-b").mkdir()
    doomed = Twistd(tmp_path / "host-a", shared)
    survivor = Twistd(tmp_path / "host-b", shared)
    for host in (doomed, survivor):
        host.wait_until_ready(1)
    try:
        load_a = Load(doomed, threads=2, limit=400, users="host-a")
        load_b = Load(survivor, threads=2, limit=800, users="host-b")
        wait_for(lambda: len(load_a.accepted) >= 200, what="load on host A")
        doomed.crash()
        crashed_at = time.monotonic()
        load_a.finish()
        load_b.finish()
        accepted = set(load_a.accepted) | set(load_b.accepted)
        client = valkey.Valkey(port=redis.port, decode_responses=True)
        prefix = shared["KEY_PREFIX"]

        def unfinished() -> set[str]:
            """Tasks whose status record does not say completed (the truth, across hosts)."""
            pipe = client.pipeline(transaction=False)
            ordered = sorted(accepted)
            for task_id in ordered:
                pipe.hget(f"{prefix}:{{q}}:task:{task_id}", "status")
            statuses = pipe.execute()
            return {t for t, status in zip(ordered, statuses, strict=True) if status != "completed"}

        wait_for(lambda: not unfinished(), timeout=60, what="the crashed host's tasks finished")
        finished_after = time.monotonic() - crashed_at
        reaped = sum(int(n) for n in REAPED.findall(survivor.output))
        assert survivor.stop() == 0  # and so writes every line it has
        doomed_lines = logged_task_ids(tmp_path / "host-a" / "logs")
        logged = set(doomed_lines) | set(logged_task_ids(tmp_path / "host-b" / "logs"))
        lines_lost = sorted(accepted - logged)
        print(
            f"\ntwo hosts: {len(accepted)} accepted; host A crashed; the survivor gave {reaped} of "
            f"its in-flight tasks back to the queue; all completed {finished_after:.1f} s after "
            f"the crash (HEARTBEAT_TTL 2 s); task-log lines lost with host A's master: "
            f"{len(lines_lost)}"
        )
        assert reaped >= 1, "host A had tasks in flight, and the survivor reaped them"
        # A child records a task's line before acknowledging it, its lines reach the master
        # through one pipe in order, and the master writes them in that order. So the lines
        # lost with host A are those of its last completions: each lost task finished no
        # earlier than the last line host A wrote (both times are the same clock reading).
        last_written = max(
            (
                line.partition(" ")[0]
                for path in (tmp_path / "host-a" / "logs").glob("tasks.log*")
                for line in path.read_text().splitlines()
            ),
            default="",
        )
        assert doomed_lines, "host A completed tasks before it crashed"
        pipe = client.pipeline(transaction=False)
        for task_id in lines_lost:
            pipe.hget(f"{prefix}:{{q}}:task:{task_id}", "finished_at")
        for task_id, finished_at in zip(lines_lost, pipe.execute(), strict=True):
            assert finished_at >= last_written, (
                f"{task_id} finished at {finished_at}, before host A's last line ({last_written}),"
                " and its line is lost"
            )
    finally:
        for host in (doomed, survivor):
            if host.process.poll() is None:
                host.process.kill()


async def connections_received(client: Any) -> int:
    info = await client.info("stats")
    return int(info["total_connections_received"])


@pytest.mark.parametrize(
    ("refused", "setting"),
    [
        ("AUTH", {"password": "not-the-password"}),  # the server has none: AUTH is an error
        ("SELECT", {"db": 99}),  # beyond the server's 16 databases
    ],
)
@pytest_twisted.ensureDeferred
async def test_a_refused_auth_or_select_is_retried_with_back_off_and_said_once(
    redis_server: RedisAddress, refused: str, setting: dict[str, Any]
) -> None:
    """txredisapi stops reconnecting for good when AUTH or SELECT fails; our pools retry
    (a rotated password, a squatter on the port) with the capped back-off, neither at
    full speed nor never, and write the reason once (not twice a second)."""
    observer_lines: list[str] = []
    observer = without_reconnect_attempts(lambda event: observer_lines.append(formatEvent(event)))
    inspector = connect_raw(redis_server, poolsize=1)
    await inspector._factory.deferred
    globalLogPublisher.addObserver(observer)
    try:
        before = await connections_received(inspector)
        pool = connect(replace(redis_server, **setting), 1, 1.0)
        try:
            with pytest.raises(RedisUnavailable):  # what a POST meets: a 503
                await within(pool.ping(), 1.0, reactor)
            await sleep(WINDOW_S - 1.0)  # the window over which attempts are counted
            attempts = await connections_received(inspector) - before
        finally:
            await pool.disconnect()
    finally:
        globalLogPublisher.removeObserver(observer)
        await inspector.disconnect()
    said = [line for line in observer_lines if f"could not {REFUSED_WORDS[refused]}" in line]
    print(f"{refused} refused: {attempts} attempts in {WINDOW_S:g} s, {len(said)} line(s) logged")
    # 0, 0.1, 0.27, then every 0.5 s (jittered): about 8 in 3 s; at full speed, 30 or more.
    assert 3 <= attempts <= 15, f"{attempts} connection attempts in {WINDOW_S} s"
    assert len(said) == 1, said


#: Seconds over which test_a_refused_auth_or_select_... counts connection attempts.
WINDOW_S = 3.0
REFUSED_WORDS = {"AUTH": "auth", "SELECT": "set dbid"}
