"""The embedded Redis: binary lookup, data-folder lock, persistence, and surviving its restart."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor

from conftest import RunningServer, connect_raw, eventually
from taskserver.config import ConfigError
from taskserver.embedded import EmbeddedRedis, find_server_binary, lock_data_dir


def test_explicit_binary_must_exist() -> None:
    with pytest.raises(ConfigError, match="REDIS_SERVER_BIN: '/nope/redis-server' is not"):
        find_server_binary("/nope/redis-server")


def test_bundled_binary_is_found_without_one_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    assert find_server_binary(None).endswith("valkey-server")


def test_one_server_per_data_folder(tmp_path: Path) -> None:
    held = lock_data_dir(tmp_path)
    try:
        with pytest.raises(ConfigError, match="is in use by another taskserver"):
            lock_data_dir(tmp_path)
    finally:
        held.close()
    lock_data_dir(tmp_path).close()


async def start_redis(data_dir: Path, port: int | None = None) -> EmbeddedRedis:
    server = EmbeddedRedis(find_server_binary(None), data_dir, reactor)
    await server.start(port)
    return server


@pytest_twisted.ensureDeferred
async def test_data_survives_a_restart(tmp_path: Path) -> None:
    server = await start_redis(tmp_path)
    assert server.address is not None
    client = connect_raw(server.address)
    await client.lpush("kept", "task")
    await client.disconnect()
    await server.stopService()

    again = await start_redis(tmp_path)
    assert again.address is not None
    client = connect_raw(again.address)
    try:
        assert await client.lrange("kept", 0, -1) == ["task"]
        policy = await client.execute_command("CONFIG", "GET", "maxmemory-policy")
        assert policy == ["maxmemory-policy", "noeviction"]
    finally:
        await client.disconnect()
        await again.stopService()


@pytest_twisted.ensureDeferred
async def test_server_recovers_when_redis_comes_back(
    start_server: Callable[..., RunningServer], tmp_path: Path
) -> None:
    """Redis stops and restarts on the same port: 503 meanwhile, then back to work by itself."""
    redis = await start_redis(tmp_path / "redis")
    address = redis.address
    assert address is not None
    server = start_server(redis=address, shutdown_timeout_s=0.5)

    async def post(user: str) -> Any:
        return await treq.post(
            server.url + "/api/v1/task",
            json={"user_id": user},
            headers={"Content-Type": "application/json"},
        )

    assert (await post("before")).code == 202
    await redis.stopService()
    assert (await post("during")).code == 503
    assert (await treq.get(server.url + "/readyz")).code == 503

    back_at = reactor.seconds()
    redis = await start_redis(tmp_path / "redis", port=address.port)
    try:

        async def accepted() -> Any:
            response = await post(f"after-{reactor.seconds()}")
            return response if response.code == 202 else None

        response = await eventually(accepted, timeout=5.0)
        assert reactor.seconds() - back_at < 2.0, "enqueueing did not resume within 2 s"

        watcher = connect_raw(redis.address)  # type: ignore[arg-type]

        async def every_consumer_waiting() -> bool:
            clients = await watcher.execute_command("CLIENT", "LIST")
            return str(clients).count("cmd=brpoplpush") == 1  # the dispatcher of the process

        await eventually(every_consumer_waiting, timeout=5.0)
        assert reactor.seconds() - back_at < 2.0, "blocking pops did not resume within 2 s"
        await watcher.disconnect()
        task_id = (await response.json())["task_id"]

        async def completed() -> bool:
            answer = await treq.get(f"{server.url}/api/v1/task/{task_id}")
            return (await answer.json()).get("status") == "completed"

        await eventually(completed, timeout=5.0)
    finally:
        await server.stop()
        await redis.stopService()
