# -*- test-case-name: tests.test_durability -*-
"""What a 202 promises (DURABILITY, WAIT_REPLICAS), and the checks that Redis can keep it.

``write``: the admission script has run in Redis (in memory). ``fsync``: it
is also in Redis's append-only file on disk. ``WAIT_REPLICAS=N``: N replicas
have it too. The admissions of a reactor turn share one script call
(:mod:`taskserver.coalesce`), so one wait covers them all: a group commit.

How the wait is made. On the embedded Redis, ``fsync`` runs the server with
``appendfsync always``: Redis fsyncs once per pass of its event loop, before
it sends that pass's replies, so the script's reply itself means "on disk"
and no second command is needed. On any other Redis the script is followed,
in one pipeline on the same connection (the offset a wait waits for is the
connection's own), by ``WAITAOF 1 N`` (``fsync``) or ``WAIT N`` (``write``
with replicas). Neither can be sent inside the script or a MULTI: Redis
answers them there at once, without waiting.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import txredisapi
from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from taskserver.config import ConfigError, RedisAddress, Settings
from taskserver.redisclient import RedisUnavailable, connect, within
from taskserver.scripts import Script

WRITE = "write"
FSYNC = "fsync"
#: How often a child asks Redis how many replicas it has (WAIT_REPLICAS > 0).
REPLICA_CHECK_EVERY_S = 1.0


class DurabilityTimeout(Exception):
    """The admission ran in Redis but the wait for disk or replicas did not finish in time.

    The task may or may not survive a crash of Redis; it exists now.
    """


class WaitRefused(DurabilityTimeout):
    """Redis answered the wait with an error (AOF turned off, a failover to a node
    without it, an ACL): the script ran, and no later admission can be confirmed."""


class AdmissionsRefused(RedisUnavailable):
    """POST is refused before anything is written; the message says why (a 503)."""


class ReplicasMissing(AdmissionsRefused):
    """WAIT_REPLICAS asks for more replicas than the primary has: nothing was written."""


class DurabilityUnfit(AdmissionsRefused):
    """Redis refuses the wait DURABILITY/WAIT_REPLICAS needs: nothing was written."""


@dataclass(frozen=True)
class Durability:
    """What an admission waits for. ``server_fsyncs``: Redis fsyncs before it replies."""

    fsync: bool = False
    replicas: int = 0
    server_fsyncs: bool = False

    def wait_command(self, timeout_ms: int) -> tuple[Any, ...] | None:
        """The command sent after the turn's script on its connection; None if none is needed."""
        if self.fsync and (self.replicas or not self.server_fsyncs):
            return ("WAITAOF", 1, self.replicas, timeout_ms)
        if self.replicas:
            return ("WAIT", self.replicas, timeout_ms)
        return None

    def satisfied(self, reply: Any) -> bool:
        """Did the wait's reply reach what was asked for?"""
        if self.fsync:
            local, replicas = (int(n) for n in reply)
            return local >= 1 and replicas >= self.replicas
        return int(reply) >= self.replicas

    def describe(self) -> str:
        what = "the append-only file on disk" if self.fsync else "Redis's memory"
        if self.replicas:
            what += f" and {self.replicas} replica(s)"
        return what


#: Today's behaviour: the 202 follows the script's reply.
WRITE_ONLY = Durability()


def durability_of(settings: Settings) -> Durability:
    """What the settings ask for; on the embedded Redis the server itself fsyncs (see above)."""
    fsync = settings.durability == FSYNC
    return Durability(fsync, settings.wait_replicas, server_fsyncs=fsync and settings.redis is None)


def embedded_appendfsync(settings: Settings) -> str:
    """The embedded Redis's ``appendfsync``: ``always`` when a 202 means "on disk"."""
    return "always" if settings.durability == FSYNC else "everysec"


async def call_then_wait(
    redis: Any, script: Script, keys: Sequence[str], args: Sequence[Any], wait: tuple[Any, ...]
) -> tuple[Any, Any]:
    """Run ``script`` then ``wait`` in one pipeline on one connection: (script's, wait's reply).

    A failed wait (an error reply) is a WaitRefused: the script ran. A
    NOSCRIPT (Redis forgot the script) sends the pipeline again with EVAL.
    """
    keys, args = list(keys), list(args)
    for with_source in (False, True):
        connection = await redis.pipeline()
        if with_source:
            connection.execute_command("EVAL", script.source, len(keys), *keys, *args)
        else:
            connection.evalsha(script.sha1, keys, args)
        # No reply timeout of txredisapi's (it would drop the connection): the
        # wait has its own, in Redis, and the caller's deadline covers the rest.
        connection.execute_command(*wait, apply_timeout=False)
        try:
            reply, waited = await connection.execute_pipeline()
        except defer.FirstError as e:
            error = e.subFailure.value
            if (
                e.index == 0
                and isinstance(error, txredisapi.ScriptDoesNotExist)
                and not with_source
            ):
                continue
            if e.index == 1 and isinstance(error, txredisapi.ResponseError):
                raise WaitRefused(str(error)) from None
            raise error from None
        return reply, waited
    raise AssertionError("unreachable: the EVAL pass returns or raises")


