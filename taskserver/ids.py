# -*- test-case-name: tests.test_child -*-
"""Process and consumer ids: how the queue's registry names who holds which tasks.

A process is ``<host>:<pid>:<token>``; a child of the master uses the
master's pid and a token naming its slot and generation
(``<token>-w<slot>.<generation>``). Each of a process's processing lists is
a consumer ``<process id>#<n>``, and the process's heartbeat covers them
all. The queue, the consumers, the master's reclaims and taskserver-admin
all build and read ids here, so the format lives in one place.
"""

from __future__ import annotations

import os
import secrets
import socket


def process_id(token: str) -> str:
    """``<host>:<pid>:<token>``: unique across hosts, and across pid reuse thanks to the token."""
    return f"{socket.gethostname()}:{os.getpid()}:{token}"


def new_process_id() -> str:
    """A fresh id for a process outside the master's cluster (or a test)."""
    return process_id(secrets.token_hex(3))


def consumer_ids_of(process_id: str) -> list[str]:
    """The processing lists of a process: one, ``<process id>#0``, for all its tasks in flight."""
    return [f"{process_id}#0"]


def process_of(consumer_id: str) -> str:
    """The process a consumer id belongs to (whose heartbeat covers it)."""
    return consumer_id.rpartition("#")[0]
