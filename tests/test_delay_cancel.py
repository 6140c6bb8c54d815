"""Delayed tasks and cancel through the real ``twistd -n taskserver`` over loopback HTTP."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from harness import Twistd, logged_task_ids, wait_for, wait_until_logged


def _seconds(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).astimezone(UTC).timestamp()


def test_a_delayed_task_is_scheduled_then_runs_on_time_and_a_cancelled_one_never_runs(
    twistd: Callable[..., Twistd], tmp_path: Path
) -> None:
    server = twistd()
    server.wait_until_listening()
    code, delayed = server.request("POST", "/api/v1/task", {"user_id": "later", "delay_s": 1.5})
    assert code == 202 and delayed["status"] == "scheduled", delayed
    assert server.status_of(delayed["task_id"]) == "scheduled"
    code, doomed = server.request("POST", "/api/v1/task", {"user_id": "doomed", "delay_s": 3600})
    assert code == 202, doomed
    code, cancelled = server.request("DELETE", f"/api/v1/task/{doomed['task_id']}")
    assert code == 200 and cancelled["status"] == "cancelled" and cancelled["cancelled_at"]
    code, again = server.request("DELETE", f"/api/v1/task/{doomed['task_id']}")
    assert code == 200 and again["status"] == "cancelled", "cancelling twice is no error"

    done = wait_for(
        lambda: server.status_of(delayed["task_id"]) == "completed" or None,
        what="the delayed task's completion",
    )
    assert done
    code, record = server.request("GET", f"/api/v1/task/{delayed['task_id']}")
    late = _seconds(record["started_at"]) - _seconds(record["run_at"])
    print(f"delayed task started {late * 1000:.0f} ms after its run_at")
    assert -0.05 <= late < 1.0, record  # the bound: within 1 s of its time
    code, refused = server.request("DELETE", f"/api/v1/task/{delayed['task_id']}")
    assert (code, refused["error"], refused["status"]) == (409, "task_not_cancellable", "completed")

    code, missing = server.request("DELETE", "/api/v1/task/" + "0" * 32)
    assert (code, missing["error"]) == (404, "task_not_found")
    code, missing = server.request("DELETE", "/api/v1/task/not-an-id")
    assert (code, missing["error"]) == (404, "task_not_found")
    for body, error in [
        ({"user_id": "u", "delay_s": -1}, "invalid_delay"),
        ({"user_id": "u", "delay_s": "1"}, "invalid_delay"),
        ({"user_id": "u", "delay_s": 1, "run_at": "2026-01-01T00:00:00Z"}, "invalid_delay"),
        ({"user_id": "u", "run_at": "tomorrow"}, "invalid_run_at"),
        ({"user_id": "u", "run_at": "2999-01-01T00:00:00Z"}, "invalid_run_at"),
    ]:
        code, answer = server.request("POST", "/api/v1/task", body)
        assert (code, answer["error"]) == (400, error), body
    code, past = server.request(
        "POST", "/api/v1/task", {"user_id": "past", "run_at": "2020-01-01T00:00:00Z"}
    )
    assert code == 202 and past["status"] == "queued", "a time in the past runs now"

    wait_until_logged(tmp_path / "logs", {past["task_id"], delayed["task_id"]})
    assert doomed["task_id"] not in logged_task_ids(tmp_path / "logs")
    assert server.stop() == 0
