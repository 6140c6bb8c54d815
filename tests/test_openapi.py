"""The OpenAPI document is the server's contract: it names exactly its routes, and it holds.

Three checks: the document is valid OpenAPI 3.1; its paths and methods are
exactly the routes the server answers (Klein's url maps, the dashboard's
included, plus the POST route TaskResource answers itself); and schemathesis,
with its default checks, finds nothing against a live ``twistd`` cluster.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis

from harness import Twistd
from taskserver import api, openapi
from taskserver.api import ENQUEUE_PATH, TaskAPI, parse_task_body
from taskserver.dashboard import DashboardRoutes
from taskserver.httpserver import ApiError

#: In the document, not yet served on this branch: what the other branches of issue 12
#: add (route: (method, path, None); a body field or query parameter: its name third).
#: Each merge empties its entries; test_planned_entries_are_not_served_yet says which.
PLANNED: list[tuple[str, str, str | None]] = []
PLANNED_ROUTES = {(method, path) for method, path, name in PLANNED if name is None}
#: Methods werkzeug adds to every GET rule, which the document leaves implicit.
IMPLICIT_METHODS = {"head", "options"}
METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}
#: schemathesis's settings (422 accepted for a reused Idempotency-Key; /kill and the
#: dashboard's POSTs not fuzzed, each with its reason), also for runs by hand.
FUZZ_CONFIG = Path(__file__).parent.parent / "schemathesis.toml"
#: Bounded and repeatable: the same seed, at most this many cases per operation and phase
#: (about 30 s here, some 3,000 requests).
FUZZ_SEED = 20261206
#: Any clock: these bodies have no delay.
NOW = 1_780_000_000.0
FUZZ_MAX_EXAMPLES = 500


def werkzeug_to_openapi(rule: str) -> str:
    """``/api/v1/task/<task_id>`` -> ``/api/v1/task/{task_id}``."""
    return re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"{\1}", rule)


def served_routes() -> set[tuple[str, str]]:
    """(method, path) of every route the server answers, as the document spells them."""
    routes = {("post", ENQUEUE_PATH.decode())}  # TaskResource answers it, not Klein
    rules = list(DashboardRoutes.app.url_map.iter_rules())
    for rule in TaskAPI.app.url_map.iter_rules():
        handler = TaskAPI.app.endpoints[rule.endpoint]
        # The dashboard's mounts ("/", "/dashboard...") hand the request to its own routes.
        if getattr(handler, "__wrapped__", None) is not TaskAPI.dashboard:
            rules.append(rule)
    for rule in rules:
        for method in (rule.methods or set()) - {m.upper() for m in IMPLICIT_METHODS}:
            routes.add((method.lower(), werkzeug_to_openapi(rule.rule)))
    return routes


def documented_routes(document: dict[str, Any]) -> set[tuple[str, str]]:
    return {
        (method, path)
        for path, item in document["paths"].items()
        for method in item
        if method in METHODS
    }


def test_the_document_is_valid_openapi_3_1() -> None:
    document = openapi.document()
    assert document["openapi"] == "3.1.0"
    schemathesis.openapi.from_dict(copy.deepcopy(document)).validate()


def test_the_documented_routes_are_the_served_ones() -> None:
    """Both ways: nothing undocumented is served, nothing documented is missing
    (but the PLANNED routes, which other branches add)."""
    documented, served = documented_routes(openapi.document()), served_routes()
    assert served - documented == set(), "served but not in taskserver/openapi.py"
    assert documented - served == PLANNED_ROUTES, "documented but not served (nor PLANNED)"


def test_planned_entries_are_not_served_yet() -> None:
    """When a merge brings a PLANNED route or field, this fails: empty its entry."""
    assert PLANNED_ROUTES & served_routes() == set(), "served now: take it out of PLANNED"
    for method, path, name in PLANNED:
        if (method, path) == ("post", "/api/v1/task") and name is not None:
            body = json.dumps({"user_id": "u", name: 1}).encode()
            with pytest.raises(ApiError, match="unknown field") as refused:
                parse_task_body(b"application/json", body, now=NOW)
            assert refused.value.code == "unknown_field", f"{name} is served now"


def served_document() -> dict[str, Any]:
    """The document less what PLANNED says the server does not serve yet: what is fuzzed."""
    document = copy.deepcopy(openapi.document())
    for method, path, name in PLANNED:
        item = document["paths"][path]
        if name is None:
            del item[method]
            if not METHODS & set(item):
                del document["paths"][path]
        elif method == "post":
            schema = item[method]["requestBody"]["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/TaskRequest"}
            del document["components"]["schemas"]["TaskRequest"]["properties"][name]
        else:
            operation = item[method]
            operation["parameters"] = [p for p in operation["parameters"] if p["name"] != name]
    return document


def test_the_fuzzed_document_leaves_out_only_the_planned_entries() -> None:
    fuzzed, full = served_document(), openapi.document()
    assert documented_routes(fuzzed) == documented_routes(full) - PLANNED_ROUTES
    schemathesis.openapi.from_dict(fuzzed).validate()


# ---------------------------------------------------------------- against a live cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Twistd]:
    """``twistd -n taskserver`` with everything at its defaults (the rate limits included)."""
    server = Twistd(tmp_path_factory.mktemp("openapi"), {"CONCURRENCY": "2"})
    try:
        server.wait_until_ready(2)
        yield server
    finally:
        if server.process.poll() is None:
            server.stop()


def test_the_server_serves_the_document(cluster: Twistd) -> None:
    with urllib.request.urlopen(cluster.url + "/openapi.json", timeout=5) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "application/json"
        assert json.loads(response.read()) == openapi.document()


def fuzz(
    cluster: Twistd, folder: Path, document: dict[str, Any], max_examples: int, *more: str
) -> subprocess.CompletedProcess[str]:
    """``st run`` of ``document`` against the cluster, with schemathesis.toml and our seed."""
    schema = folder / "openapi.json"
    schema.write_text(json.dumps(document))
    st = str(Path(sys.executable).parent / "st")
    command = [
        st, "--no-color", "--config-file", str(FUZZ_CONFIG),
        "run", str(schema), "--url", cluster.url,
        "--seed", str(FUZZ_SEED), "--max-examples", str(max_examples),
        "--generation-database", "none", "--request-timeout", "10", *more,
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=140, cwd=folder)


@pytest.mark.timeout(150)
def test_schemathesis_finds_nothing(cluster: Twistd, tmp_path: Path) -> None:
    """Every default check, every phase, a fixed seed and bounded examples (about half a
    minute here); 429 and 503 are documented answers. On failure, its report is printed."""
    run = fuzz(cluster, tmp_path, served_document(), FUZZ_MAX_EXAMPLES)
    assert run.returncode == 0, run.stdout[-20000:] + run.stderr[-5000:]


def test_schemathesis_would_say_so(cluster: Twistd, tmp_path: Path) -> None:
    """The same run fails when the document and the server disagree (a pid documented
    as a string): the check above can fail."""
    document = served_document()
    answer = document["paths"]["/healthz"]["get"]["responses"]["200"]
    answer["content"]["application/json"]["schema"]["properties"]["pid"] = {"type": "string"}
    run = fuzz(cluster, tmp_path, document, 5, "--include-operation-id=healthz")
    assert run.returncode != 0
    assert "pid" in run.stdout and "Response violates schema" in run.stdout, run.stdout[-5000:]


@pytest.mark.parametrize(
    ("run_at", "accepted"),
    [
        ("2026-12-07T10:00:00Z", True),
        ("2026-12-07t10:00:00z", True),
        ("2026-12-07 10:00:00.123456789+01:00", True),
        ("2026-12-07T10:00:60Z", False),  # a leap second: datetime has none
        ("2026-12-07T24:00:00Z", False),
        ("2026-13-07T10:00:00Z", False),
        ("2026-12-07T10:00:00.1234567890Z", False),
        ("2026-12-07T10:00:00+24:00", False),
        ("2026-12-07T10:00:00", False),
    ],
)
def test_the_run_at_pattern_is_what_the_parser_accepts(run_at: str, accepted: bool) -> None:
    schema = openapi.document()["components"]["schemas"]["TaskRequest"]["properties"]["run_at"]
    assert bool(re.search(schema["pattern"], run_at)) is accepted, "the document's pattern"
    body = json.dumps({"user_id": "u", "run_at": run_at}).encode()
    try:
        parse_task_body(b"application/json", body, now=1_796_601_600.0)  # 2026-12-07
    except ApiError as refused:
        assert not accepted and refused.code == "invalid_run_at"
    else:
        assert accepted, "the parser took it"


def test_the_body_errors_name_invalid_run_at_and_the_bound_is_the_parsers() -> None:
    assert "`invalid_run_at`" in openapi.BODY_ERRORS["400"]["description"]
    schema = openapi.document()["components"]["schemas"]["TaskRequest"]["properties"]
    assert schema["delay_s"]["maximum"] == api.DELAY_MAX_S
