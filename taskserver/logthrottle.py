# -*- test-case-name: tests.test_logthrottle -*-
"""Identical warnings, written once per window instead of once per request.

During a Redis outage every request fails the same way; a line per request
would write thousands of lines that say one thing. The first of a kind is
written at once; repeats within ``window_s`` are counted and written as one
summary when the window ends ("... (N more in the last 10 s)"), and a kind
that stops repeating is forgotten.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

#: How long repeats of one warning are counted before their summary is written.
REPEAT_WINDOW_S = 10.0


class WarningThrottle:
    """Writes a warning the first time, then at most one summary per window of its repeats."""

    def __init__(self, log: Logger, clock: IReactorTime, window_s: float = REPEAT_WINDOW_S) -> None:
        self._log = log
        self._clock = clock
        self._window_s = window_s
        #: The repeats counted in the open window of each warning.
        self._repeats: dict[str, int] = {}

    def warn(self, text: str) -> None:
        """Warn ``text`` (a finished sentence: identical texts are repeats)."""
        if text in self._repeats:
            self._repeats[text] += 1
            return
        self._log.warn("{text}", text=text)
        self._open_window(text)

    def _open_window(self, text: str) -> None:
        self._repeats[text] = 0
        self._clock.callLater(self._window_s, self._end, text)

    def _end(self, text: str) -> None:
        repeats = self._repeats.pop(text)
        if not repeats:
            return
        self._log.warn(
            "{text} ({repeats} more in the last {window_s:g} s)",
            text=text,
            repeats=repeats,
            window_s=self._window_s,
        )
        self._open_window(text)
