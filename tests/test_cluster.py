"""The cluster, with real processes: a master, two children, the embedded Redis, loopback HTTP."""

from __future__ import annotations

import os
import re
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from harness import (
    Load,
    Twistd,
    alive,
    logged_task_ids,
    wait_for,
    wait_until_logged,
)

WORKERS = 2


def start_cluster(twistd: Callable[..., Twistd], **environ: str) -> tuple[Twistd, list[int]]:
    server = twistd(WORKERS=str(WORKERS), **environ)
    pids = server.wait_until_ready(WORKERS)
    return server, pids


@pytest.mark.serial  # how connections spread depends on the children keeping up
def test_children_share_the_port_and_connections_spread_evenly(
    twistd: Callable[..., Twistd],
) -> None:
    """64 connections opened at once: every child holds between 0.5 and 1.5 times its share."""
    server, pids = start_cluster(twistd)
    assert len(set(pids)) == WORKERS and server.process.pid not in pids
    fair = 64 / WORKERS
    for run in range(3):
        counts = server.spread(64)
        print(f"run {run}: connections per child {dict(counts)}")
        assert set(counts) == set(pids), "every child serves, the master does not"
        assert all(0.5 * fair <= n <= 1.5 * fair for n in counts.values()), counts
    assert f"[worker-0 {pids[0]}]" in server.output or f"[worker-1 {pids[0]}]" in server.output
    assert server.stop() == 0


def test_a_stalled_child_keeps_no_queued_connection(twistd: Callable[..., Twistd]) -> None:
    server, pids = start_cluster(twistd)
    os.kill(pids[0], signal.SIGSTOP)
    try:
        counts = server.spread(20)  # a connection held by the stopped child would time out
        assert counts == {pids[1]: 20}
    finally:
        os.kill(pids[0], signal.SIGCONT)
    assert server.stop(signal.SIGINT) == 0, "Ctrl-C is a clean stop too"


def test_killed_children_are_replaced_and_no_accepted_task_is_lost(
    twistd: Callable[..., Twistd], tmp_path: Path
) -> None:
    """SIGKILL and /kill under load; then every accepted task is in the log (duplicates counted)."""
    server, _ = start_cluster(twistd, TASK_HANDLER="sample_handlers:slow", SLOW_HANDLER_S="0.02")
    load = Load(server, limit=600)
    victims = []
    for round_ in range(4):
        enough = 100 * (round_ + 1)
        wait_for(lambda: len(load.accepted) >= enough, what="load progressing")  # noqa: B023
        ready_before, started_before = len(server.ready_pids()), len(server.worker_pids())
        if round_ % 2 == 0:
            victim = server.ready_pids()[-1]
            os.kill(victim, signal.SIGKILL)
        else:
            code, answer = server.request("GET", "/kill")
            assert code == 200 and answer["status"] == "exiting"
            victim = answer["pid"]
        victims.append(victim)
        wait_for(
            lambda: len(server.worker_pids()) > started_before,  # noqa: B023
            timeout=30,
            what="a replacement child started",  # at once: see test_supervisor
        )
        wait_for(
            lambda: len(server.ready_pids()) > ready_before,  # noqa: B023
            what="the replacement ready",
        )
    load.finish()
    assert "killed by signal 9" in server.output

    accepted = set(load.accepted)
    logged = wait_until_logged(tmp_path / "logs", accepted)
    duplicates = sum(n - 1 for task_id, n in logged.items() if task_id in accepted and n > 1)
    print(
        f"accepted {len(accepted)}, failed requests {load.failed}, killed {len(victims)} children, "
        f"logged {sum(logged.values())} lines, duplicates {duplicates}"
    )
    assert server.stop() == 0


