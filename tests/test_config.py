"""Settings: precedence, parsing, and one-line errors."""

from __future__ import annotations

import dataclasses
import os
import types
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import pytest
from hypothesis import given
from hypothesis import strategies as st

from taskserver.config import (
    OPTIONS,
    ConfigError,
    RateTier,
    RedisAddress,
    Settings,
    load_settings,
    parse_rate_limits,
    parse_redis_url,
    resolve_handler,
    resolve_task_handlers,
    settings_from_json,
    settings_to_json,
)
from taskserver.tap import Options


def test_defaults() -> None:
    settings = load_settings({}, {})
    assert settings.port == 8000
    assert settings.interface == ""
    assert settings.log_dir == Path("logs")
    assert settings.data_dir == Path("data")
    assert settings.redis is None  # embedded Redis
    assert settings.concurrency == 16
    assert settings.rate_limits == (RateTier("1s", 1, 1000), RateTier("60s", 20, 60_000))
    assert settings.status_ttl_s == 86_400
    assert settings.handler == "taskserver.handlers:complete"


def test_every_option_sets_a_settings_field_and_every_field_has_an_option() -> None:
    fields = {f.name for f in dataclasses.fields(Settings)}
    assert {o.field for o in OPTIONS} == fields
    assert [o.name for o in OPTIONS if o.field == "redis"] == [
        "redis_url",
        "redis_host",
        "redis_port",
        "redis_username",
        "redis_password",
        "redis_db",
        "redis_tls",
        "redis_sentinels",
        "redis_sentinel_master",
        "redis_sentinel_password",
    ], "only the Redis address combines several options"


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(Settings)])
def test_settings_defaults_are_what_no_configuration_gives(field: str) -> None:
    """Code that builds ``Settings(...)`` directly sees the same defaults as a user."""
    assert getattr(Settings(), field) == getattr(load_settings({}, {}), field)


def test_ip_tiers_are_named_apart_from_the_users() -> None:
    assert load_settings({}, {"IP_RATE_LIMITS": "120/60s"}).ip_rate_limits == (
        RateTier("ip-60s", 120, 60_000),
    )


def _strategy_for(kind: Any) -> st.SearchStrategy[Any]:
    """Values of a Settings field's type; a type this does not know fails the test."""
    if isinstance(kind, types.UnionType):
        (inner,) = (k for k in get_args(kind) if k is not type(None))
        return st.none() | _strategy_for(inner)
    if get_origin(kind) is tuple:
        return st.lists(_strategy_for(get_args(kind)[0]), max_size=3).map(tuple)
    if dataclasses.is_dataclass(kind):
        hints = get_type_hints(kind)
        return st.builds(
            kind, **{f.name: _strategy_for(hints[f.name]) for f in dataclasses.fields(kind)}
        )
    simple: dict[Any, st.SearchStrategy[Any]] = {
        int: st.integers(),
        float: st.floats(allow_nan=False),
        bool: st.booleans(),
        str: st.text(),
        Path: st.text(min_size=1).map(Path),
    }
    return simple[kind]


SETTINGS = _strategy_for(Settings)


@given(SETTINGS)
def test_settings_survive_the_trip_to_a_child(settings: Settings) -> None:
    assert settings_from_json(settings_to_json(settings)) == settings


def test_the_trip_to_a_child_keeps_the_types() -> None:
    """Equality alone would let a tuple come back as a list or a Path as a str."""
    settings = load_settings(
        {},
        {
            "REDIS_URL": "rediss://u:p@h:1/2",
            "TRUSTED_PROXY": "10.0.0.0/8",
            "IP_RATE_LIMITS": "5/1s",
        },
    )
    back = settings_from_json(settings_to_json(settings))
    for f in dataclasses.fields(Settings):
        assert type(getattr(back, f.name)) is type(getattr(settings, f.name)), f.name


