"""DURABILITY and WAIT_REPLICAS: what a 202 waits for, the checks at start-up, the fault suite.

Against real Redis-protocol servers (valkey-server on loopback) and, for the
start-up and fault tests, the real ``twistd -n taskserver``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
import valkey
from twisted.internet import defer, reactor, task
from twisted.logger import formatEvent, globalLogPublisher

from conftest import RunningServer, connect_raw, eventually, sleep, unused_port
from harness import Twistd, alive, logged_task_ids, wait_for
from taskserver.api import TaskAPI
from taskserver.cluster.child import API_POOL_SIZE
from taskserver.cluster.embedded import find_server_binary, read_embedded_address
from taskserver.config import ConfigError, RedisAddress, load_settings
from taskserver.durability import (
    Durability,
    DurabilityTimeout,
    ReplicasMissing,
    check_redis,
    durability_of,
    embedded_appendfsync,
)
from taskserver.idempotency import IdempotencyKeys
from taskserver.keys import Keys
from taskserver.queue import ADMIT, WAITS_IN_FLIGHT, TaskQueue
from taskserver.ratelimit import RatePolicy
from taskserver.task import Task

# ------------------------------------------------------------------ pure logic


def test_what_each_setting_waits_for() -> None:
    assert Durability().wait_command(500) is None, "write: the script's reply is the 202"
    assert Durability(fsync=True).wait_command(500) == ("WAITAOF", 1, 0, 500)
    assert Durability(fsync=True, server_fsyncs=True).wait_command(500) is None, (
        "appendfsync always: the reply itself comes after the fsync"
    )
    assert Durability(fsync=True, replicas=2, server_fsyncs=True).wait_command(500) == (
        "WAITAOF",
        1,
        2,
        500,
    )
    assert Durability(replicas=1).wait_command(500) == ("WAIT", 1, 500)


def test_a_wait_is_satisfied_only_by_what_was_asked() -> None:
    assert Durability(fsync=True).satisfied([1, 0])
    assert not Durability(fsync=True).satisfied([0, 0])
    assert not Durability(fsync=True, replicas=1).satisfied([1, 0])
    assert Durability(fsync=True, replicas=1).satisfied([1, 1])
    assert Durability(replicas=2).satisfied(2) and not Durability(replicas=2).satisfied(1)


def test_fsync_is_the_server_s_own_on_the_embedded_redis_only() -> None:
    assert durability_of(load_settings({}, {})) == Durability(), "write is the default"
    assert embedded_appendfsync(load_settings({}, {})) == "everysec"
    embedded = load_settings({}, {"DURABILITY": "fsync"})
    assert durability_of(embedded) == Durability(fsync=True, server_fsyncs=True)
    assert embedded_appendfsync(embedded) == "always"
    external = load_settings({}, {"REDIS_URL": "redis://h/0", "DURABILITY": "fsync"})
    assert durability_of(external) == Durability(fsync=True), "WAITAOF after each turn"
    replicas = load_settings({}, {"REDIS_URL": "redis://h/0", "WAIT_REPLICAS": "2"})
    assert durability_of(replicas) == Durability(replicas=2)
    with pytest.raises(ConfigError, match="DURABILITY"):
        load_settings({}, {"DURABILITY": "paranoid"})
    with pytest.raises(ConfigError, match="WAIT_REPLICAS"):
        load_settings({}, {"WAIT_REPLICAS": "-1"})


# ------------------------------------------------------------------ a real Redis


def commandstats(address: RedisAddress, command: str) -> int:
    client = valkey.Valkey(host=address.host, port=address.port, password=address.password)
    stats = client.info("commandstats").get(f"cmdstat_{command}", {"calls": 0})
    return int(stats["calls"])


@pytest_twisted.ensureDeferred
async def test_one_waitaof_covers_every_admission_of_a_turn(
    redis_server: RedisAddress, keys: Keys
) -> None:
    pool = connect_raw(redis_server, poolsize=3)
    queue = TaskQueue(pool, keys, 60, 2.0, reactor, durability=Durability(fsync=True))
    try:
        await queue.enqueue(Task.new("loads-the-script", None, reactor.seconds()))
        before = commandstats(redis_server, "waitaof")
        tasks = [Task.new(f"u{n}", None, reactor.seconds()) for n in range(20)]
        decisions = await defer.gatherResults(
            [defer.ensureDeferred(queue.enqueue(task)) for task in tasks]
        )
        assert len(decisions) == 20
        assert commandstats(redis_server, "waitaof") - before == 1, "one wait per turn"
        statuses = [await queue.status(task.id) for task in tasks]
        assert all(s is not None and s["status"] == "queued" for s in statuses)
    finally:
        await pool.disconnect()


@pytest_twisted.ensureDeferred
async def test_the_wait_survives_a_forgotten_script(
    redis_server: RedisAddress, redis: Any, keys: Keys
) -> None:
    pool = connect_raw(redis_server, poolsize=2)
    queue = TaskQueue(pool, keys, 60, 2.0, reactor, durability=Durability(fsync=True))
    try:
        await queue.enqueue(Task.new("first", None, reactor.seconds()))
        await redis.execute_command("SCRIPT", "FLUSH")
        task = Task.new("after-flush", None, reactor.seconds())
        await queue.enqueue(task)
        assert (await queue.status(task.id) or {}).get("status") == "queued"
    finally:
        await pool.disconnect()


@pytest_twisted.ensureDeferred
async def test_a_wait_not_done_in_time_is_an_ambiguous_503_and_a_retry_is_safe(
    redis_server: RedisAddress, keys: Keys, scratch_redis: Callable[..., ScratchRedis]
) -> None:
    """WAIT 1 on a primary without a replica: the task is written, the 503 says "maybe";
    the same request again is a 503 again while the task is still not on a replica, and
    once a replica is connected it answers that task (200), no second one."""
    timeout_s = 0.3
    pool = connect_raw(redis_server, poolsize=2)
    queue = TaskQueue(pool, keys, 60, timeout_s, reactor, durability=Durability(replicas=1))
    api = TaskAPI(
        RatePolicy(keys, ()),
        queue,
        IdempotencyKeys(pool, keys, timeout_s, reactor, 60),
        reactor,
    )
    port = reactor.listenTCP(0, api.site(), interface="127.0.0.1")
    url = f"http://127.0.0.1:{port.getHost().port}/api/v1/task"
    headers = {"Content-Type": "application/json", "Idempotency-Key": "k-1"}
    try:
        started = reactor.seconds()
        first = await treq.post(url, json={"user_id": "alice"}, headers=headers)
        waited = reactor.seconds() - started
        body = await first.json()
        assert first.code == 503, body
        assert body["error"] == "durability_timeout"
        assert "may or may not exist" in body["message"]
        assert first.headers.getRawHeaders("Retry-After") == ["2"]
        assert timeout_s * 0.9 <= waited < 10 * timeout_s, waited
        pending = await pool.lrange(keys.pending, 0, -1)
        assert len(pending) == 1, "the task was written"
        task_id = json.loads(pending[0])["id"]

        still = await treq.post(url, json={"user_id": "alice"}, headers=headers)
        not_yet = await still.json()
        assert (still.code, not_yet["error"]) == (503, "durability_timeout"), not_yet
        assert len(await pool.lrange(keys.pending, 0, -1)) == 1, "no second task"
        with pytest.raises(DurabilityTimeout):
            await queue.enqueue(Task.new("bob", None, reactor.seconds()))

        scratch_redis(
            "--replicaof", redis_server.host, str(redis_server.port),
            "--repl-diskless-load", "disabled",
        )  # fmt: skip
        again = await eventually(
            lambda: treq.post(url, json={"user_id": "alice"}, headers=headers).addCallback(
                lambda response: response if response.code != 503 else None
            ),
            timeout=30,
        )
        replayed = await again.json()
        assert again.code == 200, replayed
        assert replayed["task_id"] == task_id
        assert again.headers.getRawHeaders("Idempotent-Replayed") == ["true"]
        assert len(await pool.lrange(keys.pending, 0, -1)) == 2, "alice's and bob's, no third"
    finally:
        await port.stopListening()
        await pool.disconnect()


async def next_turn() -> None:
    await task.deferLater(reactor, 0)


@pytest_twisted.ensureDeferred
async def test_admissions_that_wait_leave_the_request_pool_to_everything_else(
    redis_server: RedisAddress, redis: Any, keys: Keys
) -> None:
    """WAIT 1 with no replica: six turns of admissions wait a full timeout each, on the wait
    pool, at most WAITS_IN_FLIGHT at once; meanwhile a status read and a completion on the
    request pool (the child's 4 connections) answer at once. The turns queued behind the
    waits go out together, and each ends in durability_timeout, not a starved 503."""
    timeout_s = 1.0
    api_pool = connect_raw(redis_server, poolsize=API_POOL_SIZE)
    wait_pool = connect_raw(redis_server, poolsize=WAITS_IN_FLIGHT)
    queue = TaskQueue(
        api_pool, keys, 60, timeout_s, reactor, durability=Durability(replicas=1),
        wait_redis=wait_pool,
    )  # fmt: skip
    done = Task.new("done", None, reactor.seconds())
    await redis.lpush(keys.processing("c-1"), done.to_json())
    await redis.execute_command("SCRIPT", "LOAD", ADMIT.source)  # no NOSCRIPT pass (2 waits)
    waits_before = commandstats(redis_server, "wait")
    try:
        admissions = []
        for n in range(6):  # one admission per reactor turn: six calls, six waits asked for
            admissions.append(defer.ensureDeferred(queue.enqueue(Task.new(f"u{n}", None, 0))))
            await next_turn()
        started = reactor.seconds()
        assert await queue.status("no-such-task") is None
        assert await queue.complete("c-1", done.to_json(), done, "t", 1.0)
        took = reactor.seconds() - started
        assert took < timeout_s / 2, f"the request pool waited {took:.2f} s behind the waits"
        assert not any(a.called for a in admissions), "the admissions were still waiting"
        outcomes = await defer.DeferredList(admissions, consumeErrors=True)
        errors = [type(failure.value) for ok, failure in outcomes]
        assert errors == [DurabilityTimeout] * 6, errors
        waits = commandstats(redis_server, "wait") - waits_before
        assert waits <= 1 + WAITS_IN_FLIGHT, f"{waits} WAITs: the turns behind were not merged"
    finally:
        await api_pool.disconnect()
        await wait_pool.disconnect()


@pytest_twisted.ensureDeferred
async def test_a_post_refused_for_missing_replicas_leaves_its_idempotency_key_free(
    redis_server: RedisAddress, keys: Keys
) -> None:
    """503 while replicas are missing claims nothing: the retry once they are back is a 202."""
    missing: list[ReplicasMissing | None] = [ReplicasMissing("WAIT_REPLICAS=1 but 0 replicas")]
    pool = connect_raw(redis_server, poolsize=2)
    queue = TaskQueue(pool, keys, 60, 1.0, reactor, refuse_admissions=lambda: missing[0])
    api = TaskAPI(
        RatePolicy(keys, ()), queue, IdempotencyKeys(pool, keys, 1.0, reactor, 60), reactor
    )
    port = reactor.listenTCP(0, api.site(), interface="127.0.0.1")
    url = f"http://127.0.0.1:{port.getHost().port}/api/v1/task"
    headers = {"Content-Type": "application/json", "Idempotency-Key": "k-missing"}
    try:
        refused = await treq.post(url, json={"user_id": "alice"}, headers=headers)
        assert refused.code == 503, await refused.text()
        assert await pool.keys(f"{keys.prefix}:idem:*") == [], "no claim was written"
        missing[0] = None  # the replicas are back
        retried = await treq.post(url, json={"user_id": "alice"}, headers=headers)
        assert retried.code == 202, await retried.text()
    finally:
        await port.stopListening()
        await pool.disconnect()


class ScratchRedis:
    """A valkey-server of the test's own, with extra arguments (AOF off, a command removed)."""

    def __init__(self, data_dir: Path, *extra: str) -> None:
        self.port = unused_port()
        data_dir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [find_server_binary(None), "--port", str(self.port), "--bind", "127.0.0.1",
             "--dir", str(data_dir), "--save", "", *extra],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self.address = RedisAddress("127.0.0.1", self.port)
        client = valkey.Valkey(port=self.port)

        def answers() -> bool:
            with contextlib.suppress(valkey.ConnectionError):
                return bool(client.ping())
            return False

        wait_for(answers, what="scratch Redis answering")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(20)


@pytest.fixture
def scratch_redis(tmp_path: Path) -> Iterator[Callable[..., ScratchRedis]]:
    started: list[ScratchRedis] = []

    def start(*extra: str) -> ScratchRedis:
        server = ScratchRedis(tmp_path / f"scratch-{len(started)}", *extra)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--appendonly", "no"), "append-only file turned off"),
        (("--appendonly", "yes", "--rename-command", "WAITAOF", ""), "needs WAITAOF"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_fsync_is_refused_by_a_redis_that_cannot_keep_it(
    scratch_redis: Callable[..., ScratchRedis], extra: tuple[str, ...], message: str
) -> None:
    server = scratch_redis(*extra)
    pool = connect_raw(server.address, poolsize=1)
    try:
        with pytest.raises(ConfigError, match=message):
            await check_redis(pool, Durability(fsync=True), 1.0, reactor)
        assert await check_redis(pool, Durability(), 1.0, reactor) == 0, "write needs nothing"
    finally:
        await pool.disconnect()


def test_start_up_stops_with_one_line_when_redis_cannot_fsync(
    twistd: Callable[..., Twistd], scratch_redis: Callable[..., ScratchRedis]
) -> None:
    server = scratch_redis("--appendonly", "no")
    master = twistd(REDIS_URL=f"redis://127.0.0.1:{server.port}/0", DURABILITY="fsync")
    assert master.process.wait(60) == 1
    refusals = [line for line in master.output.splitlines() if "could not start" in line]
    assert len(refusals) == 1, master.output
    assert "DURABILITY=fsync: Redis has its append-only file turned off" in refusals[0]
    assert "Traceback" not in master.output
    assert "worker-" not in master.output, "no child was started"


def test_wait_replicas_without_a_replica_answers_503_until_one_connects(
    twistd: Callable[..., Twistd], scratch_redis: Callable[..., ScratchRedis], tmp_path: Path
) -> None:
    """The embedded valkey with no replica: a warning, POSTs 503 (nothing written); a real
    replica connects, and POSTs are accepted without a restart."""
    master = twistd(WORKERS="1", WAIT_REPLICAS="1", DURABILITY="fsync", RATE_LIMITS="")
    master.wait_until_ready(1)
    assert "WAIT_REPLICAS=1 but Redis has 0 replica(s) connected" in master.output
    code, body = master.request("POST", "/api/v1/task", {"user_id": "early"})
    assert code == 503 and body["error"] == "redis_unavailable", body
    embedded = read_embedded_address(tmp_path / "data")
    assert embedded is not None
    primary = valkey.Valkey(port=embedded.port, password=embedded.password)
    assert primary.llen("taskserver:{q}:pending") == 0, "a refused POST writes nothing"
    # With fsync, WAITAOF 1 1 counts a replica once the write is in its own append-only file.
    scratch_redis(
        "--replicaof", "127.0.0.1", str(embedded.port), "--masterauth", str(embedded.password),
        "--appendonly", "yes", "--repl-diskless-load", "disabled",
    )  # fmt: skip

    def accepted() -> bool:
        code, _ = master.request("POST", "/api/v1/task", {"user_id": f"late-{time.time_ns()}"})
        return code == 202

    wait_for(accepted, timeout=30, what="a 202 once the replica is connected")
    assert "replica(s) again: POST accepts tasks" in master.output
    assert master.stop() == 0


def test_wait_replicas_on_a_redis_that_refuses_info_lets_wait_decide(
    twistd: Callable[..., Twistd], scratch_redis: Callable[..., ScratchRedis]
) -> None:
    """An ACL forbids INFO but allows WAIT: start-up goes on with one warning (master, child),
    POST answers what WAIT says (no replica: durability_timeout; a replica: 202), and no
    traceback is logged for the INFO the watch is refused every second."""
    primary = scratch_redis("--appendonly", "yes")
    valkey.Valkey(port=primary.port).execute_command(
        "ACL", "SETUSER", "default", "on", "nopass", "~*", "&*", "+@all", "-info"
    )
    master = twistd(
        REDIS_URL=f"redis://127.0.0.1:{primary.port}/0",
        WAIT_REPLICAS="1",
        WORKERS="1",
        RATE_LIMITS="",
        REDIS_TIMEOUT="0.5",
    )
    master.wait_until_ready(1)
    wait_for(
        lambda: master.output.count("cannot count replicas; WAIT decides") == 2,
        what="the master's and the child's warning (the child's once its watch has asked)",
    )
    code, body = master.request("POST", "/api/v1/task", {"user_id": "no-replica"})
    assert (code, body["error"]) == (503, "durability_timeout"), body
    scratch_redis("--replicaof", "127.0.0.1", str(primary.port), "--repl-diskless-load", "disabled")

    def accepted() -> bool:
        code, _ = master.request("POST", "/api/v1/task", {"user_id": f"r-{time.time_ns()}"})
        return code == 202

    wait_for(accepted, timeout=30, what="a 202 once WAIT finds the replica")
    # The watch asked for INFO every second meanwhile (several seconds: a replica's sync).
    assert master.output.count("cannot count replicas; WAIT decides") == 2, master.output
    assert "Traceback" not in master.output
    assert master.stop() == 0


# ------------------------------------------------------------------ the fault suite

#: Seconds of load per mode, and the embedded Redis SIGKILLed about every KILL_EVERY_S.
LOAD_S = 9.0
KILL_EVERY_S = 2.5
BACK = re.compile(r"embedded Redis is back \(pid (\d+)\)")


class TimedLoad:
    """POSTs from distinct users on a few threads until stopped; every 202 with its time."""

    def __init__(self, server: Twistd, threads: int = 4) -> None:
        self.server = server
        self.accepted: list[tuple[float, str]] = []
        self.refused: Counter[int | str] = Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._next = 0
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]
        for thread in self._threads:
            thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                n, self._next = self._next, self._next + 1
            try:
                code, body = self.server.request("POST", "/api/v1/task", {"user_id": f"k-{n}"})
            except OSError as e:
                code, body = type(e).__name__, {}  # type: ignore[assignment]
            with self._lock:
                if code == 202:
                    self.accepted.append((time.monotonic(), body["task_id"]))
                else:
                    self.refused[code] += 1

    def count(self) -> int:
        with self._lock:
            return len(self.accepted)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def longest_gap_s(self) -> float:
        """The longest stretch without a 202: how long POSTs answered 503 around a kill."""
        times = sorted(t for t, _ in self.accepted)
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


def kill_redis_under_load(workdir: Path, durability: str) -> dict[str, Any]:
    """One mode: a 2-child cluster on the embedded Redis, the Redis SIGKILLed under load."""
    workdir.mkdir()
    server = Twistd(
        workdir,
        {
            "WORKERS": "2",
            "DURABILITY": durability,
            "RATE_LIMITS": "",
            "TASK_HANDLER": "sample_handlers:slow",
            "SLOW_HANDLER_S": "0.002",
            "HEARTBEAT_TTL": "2",
            "SHUTDOWN_TIMEOUT": "2",
        },
    )
    try:
        server.wait_until_ready(2)
        embedded = read_embedded_address(workdir / "data")
        assert embedded is not None
        client = valkey.Valkey(port=embedded.port, password=embedded.password)
        # What the mode means on the embedded Redis: fsync before every reply, or each second.
        appendfsync = "always" if durability == "fsync" else "everysec"
        assert client.config_get("appendfsync") == {"appendfsync": appendfsync}
        load = TimedLoad(server)
        started, kills = time.monotonic(), 0
        while time.monotonic() - started < LOAD_S:
            flowing = load.count()
            wait_for(lambda n=flowing: load.count() > n + 20, timeout=30, what="202s flowing")
            time.sleep(KILL_EVERY_S)  # when to strike: test input, not synchronisation
            backs = BACK.findall(server.output)
            restarts = len(backs)
            pid = int(backs[-1]) if backs else server.redis_pid()
            os.kill(pid, signal.SIGKILL)
            kills += 1
            wait_for(
                lambda n=restarts: len(BACK.findall(server.output)) > n,
                timeout=30,
                what="the embedded Redis restarted",
            )
        flowing = load.count()
        wait_for(lambda: load.count() > flowing + 20, timeout=30, what="202s after the last kill")
        load.stop()
        accepted = {task_id for _, task_id in load.accepted}
        assert client.config_get("appendfsync") == {"appendfsync": appendfsync}, "restarted"

        def unsettled() -> set[str]:
            """Accepted tasks whose record says neither completed nor dead (lost: no record)."""
            ordered = sorted(accepted)
            pipe = client.pipeline(transaction=False)
            for task_id in ordered:
                pipe.hget(f"taskserver:{{q}}:task:{task_id}", "status")
            statuses = pipe.execute()
            return {
                task_id
                for task_id, status in zip(ordered, statuses, strict=True)
                if status not in (b"completed", b"dead")
            }

        with contextlib.suppress(AssertionError):  # what is left is counted below
            wait_for(lambda: not unsettled(), timeout=30, what="every accepted task settled")
        left = unsettled()
        logged = logged_task_ids(workdir / "logs")
        figures = {
            "durability": durability,
            "kills": kills,
            "accepted": len(accepted),
            "refused": dict(load.refused),
            "lost": len(left),
            "duplicates": sum(n - 1 for task_id, n in logged.items() if task_id in accepted),
            "longest_503_window_s": round(load.longest_gap_s(), 2),
        }
        print(f"\nembedded Redis SIGKILLed under load: {figures}")
        assert server.stop() == 0
        return figures
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait(10)
        redis_pids = [int(p) for p in BACK.findall(server.output)]
        for pid in redis_pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.serial  # SIGKILLs under load
def test_a_sigkilled_embedded_redis_loses_no_task_with_fsync(tmp_path: Path) -> None:
    """fsync: every task that got a 202 completes (or is dead-lettered), across the kills.

    With write the loss is counted and printed, not asserted: a SIGKILL leaves what
    Redis wrote in the kernel's page cache, so it rarely loses anything; a power cut
    would lose what was not yet fsynced (up to a second).
    """
    fsync = kill_redis_under_load(tmp_path / "fsync", "fsync")
    assert fsync["kills"] >= 3
    assert fsync["accepted"] > 100
    assert fsync["lost"] == 0, fsync
    write = kill_redis_under_load(tmp_path / "write", "write")
    assert write["kills"] >= 3
    print(f"\nDURABILITY=write lost {write['lost']} of {write['accepted']} accepted tasks")


# ------------------------------------------------------------------ Redis refuses the wait


async def post_task(server: RunningServer, user_id: str) -> tuple[int, dict[str, Any]]:
    response = await treq.post(
        server.url + "/api/v1/task",
        json={"user_id": user_id},
        headers={"Content-Type": "application/json"},
    )
    return response.code, await response.json()


@pytest_twisted.ensureDeferred
async def test_a_wait_refused_by_redis_refuses_posts_until_it_is_accepted_again(
    start_server: Callable[..., RunningServer], scratch_redis: Callable[..., ScratchRedis]
) -> None:
    """AOF turned off after start: WAITAOF answers an error. That POST's task was written (503
    durability_timeout); later POSTs write nothing (503 redis_unavailable saying why), with
    one log line, until the AOF is back and a re-check passes."""
    redis = scratch_redis("--appendonly", "yes")
    client = valkey.Valkey(port=redis.port)
    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    try:
        server = start_server(redis=redis.address, durability="fsync", rate_limits=())
        code, _ = await eventually(
            lambda: defer.ensureDeferred(post_task(server, "before")).addCallback(
                lambda answer: answer if answer[0] == 202 else None
            )
        )
        client.config_set("appendonly", "no")
        code, body = await post_task(server, "when-it-went")
        assert (code, body["error"]) == (503, "durability_timeout"), body
        pending = f"{server.settings.key_prefix}:{{q}}:pending"
        written = client.llen(pending)
        for n in range(3):
            code, body = await post_task(server, f"refused-{n}")
            assert (code, body["error"]) == (503, "redis_unavailable"), body
            assert "append-only file turned off" in body["message"], body
        assert client.llen(pending) == written, "a refused POST writes nothing"
        assert sum("POST answers 503 until it accepts it again" in line for line in lines) == 1
        client.config_set("appendonly", "yes")
        await eventually(
            lambda: defer.ensureDeferred(post_task(server, "after")).addCallback(
                lambda answer: answer[0] == 202
            ),
            timeout=30,
        )
        assert any("accepts the wait DURABILITY needs again" in line for line in lines)
    finally:
        globalLogPublisher.removeObserver(observe)


# ------------------------------------------------------------------ no 202 before the wait's reply


def reply_end(data: bytes, start: int) -> int | None:
    """Where the RESP reply that begins at ``start`` ends; None if it is not all there yet."""
    line_end = data.find(b"\r\n", start)
    if line_end < 0:
        return None
    kind, after = data[start : start + 1], line_end + 2
    if kind in (b"+", b"-", b":"):
        return after
    count = int(data[start + 1 : line_end])
    if count < 0:
        return after
    if kind == b"$":
        return after + count + 2 if len(data) >= after + count + 2 else None
    assert kind == b"*", data[start:]
    for _ in range(count):
        end = reply_end(data, after)
        if end is None:
            return None
        after = end
    return after


class WaitReplyHoldingProxy:
    """A TCP proxy to Redis that, once armed, holds back the reply to the next admission's
    WAITAOF.

    The connection that sends it gets its earlier replies (the script's) as they come;
    from the WAITAOF's reply on, nothing until :meth:`release`. ``held`` fires once
    Redis has answered the WAITAOF and that answer is held here.
    """

    def __init__(self, redis: RedisAddress) -> None:
        from twisted.protocols import portforward

        proxy = self
        self.armed = False
        self.held: defer.Deferred[None] = defer.Deferred()
        self._holding: Any = None

        class Client(portforward.ProxyClient):  # Redis's side
            passing = 0
            buffer = b""

            def dataReceived(self, data: bytes) -> None:
                if proxy._holding is not self.peer:
                    super().dataReceived(data)
                    return
                self.buffer += data
                position = 0
                while self.passing and (end := reply_end(self.buffer, position)) is not None:
                    position, self.passing = end, self.passing - 1
                if position:
                    super().dataReceived(self.buffer[:position])
                    self.buffer = self.buffer[position:]
                answered = not self.passing and reply_end(self.buffer, 0) is not None
                if answered and not proxy.held.called:
                    proxy.held.callback(None)

        class ClientFactory(portforward.ProxyClientFactory):
            protocol = Client

        class Server(portforward.ProxyServer):  # taskserver's side
            clientProtocolFactory = ClientFactory

            def dataReceived(self, data: bytes) -> None:
                # An admission's pipeline (one write: script, then wait), not the
                # child's own check of the wait (a WAITAOF alone).
                admission = b"EVALSHA" in data and b"WAITAOF" in data
                if proxy.armed and admission and self.peer is not None:
                    proxy.armed, proxy._holding = False, self
                    # Replies owed before the WAITAOF's: one per command sent before it
                    # (the first command has no CRLF before it, the WAITAOF's header has).
                    self.peer.passing = data[: data.index(b"WAITAOF")].count(b"\r\n*")
                super().dataReceived(data)

        factory = portforward.ProxyFactory(redis.host, redis.port)
        factory.protocol = Server
        factory.noisy = False
        self.port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.address = RedisAddress("127.0.0.1", self.port.getHost().port)

    def release(self) -> None:
        holding, self._holding = self._holding, None
        if holding is not None and holding.peer is not None:
            rest, holding.peer.buffer = holding.peer.buffer, b""
            holding.transport.write(rest)


@pytest_twisted.ensureDeferred
async def test_no_202_is_sent_before_the_waitaof_reply(
    start_server: Callable[..., RunningServer], redis_server: RedisAddress, redis: Any
) -> None:
    """DURABILITY=fsync on an external Redis: the script has run and its reply came, but
    while WAITAOF's reply is held back the POST stays unanswered; released, it is a 202."""
    proxy = WaitReplyHoldingProxy(redis_server)
    try:
        server = start_server(
            redis=proxy.address, durability="fsync", rate_limits=(), redis_timeout_s=5.0
        )
        await eventually(
            lambda: defer.ensureDeferred(post_task(server, "warm")).addCallback(
                lambda answer: answer[0] == 202
            )
        )
        proxy.armed = True
        answers: list[Any] = []
        posted = treq.post(
            server.url + "/api/v1/task",
            json={"user_id": "held"},
            headers={"Content-Type": "application/json"},
        )
        posted.addCallback(lambda response: answers.append(response) or response)
        await proxy.held
        statuses = await redis.keys(f"{server.settings.key_prefix}:{{q}}:task:*")
        assert len(statuses) == 2, "the script ran: the task exists (and the warm-up's)"
        await sleep(0.3)  # the negative check's window: a 202 sent early would be here by now
        assert answers == [], "answered before the WAITAOF's reply"
        proxy.release()
        response = await posted
        assert response.code == 202, await response.text()
    finally:
        proxy.release()
        await proxy.port.stopListening()