def test_a_dead_childs_task_is_back_at_once_not_after_its_heartbeat(
    twistd: Callable[..., Twistd],
) -> None:
    """HEARTBEAT_TTL is 30 s, yet the task runs again within seconds: the master gave it back."""
    server = twistd(
        WORKERS="1", TASK_HANDLER="sample_handlers:hang", HEARTBEAT_TTL="30", SHUTDOWN_TIMEOUT="0.5"
    )
    [child] = server.wait_until_ready(1)
    task_id = server.post_task("held")
    assert task_id
    wait_for(lambda: server.status_of(task_id) == "processing", what="task processing")
    os.kill(child, signal.SIGKILL)

    def attempts() -> int:
        return int(server.request("GET", f"/api/v1/task/{task_id}")[1].get("attempts", 0))

    # The deadline is the check: 25 s is before the 30 s heartbeat can have expired.
    wait_for(lambda: attempts() == 2, timeout=25, what="the task started again before 30 s")
    assert "gave 1 in-flight task(s) of worker-0 back to the queue" in server.output
    assert server.stop() == 0


def test_a_task_that_kills_its_child_ends_in_the_dead_letters(
    twistd: Callable[..., Twistd],
) -> None:
    """A poison pill costs an attempt per crash, then stops crashing children.

    The child that accepts the task may also be the one that runs it, and die
    before its 202 is out: the client retries with its Idempotency-Key, as
    the README tells clients to.
    """
    server, _ = start_cluster(twistd, TASK_HANDLER="sample_handlers:suicide", MAX_ATTEMPTS="2")
    task_id = wait_for(
        lambda: server.post_task("poison", idempotency_key="poison-1"),
        timeout=10,
        what="the task accepted",
    )
    wait_for(lambda: server.status_of(task_id) == "dead", timeout=20, what="the task dead-lettered")
    _, document = server.request("GET", f"/api/v1/task/{task_id}")
    assert document["attempts"] == 2
    assert "process died" in document["error"]
    assert server.output.count("killed by signal 9") == 2
    wait_for(  # the master logs it once Redis has answered, maybe after the status is read
        lambda: "1 task(s) worker-" in server.output and "dead-lettered" in server.output,
        timeout=20,
        what="the master's dead-letter line",
    )
    assert server.request("GET", "/healthz")[0] == 200
    assert server.stop() == 0


def test_the_tasks_running_beside_a_poison_pill_are_not_blamed(
    twistd: Callable[..., Twistd], tmp_path: Path
) -> None:
    """A pill kills its child while five slow tasks run beside it, twice (MAX_ATTEMPTS 2).

    A death with several tasks running blames none of them; each then runs
    alone. The five complete, each on its first counted attempt; the pill,
    caught alone, ends in the dead letters.
    """
    server = twistd(
        WORKERS="1",
        TASK_HANDLER="sample_handlers:poison_or_slow",
        SLOW_HANDLER_S="0.5",
        MAX_ATTEMPTS="2",
    )
    server.wait_until_ready(1)
    innocents = [server.post_task(f"innocent-{n}") for n in range(5)]
    assert all(innocents)
    wait_for(
        lambda: all(server.status_of(t) == "processing" for t in innocents),  # type: ignore[arg-type]
        what="the five running",
    )
    pill = wait_for(lambda: _post_pill(server), timeout=10, what="the pill accepted")
    wait_for(lambda: server.status_of(pill) == "dead", timeout=40, what="the pill dead-lettered")
    logged = wait_until_logged(tmp_path / "logs", set(innocents))  # type: ignore[arg-type]
    for task_id in innocents:
        _, document = server.request("GET", f"/api/v1/task/{task_id}")
        assert (document["status"], document["attempts"]) == ("completed", 1), document
        assert logged[task_id] == 1
    assert server.stop() == 0


def _post_pill(server: Twistd) -> str | None:
    """POST the pill, retrying with its Idempotency-Key if the child dies before answering."""
    try:
        code, document = server.request(
            "POST",
            "/api/v1/task",
            {"user_id": "pill", "payload": {"poison": True}},
            {"Idempotency-Key": "pill-1"},
        )
    except OSError:
        return None
    return document["task_id"] if code in (200, 202) else None