#: How long the replay probe's key lives (it holds nothing anybody reads).
PROBE_TTL_MS = 60_000


async def write_then_wait(redis: Any, probe_key: str, wait: tuple[Any, ...]) -> Any:
    """A small write to ``probe_key``, then ``wait``, in one pipeline: the wait's reply.

    Replication and AOF offsets only grow, so the wait covers every write made
    before this one on any connection, such as an admission whose own wait
    fell short: a replay answers its task only once it is as durable as a 202.
    """
    connection = await redis.pipeline()
    connection.execute_command("SET", probe_key, "1", "PX", PROBE_TTL_MS)
    connection.execute_command(*wait, apply_timeout=False)
    try:
        _, waited = await connection.execute_pipeline()
    except defer.FirstError as e:
        error = e.subFailure.value
        if e.index == 1 and isinstance(error, txredisapi.ResponseError):
            raise WaitRefused(str(error)) from None
        raise error from None
    return waited


def _info_fields(text: str) -> dict[str, str]:
    fields = {}
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        if sep:
            fields[name.strip()] = value.strip()
    return fields


class CannotCountReplicas(Exception):
    """Redis refuses INFO (an ACL): the replicas are not counted, each admission's WAIT judges."""


#: Said once (by the master, and by each child) when INFO is refused.
CANNOT_COUNT = "cannot count replicas; WAIT decides"


async def connected_replicas(redis: Any, timeout_s: float, clock: IReactorTime) -> int:
    """How many replicas the primary has (INFO replication); CannotCountReplicas if refused."""
    try:
        info = await within(redis.execute_command("INFO", "replication"), timeout_s, clock)
    except txredisapi.ResponseError as e:  # unavailability is RedisUnavailable, from within()
        raise CannotCountReplicas(str(e).splitlines()[0][:160] if str(e) else "") from None
    return int(_info_fields(str(info)).get("connected_slaves", "0"))


async def check_wait(
    redis: Any, durability: Durability, timeout_s: float, clock: IReactorTime
) -> None:
    """Does this Redis accept the wait the admissions need? ConfigError in one line if not.

    Sends that wait for no replica (``WAITAOF 1 0``, ``WAIT 0``): it answers at
    once, or with the error every admission's wait would get.
    """
    timeout_ms = max(1, int(timeout_s * 1000))
    wait: tuple[Any, ...]
    if durability.fsync:
        wait = ("WAITAOF", 1, 0, timeout_ms)
    elif durability.replicas:
        wait = ("WAIT", 0, timeout_ms)
    else:
        return
    try:
        await within(redis.execute_command(*wait), 2 * timeout_s, clock)
    except txredisapi.ResponseError as e:
        raise ConfigError(why_wait_refused(durability, str(e))) from None


def why_wait_refused(durability: Durability, error: str) -> str:
    """What an operator reads when Redis answers the admissions' wait with ``error``."""
    first_line = error.splitlines()[0][:120] if error else ""
    if not durability.fsync:
        return f"WAIT_REPLICAS needs WAIT, which this Redis refuses ({first_line})"
    if "appendonly" in error:
        return (
            "DURABILITY=fsync: Redis has its append-only file turned off "
            "(set appendonly yes on it, or DURABILITY=write)"
        )
    return (
        f"DURABILITY=fsync needs WAITAOF (Redis 7.2 or later), which this Redis refuses "
        f"({first_line}); upgrade it, or set DURABILITY=write"
    )


async def check_redis(
    redis: Any, durability: Durability, timeout_s: float, clock: IReactorTime
) -> int:
    """Can this Redis keep the promise? ConfigError in one line if it cannot.

    Returns how many replicas are connected (a shortfall is only a warning:
    replicas come and go, and POST answers 503 until enough are there).
    """
    if durability.fsync:
        await check_wait(redis, durability, timeout_s, clock)
    return await connected_replicas(redis, timeout_s, clock) if durability.replicas else 0


_log = Logger(namespace="taskserver.durability")


async def check_at_start(settings: Settings, address: RedisAddress, clock: IReactorTime) -> None:
    """The master's check before it starts its children (one connection, closed after).

    ConfigError if Redis cannot honour the settings; a warning if it cannot yet
    (too few replicas), or if Redis does not answer (the children will wait for it).
    """
    durability = durability_of(settings)
    if not durability.fsync and not durability.replicas:
        return
    redis = connect(address, 1, settings.redis_timeout_s)
    try:
        replicas = await check_redis(redis, durability, settings.redis_timeout_s, clock)
    except RedisUnavailable as e:
        _log.warn(
            "could not check that Redis can keep DURABILITY ({error}); "
            "each child checks once it answers",
            error=e,
        )
        return
    except CannotCountReplicas as e:
        _log.warn("WAIT_REPLICAS: Redis refuses INFO ({error}): " + CANNOT_COUNT, error=e)
        return
    finally:
        await redis.disconnect()
    if replicas < durability.replicas:
        _log.warn(
            "WAIT_REPLICAS={n} but Redis has {have} replica(s) connected: "
            "POST answers 503 until {n} are",
            n=durability.replicas,
            have=replicas,
        )


