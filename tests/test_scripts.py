"""The Lua loader: every script assembles and compiles, and a forgotten script is loaded again."""

from __future__ import annotations

import re
from importlib.resources import files
from typing import Any

import pytest
import pytest_twisted

from taskserver import admin, deadletters, idempotency, metrics, queue, ratelimit, scripts, stats
from taskserver.keys import Keys

SCRIPTS = {
    name: value
    for module in (queue, ratelimit, idempotency, admin, deadletters, metrics, stats)
    for name, value in vars(module).items()
    if isinstance(value, scripts.Script)
}


def test_every_lua_file_is_a_script_someone_loads() -> None:
    on_disk = {
        entry.name.removesuffix(".lua")
        for entry in (files("taskserver") / "lua").iterdir()
        if entry.name.endswith(".lua")
    }
    assert on_disk == {script.name for script in SCRIPTS.values()}


def test_snippets_are_prepended_once_each() -> None:
    fail = scripts.load("fail")
    assert fail.source.count("local function now_ms()") == 1
    assert fail.source.count("local function dead_letter(") == 1
    assert fail.source.count("local function record_outcome(") == 1
    assert fail.source.endswith("return outcome\n")
    assert re.fullmatch("[0-9a-f]{40}", fail.sha1)


def test_a_missing_snippet_fails_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    real_read = scripts._read

    def read(path: str) -> str:
        return "-- uses: nothing_here\nreturn 1\n" if path == "x.lua" else real_read(path)

    monkeypatch.setattr(scripts, "_read", read)
    with pytest.raises(FileNotFoundError, match="nothing_here"):
        scripts.load("x")


@pytest.mark.parametrize("name", sorted(SCRIPTS))
@pytest_twisted.ensureDeferred
async def test_every_script_compiles_in_redis(redis: Any, name: str) -> None:
    script = SCRIPTS[name]
    assert await redis.execute_command("SCRIPT", "LOAD", script.source) == script.sha1


async def script_calls(redis: Any) -> dict[str, int]:
    info = str(await redis.execute_command("INFO", "commandstats"))
    return {name: int(n) for name, n in re.findall(r"cmdstat_(eval|evalsha):calls=(\d+)", info)}


@pytest_twisted.ensureDeferred
async def test_a_script_redis_forgot_is_loaded_again_and_runs_once(redis: Any, keys: Keys) -> None:
    """After SCRIPT FLUSH (what a restart or failover does), EVALSHA fails and EVAL loads it."""
    heartbeat = queue.HEARTBEAT
    await heartbeat(redis, [keys.heartbeat("p"), keys.consumers], [30_000, "p#0"])
    await redis.execute_command("SCRIPT", "FLUSH")
    before = await script_calls(redis)
    assert await heartbeat(redis, [keys.heartbeat("p"), keys.consumers], [30_000, "p#1"]) == 1
    after = await script_calls(redis)
    assert (after["evalsha"] - before.get("evalsha", 0), after["eval"] - before.get("eval", 0)) == (
        1,
        1,
    )
    assert await redis.smembers(keys.consumers) == {"p#0", "p#1"}
    again = await script_calls(redis)
    await heartbeat(redis, [keys.heartbeat("p"), keys.consumers], [30_000, "p#2"])
    assert (await script_calls(redis))["evalsha"] - again["evalsha"] == 1, "by SHA from now on"
