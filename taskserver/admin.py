# -*- test-case-name: tests.test_admin -*-
"""``taskserver-admin``: look at and repair the queue of a running taskserver.

It reads the same configuration as the server (command-line options,
environment, ``.env``). With no Redis configured it finds the embedded one
through the address file the master writes in ``DATA_DIR``.

    taskserver-admin stats                 the dashboard's numbers: queue, totals, latency, workers
    taskserver-admin dead [--limit N]      the dead-letter list, newest first (JSON lines)
    taskserver-admin requeue [TASK_ID...]  dead tasks back to the queue (all if none named)
    taskserver-admin purge                 empty the dead-letter list
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from dotenv import find_dotenv, load_dotenv
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime

from taskserver.cluster.embedded import read_embedded_address
from taskserver.config import ConfigError, RedisAddress, Settings, load_settings
from taskserver.deadletters import dead_letters, purge, requeue
from taskserver.keys import Keys
from taskserver.metrics import configured_tiers
from taskserver.redisclient import connect
from taskserver.stats import address_label, read_stats

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


async def stats(
    redis: Any,
    keys: Keys,
    clock: IReactorTime,
    address: RedisAddress,
    embedded: bool,
    tiers: Sequence[str] = (),
) -> dict[str, Any]:
    """The dashboard's overview (the same reading, :func:`taskserver.stats.read_stats`),
    and the tasks in flight per consumer of each process."""
    reading = await read_stats(
        redis,
        keys,
        clock,
        TIMEOUT_S,
        redis_label=address_label(address),
        embedded=embedded,
        history=True,
    )
    return {**reading.overview(tiers=tiers), "processes": reading.processes()}


def _print_stats(report: dict[str, Any]) -> None:
    queue, totals, latency, redis = (
        report["queue"],
        report["totals"],
        report["latency"],
        report["redis"],
    )
    print(f"pending     {queue['pending']}   (oldest: {_seconds(queue['oldest_pending_age_s'])})")
    print(f"suspects    {queue['suspects']}   (running when their process died; run alone next)")
    print(f"delayed     {queue['delayed']}   (retries and delayed tasks waiting for their time)")
    print(f"dead        {queue['dead']}")
    print(f"processing  {queue['processing']}")
    for process, info in sorted(report["processes"].items()):
        state = "alive" if info["alive"] else "no heartbeat (its tasks will be reclaimed)"
        print(f"  {process}: {sum(info['processing'].values())} in flight, {state}")
    print("totals      " + ", ".join(f"{name} {n}" for name, n in totals.items()))
    limited = ", ".join(f"{tier} {n}" for tier, n in report["rate_limited"].items()) or "none"
    print(f"limited     {limited}   (requests refused per rate-limit tier)")
    for what in ("wait", "run"):
        p50, p95 = latency[what]["p50"], latency[what]["p95"]
        print(
            f"{what:<12}p50 {_seconds(p50)}, p95 {_seconds(p95)}   (last {latency['window_s']} s)"
        )
    print(f"workers     {len(report['workers'])}")
    for w in report["workers"]:
        print(
            f"  {w['host']} pid {w['pid']}: up {_seconds(w['uptime_s'])}, {w['restarts']} restarts,"
            f" {w['in_flight']} in flight, {w['connections']} connections"
        )
    kind = "embedded" if redis["embedded"] else "external"
    memory = redis["used_memory_bytes"]
    used = "?" if memory is None else f"{memory / 1_048_576:.1f} MiB"
    print(f"redis       {redis['address']} ({kind}, version {redis['version'] or '?'}, {used})")


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.1f} s"


async def run(reactor: Any, arguments: argparse.Namespace, settings: Settings) -> None:
    """One admin command against the configured Redis."""
    redis = connect(redis_address(settings), 1, TIMEOUT_S)
    keys = Keys(settings.key_prefix)
    try:
        if arguments.command == "stats":
            address, embedded = redis_address(settings), settings.redis is None
            tiers = configured_tiers(settings)
            report = await stats(redis, keys, reactor, address, embedded, tiers)
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
