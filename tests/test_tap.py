"""twistd glue: options become settings, and every start-up error is one line."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from taskserver.cluster.master import Master
from taskserver.config import OPTIONS
from taskserver.tap import Options, makeService


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No .env, no settings from the environment: only what the test passes."""
    monkeypatch.chdir(tmp_path)
    for option in OPTIONS:  # every setting's variable, as tests/harness.py strips them
        monkeypatch.delenv(option.env, raising=False)
    for name in [n for n in os.environ if n.startswith("REDIS_")]:
        monkeypatch.delenv(name)


def options(*argv: str) -> Options:
    parsed = Options()
    parsed.parseOptions(list(argv))
    return parsed


def test_options_become_settings() -> None:
    settings = options("--port", "0", "--workers", "3", "--data-dir", "d").settings
    assert (settings.port, settings.workers, settings.data_dir) == (0, 3, Path("d"))


def test_an_invalid_option_stops_with_one_line() -> None:
    with pytest.raises(SystemExit) as stopped:
        options("--port", "70000")
    message = str(stopped.value.code)
    assert message.startswith("taskserver: ") and "70000" in message
    assert "\n" not in message


def test_make_service_binds_the_port_and_locks_the_data_folder(tmp_path: Path) -> None:
    service = makeService(options("--port", "0", "--interface", "127.0.0.1", "--workers", "1"))
    assert isinstance(service, Master)
    with pytest.raises(SystemExit, match=r"^taskserver: DATA_DIR .* is in use"):
        makeService(options("--port", "0", "--interface", "127.0.0.1"))
    service._listener.close()
    service._data_lock.close()  # type: ignore[union-attr]


def test_a_port_in_use_stops_with_one_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit) as stopped:
            makeService(options("--port", str(port), "--interface", "127.0.0.1"))
    assert str(stopped.value.code) == f"taskserver: PORT (--port): port {port} is already in use"


def test_an_unknown_handler_stops_before_anything_is_bound() -> None:
    with pytest.raises(SystemExit, match=r"^taskserver: TASK_HANDLER: cannot import 'nope'"):
        makeService(options("--port", "0", "--handler", "nope:missing"))


def test_an_unknown_typed_handler_stops_start_up_with_one_line() -> None:
    with pytest.raises(SystemExit) as stopped:
        makeService(options("--port", "0", "--task-handlers", "email=nope.mod:send"))
    assert str(stopped.value.code) == (
        "taskserver: TASK_HANDLERS (email): cannot import 'nope.mod': No module named 'nope'"
    )
