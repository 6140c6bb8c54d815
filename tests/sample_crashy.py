"""A handler module that cannot be imported while the file named by CRASH_FLAG exists.

The master imports it at start (no flag yet); children started after the
flag appears die before they are ready, like a broken deployment.
"""

from __future__ import annotations

import os
from typing import Any

if os.path.exists(os.environ["CRASH_FLAG"]):
    raise RuntimeError("CRASH_FLAG is set: this deployment is broken")


def run(task: dict[str, Any]) -> None:
    return None
