"""The README is the front door: its configuration table must match the code."""

from __future__ import annotations

import re
from pathlib import Path

from taskserver.config import OPTIONS

README = Path(__file__).parent.parent / "README.md"
ROW = re.compile(r"^\| `([A-Z_]+)` \| `--([a-z-]+)` \| (`[^`]*`|\(empty\)) \| [^|]+ \|$")


def section(title: str) -> str:
    """The text of the README section (any level) called ``title``, up to the next heading."""
    text = README.read_text()
    match = re.search(rf"^(#+) {re.escape(title)}\n(.*?)(?=^#+ )", text, re.MULTILINE | re.DOTALL)
    assert match, f"the README has no section {title!r}"
    return match[2]


def test_configuration_table_matches_the_options() -> None:
    """Every row, in order: variable, option and default as the code has them."""
    lines = [line for line in section("Configuration").splitlines() if line.startswith("|")]
    assert lines[:2] == ["| variable | option | default | meaning |", "|---|---|---|---|"]
    rows = []
    for line in lines[2:]:
        match = ROW.match(line)
        assert match, f"a configuration row this test cannot read: {line!r}"
        rows.append(match.groups())
    expected = [(o.env, o.option, f"`{o.default}`" if o.default else "(empty)") for o in OPTIONS]
    assert rows == expected


def test_readme_shows_the_two_commands() -> None:
    text = README.read_text()
    assert "make run" in text and "make test" in text
