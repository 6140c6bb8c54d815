# -*- test-case-name: tests.test_e2e -*-
"""The whole server in one process: the embedded Redis (if needed), then the web app and consumers.

Start-up is asynchronous (the embedded Redis must be ready before anything
connects to it); if it fails, the reason is logged in one line and the
process exits with status 1.
"""

from __future__ import annotations

import os
import signal
import socket
from typing import IO, Any, cast

from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import ILogObserver, Logger, globalLogPublisher, textFileLogObserver
from twisted.python.logfile import LogFile

from taskserver.child import ChildService
from taskserver.config import RedisAddress, Settings
from taskserver.consumer import Handler
from taskserver.embedded import EmbeddedRedis
from taskserver.listener import describe

SERVER_LOG_NAME = "twistd.log"
SERVER_LOG_MAX_BYTES = 10_000_000
SERVER_LOG_ROTATED_FILES = 5


class TaskServer(Service):
    """Owns the listening socket, the embedded Redis and the process's ChildService."""

    log = Logger()

    def __init__(
        self,
        settings: Settings,
        listener: socket.socket,
        handler: Handler,
        reactor: Any,
        redis_binary: str | None = None,
        data_lock: IO[bytes] | None = None,
    ) -> None:
        self._settings = settings
        self._listener = listener
        self._handler = handler
        self._reactor = reactor
        self._embedded = (
            EmbeddedRedis(redis_binary, settings.data_dir, reactor) if redis_binary else None
        )
        self._data_lock = data_lock
        self._log_observer: ILogObserver | None = None
        self._log_file: LogFile | None = None
        self.child: ChildService | None = None
        self.started: defer.Deferred[None] = defer.Deferred()

    def startService(self) -> None:
        super().startService()
        self._start_server_log()
        defer.Deferred.fromCoroutine(self._start()).addErrback(self._start_failed)

    def _start_server_log(self) -> None:
        """twistd's own log also goes to LOG_DIR/twistd.log."""
        self._settings.log_dir.mkdir(parents=True, exist_ok=True)
        self._log_file = LogFile(
            SERVER_LOG_NAME,
            str(self._settings.log_dir),
            rotateLength=SERVER_LOG_MAX_BYTES,
            maxRotatedFiles=SERVER_LOG_ROTATED_FILES,
        )
        self._log_observer = textFileLogObserver(cast(IO[str], self._log_file))
        globalLogPublisher.addObserver(self._log_observer)

    async def _start(self) -> None:
        redis = await self._redis_address()
        self.child = ChildService(
            self._settings, redis, self._listener, self._handler, self._reactor
        )
        self.child.startService()
        self.log.info(
            "taskserver listening on {url} (pid {pid}, {n} consumer loops)",
            url=describe(self._listener),
            pid=os.getpid(),
            n=self._settings.concurrency,
        )
        self.started.callback(None)

    async def _redis_address(self) -> RedisAddress:
        if self._embedded is None:
            assert self._settings.redis is not None
            self.log.info("Redis: {url}", url=self._settings.redis.display())
            return self._settings.redis
        address = await self._embedded.start()
        self.log.info(
            "Redis: embedded {binary} at {host}:{port}, data in {data_dir}",
            binary=self._embedded.binary,
            host=address.host,
            port=address.port,
            data_dir=self._settings.data_dir.resolve(),
        )
        return address

    def _start_failed(self, failure: Any) -> None:
        self.log.critical("taskserver could not start: {error}", error=failure.value)
        self.started.errback(failure)
        self._reactor.addSystemEventTrigger("after", "shutdown", os._exit, 1)
        self._reactor.stop()

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        return defer.Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        try:
            if self.child is not None:
                await self.child.stopService()
        finally:
            # Redis stops last, and even if the child failed to stop cleanly.
            if self._embedded is not None:
                await self._embedded.stopService()
        self._listener.close()
        self.log.info("taskserver stopped")
        # twistd re-raises the signal that stopped it (exit status -15); a
        # stop that completed cleanly is a success, so it exits 0 instead.
        if getattr(self._reactor, "_exitSignal", None) in (signal.SIGTERM, signal.SIGINT):
            self._reactor._exitSignal = None
        if self._log_observer is not None:
            globalLogPublisher.removeObserver(self._log_observer)
        if self._log_file is not None:
            self._log_file.close()
        if self._data_lock is not None:
            self._data_lock.close()