class DurabilityWatch(Service):
    """Knows whether Redis can keep what a 202 promises now; asks every second.

    Two things, each with one log line when it goes wrong and one when it is
    right again. The wait: checked when the child starts (the master's check
    may have found Redis unreachable), and again every second after Redis
    refused it (:meth:`wait_refused`: AOF turned off, a failover to a node
    without it), POST refused meanwhile. The replicas (WAIT_REPLICAS): until
    the first answer it says no, so a POST gets a 503 rather than a 202 that
    no replica may have; if Redis refuses INFO (an ACL), it stops counting and
    lets each admission's WAIT judge.
    """

    log = Logger()

    def __init__(
        self,
        redis: Any,
        durability: Durability,
        clock: IReactorTime,
        timeout_s: float,
        every_s: float = REPLICA_CHECK_EVERY_S,
    ) -> None:
        self._redis = redis
        self._durability = durability
        self.needed = durability.replicas
        self._clock = clock
        self._timeout_s = timeout_s
        self._every_s = every_s
        self._loop: task.LoopingCall | None = None
        #: Replicas connected at the last answer (None: no answer yet, or Redis unreachable).
        self.connected: int | None = None
        self._warned = False
        #: Redis refuses INFO: the replicas are not counted (each admission's WAIT judges).
        self.uncountable = False
        #: Why Redis cannot keep the promise (it refused the wait), or None.
        self.unfit: str | None = None
        self._wait_checked = False

    def enough(self) -> bool:
        if self.uncountable:
            return True
        return self.connected is not None and self.connected >= self.needed

    def startService(self) -> None:
        super().startService()
        self._loop = task.LoopingCall(lambda: defer.Deferred.fromCoroutine(self.check()))
        self._loop.clock = self._clock
        self._loop.start(self._every_s, now=True)

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()
        return defer.succeed(None)

    def wait_refused(self, error: str) -> None:
        """An admission's wait got ``error``: refuse POSTs until a check passes."""
        self._wait_checked = False
        self._unfit(why_wait_refused(self._durability, error))

    def _unfit(self, why: str) -> None:
        if self.unfit is None:
            self.log.warn("{why}: POST answers 503 until it accepts it again", why=why)
        self.unfit = why

    async def check(self) -> None:
        if not self._wait_checked:
            await self._check_wait()
        if self.needed:
            await self._count_replicas()

    async def _check_wait(self) -> None:
        try:
            await check_wait(self._redis, self._durability, self._timeout_s, self._clock)
        except RedisUnavailable:
            return  # Redis's own outage is logged by RedisLinkWatch; asked again next time
        except ConfigError as e:
            self._unfit(str(e))
            return
        except Exception:
            self.log.failure("checking that Redis accepts the wait")
            return
        self._wait_checked = True
        if self.unfit is not None:
            self.unfit = None
            self.log.info("Redis accepts the wait DURABILITY needs again: POST accepts tasks")

    async def _count_replicas(self) -> None:
        try:
            self.connected = await connected_replicas(self._redis, self._timeout_s, self._clock)
        except RedisUnavailable:
            self.connected = None  # Redis's own outage is logged by RedisLinkWatch
            return
        except CannotCountReplicas as e:
            if not self.uncountable:
                self.uncountable = True
                self.log.warn(
                    "WAIT_REPLICAS: Redis refuses INFO ({error}): " + CANNOT_COUNT, error=e
                )
            return
        except Exception:
            self.log.failure("asking Redis for its replicas")
            return
        if self.uncountable:
            self.uncountable = False
            self.log.info("Redis answers INFO again: POST waits for counted replicas")
        if not self.enough() and not self._warned:
            self._warned = True
            self.log.warn(
                "WAIT_REPLICAS={n} but Redis has {have} replica(s) connected: "
                "POST answers 503 until {n} are",
                n=self.needed,
                have=self.connected,
            )
        elif self.enough() and self._warned:
            self._warned = False
            self.log.info(
                "Redis has {have} replica(s) again: POST accepts tasks", have=self.connected
            )

    def refusal(self) -> AdmissionsRefused | None:
        """The 503 a POST gets now (nothing written), or None: admit."""
        if self.unfit is not None:
            return DurabilityUnfit(self.unfit)
        if self.needed and not self.enough():
            have = "an unknown number of" if self.connected is None else str(self.connected)
            return ReplicasMissing(
                f"WAIT_REPLICAS={self.needed} but Redis has {have} replica(s) connected"
            )
        return None
