"""Waiting for completion (``GET /api/v1/task/<id>?wait=``) through the real twistd.

Two children: the GET may be answered by one child while another runs the task, so
the answer comes through Redis Pub/Sub, not through the process that finished it.
"""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Callable
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from harness import Twistd, wait_for


def timed_get(server: Twistd, path: str, timeout: float = 30.0) -> tuple[float, int, Any]:
    started = time.monotonic()
    code, document = server.request("GET", path, timeout=timeout)
    return time.monotonic() - started, code, document


def open_waiters(server: Twistd) -> float:
    """``taskserver_waiters`` of a scrape: the open ``?wait=`` GETs of the cluster's children,
    as of their last report (once a second)."""
    with urllib.request.urlopen(server.url + "/metrics", timeout=5) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "taskserver_waiters":
                return sample.value
    raise AssertionError("no taskserver_waiters in GET /metrics")


def waiting_get(server: Twistd, task_id: str) -> tuple[threading.Thread, list[Any]]:
    """A ``?wait=30`` GET of the task in a thread of its own; its timed answer lands in
    the list returned once the thread ends."""
    answer: list[tuple[float, int, Any]] = []
    waiting = threading.Thread(
        target=lambda: answer.append(
            timed_get(server, f"/api/v1/task/{task_id}?wait=30", timeout=40)
        )
    )
    waiting.start()
    return waiting, answer


def test_a_waiting_get_answers_completed_as_soon_as_the_task_finishes(
    twistd: Callable[..., Twistd],
) -> None:
    server = twistd(WORKERS="2", TASK_HANDLER="sample_handlers:slow", SLOW_HANDLER_S="1.0")
    server.wait_until_ready(2)
    code, task = server.request("POST", "/api/v1/task", {"user_id": "waiter", "payload": 1})
    assert code == 202, task
    took, code, record = timed_get(server, f"/api/v1/task/{task['task_id']}?wait=20")
    assert code == 200 and record["status"] == "completed", record
    assert record["finished_at"] and record["attempts"] == 1
    print(f"answered {took:.2f} s after the GET (the handler takes 1.0 s)")
    assert took < 5, f"answered after {took:.2f} s: not woken by the completion"
    took, code, again = timed_get(server, f"/api/v1/task/{task['task_id']}?wait=20")
    assert code == 200 and again == record and took < 1, "finished already: answered at once"


def test_a_waiting_get_answers_the_current_record_when_the_time_is_up(
    twistd: Callable[..., Twistd],
) -> None:
    server = twistd()
    server.wait_until_listening()
    code, task = server.request("POST", "/api/v1/task", {"user_id": "later", "delay_s": 3600})
    assert code == 202, task
    took, code, record = timed_get(server, f"/api/v1/task/{task['task_id']}?wait=0.75")
    assert code == 200 and record["status"] == "scheduled", record
    assert 0.7 <= took < 3, f"answered after {took:.2f} s, not at its wait of 0.75 s"
    code, plain = server.request("GET", f"/api/v1/task/{task['task_id']}")
    assert plain == record, "the same document as a GET without wait"

    code, unknown = server.request("GET", "/api/v1/task/" + "0" * 32 + "?wait=30")
    assert code == 404 and unknown["error"] == "task_not_found"
    for bad in ("0", "-1", "60.5", "abc", "nan", "inf", "1,5", ""):
        code, refused = server.request("GET", f"/api/v1/task/{task['task_id']}?wait={bad}")
        assert code == 400 and refused["error"] == "invalid_wait", (bad, refused)
    code, twice = server.request("GET", f"/api/v1/task/{task['task_id']}?wait=1&wait=2")
    assert code == 400 and twice["error"] == "invalid_wait"
    code, unknown_parameter = server.request("GET", f"/api/v1/task/{task['task_id']}?w=1")
    assert code == 400 and unknown_parameter["error"] == "unknown_parameter"


def test_a_cancel_during_the_wait_answers_cancelled(twistd: Callable[..., Twistd]) -> None:
    server = twistd(WORKERS="2")
    server.wait_until_ready(2)
    code, task = server.request("POST", "/api/v1/task", {"user_id": "doomed", "delay_s": 3600})
    assert code == 202, task
    waiting, answer = waiting_get(server, task["task_id"])
    wait_for(lambda: open_waiters(server) == 1, what="the GET counted as a waiter")
    code, cancelled = server.request("DELETE", f"/api/v1/task/{task['task_id']}")
    assert code == 200 and cancelled["status"] == "cancelled"
    waiting.join(40)
    took, code, record = wait_for(lambda: answer and answer[0], what="the waiting GET")
    assert code == 200 and record == cancelled, record
    assert took < 10, f"answered after {took:.2f} s: not woken by the cancel"
    wait_for(lambda: open_waiters(server) == 0, what="the answered GET no longer counted")


def test_a_stopping_server_answers_its_waiters_with_the_current_record(
    twistd: Callable[..., Twistd],
) -> None:
    server = twistd()
    server.wait_until_ready(1)
    code, task = server.request("POST", "/api/v1/task", {"user_id": "stop", "delay_s": 3600})
    assert code == 202, task
    waiting, answer = waiting_get(server, task["task_id"])
    wait_for(lambda: open_waiters(server) == 1, what="the GET counted as a waiter")
    assert server.stop() == 0
    waiting.join(40)
    took, code, record = wait_for(lambda: answer and answer[0], what="the waiting GET")
    assert code == 200 and record["status"] == "scheduled", record
    assert took < 10, f"answered after {took:.2f} s: the stop did not answer it"
