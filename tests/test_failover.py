"""The failover fault suite: the Redis primary SIGKILLed under load, behind Sentinel, in a row.

A real deployment (tests/sentinel_deploy.py: one primary, one replica, three
sentinels, ``down-after-milliseconds`` 1500) and the real ``twistd -n
taskserver`` with ``REDIS_SENTINELS``, 2 children, under a load of POSTs
from a few client threads. Each round SIGKILLs the node the sentinels call the
primary, measures the failover time from the sentinels (kill to a new
primary named that says it is one), restarts the killed node (which the
sentinels make a replica of the new one) and waits until the deployment
can fail over again: so two rounds fail over and back.

Asserted: POST answers 202 again without a restart of taskserver (same
children) within the failover time + 2 s (with ``WAIT_REPLICAS=1`` and the
one replica gone, within the time the restarted node takes to be a replica in
sync + 2 s: there is no replica to wait for before); consumers resume (every
task accepted after the last failover completes); with ``WAIT_REPLICAS=1``
every task that got a 202 is completed or dead-lettered by its status record
(none lost). Without it the loss is counted and printed, not asserted. The
last test adds a second replica, so that WAIT_REPLICAS=1 has one left after a
failover and must answer 202 again within the failover time + 2 s as well.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import valkey

from harness import Twistd, logged_task_ids, wait_for
from sentinel_deploy import HOST, Node, SentinelDeployment
from taskserver.cluster.embedded import free_loopback_port

pytestmark = [pytest.mark.slow, pytest.mark.serial, pytest.mark.timeout(300)]

#: Fail over and back: the first round moves the primary away, the second moves it back.
ROUNDS = 2
#: What the issue allows beyond the failover time for POST to answer 202 again.
SLACK_S = 2.0
#: The sentinels' down-after-milliseconds (see the deployment fixture).
DOWN_AFTER_MS = 1500
#: Seconds of steady load before each kill (test input: when to strike, not a wait).
STEADY_S = 1.0


class Load:
    """POSTs from distinct users on a few threads until stopped; each answer with the
    time its request started (a 202 counts only for requests sent after a kill)."""

    def __init__(self, server: Twistd, threads: int = 4) -> None:
        self.server = server
        self.answers: list[tuple[float, int | str, str | None]] = []
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
            started = time.monotonic()
            try:
                code, body = self.server.request("POST", "/api/v1/task", {"user_id": f"f-{n}"})
            except OSError as e:
                code, body = type(e).__name__, {}
            task_id = body.get("task_id") if code == 202 else None
            with self._lock:
                self.answers.append((started, code, task_id))

    def accepted(self) -> set[str]:
        with self._lock:
            return {task_id for _, code, task_id in self.answers if task_id is not None}

    def refused(self) -> Counter[int | str]:
        with self._lock:
            return Counter(code for _, code, _ in self.answers if code != 202)

    def accepted_since(self, moment: float) -> int:
        with self._lock:
            return sum(1 for started, code, _ in self.answers if code == 202 and started >= moment)

    def first_202_sent_after(self, moment: float) -> float | None:
        with self._lock:
            starts = [s for s, code, _ in self.answers if code == 202 and s >= moment]
        return min(starts) if starts else None

    def longest_gap_s(self) -> float:
        """The longest stretch between two 202s (by when their requests were sent)."""
        with self._lock:
            starts = sorted(s for s, code, _ in self.answers if code == 202)
        return max((b - a for a, b in itertools.pairwise(starts)), default=0.0)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelDeployment]:
    # 1.5 s, not the deployment's 1 s: at 1 s the sentinels now and then judged a primary
    # down about 1 s after promoting it and failed over again (seen in 3 of 5 runs, once
    # onto the killed node just restarted with its stale data: 10,277 tasks lost without
    # WAIT_REPLICAS); at 1.5 s, none in 12 failovers. With the SentinelWatch, at 1 s again:
    # 1 of 5 runs (3,141 of 40,988 lost), so 1.5 s stays. The README's fault table says both.
    deployment = SentinelDeployment(
        tmp_path_factory.mktemp("sentinel"), down_after_ms=DOWN_AFTER_MS
    )
    try:
        deployment.start()
        yield deployment
    finally:
        deployment.stop()


def add_replica(deployment: SentinelDeployment, name: str) -> Node:
    """One more data node, a replica of the primary, as the deployment's own are started;
    returns once every sentinel lists it (their INFO of the primary: up to 10 s)."""
    primary = deployment.primary()
    assert primary is not None
    directory = deployment.directory / name
    directory.mkdir()
    port = free_loopback_port()
    node = Node(
        name,
        port,
        directory,
        [
            deployment.binary, "--port", str(port), "--bind", HOST,
            "--dir", str(directory.resolve()), "--appendonly", "yes", "--save", "",
            "--daemonize", "no", "--logfile", "", "--replicaof", HOST, str(primary.port),
        ],
    )  # fmt: skip
    node.spawn()
    deployment.data_nodes.append(node)
    deployment.wait_ready()
    return node


def statuses(client: valkey.Valkey, task_ids: list[str]) -> dict[str, str | None]:
    pipe = client.pipeline(transaction=False)
    for task_id in task_ids:
        pipe.hget(f"taskserver:{{q}}:task:{task_id}", "status")
    return {
        task_id: status.decode() if status is not None else None
        for task_id, status in zip(task_ids, pipe.execute(), strict=True)
    }


def switches(deployment: SentinelDeployment) -> int:
    """Failovers done so far, as the first sentinel logged them (``+switch-master``): more
    than the kills when the sentinels also failed over a primary that was not killed."""
    return deployment.sentinels[0].log.read_text(errors="replace").count("+switch-master")


def fail_over_under_load(
    deployment: SentinelDeployment,
    workdir: Path,
    wait_replicas: int,
    slack_from_failover: bool | None = None,
) -> dict[str, Any]:
    """ROUNDS failovers under load; the figures of the run (asserting the 202-again bound).

    ``slack_from_failover``: 202s are due within the failover time + SLACK_S (by default
    only without WAIT_REPLICAS), else within the killed node's return as a replica + SLACK_S.
    """
    if slack_from_failover is None:
        slack_from_failover = not wait_replicas
    deployment.wait_ready()
    workdir.mkdir()
    server = Twistd(
        workdir,
        {
            "WORKERS": "2",
            "REDIS_SENTINELS": deployment.sentinels_setting(),
            "WAIT_REPLICAS": str(wait_replicas),
            "RATE_LIMITS": "",
            "TASK_HANDLER": "sample_handlers:slow",
            "SLOW_HANDLER_S": "0.002",
            "SHUTDOWN_TIMEOUT": "2",
        },
    )
    load: Load | None = None
    try:
        children = server.wait_until_ready(2)
        switches_before = switches(deployment)
        load = Load(server)
        rounds = []
        for _ in range(ROUNDS):
            flowing = load.accepted_since(0)
            wait_for(lambda n=flowing: load.accepted_since(0) > n + 20, 30, "202s flowing")
            time.sleep(STEADY_S)
            old = deployment.primary()
            assert old is not None
            deployment.kill_primary()  # returns once the process is gone
            killed_at = time.monotonic()
            deployment.wait_for_failover(old)
            failover_s = time.monotonic() - killed_at
            deployment.restart(old)  # the sentinels make it a replica of the new primary
            deployment.wait_ready()
            replica_back_s = time.monotonic() - killed_at
            back_at = wait_for(
                lambda at=killed_at: load.first_202_sent_after(at), 30, "a 202 after the kill"
            )
            window_s = back_at - killed_at
            rounds.append(
                {
                    "from": old.name,
                    "failover_s": round(failover_s, 2),
                    "replica_back_s": round(replica_back_s, 2),
                    "no_202_s": round(window_s, 2),
                }
            )
            # With one replica, WAIT_REPLICAS=1 has none to wait for until the killed node is
            # back in sync; without a wait (or with a second replica) the new primary is enough.
            allowed = (failover_s if slack_from_failover else replica_back_s) + SLACK_S
            assert window_s <= allowed, (rounds[-1], f"allowed {allowed:.2f} s")
        assert rounds[0]["from"] != rounds[1]["from"], f"not over and back: {rounds}"
        last_failover = time.monotonic()
        wait_for(lambda: load.accepted_since(last_failover) > 20, 30, "202s after the last round")
        load.stop()
        accepted = sorted(load.accepted())
        primary = deployment.primary()
        assert primary is not None
        client = valkey.Valkey(port=primary.port, password=deployment.password)

        def unsettled() -> dict[str, str | None]:
            return {
                task_id: status
                for task_id, status in statuses(client, accepted).items()
                if status not in ("completed", "dead")
            }

        # A task whose record is gone (None) was lost with a failover and never settles:
        # wait for the others only (waiting for all took the whole 30 s when any was lost).
        with contextlib.suppress(AssertionError):  # what is left is counted and judged below
            wait_for(
                lambda: all(status is None for status in unsettled().values()),
                30,
                "every accepted task with a record completed or dead",
            )
        left = unsettled()
        logged = logged_task_ids(workdir / "logs")
        figures = {
            "wait_replicas": wait_replicas,
            "replicas": len(deployment.data_nodes) - 1,
            "rounds": rounds,
            "failovers": switches(deployment) - switches_before,
            "accepted": len(accepted),
            "longest_without_202_s": round(load.longest_gap_s(), 2),
            "refused": dict(load.refused()),
            "lost": len(left),
            "lost_by_status": dict(Counter(left.values())),
            "duplicates": sum(n - 1 for task_id, n in logged.items() if task_id in set(accepted)),
            "children_restarted": len(server.worker_pids()) - len(children),
        }
        print(f"\nRedis primary SIGKILLed under load behind Sentinel: {figures}")
        assert figures["children_restarted"] == 0, "taskserver's children were restarted"
        assert not {s for s in left.values() if s is not None}, (
            f"accepted tasks stuck (a record, not finished): {figures}"
        )
        assert server.stop() == 0
        return figures
    finally:
        if load is not None:
            load.stop()
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait(10)


def test_with_wait_replicas_1_no_accepted_task_is_lost_across_failovers(
    deployment: SentinelDeployment, tmp_path: Path
) -> None:
    """The one replica is the new primary: POST answers 503 (no replica to wait for) until
    the killed node is back as its replica, and no task that got a 202 is lost."""
    figures = fail_over_under_load(deployment, tmp_path / "wait-1", wait_replicas=1)
    assert figures["accepted"] > 100, figures
    assert figures["lost"] == 0, figures


def test_without_a_wait_failovers_lose_what_the_replica_had_not_got(
    deployment: SentinelDeployment, tmp_path: Path
) -> None:
    """Counted and printed: a task is lost when its 202 left before the replica had it."""
    figures = fail_over_under_load(deployment, tmp_path / "wait-0", wait_replicas=0)
    assert figures["accepted"] > 100, figures
    print(f"\nWAIT_REPLICAS=0 lost {figures['lost']} of {figures['accepted']} accepted tasks")


def test_with_wait_replicas_1_and_two_replicas_posts_go_on_after_the_failover_time(
    deployment: SentinelDeployment, tmp_path: Path
) -> None:
    """Two replicas (one added here, last: it changes the module's deployment): the new
    primary has the other one at once, so 202s come back within the failover time + 2 s
    with WAIT_REPLICAS=1 too, and none of them is lost."""
    add_replica(deployment, "node-c")
    figures = fail_over_under_load(
        deployment, tmp_path / "wait-1-of-2", wait_replicas=1, slack_from_failover=True
    )
    assert figures["accepted"] > 100, figures
    assert figures["lost"] == 0, figures
