"""The README is the front door: its configuration table must match the code."""

from __future__ import annotations

import re
from pathlib import Path

from taskserver.config import OPTIONS

README = Path(__file__).parent.parent / "README.md"
ROW = re.compile(r"^\| `([A-Z_]+)` \| `--([a-z-]+)` \| (`[^`]*`|\(empty\)) \|", re.MULTILINE)


def test_configuration_table_matches_the_options() -> None:
    rows = {env: (option, default) for env, option, default in ROW.findall(README.read_text())}
    expected = {o.env: (o.option, f"`{o.default}`" if o.default else "(empty)") for o in OPTIONS}
    assert rows == expected


def test_readme_shows_the_two_commands() -> None:
    text = README.read_text()
    assert "make run" in text and "make test" in text
