"""End to end: the real ``twistd -n taskserver`` as a subprocess, over loopback HTTP.

These run the installed plugin from a scratch working directory (not the
source tree), the way a user runs it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from harness import Twistd, alive, wait_for
from taskserver.config import RedisAddress


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
    # The line is written before the outcome is sent (one writer, then COMPLETE): the
    # record says completed a moment after the line is in the log.
    wait_for(lambda: server.status_of(task_id) == "completed", what="the completed record")
    assert (tmp_path / "logs" / "twistd.log").exists()

    redis = server.redis_pid()
    assert alive(redis)
    assert server.stop() == 0
    assert not alive(redis), "embedded Redis left running"
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
    """Two instances on one Redis, as two hosts would run them: the survivor reaps the task."""
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
    # How soon (HEARTBEAT_TTL and a half) is tests/test_consumer_timers.py's business.
    wait_for(
        lambda: survivor.status_of(task_id) == "completed",
        timeout=60,
        what="task rerun by survivor",
    )
    _, document = survivor.request("GET", f"/api/v1/task/{task_id}")
    assert document["attempts"] == 2
    assert survivor.stop() == 0


def test_simultaneous_requests_across_processes_admit_exactly_one(
    twistd: Callable[..., Twistd], redis_server: RedisAddress
) -> None:
    """40 requests of a new user at once, spread over two server processes: one 202.

    The window is a minute, not the default second, so a slow machine cannot spread
    the 40 over two windows: what is tested is that the check-and-charge is atomic.
    """
    shared = {
        "REDIS_URL": f"redis://{redis_server.host}:{redis_server.port}/0",
        "KEY_PREFIX": f"e2e{time.monotonic_ns()}",
        "RATE_LIMITS": "1/60s",
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


def test_typed_and_untyped_tasks_run_their_handlers_and_keep_their_results(
    twistd: Callable[..., Twistd], tmp_path: Path
) -> None:
    """TASK_HANDLERS routes by type; GET shows each result, or why it was not kept."""
    server = twistd(
        TASK_HANDLER="sample_handlers:echo",
        TASK_HANDLERS="echo=sample_handlers:echo,nojson=sample_handlers:not_json,"
        "big=sample_handlers:too_large",
    )
    server.wait_until_listening()
    submitted = {}
    for user, body in [
        ("plain", {"payload": {"n": 1}}),
        ("typed", {"payload": [1, "é"], "type": "echo"}),
        ("set", {"type": "nojson"}),
        ("large", {"type": "big"}),
    ]:
        code, created = server.request("POST", "/api/v1/task", {"user_id": user, **body})
        assert code == 202, created
        assert created.get("type") == body.get("type")
        submitted[user] = created["task_id"]
    for body, error in [
        ({"user_id": "u", "type": "fax"}, "unknown_task_type"),
        ({"user_id": "u", "type": 5}, "invalid_task_type"),
        ({"user_id": "u", "type": ""}, "invalid_task_type"),
    ]:
        code, refused = server.request("POST", "/api/v1/task", body)
        assert (code, refused["error"]) == (400, error), refused
        if error == "unknown_task_type":
            assert refused["message"].endswith("the known types: big, echo, nojson")

    def finished(task_id: str) -> dict[str, Any] | None:
        code, document = server.request("GET", f"/api/v1/task/{task_id}")
        return document if code == 200 and document["status"] == "completed" else None

    records = {
        user: wait_for(lambda t=task_id: finished(t), what=f"{user}'s task completed")
        for user, task_id in submitted.items()
    }
    assert records["plain"]["result"] == {"echo": {"n": 1}, "type": None}
    assert "type" not in records["plain"]
    assert records["typed"]["result"] == {"echo": [1, "é"], "type": "echo"}
    assert records["typed"]["type"] == "echo"
    assert records["set"]["result_note"] == "result not stored: not JSON (set)"
    assert records["large"]["result_note"] == (
        "result not stored: 70002 bytes, over RESULT_MAX_BYTES 65536"
    )
    assert "result" not in records["set"] and "result" not in records["large"]
    lines = (tmp_path / "logs" / "tasks.log").read_text().splitlines()
    by_id = {line.split("task_id=")[1][:32]: line for line in lines}
    assert by_id[submitted["typed"]].endswith(' type="echo"')
    assert by_id[submitted["large"]].endswith(' type="big"')
    assert " type=" not in by_id[submitted["plain"]]
    assert server.stop() == 0
    assert "Traceback" not in server.output
