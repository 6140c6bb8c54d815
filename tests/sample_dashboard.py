"""Task handlers for the dashboard's browser test (TASK_HANDLER=sample_dashboard:run).

Marker files in the payload steer a task from outside, so the test decides when it
fails and when it finishes instead of guessing at timings.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import reactor, task

#: How often a held task looks whether its hold file is gone.
HOLD_CHECK_S = 0.05


async def run(task_: dict[str, Any]) -> None:
    """``{"hold": path}`` runs until that file is gone; ``{"fail_while": path, "text": ...}``
    raises, with the payload's text in the error, while that file exists; else completes."""
    payload = task_["payload"] if isinstance(task_["payload"], dict) else {}
    hold = payload.get("hold")
    while hold and os.path.exists(hold):
        await task.deferLater(reactor, HOLD_CHECK_S)
    marker = payload.get("fail_while")
    if marker and os.path.exists(marker):
        raise RuntimeError(f"failed on purpose: {payload.get('text', '')}")
