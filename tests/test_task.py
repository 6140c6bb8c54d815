"""The task record and the timestamp format (pure logic)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from taskserver.task import Task, iso_utc


def reference(seconds: float) -> str:
    moment = datetime.fromtimestamp(seconds, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def test_iso_utc_examples() -> None:
    assert iso_utc(0) == "1970-01-01T00:00:00.000Z"
    assert iso_utc(1795822113.6597) == "2026-11-27T23:28:33.659Z"
    assert iso_utc(1795822113.9999996) == "2026-11-27T23:28:34.000Z", "rounds into the next second"


@given(st.floats(min_value=0, max_value=4_102_444_800, allow_nan=False))
def test_iso_utc_is_what_datetime_says(seconds: float) -> None:
    assert iso_utc(seconds) == reference(seconds)


def test_the_handler_gets_a_fresh_dict_with_the_attempt() -> None:
    task = Task.new("alice", {"n": [1, 2]}, now=0)
    raw = task.to_json()
    argument = Task.from_json(raw).handler_argument(2)
    assert argument == {
        "id": task.id,
        "user_id": "alice",
        "payload": {"n": [1, 2]},
        "queued_at": "1970-01-01T00:00:00.000Z",
        "attempts": 2,
    }
    argument["payload"]["n"].append(3)
    assert Task.from_json(raw).handler_argument(2)["payload"] == {"n": [1, 2]}
    assert Task.from_json(raw) == task


def test_a_queue_entry_is_parsed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The consumer's path: from_json, then handler_argument, one JSON parse in all."""
    raw = Task.new("bob", [1, {"deep": []}], now=0).to_json()
    parses: list[str] = []
    real_loads = json.loads

    def counting_loads(text: str, **options: Any) -> Any:
        parses.append(text)
        return real_loads(text, **options)

    monkeypatch.setattr(json, "loads", counting_loads)
    assert Task.from_json(raw).handler_argument(1)["payload"] == [1, {"deep": []}]
    assert parses == [raw]


def test_a_delayed_task_carries_its_run_at_and_an_undelayed_entry_is_unchanged() -> None:
    delayed = Task.new("u", 1, now=0.0, run_at="1970-01-01T01:00:00.000Z")
    assert Task.from_json(delayed.to_json()) == delayed
    assert delayed.due_at == "1970-01-01T01:00:00.000Z"
    plain = Task.new("u", 1, now=0.0)
    assert "run_at" not in json.loads(plain.to_json()) and plain.due_at == plain.queued_at
