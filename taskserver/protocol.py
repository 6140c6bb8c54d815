# -*- test-case-name: tests.test_child -*-
"""What the master and its children agree on: file descriptors, records, process ids.

One place for both sides, so the master (:mod:`taskserver.master`,
:mod:`taskserver.supervisor`) and a child (:mod:`taskserver.child`) cannot
drift apart. A child is spawned with these file descriptors:

====  =====================================================================
fd    what
====  =====================================================================
0     a pipe from the master: first line, this child's JSON configuration;
      then end-of-file when the master exits
1, 2  log output, relayed by the master into its log, tagged with the child
3     the shared listening socket
4     the connection-balancing scoreboard (see :mod:`taskserver.balance`)
5     a pipe to the master: one record per line, ``ready`` once serving,
      ``task <line>`` per finished task (the master is the single writer of
      tasks.log)
====  =====================================================================

Ids: a process is ``<host>:<pid>:<token>`` (a child of the master:
``<host>:<master pid>:<token>-w<slot>.<generation>``), and each of its
processing lists is a consumer ``<process id>#<n>``. The heartbeat belongs
to the process.
"""

from __future__ import annotations

import os
import secrets
import socket

CONFIG_FD = 0
STDOUT_FD = 1
STDERR_FD = 2
LISTENER_FD = 3
SCOREBOARD_FD = 4
RECORDS_FD = 5

#: Record kinds on RECORDS_FD.
READY = "ready"
TASK = "task"


def task_record(line: str) -> str:
    """The record that carries one task-log line to the master."""
    return f"{TASK} {line}"


def parse_record(record: str) -> tuple[str, str]:
    """``(kind, body)`` of one record line: ``("ready", "")``, ``("task", "<line>")``."""
    kind, _, body = record.partition(" ")
    return kind, body


def new_process_id() -> str:
    """A process id unique across hosts and restarts (a process outside the master's cluster)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


def worker_process_id(master_token: str, slot: int, generation: int) -> str:
    """The id of the master's child in ``slot``, ``generation`` times restarted."""
    return f"{socket.gethostname()}:{os.getpid()}:{master_token}-w{slot}.{generation}"


def consumer_ids_of(process_id: str) -> list[str]:
    """The processing lists of a process: one, ``<process id>#0``, for all its tasks in flight."""
    return [f"{process_id}#0"]


def process_of(consumer_id: str) -> str:
    """The process a consumer id belongs to (whose heartbeat covers it)."""
    return consumer_id.rpartition("#")[0]
