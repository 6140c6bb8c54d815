"""The README is the front door: its configuration table and its examples must match the code.

The "Try it" examples are run against the real ``twistd -n taskserver`` with
nothing configured (as ``make run`` starts it), and each answer is compared
with the one the README shows: the status line, the header names, every
header value that depends on neither time nor ids, and the JSON body's keys
and fixed values. Ids, timestamps and measured numbers only have to be of
the same kind, and an id must stand for the same task everywhere it appears.
"""

from __future__ import annotations

import http.client
import json
import re
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from harness import Twistd
from taskserver.config import OPTIONS, parse_rate_limits

README = Path(__file__).parent.parent / "README.md"
ROW = re.compile(r"^\| `([A-Z_]+)` \| `--([a-z-]+)` \| (`[^`]*`|\(empty\)) \| [^|]+ \|$")
README_URL = "http://localhost:8000"
#: Headers the README says it leaves out of every answer.
LEFT_OUT = ("Server", "Date")
TASK_ID = re.compile(r"^[0-9a-f]{32}$")
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
#: JSON fields and task-log fields whose values are measurements, not fixed text.
MEASURED = {"duration_ms", "pid"}
LOG_FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')
DEFAULT_TIERS = parse_rate_limits(next(o.default for o in OPTIONS if o.name == "rate_limits"))
SHORTEST_WINDOW_S = DEFAULT_TIERS[0].window_ms / 1000
LONGEST_WINDOW_S = DEFAULT_TIERS[-1].window_ms / 1000


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


# ---------------------------------------------------------------- the "Try it" examples


@dataclass
class Example:
    """One ``$ command`` of a console block and the output the README shows for it."""

    argv: list[str]
    shown: list[str]

    @property
    def text(self) -> str:
        return shlex.join(self.argv)


def console_examples(text: str) -> list[Example]:
    """The commands of every ``console`` block, continuation lines joined."""
    examples: list[Example] = []
    for block in re.findall(r"^```console\n(.*?)^```", text, re.MULTILINE | re.DOTALL):
        lines = block.splitlines()
        while lines:
            line = lines.pop(0)
            assert line.startswith("$ "), f"console output before any command: {line!r}"
            command = line[2:]
            while command.endswith("\\"):
                command = command[:-1] + " " + lines.pop(0).strip()
            shown: list[str] = []
            while lines and not lines[0].startswith("$ "):
                shown.append(lines.pop(0))
            while shown and not shown[-1].strip():
                shown.pop()
            examples.append(Example(shlex.split(command), shown))
    return examples


class Inconclusive(Exception):
    """The machine was too slow for what the README shows (a second request within 1 s)."""


@dataclass
class Answer:
    status: int
    status_line: str
    headers: list[tuple[str, str]]
    body: str


@dataclass
class Curl:
    """The few curl options the examples use, done with http.client."""

    method: str = "GET"
    headers: dict[str, str] = field(default_factory=dict)
    data: str | None = None
    include: bool = False
    url: str = ""

    @classmethod
    def parse(cls, argv: list[str]) -> Curl:
        curl, arguments = cls(), iter(argv[1:])
        method = None
        for argument in arguments:
            if argument == "-i":
                curl.include = True
            elif argument == "-X":
                method = next(arguments)
            elif argument == "-H":
                name, _, value = next(arguments).partition(":")
                curl.headers[name.strip()] = value.strip()
            elif argument == "-d":
                curl.data = next(arguments)
            elif argument.startswith("http"):
                curl.url = argument
            else:
                raise AssertionError(f"a curl option this test does not know: {argument}")
        if curl.data is not None:
            curl.headers.setdefault("Content-Type", "application/x-www-form-urlencoded")
        curl.method = method or ("POST" if curl.data is not None else "GET")
        assert curl.url.startswith(README_URL), f"the README's server is {README_URL}: {curl.url}"
        return curl

    def send(self, base_url: str, ids: dict[str, str]) -> Answer:
        url = urlsplit(base_url)
        path = substitute(self.url[len(README_URL) :], ids)
        connection = http.client.HTTPConnection(url.hostname or "", url.port, timeout=10)
        try:
            headers = {"User-Agent": "curl (test_readme)", "Accept": "*/*", **self.headers}
            connection.request(self.method, path, self.data, headers)
            response = connection.getresponse()
            body = response.read().decode()
            status_line = f"HTTP/{response.version // 10}.{response.version % 10} "
            status_line += f"{response.status} {response.reason}"
            return Answer(response.status, status_line, response.getheaders(), body)
        finally:
            connection.close()


