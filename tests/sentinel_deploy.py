"""A real Redis Sentinel deployment on loopback for tests: a primary, a replica, three sentinels.

Every process is the embedded valkey-server (``find_server_binary(None)``), the
sentinels run it with ``--sentinel``. Helpers here are synchronous (like
tests/harness.py): they talk RESP over plain sockets and poll conditions
with deadlines. ``start()`` returns only once every sentinel lists the
replica and two peers: sentinels learn a primary's replicas from its INFO
and each other from hello messages, and before that a killed primary is
never failed over (shared/README decision 11). The replica is in sync
before the sentinels start, so their first INFO already lists it.

    deployment = SentinelDeployment(tmp_path)
    deployment.start()
    old = deployment.kill_primary()            # SIGKILL, returns the node
    seconds = deployment.wait_for_failover(old)
    deployment.restart(old)                    # comes back; sentinels make it a replica
    deployment.wait_ready()
    deployment.stop()
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from taskserver.cluster.embedded import find_server_binary, free_loopback_port

HOST = "127.0.0.1"
MASTER_NAME = "mymaster"
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 3000
START_TIMEOUT_S = 30.0
FAILOVER_TIMEOUT_S = 30.0


class ReplyError(Exception):
    """An error reply (``-ERR ...``) from a server."""


def command(port: int, *args: str | int, password: str | None = None, timeout: float = 2.0) -> Any:
    """Send one command to ``HOST:port`` on a fresh connection; its decoded reply.

    ReplyError for an error reply; OSError when the server is not there.
    """
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        stream = sock.makefile("rwb")
        if password is not None:
            stream.write(_encode(("AUTH", password)))
            stream.flush()
            _read(stream)
        stream.write(_encode(args))
        stream.flush()
        return _read(stream)


def _encode(args: Sequence[str | int]) -> bytes:
    parts = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        data = str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def _read(stream: Any) -> Any:
    line = stream.readline()
    if not line:
        raise ConnectionError("connection closed before a reply")
    kind, rest = line[:1], line[1:-2].decode()
    if kind == b"+":
        return rest
    if kind == b"-":
        raise ReplyError(rest)
    if kind == b":":
        return int(rest)
    if kind == b"$":
        if int(rest) < 0:
            return None
        data = stream.read(int(rest) + 2)[:-2]
        return data.decode()
    if kind == b"*":
        if int(rest) < 0:
            return None
        return [_read(stream) for _ in range(int(rest))]
    raise ConnectionError(f"unexpected reply {line!r}")


def _pairs(flat: list[Any]) -> dict[str, Any]:
    """A flat ``[k1, v1, k2, v2]`` reply (SENTINEL MASTERS' entries) as a dict."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


def wait_until(check: Any, timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``check`` (OSError and ReplyError count as not yet) until truthy."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            result = check()
        except (OSError, ReplyError, ConnectionError) as e:
            result, last = None, e
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s (last error: {last!r})")
        time.sleep(interval)


@dataclass
class Node:
    """One valkey-server process (a data node or a sentinel) on ``HOST:port``."""

    name: str
    port: int
    directory: Path
    arguments: list[str]
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def address(self) -> tuple[str, int]:
        return HOST, self.port

    @property
    def log(self) -> Path:
        return self.directory / "server.log"

    def spawn(self) -> None:
        with open(self.log, "ab") as output:
            self.process = subprocess.Popen(
                self.arguments, cwd=self.directory, stdout=output, stderr=subprocess.STDOUT
            )

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig``; with SIGKILL (the default) wait until the process is gone."""
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.process.pid, sig)
        if sig == signal.SIGKILL:
            self.process.wait(10)


class SentinelDeployment:
    """One primary, one replica, three sentinels (quorum 2) under ``directory``.

    ``password`` protects the data nodes (requirepass, masterauth, the
    sentinels' auth-pass); ``sentinel_password`` the sentinels themselves.
    """

    def __init__(
        self,
        directory: Path,
        *,
        password: str | None = None,
        sentinel_password: str | None = None,
        down_after_ms: int = DOWN_AFTER_MS,
        failover_timeout_ms: int = FAILOVER_TIMEOUT_MS,
    ) -> None:
        self.directory = directory
        self.password = password
        self.sentinel_password = sentinel_password
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.binary = find_server_binary(None)
        self.data_nodes: list[Node] = []
        self.sentinels: list[Node] = []
        #: Primaries of their own, started by start_standalone() (no replica, not waited on).
        self.standalone: list[Node] = []
        self._first_primary_port = 0

    # ------------------------------------------------------------ building

    def _data_node(self, name: str, replica_of: int | None) -> Node:
        port = free_loopback_port()
        directory = self.directory / name
        directory.mkdir(parents=True, exist_ok=True)
        arguments = [
            self.binary,
            "--port", str(port),
            "--bind", HOST,
            "--dir", str(directory.resolve()),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",
            "--maxmemory-policy", "noeviction",
            "--daemonize", "no",
            "--logfile", "",
        ]  # fmt: skip
        if self.password is not None:
            arguments += ["--requirepass", self.password, "--masterauth", self.password]
        if replica_of is not None:
            arguments += ["--replicaof", HOST, str(replica_of)]
        return Node(name, port, directory, arguments)

    def _sentinel(self, name: str, primary_port: int) -> Node:
        port = free_loopback_port()
        directory = self.directory / name
        directory.mkdir(parents=True, exist_ok=True)
        lines = [
            f"port {port}",
            f"bind {HOST}",
            f'dir "{directory.resolve()}"',
            'logfile ""',
            f"sentinel monitor {MASTER_NAME} {HOST} {primary_port} 2",
            f"sentinel down-after-milliseconds {MASTER_NAME} {self.down_after_ms}",
            f"sentinel failover-timeout {MASTER_NAME} {self.failover_timeout_ms}",
            f"sentinel parallel-syncs {MASTER_NAME} 1",
        ]
        if self.password is not None:
            lines.append(f"sentinel auth-pass {MASTER_NAME} {self.password}")
        if self.sentinel_password is not None:
            lines.append(f"requirepass {self.sentinel_password}")
        config = directory / "sentinel.conf"  # sentinels rewrite their own file
        config.write_text("\n".join(lines) + "\n")
        return Node(name, port, directory, [self.binary, str(config.resolve()), "--sentinel"])

    # ------------------------------------------------------------ the life cycle

    def start(self, timeout: float = START_TIMEOUT_S) -> None:
        """Start every process; return once the deployment can fail over."""
        primary = self._data_node("node-a", None)
        primary.spawn()
        self._wait_answers(primary, timeout)
        replica = self._data_node("node-b", primary.port)
        replica.spawn()
        self.data_nodes = [primary, replica]
        self._first_primary_port = primary.port
        wait_until(lambda: self._in_sync(replica), timeout, "replica in sync")
        self.sentinels = [self._sentinel(f"sentinel-{i}", primary.port) for i in range(3)]
        for sentinel in self.sentinels:
            sentinel.spawn()
        self.wait_ready(timeout)

    def stop(self) -> None:
        """SIGKILL everything still running (nothing here needs a clean stop)."""
        for node in [*self.sentinels, *self.data_nodes, *self.standalone]:
            if node.running:
                node.kill()

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        """Every sentinel agrees on the primary, lists every other running data node as
        a healthy replica, and knows its two peers; every replica is in sync."""

        def ready() -> bool:
            primary = self.primary()
            if primary is None or self._role(primary) != "master":
                return False
            others = {n.port for n in self.data_nodes if n.running and n is not primary}
            if not all(self._in_sync(n) for n in self.data_nodes if n.port in others):
                return False
            for sentinel in self.sentinels:
                replicas = self._sentinel_command(sentinel, "SENTINEL", "REPLICAS", MASTER_NAME)
                healthy = {
                    int(r["port"])
                    for r in map(_pairs, replicas)
                    if not {"s_down", "o_down", "disconnected"} & set(r["flags"].split(","))
                }
                peers = self._sentinel_command(sentinel, "SENTINEL", "SENTINELS", MASTER_NAME)
                if not others <= healthy or len(peers) < 2:
                    return False
            return True

        wait_until(ready, timeout, "sentinel deployment ready", interval=0.1)

    # ------------------------------------------------------------ faults

    def kill_primary(self) -> Node:
        """SIGKILL the node the sentinels call the primary; returns it (for restart())."""
        primary = self.primary()
        assert primary is not None, "no primary to kill"
        primary.kill()
        return primary

    def restart(self, node: Node, timeout: float = START_TIMEOUT_S) -> None:
        """Start a stopped node again on its port, with its data (sentinels then make it a replica).

        A former primary comes back with its old command line (no replicaof),
        which is what happens to a real server restarted by its supervisor.
        """
        assert not node.running
        node.spawn()
        self._wait_answers(node, timeout)

    def wait_for_failover(self, old: Node, timeout: float = FAILOVER_TIMEOUT_S) -> float:
        """Wait until the sentinels name another primary that says it is one.

        Returns the seconds waited (the failover time as a client sees it
        when called right after kill_primary()).
        """
        started = time.monotonic()

        def moved() -> bool:
            primary = self.primary()
            return primary is not None and primary is not old and self._role(primary) == "master"

        wait_until(moved, timeout, f"failover away from {old.name}")
        return time.monotonic() - started

    def start_standalone(self, name: str = "node-c") -> Node:
        """Start a data node that replicates from no one (a primary nobody monitors yet)."""
        node = self._data_node(name, None)
        node.spawn()
        self.standalone.append(node)
        self._wait_answers(node, START_TIMEOUT_S)
        return node

    def restart_loading(self, node: Node, keys: int, load_s: float) -> None:
        """Restart ``node`` with ``keys`` keys to load, slowed down to take about ``load_s``:
        returns while it loads (ROLE says ``master``, nearly every command ``LOADING``),
        as a replica promoted while loading or a restart with a large append-only file.

        The keys are written, the append-only file rewritten (its base is a snapshot,
        loaded key by key), and the node restarted with Valkey's ``key-load-delay`` (a
        debugging setting: microseconds per key loaded) and answering while it loads.
        """
        per_call = 1000
        for first in range(0, keys, per_call):
            pairs: list[str | int] = []
            for n in range(first, min(keys, first + per_call)):
                pairs += [f"filler:{n}", "x" * 16]
            self.data_command(node, "MSET", *pairs)
        self.data_command(node, "BGREWRITEAOF")
        wait_until(
            lambda: (
                "aof_rewrite_in_progress:0" in self.data_command(node, "INFO", "persistence")
                and "aof_rewrite_scheduled:0" in self.data_command(node, "INFO", "persistence")
            ),
            START_TIMEOUT_S,
            f"{node.name}'s append-only file rewritten",
        )
        node.kill()
        arguments = node.arguments
        delay_us = max(1, int(load_s * 1_000_000 / keys))
        node.arguments = [
            *arguments,
            "--key-load-delay", str(delay_us),
            "--loading-process-events-interval-bytes", "1024",
        ]  # fmt: skip
        try:
            node.spawn()
        finally:
            node.arguments = arguments  # a later restart loads at full speed
        wait_until(
            lambda: "loading:1" in self.data_command(node, "INFO", "persistence"),
            START_TIMEOUT_S,
            f"{node.name} loading",
        )

    def wait_for_sentinel_links(self, node: Node) -> None:
        """Until every sentinel holds its two links to ``node`` (commands, hello messages):
        connections counted on ``node`` after this are not theirs."""

        def linked() -> bool:
            info = self.data_command(node, "INFO", "clients")
            line = next(x for x in info.splitlines() if x.startswith("connected_clients:"))
            return int(line.split(":")[1]) - 1 >= 2 * len(self.sentinels)

        wait_until(linked, START_TIMEOUT_S, f"the sentinels' links to {node.name}")

    def connections_received(self, node: Node) -> int:
        """The connections ``node`` has accepted since it started, this reading's included."""
        info = self.data_command(node, "INFO", "stats")
        line = next(x for x in info.splitlines() if x.startswith("total_connections_received:"))
        return int(line.split(":")[1])

    def monitor(self, node: Node) -> None:
        """Make every sentinel name ``node`` the primary (``SENTINEL REMOVE`` + ``MONITOR``
        under the same name), behind the old primary's back: it is not told, and still
        answers ROLE as a primary and takes writes, as a node cut off from the sentinels
        does while they fail over without it."""
        for sentinel in self.sentinels:
            self._sentinel_command(sentinel, "SENTINEL", "REMOVE", MASTER_NAME)
            self._sentinel_command(sentinel, "SENTINEL", "MONITOR", MASTER_NAME, HOST, node.port, 2)
            if self.password is not None:
                self._sentinel_command(
                    sentinel, "SENTINEL", "SET", MASTER_NAME, "auth-pass", self.password
                )

    # ------------------------------------------------------------ reading

    def primary(self) -> Node | None:
        """The data node most sentinels name as the primary (None if none answers)."""
        votes: Counter[int] = Counter()
        for sentinel in self.sentinels:
            if not sentinel.running:
                continue
            try:
                reply = self._sentinel_command(
                    sentinel, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME
                )
            except (OSError, ReplyError, ConnectionError):
                continue
            if reply:
                votes[int(reply[1])] += 1
        if not votes:
            return None
        port = votes.most_common(1)[0][0]
        return next((n for n in self.data_nodes if n.port == port), None)

    def replicas(self) -> list[Node]:
        """The running data nodes that are not the primary."""
        primary = self.primary()
        return [n for n in self.data_nodes if n.running and n is not primary]

    def sentinel_addresses(self) -> list[tuple[str, int]]:
        return [s.address for s in self.sentinels]

    def sentinels_setting(self) -> str:
        """The REDIS_SENTINELS value for this deployment."""
        return ",".join(f"{host}:{port}" for host, port in self.sentinel_addresses())

    def data_command(self, node: Node, *args: str | int) -> Any:
        """One command on a data node (with the data nodes' password)."""
        return command(node.port, *args, password=self.password)

    def _sentinel_command(self, sentinel: Node, *args: str | int) -> Any:
        return command(sentinel.port, *args, password=self.sentinel_password)

    def _role(self, node: Node) -> str | None:
        try:
            return str(self.data_command(node, "ROLE")[0])
        except (OSError, ReplyError, ConnectionError):
            return None

    def _in_sync(self, node: Node) -> bool:
        info = self.data_command(node, "INFO", "replication")
        return "master_link_status:up" in info

    def _wait_answers(self, node: Node, timeout: float) -> None:
        def answers() -> bool:
            if not node.running:
                raise AssertionError(f"{node.name} exited:\n{node.log.read_text(errors='replace')}")
            return bool(self.data_command(node, "PING") == "PONG")

        wait_until(answers, timeout, f"{node.name} answering")
