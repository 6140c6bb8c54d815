"""The benchmark's floor: the least a Klein server can do for ``POST /api/v1/task``.

It parses the JSON body and does one LPUSH, nothing else: no validation, no
rate limit, no status record, no consumers. It runs on the same shared-socket
cluster as taskserver (the same supervisor, scoreboard and balanced port), so
the ratio taskserver/floor measures taskserver's own cost. It is a Klein app
as Klein's documentation shows one: the router for every request and the
default Site options; the shortcuts taskserver takes are taskserver's work.

    python bench/floor.py --port 8100 --workers 2 --redis-port 6390
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import txredisapi
from klein import Klein
from twisted.internet import reactor
from twisted.logger import globalLogBeginner, textFileLogObserver

from taskserver.cluster.balance import BalancedPort, Scoreboard, Seat
from taskserver.cluster.listener import bind_listener
from taskserver.cluster.supervisor import Supervisor
from taskserver.httpserver import TaskSite

QUEUE = "floor:queue"


class Floor:
    app = Klein()

    def __init__(self, redis: Any) -> None:
        self._redis = redis

    @app.route("/api/v1/task", methods=["POST"])
    async def create(self, request: Any) -> bytes:
        body = json.loads(request.content.read())
        await self._redis.lpush(QUEUE, json.dumps(body))
        request.setResponseCode(202)
        request.setHeader(b"content-type", b"application/json")
        return b'{"status":"queued"}'


def child() -> None:
    config = json.loads(os.read(0, 65536))
    redis = txredisapi.lazyConnectionPool(
        port=config["redis_port"], poolsize=4, convertNumbers=False
    )
    site = TaskSite(Floor(redis).app.resource())
    seat = Seat(Scoreboard(4, config["seats"]), config["seat"])
    site.on_open = seat.opened
    site.on_close = seat.closed
    seat.publish()

    def start() -> None:
        from twisted.internet import task

        task.LoopingCall(seat.publish).start(0.1)
        BalancedPort.adopt(reactor, 3, config["family"], site, seat, 100_000)
        os.close(3)
        os.write(5, b"ready\n")

    reactor.callWhenRunning(start)
    reactor.run()


def master(port: int, workers: int, redis_port: int) -> None:
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])
    listener = bind_listener("127.0.0.1", port)
    board = Scoreboard.create(Supervisor.seats_for(workers))
    supervisor = Supervisor(
        reactor,
        workers,
        argv=[sys.executable, __file__, "child"],
        env=dict(os.environ),
        extra_fds={3: listener.fileno(), 4: board.fd},
        config_for=lambda worker: (
            json.dumps(
                {
                    "redis_port": redis_port,
                    "seat": worker.seat,
                    "seats": Supervisor.seats_for(workers),
                    "family": int(listener.family),
                }
            ).encode()
            + b"\n"
        ),
        on_record=lambda worker, line: None,
        on_exit=lambda worker: None,
        process_id_for=lambda slot, generation: f"floor-{slot}.{generation}",
        stop_timeout_s=2.0,
    )
    reactor.callWhenRunning(supervisor.startService)
    reactor.addSystemEventTrigger("before", "shutdown", supervisor.stopService)
    reactor.run()


if __name__ == "__main__":
    if sys.argv[1:] == ["child"]:
        child()
    else:
        parser = argparse.ArgumentParser()
        parser.add_argument("--port", type=int, required=True)
        parser.add_argument("--workers", type=int, required=True)
        parser.add_argument("--redis-port", type=int, required=True)
        arguments = parser.parse_args()
        master(arguments.port, arguments.workers, arguments.redis_port)