def substitute(text: str, ids: dict[str, str]) -> str:
    """The README's ids replaced by the ones this run created."""
    for shown, actual in ids.items():
        text = text.replace(shown, actual)
    return text


def same_id(shown: str, actual: Any, ids: dict[str, str], where: str) -> list[str]:
    """An id of the README stands for one id of this run, everywhere."""
    if not isinstance(actual, str) or not TASK_ID.match(actual):
        return [f"{where}: expected an id like {shown}, got {actual!r}"]
    known = ids.setdefault(shown, actual)
    return [] if known == actual else [f"{where}: {shown} was {known} before, now {actual}"]


def compare_json(shown: Any, actual: Any, ids: dict[str, str], where: str = "body") -> list[str]:
    """Keys and fixed values exactly; ids, timestamps and measurements by kind."""
    if isinstance(shown, dict):
        if not isinstance(actual, dict):
            return [f"{where}: expected an object, got {actual!r}"]
        if set(shown) != set(actual):
            return [f"{where}: keys {sorted(actual)}, the README shows {sorted(shown)}"]
        return [p for key in shown for p in compare_json(shown[key], actual[key], ids, key)]
    if isinstance(shown, list):
        if not isinstance(actual, list) or len(actual) != len(shown):
            return [f"{where}: expected {shown!r}, got {actual!r}"]
        return [p for s, a in zip(shown, actual, strict=True) for p in compare_json(s, a, ids)]
    if isinstance(shown, str) and TASK_ID.match(shown):
        return same_id(shown, actual, ids, where)
    if isinstance(shown, str) and TIMESTAMP.match(shown):
        ok = isinstance(actual, str) and TIMESTAMP.match(actual)
        return [] if ok else [f"{where}: expected a timestamp, got {actual!r}"]
    if where in MEASURED:
        ok = isinstance(actual, int | float) and not isinstance(actual, bool) and actual >= 0
        return [] if ok else [f"{where}: expected a measurement, got {actual!r}"]
    return [] if shown == actual else [f"{where}: expected {shown!r}, got {actual!r}"]


def compare_header(name: str, shown: str, actual: str, answer: Answer, ids: dict[str, str]) -> str:
    """'' if the header agrees with the README's, else what is wrong."""
    if name == "Content-Length":
        ok = int(actual) == len(answer.body.encode())
    elif name == "X-Ratelimit-Reset":  # a Unix time: the end of a window
        now = time.time()
        ok = shown.isdigit() and now - 1 <= int(actual) <= now + LONGEST_WINDOW_S + 1
    elif name == "Ratelimit":  # t= is the time left in each window
        ok = re.fullmatch(re.sub(r"t=\d+", r"t=\\d+", re.escape(shown)), actual) is not None
    else:
        ok = substitute(shown, ids) == actual
    return "" if ok else f"header {name}: {actual!r}, the README shows {shown!r}"


def compare_http(example: Example, curl: Curl, answer: Answer, ids: dict[str, str]) -> list[str]:
    shown_body = example.shown
    problems: list[str] = []
    if curl.include:
        blank = example.shown.index("")
        status_line, *header_lines = example.shown[:blank]
        shown_body = example.shown[blank + 1 :]
        if answer.status_line != status_line:
            return [f"status {answer.status_line!r}, the README shows {status_line!r}"]
        shown_headers = dict(line.split(": ", 1) for line in header_lines)
        length = shown_headers.get("Content-Length")
        newline = "\n" if answer.body.endswith("\n") else ""  # curl shows it as a line break
        if length is not None and int(length) != len(("\n".join(shown_body) + newline).encode()):
            problems.append(f"the README's Content-Length {length} is not its body's length")
    try:
        document = json.loads(answer.body)
    except ValueError:
        return [f"not JSON: {answer.body!r}"]
    problems += compare_json(json.loads("\n".join(shown_body)), document, ids)
    if curl.include:
        actual_headers = [(n, v) for n, v in answer.headers if n not in LEFT_OUT]
        names = [n for n, _ in actual_headers]
        if sorted(names) != sorted(shown_headers):
            problems.append(f"headers {names}, the README shows {list(shown_headers)}")
        for name, value in actual_headers:
            if name in shown_headers:
                problems.append(compare_header(name, shown_headers[name], value, answer, ids))
    return [p for p in problems if p]


