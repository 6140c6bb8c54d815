# -*- test-case-name: tests.test_admin -*-
"""``taskserver-admin``: look at and repair the queue of a running taskserver.

It reads the same configuration as the server (command-line options,
environment, ``.env``). With no Redis configured it finds the embedded one
through the address file the master writes in ``DATA_DIR``.

    taskserver-admin stats                 queue depth, delayed, dead, in flight per consumer
    taskserver-admin dead [--limit N]      the dead-letter list, newest first (JSON lines)
    taskserver-admin requeue [TASK_ID...]  dead tasks back to the queue (all if none named)
    taskserver-admin purge                 empty the dead-letter list
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from typing import Any

from dotenv import find_dotenv, load_dotenv
from twisted.internet import defer, task

from taskserver.cluster.embedded import read_embedded_address
from taskserver.config import ConfigError, RedisAddress, Settings, load_settings
from taskserver.deadletters import dead_letters, purge, requeue
from taskserver.ids import process_of
from taskserver.keys import Keys
from taskserver.redisclient import connect

TIMEOUT_S = 5.0
#: The whole command gives up after this long (Redis unreachable, say).
RUN_TIMEOUT_S = 30.0


def redis_address(settings: Settings) -> RedisAddress:
    """The configured Redis, or the embedded one a master in DATA_DIR is running."""
    if settings.redis is not None:
        return settings.redis
    address = read_embedded_address(settings.data_dir)
    if address is None:
        raise ConfigError(
            f"no Redis configured and no running taskserver in DATA_DIR {str(settings.data_dir)!r}"
        )
    return address


async def stats(redis: Any, keys: Keys) -> dict[str, Any]:
    """Queue depth, delayed retries, dead letters, and in-flight tasks per consumer."""
    consumers = sorted(await redis.smembers(keys.consumers))
    in_flight = {c: int(await redis.llen(keys.processing(c))) for c in consumers}
    alive = {
        p: bool(await redis.exists(keys.heartbeat(p))) for p in {process_of(c) for c in consumers}
    }
    by_process: dict[str, dict[str, Any]] = defaultdict(lambda: {"alive": False, "processing": {}})
    for consumer, count in in_flight.items():
        process = process_of(consumer)
        by_process[process]["alive"] = alive[process]
        by_process[process]["processing"][consumer] = count
    return {
        "pending": int(await redis.llen(keys.pending)),
        "suspects": int(await redis.llen(keys.suspects)),
        "delayed": int(await redis.zcard(keys.delayed)),
        "dead": int(await redis.llen(keys.dead)),
        "processing": sum(in_flight.values()),
        "processes": dict(by_process),
    }


def _print_stats(report: dict[str, Any]) -> None:
    print(f"pending     {report['pending']}")
    print(f"suspects    {report['suspects']}   (running when their process died; run alone next)")
    print(f"delayed     {report['delayed']}   (retries waiting for their time)")
    print(f"dead        {report['dead']}")
    print(f"processing  {report['processing']}")
    for process, info in sorted(report["processes"].items()):
        state = "alive" if info["alive"] else "no heartbeat (its tasks will be reclaimed)"
        print(f"  {process}: {sum(info['processing'].values())} in flight, {state}")


async def run(reactor: Any, arguments: argparse.Namespace, settings: Settings) -> None:
    """One admin command against the configured Redis."""
    redis = connect(redis_address(settings), 1, TIMEOUT_S)
    keys = Keys(settings.key_prefix)
    try:
        if arguments.command == "stats":
            report = await stats(redis, keys)
            if arguments.json:
                print(json.dumps(report, indent=2))
            else:
                _print_stats(report)
        elif arguments.command == "dead":
            for entry in await dead_letters(redis, keys, arguments.limit):
                print(json.dumps(entry, ensure_ascii=False))
        elif arguments.command == "requeue":
            print(f"requeued {await requeue(redis, keys, arguments.task_ids)} dead task(s)")
        elif arguments.command == "purge":
            print(f"purged {await purge(redis, keys)} dead task(s)")
    finally:
        await redis.disconnect()


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="taskserver-admin", description="Look at and repair a taskserver's queue."
    )
    top.add_argument("--redis-url", help="as the server's REDIS_URL (default: the same config)")
    top.add_argument("--key-prefix", help="as the server's KEY_PREFIX")
    top.add_argument("--data-dir", help="as the server's DATA_DIR (finds the embedded Redis)")
    commands = top.add_subparsers(dest="command", required=True)
    stats_command = commands.add_parser("stats", help="queue depth, delayed, dead, in flight")
    stats_command.add_argument("--json", action="store_true", help="machine-readable output")
    dead = commands.add_parser("dead", help="list dead tasks, newest first (JSON lines)")
    dead.add_argument("--limit", type=int, default=100)
    again = commands.add_parser("requeue", help="put dead tasks back in the queue")
    again.add_argument("task_ids", nargs="*", help="only these (default: every dead task)")
    commands.add_parser("purge", help="delete every dead task")
    return top


def main(argv: list[str] | None = None) -> None:
    arguments = parser().parse_args(argv)
    load_dotenv(find_dotenv(usecwd=True), override=False)
    cli = {
        "redis_url": arguments.redis_url,
        "key_prefix": arguments.key_prefix,
        "data_dir": arguments.data_dir,
    }
    try:
        settings = load_settings(cli, os.environ)
        redis_address(settings)
    except ConfigError as e:
        sys.exit(f"taskserver-admin: {e}")

    def start(reactor: Any) -> defer.Deferred[None]:
        running = defer.Deferred.fromCoroutine(run(reactor, arguments, settings))
        return running.addTimeout(RUN_TIMEOUT_S, reactor)

    task.react(start)