def test_command_line_beats_environment() -> None:
    settings = load_settings({"port": "9001"}, {"PORT": "9002", "CONCURRENCY": "7"})
    assert settings.port == 9001
    assert settings.concurrency == 7


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"PORT": "eighty"}, "PORT (--port): expected a whole number, got 'eighty'"),
        ({"PORT": "70000"}, "PORT (--port): expected a number from 0 to 65535, got 70000"),
        ({"CONCURRENCY": "0"}, "CONCURRENCY (--concurrency): expected a number from 1 to 256"),
        (
            {"REDIS_URL": "http://x"},
            "REDIS_URL (--redis-url): expected a redis:// or rediss:// URL",
        ),
        ({"REDIS_URL": "redis://h/abc"}, "database must be a number"),
        ({"RATE_LIMITS": "1 per second"}, "RATE_LIMITS (--rate-limits): expected tiers like"),
        ({"RATE_LIMITS": "1/1s,5/1000ms"}, "two tiers have the same window"),
        ({"TASK_HANDLER": "not a handler"}, "TASK_HANDLER (--handler): expected module:function"),
        (
            {"TASK_HANDLERS": "email"},
            "TASK_HANDLERS (--task-handlers): expected name=module:function entries",
        ),
        ({"TASK_HANDLERS": "Email=a:b"}, "a name is 1-64 of a-z 0-9 _ . -"),
        ({"TASK_HANDLERS": "email=a b"}, "TASK_HANDLERS (--task-handlers): email: expected"),
        ({"TASK_HANDLERS": "a=m:f, a=m:g"}, "the task type 'a' is named twice"),
        ({"RESULT_MAX_BYTES": "-1"}, "RESULT_MAX_BYTES (--result-max-bytes): expected a number"),
        ({"REDIS_TLS": "maybe"}, "REDIS_TLS (--redis-tls): expected true or false"),
        ({"REDIS_PASSWORD": "s3cret"}, "REDIS_PASSWORD set but REDIS_HOST is not"),
        ({"HEARTBEAT_TTL": "nan"}, "HEARTBEAT_TTL (--heartbeat-ttl): expected seconds"),
        ({"KEY_PREFIX": "a b"}, "KEY_PREFIX (--key-prefix): expected 1-64 characters"),
        ({"REDIS_SENTINELS": "host:0"}, "REDIS_SENTINELS (--redis-sentinels): 'host:0' has port 0"),
        (
            {"REDIS_SENTINELS": "a:1?x"},
            "REDIS_SENTINELS (--redis-sentinels): 'a:1?x' is not host:port",
        ),
        (
            {"REDIS_SENTINELS": "a:1#f"},
            "REDIS_SENTINELS (--redis-sentinels): 'a:1#f' is not host:port",
        ),
        ({"REDIS_SENTINELS": ","}, "REDIS_SENTINELS (--redis-sentinels): ',' names no sentinel"),
    ],
)
def test_invalid_values_name_the_setting_in_one_line(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({}, environ)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_redis_url_with_user_password_db_and_tls() -> None:
    address = parse_redis_url("rediss://alice:p%40ss@redis.example:6380/3")
    assert address == RedisAddress("redis.example", 6380, "alice", "p@ss", 3, tls=True)
    assert address.display() == "rediss://alice:***@redis.example:6380/3"
    assert "p@ss" not in repr(address)


def test_original_readme_variables() -> None:
    settings = load_settings(
        {}, {"REDIS_HOST": "cache", "REDIS_PORT": "6390", "REDIS_PASSWORD": "pw"}
    )
    assert settings.redis == RedisAddress("cache", 6390, None, "pw", 0, tls=False)


def test_redis_url_takes_precedence_over_redis_host() -> None:
    settings = load_settings({}, {"REDIS_URL": "redis://a:1/0", "REDIS_HOST": "b"})
    assert settings.redis is not None and settings.redis.host == "a"


def test_rate_limit_units() -> None:
    assert parse_rate_limits("20/1m, 1/500ms") == (
        RateTier("500ms", 1, 500),
        RateTier("1m", 20, 60_000),
    )
    assert parse_rate_limits("") == ()


def test_task_handlers_are_name_spec_pairs_and_survive_the_trip_to_a_child() -> None:
    settings = load_settings(
        {},
        {"TASK_HANDLERS": " email=pkg.mod:send , resize=pkg.img:resize,", "RESULT_MAX_BYTES": "10"},
    )
    assert settings.task_handlers == (("email", "pkg.mod:send"), ("resize", "pkg.img:resize"))
    assert settings.result_max_bytes == 10
    assert settings_from_json(settings_to_json(settings)) == settings
    assert Settings().task_handlers == () and Settings().result_max_bytes == 65536


def test_every_task_handler_is_resolved_and_a_bad_one_is_named() -> None:
    resolved = resolve_task_handlers([("done", "taskserver.handlers:complete")])
    assert list(resolved) == ["done"] and resolved["done"]({"id": "x"}) is None
    with pytest.raises(ConfigError, match=r"^TASK_HANDLERS \(email\): cannot import 'no_such'"):
        resolve_task_handlers([("done", "taskserver.handlers:complete"), ("email", "no_such:f")])
    with pytest.raises(ConfigError, match=r"^TASK_HANDLERS \(x\): 'taskserver.handlers' has no"):
        resolve_task_handlers([("x", "taskserver.handlers:nope")])


def test_handler_resolution() -> None:
    assert resolve_handler("taskserver.handlers:complete")({"id": "x"}) is None
    with pytest.raises(ConfigError, match="cannot import 'no_such_module'"):
        resolve_handler("no_such_module:run")
    with pytest.raises(ConfigError, match="has no function 'nope'"):
        resolve_handler("taskserver.handlers:nope")


class TestOptions:
    """The twistd options: command line over environment over .env."""

    @pytest.fixture(autouse=True)
    def clean_environment(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
        for name in ("PORT", "CONCURRENCY", "LOG_DIR", "REDIS_URL", "REDIS_HOST"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.chdir(tmp_path)
        return tmp_path

    def test_dotenv_is_read_from_the_working_directory(self, tmp_path: Path) -> None:
        (tmp_path / ".env").write_text("PORT=8123\nCONCURRENCY=3\nLOG_DIR=/tmp/x\n")
        options = Options()
        try:
            options.parseOptions(["--concurrency", "5"])
            assert options.settings.port == 8123  # .env
            assert options.settings.concurrency == 5  # command line beats .env
        finally:
            for name in ("PORT", "CONCURRENCY", "LOG_DIR"):
                os.environ.pop(name, None)

    def test_environment_beats_dotenv(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        (tmp_path / ".env").write_text("PORT=8123\n")
        monkeypatch.setenv("PORT", "8124")
        options = Options()
        options.parseOptions([])
        assert options.settings.port == 8124

    def test_invalid_value_exits_with_one_line(self) -> None:
        with pytest.raises(SystemExit) as caught:
            Options().parseOptions(["--port", "-1"])
        assert str(caught.value) == (
            "taskserver: PORT (--port): expected a number from 0 to 65535, got -1"
        )


def test_auto_workers_follow_the_cpu_affinity(monkeypatch: pytest.MonkeyPatch) -> None:
    """A process pinned to two cores of a bigger host runs two children, not one per host core."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3, 5}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert load_settings({}, {"WORKERS": "auto"}).workers == 2
    assert load_settings({}, {}).workers == 2
    assert load_settings({}, {"WORKERS": "3"}).workers == 3