def test_sigterm_stops_everything_and_a_restart_runs_what_was_queued(
    twistd: Callable[..., Twistd], tmp_path: Path
) -> None:
    server, _ = start_cluster(
        twistd, TASK_HANDLER="sample_handlers:slow", SLOW_HANDLER_S="0.3", CONCURRENCY="1"
    )
    answers = [server.post_task(f"queued-{n}") for n in range(12)]
    accepted = [task_id for task_id in answers if task_id]
    assert len(accepted) == 12
    children = server.worker_pids()
    assert server.stop() == 0
    left = [pid for pid in [*children, server.redis_pid()] if alive(pid)]
    assert left == [], "a child or Redis outlived the master"
    assert "taskserver stopped" in server.output
    done_before = logged_task_ids(tmp_path / "logs")
    assert len(done_before) < len(accepted), "some tasks should still have been queued"

    again, _ = start_cluster(twistd)
    logged = wait_until_logged(tmp_path / "logs", set(accepted))
    assert all(logged[task_id] == 1 for task_id in accepted), "graceful stop runs nothing twice"
    assert again.stop() == 0


def test_a_crash_looping_child_backs_off(twistd: Callable[..., Twistd], tmp_path: Path) -> None:
    flag = tmp_path / "broken"
    server, _ = start_cluster(twistd, TASK_HANDLER="sample_crashy:run", CRASH_FLAG=str(flag))
    flag.touch()
    assert server.request("GET", "/kill")[0] == 200
    wait_for(lambda: "restarting in 2 s" in server.output, timeout=10, what="the back-off growing")
    assert "restarting in 0.5 s" in server.output and "restarting in 1 s" in server.output
    starts = len(server.worker_pids())
    assert starts <= WORKERS + 4, "no busy restart loop"
    assert server.process.poll() is None, "the master survives"
    assert server.request("GET", "/healthz")[0] == 200, "the other child still serves"
    flag.unlink()
    wait_for(lambda: len(server.ready_pids()) > WORKERS, timeout=15, what="the child back")
    assert server.stop() == 0


def test_sighup_restarts_every_child_without_refusing_a_request(
    twistd: Callable[..., Twistd],
) -> None:
    server, old_pids = start_cluster(twistd)
    answers: list[int] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def ask() -> None:
        while not stop.is_set() and len(answers) < 20_000:
            try:
                answers.append(server.request("GET", "/healthz")[0])
            except OSError as e:
                errors.append(e)

    client = threading.Thread(target=ask, daemon=True)
    client.start()
    wait_for(lambda: len(answers) > 20, what="requests flowing")
    server.process.send_signal(signal.SIGHUP)
    wait_for(lambda: "rolling restart done" in server.output, timeout=30, what="rolling restart")
    stop.set()
    client.join(10)
    print(f"{len(answers)} requests during the rolling restart, {len(errors)} errors")
    assert errors == [] and set(answers) == {200}
    new_pids = server.ready_pids()[WORKERS:]
    assert len(new_pids) == WORKERS and not set(new_pids) & set(old_pids)
    assert server.stop() == 0


def test_children_and_redis_exit_when_the_master_is_killed(
    twistd: Callable[..., Twistd], tmp_path: Path
) -> None:
    server, pids = start_cluster(twistd)
    redis = server.redis_pid()
    assert alive(redis)
    server.process.send_signal(signal.SIGKILL)
    server.process.wait(10)
    wait_for(
        lambda: not any(alive(pid) for pid in [*pids, redis]),
        timeout=10,
        what="children and Redis gone",
    )


