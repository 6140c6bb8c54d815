# -*- test-case-name: tests.test_scripts -*-
"""The Lua scripts, loaded from ``taskserver/lua/*.lua`` and called by their SHA1.

A script's first line may name the snippets it uses, ``-- uses: now_ms, status``:
Lua functions in ``lua/lib/`` that several scripts share (the dead-letter
entry, Redis time in ms, the status record, the rate limit), prepended when
the script is loaded, so each is written once. A script is read and hashed
once, when its module is imported.

A call is an ``EVALSHA``: Redis keeps scripts it has seen, so the source is
not sent again. When Redis has forgotten it (a restart, a failover, ``SCRIPT
FLUSH``) it answers ``NOSCRIPT`` and the call is made again as an ``EVAL``
with the source, which loads it again. Nothing runs twice: a NOSCRIPT means
the script did not run.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.resources import files
from typing import Any

import txredisapi
from twisted.internet import defer
from twisted.python.failure import Failure

USES_PREFIX = "-- uses:"


def _read(path: str) -> str:
    """A file under ``taskserver/lua/`` (package data, so also in a wheel's install)."""
    found = files("taskserver") / "lua"
    for part in path.split("/"):
        found = found / part
    return found.read_text(encoding="utf-8")


@dataclass(frozen=True)
class Script:
    """One script, assembled with its snippets, and its SHA1."""

    name: str
    source: str
    sha1: str

    def __call__(self, redis: Any, keys: Sequence[str], args: Sequence[Any]) -> defer.Deferred[Any]:
        """Run it on ``redis`` (a txredisapi connection or pool); loads it again if forgotten."""
        keys, args = list(keys), list(args)
        running: defer.Deferred[Any] = redis.evalsha(self.sha1, keys, args)
        return running.addErrback(self._load_again, redis, keys, args)

    def _load_again(
        self, failure: Failure, redis: Any, keys: list[str], args: list[Any]
    ) -> defer.Deferred[Any]:
        failure.trap(txredisapi.ScriptDoesNotExist)
        # A plain EVAL, not txredisapi's eval(): that one tries EVALSHA first on a
        # pooled connection that still believes Redis has the script (a second NOSCRIPT).
        loaded: defer.Deferred[Any] = redis.execute_command(
            "EVAL", self.source, len(keys), *keys, *args
        )
        return loaded


def load(name: str) -> Script:
    """``lua/<name>.lua`` with the snippets its first line names; raises if one is missing."""
    body = _read(f"{name}.lua")
    first_line = body.partition("\n")[0]
    uses = []
    if first_line.startswith(USES_PREFIX):
        uses = [snippet.strip() for snippet in first_line[len(USES_PREFIX) :].split(",")]
    source = "".join(_read(f"lib/{snippet}.lua") + "\n" for snippet in uses) + body
    return Script(name, source, hashlib.sha1(source.encode("utf-8")).hexdigest())
