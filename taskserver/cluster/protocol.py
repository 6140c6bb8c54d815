# -*- test-case-name: tests.test_child -*-
"""What the master and its children agree on: file descriptors, records, worker ids.

One place for both sides, so the master (:mod:`taskserver.cluster.master`,
:mod:`taskserver.cluster.supervisor`) and a child (:mod:`taskserver.cluster.child`) cannot
drift apart. A child is spawned with these file descriptors:

====  =====================================================================
fd    what
====  =====================================================================
0     a pipe from the master: first line, this child's JSON configuration;
      then one record per line, ``pause <why>`` (stop fetching tasks: the
      task log cannot take more lines) and ``resume``; end-of-file when the
      master exits
1, 2  log output, relayed by the master into its log, tagged with the child
3     the shared listening socket
4     the connection-balancing scoreboard (see :mod:`taskserver.cluster.balance`)
5     a pipe to the master: one record per line, ``ready`` once serving,
      ``task <line>`` per finished task (the master is the single writer of
      tasks.log)
====  =====================================================================

Pause and resume travel on fd 0, not in the scoreboard's shared memory:
the master pushes them when its state changes, so a paused child polls
nothing and resumes the moment it is told, the scoreboard's layout (which
every seat's balancing reads) stays as it is, and a child spawned during
a pause learns it from its configuration (``fetch_paused``), ahead of any
later record on the same pipe.

Process ids are built by :func:`worker_process_id` in the format of
:mod:`taskserver.ids`.
"""

from __future__ import annotations

from taskserver.ids import process_id

CONFIG_FD = 0
STDOUT_FD = 1
STDERR_FD = 2
LISTENER_FD = 3
SCOREBOARD_FD = 4
RECORDS_FD = 5

#: Record kinds on RECORDS_FD (child to master).
READY = "ready"
TASK = "task"
#: Record kinds on CONFIG_FD after the configuration (master to child).
PAUSE = "pause"
RESUME = "resume"


def pause_record(why: str) -> str:
    """The record that stops a child fetching tasks, and says why (for its /readyz)."""
    return f"{PAUSE} {why}"


def task_record(line: str) -> str:
    """The record that carries one task-log line to the master."""
    return f"{TASK} {line}"


def parse_record(record: str) -> tuple[str, str]:
    """``(kind, body)`` of one record line: ``("ready", "")``, ``("task", "<line>")``, ..."""
    kind, _, body = record.partition(" ")
    return kind, body


def worker_process_id(master_token: str, slot: int, generation: int) -> str:
    """The id of the master's child in ``slot``, ``generation`` times restarted."""
    return process_id(f"{master_token}-w{slot}.{generation}")