@pytest.mark.serial  # under load, through a kill
def test_a_killed_embedded_redis_is_restarted_and_keeps_the_queue(
    twistd: Callable[..., Twistd], tmp_path: Path
) -> None:
    """SIGKILL the embedded Redis under load, another process on its port for a while.

    The squatter makes the first restarts fail (one line each, with the
    back-off) and the children's reconnects meet it (refused: it cannot
    answer the password). Then Redis comes back on its port with its AOF:
    POSTs answer 202 again, the tasks queued before the kill and every task
    accepted during the load complete, no child is restarted, and the
    outage writes a bounded number of log lines (not one per attempt).
    Deadlines are generous: the promptness is the unit tests' business
    (tests/test_embedded.py).
    """
    server, pids = start_cluster(
        twistd, TASK_HANDLER="sample_handlers:slow", SLOW_HANDLER_S="0.05", CONCURRENCY="1"
    )
    queued = [server.post_task(f"queued-{n}") for n in range(40)]
    assert all(queued)
    load = Load(server, threads=2, limit=2000, users="during")
    wait_for(lambda: len(load.accepted) >= 20, timeout=30, what="load flowing")
    redis = server.redis_pid()
    redis_port = int(re.search(r"Redis: embedded .* at 127\.0\.0\.1:(\d+)", server.output)[1])  # type: ignore[index]
    before_the_kill = len(server.output)
    killed_at = time.monotonic()
    os.kill(server.process.pid, signal.SIGSTOP)  # so that the squatter wins the port
    try:
        os.kill(redis, signal.SIGKILL)
        squatter = wait_for(lambda: _bound(redis_port), timeout=10, what="the port taken")
    finally:
        os.kill(server.process.pid, signal.SIGCONT)
    with squatter:
        wait_for(
            lambda: server.output.count("embedded Redis could not restart") >= 3,
            timeout=30,
            what="three restarts refused by the squatter",
        )
    wait_for(lambda: "embedded Redis is back" in server.output, timeout=60, what="Redis restarted")
    accepted_when_back = len(load.accepted)
    wait_for(
        lambda: len(load.accepted) > accepted_when_back + 10,
        timeout=30,
        what="202s again after the restart",
    )
    outage = server.output[before_the_kill:]
    outage_s = time.monotonic() - killed_at
    load.finish()
    assert f"embedded Redis (pid {redis}) died: killed by signal 9" in server.output
    accepted = set(queued) | set(load.accepted)  # type: ignore[arg-type]
    logged = wait_until_logged(tmp_path / "logs", accepted, timeout=60)
    assert all(logged[task_id] >= 1 for task_id in accepted)
    assert sorted(server.worker_pids()) == sorted(pids), "no child was restarted"
    lines = outage.splitlines()
    print(f"{len(lines)} log lines in {outage_s:.1f} s of outage:\n" + "\n".join(lines))
    assert len(lines) <= outage_line_bound(outage, outage_s), "one line per change of state"
    assert server.stop() == 0


def _bound(port: int) -> socket.socket | None:
    """A socket listening on ``port``, or None if it is still taken."""
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        squatter.bind(("127.0.0.1", port))
    except OSError:
        squatter.close()
        return None
    squatter.listen(50)
    return squatter


#: The valkey-server start-up lines relayed once a restart succeeds (21 in valkey 9 with an AOF).
VALKEY_START_LINES = 30
#: Warnings repeated through an outage, each throttled (taskserver.logthrottle) to a first
#: line plus one summary per window: heartbeat, reaper and the 503s, each with a timeout
#: and a lost-connection wording.
THROTTLED_KINDS_PER_CHILD = 6


def outage_line_bound(outage: str, seconds: float) -> int:
    """What an embedded-Redis outage may write: a constant per child and per restart attempt.

    Master: "died", "back", the successful start's relayed lines, one line
    per failed attempt. Each child: Redis unreachable/reachable (2), the
    dispatcher's cannot fetch/fetching again (2), one "write failed,
    retrying" per in-flight task (CONCURRENCY 1), and the throttled kinds.
    """
    from taskserver.logthrottle import REPEAT_WINDOW_S

    failed_attempts = outage.count("embedded Redis could not restart")
    master = 2 + VALKEY_START_LINES + failed_attempts
    windows = 1 + int(seconds // REPEAT_WINDOW_S)
    per_child = 2 + 2 + 1 + THROTTLED_KINDS_PER_CHILD * windows
    return master + WORKERS * per_child