def compare_task_log(example: Example, line: str, server: Twistd, ids: dict[str, str]) -> list[str]:
    """A task-log line: the same fields in the same order; ids, times and measures by kind."""
    shown_line = example.shown[0]
    timestamp, _, rest = line.partition(" ")
    if not TIMESTAMP.match(timestamp):
        return [f"task log: expected a timestamp first: {line!r}"]
    shown_fields = LOG_FIELD.findall(shown_line.partition(" ")[2])
    actual_fields = LOG_FIELD.findall(rest)
    if [k for k, _ in actual_fields] != [k for k, _ in shown_fields]:
        return [f"task log: {line!r}, the README shows {shown_line!r}"]
    problems = []
    for (key, shown), (_, actual) in zip(shown_fields, actual_fields, strict=True):
        if TASK_ID.match(shown):
            problems += same_id(shown, actual, ids, f"task log {key}")
        elif key == "pid":
            if int(actual) not in server.worker_pids():
                problems.append(f"task log pid {actual}: not a child of this server")
        elif key in MEASURED:
            if not re.fullmatch(r"\d+(\.\d+)?", actual):
                problems.append(f"task log {key}: expected a number, got {actual!r}")
        elif shown != actual:
            problems.append(f"task log {key}: {actual!r}, the README shows {shown!r}")
    return problems


def rate_limited(example: Example) -> bool:
    return bool(example.shown) and example.shown[0].startswith("HTTP/1.1 429 ")


def run_examples(server: Twistd, examples: list[Example]) -> None:
    """Run each example in order; fail on the first that does not answer as shown.

    A GET or a look at the task log is repeated (with a deadline) until it shows
    what the README shows: the README shows the task once it has run.
    """
    ids: dict[str, str] = {}
    started = time.monotonic()
    check: Callable[[dict[str, str]], list[str]]
    for example in examples:
        if example.argv[0] == "curl":
            curl = Curl.parse(example.argv)

            def check(
                attempt: dict[str, str], curl: Curl = curl, example: Example = example
            ) -> list[str]:
                answer = curl.send(server.url, attempt)
                problems = compare_http(example, curl, answer, attempt)
                slow = time.monotonic() - started >= SHORTEST_WINDOW_S
                if problems and rate_limited(example) and answer.status < 300 and slow:
                    raise Inconclusive(example.text)
                return problems

            repeatable = curl.method == "GET"
        elif example.argv == ["tail", "-f", "logs/tasks.log"]:

            def check(attempt: dict[str, str], example: Example = example) -> list[str]:
                log = server.workdir / "logs" / "tasks.log"
                lines = log.read_text().splitlines() if log.exists() else []
                shown_id = re.search(r"task_id=(\S+)", example.shown[0])
                assert shown_id, f"a task-log line without a task_id: {example.shown[0]!r}"
                actual_id = substitute(shown_id[1], attempt)
                wanted = [line for line in lines if f"task_id={actual_id} " in line]
                if not wanted:
                    return [f"no line for the task in the task log: {lines[-3:]}"]
                return compare_task_log(example, wanted[-1], server, attempt)

            repeatable = True
        else:
            raise AssertionError(f"a README command this test cannot check: {example.text}")
        deadline = time.monotonic() + 30
        while True:
            attempt = dict(ids)
            problems = check(attempt)
            if not problems or not repeatable or time.monotonic() > deadline:
                break
            time.sleep(0.05)  # polling a condition, with a deadline
        assert not problems, f"README example `{example.text}`:\n  " + "\n  ".join(problems)
        ids = attempt


def test_try_it_examples_answer_as_the_readme_shows(tmp_path: Path) -> None:
    """The README's first steps, against a server started the way ``make run`` starts it."""
    text = section("Try it")
    assert "the `Server` and `Date` headers are left out" in text
    examples = console_examples(text)
    assert [e.argv[0] for e in examples].count("curl") >= 3
    for attempt in range(3):
        workdir = tmp_path / f"attempt-{attempt}"
        workdir.mkdir()
        server = Twistd(workdir, {})
        try:
            server.wait_until_listening()
            run_examples(server, examples)
        except Inconclusive:
            continue
        finally:
            stopped = server.stop()
        assert stopped == 0
        return
    raise AssertionError(f"three times more than {SHORTEST_WINDOW_S} s between two requests")
