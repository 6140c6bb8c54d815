# -*- test-case-name: tests.test_logthrottle -*-
"""Identical warnings, written once per window instead of once per request.

During a Redis outage every request fails the same way; a line per request
would write thousands of lines that say one thing. The first of a kind is
written at once; repeats within ``window_s`` are counted and written as one
summary when the window ends ("... (N more in the last 10 s)"), and a kind
that stops repeating is forgotten.
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

#: How long repeats of one warning are counted before their summary is written.
REPEAT_WINDOW_S = 10.0


@dataclass
class _Window:
    repeats: int
    ends: IDelayedCall


class WarningThrottle:
    """Writes a warning the first time, then at most one summary per window of its repeats."""

    def __init__(self, log: Logger, clock: IReactorTime, window_s: float = REPEAT_WINDOW_S) -> None:
        self._log = log
        self._clock = clock
        self._window_s = window_s
        self._windows: dict[str, _Window] = {}

    def warn(self, text: str) -> None:
        """Warn ``text`` (a finished sentence: identical texts are repeats)."""
        window = self._windows.get(text)
        if window is not None:
            window.repeats += 1
            return
        self._log.warn("{text}", text=text)
        self._windows[text] = _Window(0, self._clock.callLater(self._window_s, self._end, text))

    def _end(self, text: str) -> None:
        window = self._windows[text]
        if not window.repeats:
            del self._windows[text]
            return
        self._log.warn(
            "{text} ({repeats} more in the last {window_s:g} s)",
            text=text,
            repeats=window.repeats,
            window_s=self._window_s,
        )
        window.repeats = 0
        window.ends = self._clock.callLater(self._window_s, self._end, text)
