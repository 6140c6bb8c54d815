# -*- test-case-name: tests.test_integration -*-
"""What one taskserver process runs: Redis pools, the web app, the consumers.

Started after Redis is known, on a listening socket made elsewhere, so the
same service runs in a single process or in each child of a cluster.
Stopping is ordered: stop accepting, let consumers finish and give back
their tasks, then close the Redis connections.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger

from taskserver.config import RedisAddress, Settings
from taskserver.consumer import ConsumerService, Handler
from taskserver.keys import Keys
from taskserver.queue import TaskQueue
from taskserver.ratelimit import RateLimiter
from taskserver.redisclient import connect
from taskserver.tasklog import TaskLog
from taskserver.web import TaskAPI

#: Connections for request-path commands (pipelined; blocking pops have their own pool).
API_POOL_SIZE = 4


class ChildService(Service):
    """The web app and consumers of one process, wired to one Redis."""

    log = Logger()

    def __init__(
        self,
        settings: Settings,
        redis: RedisAddress,
        listener: socket.socket,
        handler: Handler,
        reactor: Any,
    ) -> None:
        self._settings = settings
        self._redis = redis
        self._listener = listener
        self._handler = handler
        self._reactor = reactor
        self._pools: list[Any] = []
        self._port: Any = None
        self._task_log: TaskLog | None = None
        self.consumers: ConsumerService | None = None
        self.queue: TaskQueue | None = None

    def startService(self) -> None:
        super().startService()
        settings, reactor = self._settings, self._reactor
        api = connect(self._redis, API_POOL_SIZE, settings.redis_timeout_s)
        blocking = connect(self._redis, settings.concurrency, settings.redis_timeout_s)
        self._pools = [api, blocking]
        keys = Keys(settings.key_prefix)
        self.queue = TaskQueue(api, keys, settings.status_ttl_s, settings.redis_timeout_s, reactor)
        limiter = RateLimiter(api, keys, settings.rate_limits, settings.redis_timeout_s, reactor)
        site = TaskAPI(limiter, self.queue, reactor).site()
        self._port = reactor.adoptStreamPort(self._listener.fileno(), self._listener.family, site)
        self._task_log = TaskLog(settings.log_dir, settings.task_log_max_bytes, os.getpid())
        self.consumers = ConsumerService(
            queue=self.queue,
            blocking_redis=blocking,
            handler=self._handler,
            task_log=self._task_log,
            concurrency=settings.concurrency,
            heartbeat_ttl_s=settings.heartbeat_ttl_s,
            shutdown_timeout_s=settings.shutdown_timeout_s,
            clock=reactor,
        )
        self.consumers.startService()

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        return defer.Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self._port is not None:
            await self._port.stopListening()
        if self.consumers is not None:
            await self.consumers.stopService()
        for pool in self._pools:
            await pool.disconnect()
        self._pools = []
        if self._task_log is not None:
            self._task_log.close()
