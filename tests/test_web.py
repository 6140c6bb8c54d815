"""The HTTP API: input validation (pure) and every answer over loopback against real Redis."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from functools import partial
from typing import Any, cast

import pytest
import pytest_twisted
import treq
from twisted.internet import defer, reactor
from twisted.internet.task import Clock

from conftest import RunningServer, eventually, sleep, unused_port
from taskserver.api import (
    TaskAPI,
    TaskRequest,
    is_json_media_type,
    parse_task_body,
    status_document,
)
from taskserver.config import RateTier, RedisAddress, parse_rate_limits
from taskserver.httpserver import MAX_BODY_BYTES, ApiError, CountingChannel, TaskSite
from taskserver.idempotency import ABANDONED_AFTER_S, IDEMPOTENCY_TTL_S, Claim, fingerprint
from taskserver.ratelimit import Decision
from taskserver.redisclient import RedisUnavailable

JSON = {"Content-Type": "application/json"}
#: A deadline generous enough for a loaded machine: it tells a hang from an answer, not speed.
NEVER_A_HANG_S = 20.0
#: The clock a parsed body is measured from (a delay is relative to it).
NOW = 1_780_000_000.0

# ------------------------------------------------------------------ pure validation


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"", "invalid_json"),
        (b"{", "invalid_json"),
        (b"\xff\xfe", "invalid_json"),
        (b'{"user_id": NaN}', "invalid_json"),
        (b'{"user_id": "a", "payload": 1e999}', "invalid_json"),
        (b'{"user_id": "a", "user_id": "b"}', "invalid_json"),
        (b"[" * 50_000, "invalid_json"),
        (b'{"user_id": "a", "payload": ' + b"1" * 401 + b"}", "invalid_json"),
        (b'{"user_id": "a", "payload": %d}' % (int(sys.float_info.max) + 1), "invalid_json"),
        (b'{"user_id": "a", "payload": [%d]}' % -(int(sys.float_info.max) + 1), "invalid_json"),
        (b"[]", "not_an_object"),
        (b'"user123"', "not_an_object"),
        (b"{}", "missing_user_id"),
        (b'{"userid": "a"}', "unknown_field"),
        (b'{"user_id": 5}', "invalid_user_id"),
        (b'{"user_id": ""}', "invalid_user_id"),
        (b'{"user_id": "' + b"x" * 129 + b'"}', "invalid_user_id"),
        (b'{"user_id": "a\\nb"}', "invalid_user_id"),
        (b'{"user_id": "a\\u2028b"}', "invalid_user_id"),
        (b'{"user_id": "\\ud800"}', "invalid_user_id"),
        # Valid JSON that no UTF-8 encodes: lone surrogates, in payload values and keys.
        (b'{"user_id": "a", "payload": "\\ud800"}', "invalid_json"),
        (b'{"user_id": "a", "payload": {"\\uDFFF": 1}}', "invalid_json"),
        (b'{"user_id": "a", "payload": ["ok", {"k": "x\\udbff"}]}', "invalid_json"),
        (b'{"user_id": "a", "payload": "\\ude00\\ud83d"}', "invalid_json"),  # a pair reversed
    ],
)
def test_bad_bodies_are_rejected_with_a_code(body: bytes, code: str) -> None:
    with pytest.raises(ApiError) as caught:
        parse_task_body(b"application/json", body, now=NOW)
    assert caught.value.status == 400
    assert caught.value.code == code


@pytest.mark.parametrize(
    ("type_", "code"),
    [
        (5, "invalid_task_type"),
        ("", "invalid_task_type"),
        (None, "invalid_task_type"),
        (["email"], "invalid_task_type"),
        ("resize", "unknown_task_type"),
        ("Email", "unknown_task_type"),
        ("x" * 10_000, "unknown_task_type"),
    ],
)
def test_a_type_must_name_a_configured_handler(type_: Any, code: str) -> None:
    body = json.dumps({"user_id": "a", "type": type_}).encode()
    with pytest.raises(ApiError) as caught:
        parse_task_body(b"application/json", body, now=NOW, task_types={"email"})
    assert (caught.value.status, caught.value.code) == (400, code)
    assert len(caught.value.document()["message"]) <= 300


def test_a_known_type_is_kept_and_an_absent_one_is_none() -> None:
    typed = b'{"user_id": "a", "type": "email", "payload": 1}'
    assert parse_task_body(
        b"application/json", typed, now=NOW, task_types={"email"}
    ) == TaskRequest("a", 1, "email")
    untyped = b'{"user_id": "a"}'
    assert parse_task_body(b"application/json", untyped, now=NOW, task_types={"email"}).type is None
    with pytest.raises(ApiError, match="TASK_HANDLERS is empty"):
        parse_task_body(b"application/json", typed, now=NOW)


def test_status_document_parses_the_result_back() -> None:
    base = {"status": "completed", "attempts": "1"}
    assert status_document("t", {**base, "result": '{"a":[1,"é"]}'})["result"] == {"a": [1, "é"]}
    assert status_document("t", {**base, "result": "null"})["result"] is None
    noted = status_document("t", {**base, "result_note": "result not stored: not JSON (set)"})
    assert "result" not in noted and noted["result_note"] == "result not stored: not JSON (set)"
    assert not {"result", "result_note"} & set(status_document("t", base))


def test_good_bodies() -> None:
    parse = partial(parse_task_body, now=NOW)
    assert parse(b"application/json", b'{"user_id": "user123"}') == TaskRequest("user123", None)
    assert parse(
        b"application/json; charset=utf-8",
        '{"user_id": "ünïcode ✓", "payload": {"a": [1, null]}}'.encode(),
    ) == TaskRequest("ünïcode ✓", {"a": [1, None]})
    assert parse(b"application/json", b'{"user_id": "' + b"x" * 128 + b'"}').user_id
    assert (
        parse(b"application/json", b'{"user_id": "a", "payload": "\\ud83d\\ude00"}').payload
        == "\U0001f600"
    ), "a surrogate pair is one character"
    assert (
        parse(b"application/json", b'{"user_id": "a", "payload": "\\\\ud800"}').payload == "\\ud800"
    ), "an escaped backslash, then text"


@pytest.mark.parametrize(
    "number", [12345678901234567890, -(2**64), int(sys.float_info.max), -int(sys.float_info.max)]
)
def test_integers_a_double_holds_are_kept_exactly(number: int) -> None:
    body = b'{"user_id": "a", "payload": {"n": %d}}' % number
    assert parse_task_body(b"application/json", body, now=NOW) == TaskRequest("a", {"n": number})


@pytest.mark.parametrize(
    ("content_type", "ok"),
    [
        (b"application/json", True),
        (b"Application/JSON ; charset=UTF-8", True),
        (b"application/json; charset=latin-1", False),
        (b"text/plain", False),
        (b"application/x-www-form-urlencoded", False),
        (None, False),
    ],
)
def test_media_type(content_type: bytes | None, ok: bool) -> None:
    assert is_json_media_type(content_type) is ok


# ------------------------------------------------------------------ without a network (fakes)


class FakeQueue:
    """The queue as TaskAPI sees it: admissions recorded, status records from a dict."""

    def __init__(self) -> None:
        self.admitted: list[Any] = []
        self.records: dict[str, dict[str, str]] = {}
        self.pending_status: defer.Deferred[None] | None = None

    async def admit(
        self, task: Any, policy: FakeLimiter, delay_ms: int = 0, run_at: str = ""
    ) -> Decision:
        """Admits every task, or fails with the policy's ``error``."""
        if policy.error is not None:
            raise policy.error
        self.admitted.append(task)
        return Decision(allowed=True, tiers=())

    def check_admissions(self) -> None:
        """Refuses nothing (no replicas to miss)."""

    async def confirm_durable(self, task_id: str) -> None:
        """Everything is durable enough here (DURABILITY=write, no replicas)."""

    async def status(self, task_id: str) -> dict[str, str] | None:
        if self.pending_status is not None:
            await self.pending_status
        return self.records.get(task_id)

    async def ping(self) -> None:
        pass


class FakeLimiter:
    """A rate policy whose admissions (by FakeQueue.admit) fail with ``error`` if it is set."""

    active = False
    error: Exception | None = None


def fake_api(
    kill: Callable[[], None] | None = None, clock: Clock | None = None
) -> tuple[TaskAPI, FakeQueue, FakeLimiter]:
    queue, limiter = FakeQueue(), FakeLimiter()
    api = TaskAPI(
        limiter,  # type: ignore[arg-type]
        queue,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]  # no Idempotency-Key in these tests
        clock or Clock(),
        kill,
    )
    return api, queue, limiter


def stub_answer(stub: Any, method: str, path: str, body: bytes = b"") -> tuple[Any, Any]:
    """One request through treq's StubTreq: (response, decoded JSON body)."""
    from twisted.trial.unittest import SynchronousTestCase

    case = SynchronousTestCase()
    response = case.successResultOf(
        stub.request(method, "http://taskserver" + path, data=body or None, headers=JSON)
    )
    return response, json.loads(case.successResultOf(response.content()))


def test_the_hot_path_answers_through_stubtreq() -> None:
    """POST /api/v1/task is answered by the root resource; StubTreq serves it like a Site."""
    from treq.testing import StubTreq

    api, queue, limiter = fake_api()
    stub = StubTreq(api.resource())
    response, document = stub_answer(stub, "POST", "/api/v1/task", b'{"user_id": "stub"}')
    assert response.code == 202 and document["user_id"] == "stub"
    assert [task.id for task in queue.admitted] == [document["task_id"]]
    assert response.headers.getRawHeaders("Location") == [f"/api/v1/task/{document['task_id']}"]

    bad, problem = stub_answer(stub, "POST", "/api/v1/task", b"[]")
    assert (bad.code, problem["error"]) == (400, "not_an_object")
    large, problem = stub_answer(stub, "POST", "/api/v1/task", b"x" * (MAX_BODY_BYTES + 1))
    assert (large.code, problem["error"]) == (413, "body_too_large")
    wrong, problem = stub_answer(stub, "GET", "/api/v1/task")
    assert (wrong.code, problem["error"]) == (405, "method_not_allowed")
    assert wrong.headers.getRawHeaders("Allow") == ["POST"]
    limiter.error = RedisUnavailable("Redis did not answer within 1.0 s")
    down, problem = stub_answer(stub, "POST", "/api/v1/task", b'{"user_id": "stub"}')
    assert (down.code, problem["error"]) == (503, "redis_unavailable")
    assert down.headers.getRawHeaders("Retry-After") == ["2"]


def test_a_typed_task_is_accepted_with_its_type_and_an_unknown_one_is_a_400() -> None:
    from treq.testing import StubTreq

    queue, limiter = FakeQueue(), FakeLimiter()
    api = TaskAPI(
        limiter,  # type: ignore[arg-type]
        queue,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        Clock(),
        task_types={"email", "resize"},
    )
    stub = StubTreq(api.resource())
    response, document = stub_answer(
        stub, "POST", "/api/v1/task", b'{"user_id": "u", "type": "email"}'
    )
    assert (response.code, document["type"]) == (202, "email")
    assert [task.type for task in queue.admitted] == ["email"]
    refused, problem = stub_answer(stub, "POST", "/api/v1/task", b'{"user_id": "u", "type": "fax"}')
    assert (refused.code, problem["error"]) == (400, "unknown_task_type")
    assert problem["message"] == 'unknown task type "fax"; the known types: email, resize'
    assert len(queue.admitted) == 1, "nothing admitted for it"


def test_the_other_routes_go_through_klein() -> None:
    from treq.testing import StubTreq

    api, queue, _ = fake_api()
    stub = StubTreq(api.resource())
    queue.records["a" * 32] = {"status": "queued", "user_id": "u", "attempts": "0"}
    found, document = stub_answer(stub, "GET", "/api/v1/task/" + "a" * 32)
    assert (found.code, document["status"]) == (200, "queued")
    assert stub_answer(stub, "GET", "/healthz")[0].code == 200
    nowhere, document = stub_answer(stub, "GET", "/nowhere")
    assert (nowhere.code, document["error"]) == (404, "not_found")
    # One route for the hot path: another spelling of it is not a second way in.
    spelled, document = stub_answer(stub, "POST", "/api/v1/%74ask", b'{"user_id": "u"}')
    assert (spelled.code, document["error"]) == (404, "not_found")


class Connection:
    """A CountingChannel of a real TaskSite on a StringTransport, its time on a Clock."""

    def __init__(self, api: TaskAPI, clock: Clock, request_timeout_s: float = 10.0) -> None:
        from twisted.internet.address import IPv4Address
        from twisted.internet.testing import StringTransport

        self.site: TaskSite = api.site(idle_timeout_s=60.0, request_timeout_s=request_timeout_s)
        peer = IPv4Address("TCP", "127.0.0.1", 40000)
        self.channel = cast(CountingChannel, self.site.buildProtocol(peer))
        self.channel.callLater = clock.callLater  # type: ignore[method-assign]
        self.transport = StringTransport(peerAddress=peer)
        self.channel.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.channel.dataReceived(data)

    def close(self) -> None:
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure

        self.channel.connectionLost(Failure(ConnectionDone()))


def logged_while(action: Callable[[], None]) -> list[str]:
    """Every log line written while ``action`` runs (all of it synchronous here)."""
    from twisted.logger import formatEvent, globalLogPublisher

    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        lines.append(formatEvent(event) + ("(failure)" if "log_failure" in event else ""))

    globalLogPublisher.addObserver(observe)
    try:
        action()
    finally:
        globalLogPublisher.removeObserver(observe)
    return lines


@pytest.mark.parametrize(
    ("request_head", "status", "code"),
    [
        (b"GET /api/v1//task/" + b"a" * 32 + b" HTTP/1.1\r\nHost: x", 404, b"not_found"),
        (b"GET /healthz/ HTTP/1.1\r\nHost: x", 404, b"not_found"),
        (b"GET /%ff HTTP/1.1\r\nHost: x", 400, b"bad_request"),
        (b"GET /healthz%c3 HTTP/1.1\r\nHost: x", 400, b"bad_request"),
        (b"GET /healthz HTTP/1.1\r\nHost: \xff", 400, b"bad_request"),
        (b"HEAD /%ff HTTP/1.1\r\nHost: x", 400, None),
    ],
)
def test_paths_klein_cannot_route_get_a_json_4xx_and_log_nothing(
    request_head: bytes, status: int, code: bytes | None
) -> None:
    """Merged slashes (a werkzeug redirect: was a 500) and non-UTF-8 (Klein's HTML 400)."""
    connection = Connection(fake_api()[0], Clock())
    lines = logged_while(lambda: connection.send(request_head + b"\r\n\r\n"))
    answer = connection.transport.value()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d " % status), answer[:300]
    assert b"\r\nContent-Type: application/json; charset=utf-8\r\n" in head
    if code is None:  # HEAD: the same headers, no body
        assert body == b""
    else:
        assert json.loads(body)["error"] == code.decode()
    assert lines == []


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        ("RequestRedirect", 404, "not_found"),  # what merge_slashes or strict_slashes raise
        ("BadRequest", 400, "bad_request"),
        ("RequestURITooLarge", 414, "request_uri_too_long"),
    ],
)
def test_every_werkzeug_http_error_is_a_json_answer(error: str, status: int, code: str) -> None:
    from twisted.python.failure import Failure
    from twisted.web.test.requesthelper import DummyRequest
    from werkzeug import exceptions, routing

    raised = (
        routing.RequestRedirect("http://x/")
        if error == "RequestRedirect"
        else getattr(exceptions, error)()
    )
    request = DummyRequest([b""])
    body = fake_api()[0].answer_error(request, Failure(raised))
    assert request.responseCode == status
    assert json.loads(body)["error"] == code


@pytest.mark.parametrize(
    ("path", "status"), [(b"/api/v1/task", 405), (b"/healthz", 200), (b"/nowhere", 404)]
)
def test_head_answers_headers_only_and_logs_nothing(path: bytes, status: int) -> None:
    """twisted.web logs "I think I'll eat it" for every HEAD whose body a resource returns."""
    connection = Connection(fake_api()[0], Clock())
    lines = logged_while(lambda: connection.send(b"HEAD %s HTTP/1.1\r\nHost: x\r\n\r\n" % path))
    head, _, body = connection.transport.value().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d " % status), head
    assert body == b""
    assert lines == []


def test_the_channel_s_private_400_hook_still_exists() -> None:
    """The one private twisted.web name used: if it is renamed, this fails (bare 400s)."""
    from twisted.web.http import HTTPChannel

    assert callable(getattr(HTTPChannel, "_respondToBadRequestAndDisconnect", None))
    connection = Connection(fake_api()[0], Clock())
    connection.send(b"NOT HTTP AT ALL\r\n\r\n")
    answer = connection.transport.value()
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert answer.endswith(b'{"error":"bad_request","message":"malformed HTTP request"}\n')
    assert connection.transport.disconnecting


def test_a_request_that_does_not_arrive_in_time_is_408() -> None:
    clock = Clock()
    connection = Connection(fake_api(clock=clock)[0], clock, request_timeout_s=5.0)
    connection.send(b"POST /api/v1/task HTTP/1.1\r\nHost: x\r\n")
    clock.advance(4.9)
    connection.send(b"X")  # a byte now and then does not extend the deadline
    assert connection.transport.value() == b""
    clock.advance(0.1)
    assert connection.transport.value().startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert b'"error":"request_timeout"' in connection.transport.value()
    assert connection.transport.disconnecting


def test_a_connection_is_busy_from_its_whole_request_to_its_answer() -> None:
    clock = Clock()
    api, queue, _ = fake_api(clock=clock)
    connection = Connection(api, clock)
    queue.pending_status = defer.Deferred()
    connection.send(b"GET /api/v1/task/" + b"a" * 32 + b" HTTP/1.1\r\nHost: x\r\n")
    assert not connection.channel.busy, "the request has not all arrived"
    connection.send(b"\r\n")
    assert connection.channel.busy
    queue.pending_status.callback(None)
    assert connection.transport.value().startswith(b"HTTP/1.1 404 Not Found")
    assert not connection.channel.busy


def test_kill_follows_the_close_of_its_connection_not_the_fallback() -> None:
    clock, killed = Clock(), []
    connection = Connection(fake_api(kill=lambda: killed.append(True), clock=clock)[0], clock)
    connection.send(b"GET /kill HTTP/1.1\r\nHost: localhost\r\n\r\n")  # keep-alive, as HTTP/1.1 is
    assert b'"status":"exiting"' in connection.transport.value()
    assert b"Connection: close" in connection.transport.value()
    assert connection.transport.disconnecting, "the server closes even if the client would not"
    assert killed == []
    connection.close()
    assert killed == [True], "at the close, with no time passed"


# ------------------------------------------------------------------ over loopback


async def post(
    server: RunningServer, body: bytes, headers: dict[str, str] | None = None
) -> tuple[Any, Any]:
    response = await treq.post(
        server.url + "/api/v1/task", data=body, headers=JSON if headers is None else headers
    )
    return response, json.loads(await response.content())


@pytest.fixture
def server(start_server: Callable[..., RunningServer]) -> RunningServer:
    return start_server()


@pytest_twisted.ensureDeferred
async def test_accepted_task(server: RunningServer) -> None:
    response, document = await post(server, b'{"user_id": "user123", "payload": {"n": 1}}')
    assert response.code == 202
    assert set(document) == {"task_id", "user_id", "status", "queued_at"}
    assert document["user_id"] == "user123" and document["status"] == "queued"
    headers = response.headers
    assert headers.getRawHeaders("Location") == [f"/api/v1/task/{document['task_id']}"]
    assert headers.getRawHeaders("Content-Type") == ["application/json; charset=utf-8"]
    assert headers.getRawHeaders("RateLimit-Policy") == ['"1s";q=1;w=1, "60s";q=20;w=60']
    assert headers.getRawHeaders("RateLimit") == ['"1s";r=0;t=1, "60s";r=19;t=60']
    assert headers.getRawHeaders("X-RateLimit-Remaining") == ["0"]
    body = json.dumps(document, separators=(",", ":")).encode() + b"\n"
    assert response.length == len(body), "sent with a Content-Length, not in chunks"


@pytest_twisted.ensureDeferred
async def test_status_follows_the_task_to_completion(server: RunningServer) -> None:
    _, created = await post(server, b'{"user_id": "user123"}')

    async def completed() -> Any:
        response = await treq.get(f"{server.url}/api/v1/task/{created['task_id']}")
        document = json.loads(await response.content())
        return document if document.get("status") == "completed" else None

    document = await eventually(completed)
    assert document["task_id"] == created["task_id"]
    assert document["user_id"] == "user123"
    assert document["attempts"] == 1
    assert {"queued_at", "started_at", "finished_at", "duration_ms"} <= set(document)
    line = server.task_log.read_text()
    assert f'user_id="user123" task_id={created["task_id"]} status=completed' in line


@pytest_twisted.ensureDeferred
async def test_second_request_in_the_same_second_is_429(server: RunningServer) -> None:
    await post(server, b'{"user_id": "fast"}')
    response, problem = await post(server, b'{"user_id": "fast"}')
    assert response.code == 429
    assert response.headers.getRawHeaders("Content-Type") == ["application/problem+json"]
    assert response.headers.getRawHeaders("Retry-After") == ["1"]
    assert problem["violated-policies"] == ["1s"]
    assert problem["error"] == "rate_limited" and problem["message"]


@pytest_twisted.ensureDeferred
async def test_forty_simultaneous_requests_of_a_new_user_get_one_202(
    server: RunningServer,
) -> None:
    answers = await defer.gatherResults(
        [defer.Deferred.fromCoroutine(post(server, b'{"user_id": "crowd"}')) for _ in range(40)]
    )
    codes = sorted(response.code for response, _ in answers)
    assert codes == [202] + [429] * 39


@pytest.mark.parametrize(
    ("body", "headers", "status", "code"),
    [
        (b'{"user_id": "a"}', {"Content-Type": "text/plain"}, 415, "unsupported_media_type"),
        (b'{"user_id": "a"}', {}, 415, "unsupported_media_type"),
        (b"{nope", JSON, 400, "invalid_json"),
        (b'{"user_id": ""}', JSON, 400, "invalid_user_id"),
        (b'{"user_id": "a", "payload": "' + b"x" * 70_000 + b'"}', JSON, 413, "body_too_large"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_errors_are_json(
    server: RunningServer, body: bytes, headers: dict[str, str], status: int, code: str
) -> None:
    response, document = await post(server, body, headers)
    assert response.code == status
    assert document["error"] == code and document["message"]
    assert response.headers.getRawHeaders("Content-Type") == ["application/json; charset=utf-8"]


@pytest_twisted.ensureDeferred
async def test_chunked_body_over_the_limit_is_413(server: RunningServer) -> None:
    from io import BytesIO

    from twisted.web.client import FileBodyProducer

    class UnknownLength(FileBodyProducer):
        length = -1  # UNKNOWN_LENGTH: sent chunked, no Content-Length

    producer = UnknownLength(BytesIO(b'{"user_id":"a","payload":"' + b"y" * 100_000 + b'"}'))
    response = await treq.post(server.url + "/api/v1/task", data=producer, headers=JSON)
    assert response.code == 413
    assert json.loads(await response.content())["error"] == "body_too_large"


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/nowhere", 404, "not_found"),
        ("GET", "/api/v1/task/" + "0" * 32, 404, "task_not_found"),
        ("GET", "/api/v1/task/not-a-task-id", 404, "task_not_found"),
        ("GET", "/api/v1/task", 405, "method_not_allowed"),
        ("DELETE", "/healthz", 405, "method_not_allowed"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_unknown_things_are_json_errors(
    server: RunningServer, method: str, path: str, status: int, code: str
) -> None:
    response = await treq.request(method, server.url + path)
    assert response.code == status
    assert json.loads(await response.content())["error"] == code


@pytest_twisted.ensureDeferred
async def test_health_and_readiness(server: RunningServer) -> None:
    for path in ("/healthz", "/readyz"):
        response = await treq.get(server.url + path)
        assert response.code == 200, path


@pytest_twisted.ensureDeferred
async def test_readiness_fails_while_the_task_log_is_full(server: RunningServer) -> None:
    """The master paused fetching: /readyz says why (503); /healthz and POST carry on."""
    server.child.pause_fetching("the task log cannot be written (No space left on device)")
    response = await treq.get(server.url + "/readyz")
    assert response.code == 503
    assert json.loads(await response.content()) == {
        "error": "task_log_unwritable",
        "message": "the task log cannot be written (No space left on device)",
    }
    assert response.headers.getRawHeaders("Retry-After") == ["5"]
    assert (await treq.get(server.url + "/healthz")).code == 200
    accepted, _ = await post(server, b'{"user_id": "while-paused"}')
    assert accepted.code == 202, "tasks are still accepted: they wait in the queue"
    server.child.resume_fetching()
    assert (await treq.get(server.url + "/readyz")).code == 200


@pytest_twisted.ensureDeferred
async def test_redis_down_gives_503_quickly_and_health_stays_up(
    start_server: Callable[..., RunningServer],
) -> None:
    nowhere = RedisAddress("127.0.0.1", unused_port())
    server = start_server(redis=nowhere, redis_timeout_s=1.0, shutdown_timeout_s=0.2)
    started = reactor.seconds()
    response, document = await post(server, b'{"user_id": "u"}')
    assert reactor.seconds() - started < NEVER_A_HANG_S
    assert response.code == 503
    assert document["error"] == "redis_unavailable"
    assert response.headers.getRawHeaders("Retry-After") == ["2"]
    assert (await treq.get(server.url + "/readyz")).code == 503
    assert (await treq.get(server.url + "/healthz")).code == 200


@pytest_twisted.ensureDeferred
async def test_redis_that_never_answers_gives_503_not_a_hang(
    start_server: Callable[..., RunningServer],
) -> None:
    """A server that accepts connections and then says nothing (a hung Redis)."""
    from twisted.internet.protocol import Factory, Protocol

    silent = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
    try:
        mute = RedisAddress("127.0.0.1", silent.getHost().port)
        server = start_server(redis=mute, redis_timeout_s=1.0, shutdown_timeout_s=0.2)
        started = reactor.seconds()
        response, document = await post(server, b'{"user_id": "u"}')
        assert response.code == 503
        assert reactor.seconds() - started < NEVER_A_HANG_S
        assert document["error"] == "redis_unavailable"
    finally:
        await silent.stopListening()


# ------------------------------------------------------------------ GET /kill


@pytest.mark.parametrize(
    ("forwarded", "trusted", "status"),
    [
        ({"X-Forwarded-For": "203.0.113.9"}, (), 403),
        ({"Forwarded": "for=203.0.113.9"}, (), 403),
        ({"X-Real-IP": "203.0.113.9"}, (), 403),
        ({"X-Forwarded-For": "127.0.0.1"}, (), 403),  # an untrusted proxy says nothing
        ({"X-Forwarded-For": "127.0.0.1"}, ("127.0.0.1",), 200),
        ({"Forwarded": "for=203.0.113.9"}, ("127.0.0.1",), 403),
        ({"X-Forwarded-For": "203.0.113.9"}, ("127.0.0.1",), 403),
    ],
)
@pytest_twisted.ensureDeferred
async def test_kill_through_a_proxy_on_this_host(
    start_server: Callable[..., RunningServer],
    forwarded: dict[str, str],
    trusted: tuple[str, ...],
    status: int,
) -> None:
    """Behind a proxy on this host every peer is loopback: the forwarded client decides."""
    killed: list[bool] = []
    server = start_server(kill=lambda: killed.append(True), trusted_proxies=trusted)
    response = await treq.get(server.url + "/kill", headers=forwarded)
    document = json.loads(await response.content())
    assert response.code == status, document
    if status == 403:
        assert document["error"] == "forbidden"
        assert killed == []


@pytest.mark.parametrize(
    "client_line",
    [b'for="[::1]', b'for="127.0.0.1:', b'for="[::1]junk, for=127.0.0.1', b'for="[::1], for=::1'],
)
@pytest_twisted.ensureDeferred
async def test_kill_behind_a_trusted_proxy_is_not_fooled_by_an_open_quote(
    start_server: Callable[..., RunningServer], client_line: bytes
) -> None:
    """The client's own Forwarded line, then the one its proxy (trusted, on this host) added."""
    killed: list[bool] = []
    server = start_server(kill=lambda: killed.append(True), trusted_proxies=("127.0.0.1",))
    client = await RawClient().connect(server.port)
    client.send(
        b"GET /kill HTTP/1.1\r\nHost: localhost\r\nForwarded: %s\r\nForwarded: for=203.0.113.9\r\n"
        b"Connection: close\r\n\r\n" % client_line
    )
    await client.closed.addTimeout(NEVER_A_HANG_S, reactor)
    assert client.received.startswith(b"HTTP/1.1 403 Forbidden"), client.received[:200]
    assert b'"error":"forbidden"' in client.received
    assert killed == []


@pytest.mark.parametrize(
    ("browser", "kill_token", "status"),
    [
        ({"Sec-Fetch-Site": "cross-site"}, None, 403),  # <img src=http://localhost:8000/kill>
        ({"Sec-Fetch-Site": "same-site"}, None, 403),
        ({"Origin": "http://evil.example"}, None, 403),  # fetch() from a page
        ({"Sec-Fetch-Site": "cross-site"}, "secret", 403),
        ({"Sec-Fetch-Site": "none"}, None, 200),  # typed into the address bar
        ({"Sec-Fetch-Site": "same-origin"}, None, 200),
    ],
)
@pytest_twisted.ensureDeferred
async def test_kill_refuses_what_a_web_page_sends(
    start_server: Callable[..., RunningServer],
    browser: dict[str, str],
    kill_token: str | None,
    status: int,
) -> None:
    killed: list[bool] = []
    server = start_server(kill=lambda: killed.append(True), kill_token=kill_token)
    headers = {**browser, **({"Authorization": f"Bearer {kill_token}"} if kill_token else {})}
    response = await treq.get(server.url + "/kill", headers=headers)
    document = json.loads(await response.content())
    assert response.code == status, document
    if status == 403:
        assert document["error"] == "forbidden"
        assert killed == []


@pytest_twisted.ensureDeferred
async def test_kill_answers_then_kills_after_the_answer_is_sent(
    start_server: Callable[..., RunningServer],
) -> None:
    """Over loopback; that the kill follows the close, not the fallback, is tested on a Clock."""
    killed: list[bool] = []
    server = start_server(kill=lambda: killed.append(True))
    response = await treq.get(server.url + "/kill")
    document = json.loads(await response.content())
    assert response.code == 200
    assert document == {"pid": os.getpid(), "status": "exiting"}
    await eventually(lambda: defer.succeed(killed))


@pytest.mark.parametrize(
    ("authorization", "status"),
    [(None, 403), ("Bearer wrong", 403), ("secret", 403), ("Bearer secret", 200)],
)
@pytest_twisted.ensureDeferred
async def test_kill_with_a_token_needs_it_even_from_loopback(
    start_server: Callable[..., RunningServer], authorization: str | None, status: int
) -> None:
    killed: list[bool] = []
    server = start_server(kill=lambda: killed.append(True), kill_token="secret")
    headers = {"Authorization": authorization} if authorization else {}
    response = await treq.get(server.url + "/kill", headers=headers)
    assert response.code == status
    if status == 403:
        assert json.loads(await response.content())["error"] == "forbidden"
        assert killed == []


@pytest_twisted.ensureDeferred
async def test_kill_can_be_turned_off(start_server: Callable[..., RunningServer]) -> None:
    killed: list[bool] = []
    server = start_server(kill=lambda: killed.append(True), disable_kill=True)
    response = await treq.get(server.url + "/kill")
    assert response.code == 404
    assert killed == []


@pytest_twisted.ensureDeferred
async def test_kill_closes_the_connection_even_if_the_client_would_keep_it(
    start_server: Callable[..., RunningServer],
) -> None:
    """A client that ignores "Connection: close": the server closes, then the kill follows."""
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
    from twisted.internet.protocol import Protocol

    killed: list[bool] = []
    server = start_server(kill=lambda: killed.append(True))

    class Stubborn(Protocol):
        def __init__(self) -> None:
            self.received = b""
            self.closed: defer.Deferred[None] = defer.Deferred()

        def dataReceived(self, data: bytes) -> None:
            self.received += data

        def connectionLost(self, reason: object) -> None:
            self.closed.callback(None)

    client = Stubborn()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", server.port), client)
    client.transport.write(b"GET /kill HTTP/1.1\r\nHost: localhost\r\n\r\n")  # type: ignore[union-attr]
    await client.closed.addTimeout(NEVER_A_HANG_S, reactor)  # the fallback kill closes nothing
    assert b'"status":"exiting"' in client.received
    assert killed == [True]


class RawClient:
    """A raw HTTP client over loopback: what it received, and when the server closed."""

    def __init__(self) -> None:
        from twisted.internet.protocol import Protocol

        client = self

        class _Protocol(Protocol):
            def dataReceived(self, data: bytes) -> None:
                client.received += data

            def connectionLost(self, reason: object) -> None:
                client.closed.callback(None)

        self.protocol = _Protocol()
        self.received = b""
        self.closed: defer.Deferred[None] = defer.Deferred()

    async def connect(self, port: int) -> RawClient:
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), self.protocol)
        return self

    def send(self, data: bytes) -> None:
        self.protocol.transport.write(data)  # type: ignore[union-attr]


@pytest_twisted.ensureDeferred
async def test_draining_answers_a_connection_whose_first_request_is_still_coming(
    server: RunningServer,
) -> None:
    fresh = await RawClient().connect(server.port)
    idle = await RawClient().connect(server.port)
    idle.send(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
    await eventually(lambda: defer.succeed(idle.received.endswith(b"}\n")))
    await eventually(lambda: defer.succeed(len(server.child.site.channels) == 2))  # type: ignore[union-attr]

    server.child.site.drain()  # type: ignore[union-attr]
    await idle.closed.addTimeout(NEVER_A_HANG_S, reactor)  # idle keep-alive connection: closed
    assert not fresh.closed.called, "a connection that has not sent its request yet stays open"
    fresh.send(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
    await fresh.closed.addTimeout(NEVER_A_HANG_S, reactor)
    assert fresh.received.startswith(b"HTTP/1.1 200 OK")
    assert b"Connection: close" in fresh.received


# ------------------------------------------------------------------ Redis trouble


@pytest_twisted.ensureDeferred
async def test_scripts_are_reloaded_after_the_script_cache_is_flushed(
    server: RunningServer, redis: Any
) -> None:
    """NOSCRIPT (a Redis restart or failover forgets scripts) is handled, not a 500."""
    assert (await post(server, b'{"user_id": "before-flush"}'))[0].code == 202
    await redis.execute_command("SCRIPT", "FLUSH")
    response, document = await post(server, b'{"user_id": "after-flush"}')
    assert response.code == 202, document


@pytest_twisted.ensureDeferred
async def test_a_paused_redis_gives_bounded_503s_not_a_pile_up(
    server: RunningServer, redis: Any
) -> None:
    """CLIENT PAUSE until told: every request answers 503, then all is well after UNPAUSE.

    The deadline's timing is tested on a Clock (test_a_deadline_is_a_deadline).
    """
    await redis.execute_command("CLIENT", "PAUSE", "60000", "WRITE")
    try:
        answers = await defer.gatherResults(
            [
                defer.Deferred.fromCoroutine(post(server, f'{{"user_id": "p{n}"}}'.encode()))
                for n in range(30)
            ]
        )
    finally:
        await redis.execute_command("CLIENT", "UNPAUSE")
    assert [response.code for response, _ in answers] == [503] * 30

    async def accepted() -> bool:
        response, _ = await post(server, f'{{"user_id": "later-{reactor.seconds()}"}}'.encode())
        return response.code == 202

    await eventually(accepted, timeout=NEVER_A_HANG_S)


# ------------------------------------------------------------------ Idempotency-Key


async def post_with_key(server: RunningServer, body: bytes, key: str) -> tuple[Any, Any]:
    return await post(server, body, {**JSON, "Idempotency-Key": key})


@pytest_twisted.ensureDeferred
async def test_a_retried_post_returns_the_original_task(server: RunningServer, redis: Any) -> None:
    body = b'{"user_id": "retrier", "payload": {"x": 1, "y": [2]}}'
    first, created = await post_with_key(server, body, "order-42")
    again, replayed = await post_with_key(
        server, b'{"payload": {"y": [2], "x": 1}, "user_id": "retrier"}', "order-42"
    )
    assert first.code == 202
    assert again.code == 200, "a replay, not a 429: replays are not charged to the rate limit"
    assert replayed["task_id"] == created["task_id"]
    assert again.headers.getRawHeaders("Idempotent-Replayed") == ["true"]
    assert again.headers.getRawHeaders("Location") == [f"/api/v1/task/{created['task_id']}"]
    pending = await redis.lrange(server.child.queue.keys.pending, 0, -1)  # type: ignore[union-attr]
    logged = server.task_log.read_text() if server.task_log.exists() else ""
    assert str(pending).count(created["task_id"]) + logged.count(created["task_id"]) == 1


@pytest_twisted.ensureDeferred
async def test_a_key_whose_request_died_before_its_task_is_409_then_taken_over(
    server: RunningServer, redis: Any
) -> None:
    """A claim with no task: "in flight" while young; once abandoned, a retry creates the task."""
    keys = server.child.queue.keys  # type: ignore[union-attr]
    phantom = Claim("0" * 32, fingerprint("frank", None), "2026-01-01T00:00:00.000Z")
    claim_key = keys.idempotency("frank", "order-7")
    await redis.set(claim_key, phantom.to_json())
    await redis.execute_command("PEXPIRE", claim_key, IDEMPOTENCY_TTL_S * 1000)
    young, document = await post_with_key(server, b'{"user_id": "frank"}', "order-7")
    assert (young.code, document["error"]) == (409, "idempotency_key_in_use")

    old_enough = (IDEMPOTENCY_TTL_S - ABANDONED_AFTER_S - 1) * 1000
    await redis.execute_command("PEXPIRE", claim_key, int(old_enough))
    taken, created = await post_with_key(server, b'{"user_id": "frank"}', "order-7")
    assert taken.code == 202 and created["task_id"] != phantom.task_id
    again, replayed = await post_with_key(server, b'{"user_id": "frank"}', "order-7")
    assert (again.code, replayed["task_id"]) == (200, created["task_id"])


@pytest_twisted.ensureDeferred
async def test_the_same_key_with_another_body_is_422(server: RunningServer) -> None:
    await post_with_key(server, b'{"user_id": "u1", "payload": 1}', "k")
    response, document = await post_with_key(server, b'{"user_id": "u1", "payload": 2}', "k")
    assert response.code == 422
    assert document["error"] == "idempotency_key_reused"


@pytest_twisted.ensureDeferred
async def test_the_same_key_with_another_delay_is_422(server: RunningServer) -> None:
    """delay_s and run_at are part of the request: a retry must not change when it runs."""
    first, _ = await post_with_key(server, b'{"user_id": "u2", "delay_s": 60}', "d")
    assert first.code == 202
    for body in (
        b'{"user_id": "u2", "delay_s": 120}',
        b'{"user_id": "u2"}',
        b'{"user_id": "u2", "run_at": "2026-12-07T10:00:00Z"}',
    ):
        response, document = await post_with_key(server, body, "d")
        assert (response.code, document["error"]) == (422, "idempotency_key_reused"), body


@pytest_twisted.ensureDeferred
async def test_a_replayed_delayed_post_answers_its_run_at(server: RunningServer) -> None:
    body = b'{"user_id": "u3", "payload": 1, "delay_s": 60}'
    first, created = await post_with_key(server, body, "r")
    again, replayed = await post_with_key(server, body, "r")
    assert (first.code, again.code) == (202, 200)
    assert replayed == created, "the replay answers what the first answer said"


@pytest_twisted.ensureDeferred
async def test_a_replayed_typed_post_answers_its_type(
    start_server: Callable[..., RunningServer],
) -> None:
    server = start_server(typed_handlers={"email": lambda task: None})
    body = b'{"user_id": "u6", "type": "email", "delay_s": 60}'
    first, created = await post_with_key(server, body, "t")
    again, replayed = await post_with_key(server, body, "t")
    assert (first.code, again.code, created["type"]) == (202, 200, "email")
    assert replayed == created, "the replay answers what the first answer said"


@pytest_twisted.ensureDeferred
async def test_the_202_of_a_delayed_task_shows_the_run_at_of_its_record(
    server: RunningServer,
) -> None:
    response, created = await post(server, b'{"user_id": "u4", "delay_s": 60.0005}')
    assert (response.code, created["status"]) == (202, "scheduled")
    record = await treq.get(f"{server.url}/api/v1/task/{created['task_id']}")
    assert (await record.json())["run_at"] == created["run_at"]


def test_a_delay_is_measured_from_the_injected_clock() -> None:
    submitted = parse_task_body(b"application/json", b'{"user_id": "a", "delay_s": 1.5}', now=NOW)
    assert (submitted.delay_ms, submitted.run_at) == (1500, "2026-05-28T20:26:41.500Z")


@pytest_twisted.ensureDeferred
async def test_a_cancel_is_counted_once(server: RunningServer, redis: Any) -> None:
    _, created = await post(server, b'{"user_id": "u5", "delay_s": 600}')
    for _ in range(2):
        response = await treq.delete(f"{server.url}/api/v1/task/{created['task_id']}")
        assert response.code == 200
    metrics = server.child.queue.keys.metrics  # type: ignore[union-attr]

    async def counted() -> Any:
        return await redis.hget(metrics, "tasks_cancelled")

    assert await eventually(counted) == "1"


@pytest_twisted.ensureDeferred
async def test_keys_belong_to_one_user(server: RunningServer) -> None:
    first, a = await post_with_key(server, b'{"user_id": "alice"}', "same-key")
    second, b = await post_with_key(server, b'{"user_id": "bob"}', "same-key")
    assert (first.code, second.code) == (202, 202)
    assert a["task_id"] != b["task_id"]


@pytest_twisted.ensureDeferred
async def test_a_key_whose_request_was_rate_limited_is_free_again(
    start_server: Callable[..., RunningServer],
) -> None:
    server = start_server(rate_limits=parse_rate_limits("1/60s"))
    assert (await post(server, b'{"user_id": "busy"}'))[0].code == 202
    limited, _ = await post_with_key(server, b'{"user_id": "busy"}', "k2")
    assert limited.code == 429
    other, _ = await post_with_key(server, b'{"user_id": "busy", "payload": 9}', "k2")
    assert other.code == 429, "not 409 or 422: the limited request did not keep the key"


@pytest.mark.parametrize("key", ["", "tab\there", "x" * 256, "naïve"])
@pytest_twisted.ensureDeferred
async def test_invalid_keys_are_400(server: RunningServer, key: str) -> None:
    response, document = await post(
        server,
        b'{"user_id": "k"}',
        {**JSON, "Idempotency-Key": key.encode("utf-8").decode("latin-1")},
    )
    assert response.code == 400
    assert document["error"] == "invalid_idempotency_key"


@pytest_twisted.ensureDeferred
async def test_a_lone_surrogate_is_400_and_the_request_beside_it_is_unaffected(
    start_server: Callable[..., RunningServer],
) -> None:
    """Both requests are read in one reactor turn, so they would share one admission batch."""
    from twisted.logger import globalLogPublisher

    server = start_server(rate_limits=())
    assert (await post(server, b'{"user_id": "warm-up"}'))[0].code == 202
    failures: list[Any] = []

    def observe(event: dict[str, Any]) -> None:
        if "log_failure" in event or event.get("isError"):
            failures.append(event)

    clients = [await RawClient().connect(server.port) for _ in range(2)]
    globalLogPublisher.addObserver(observe)
    try:
        for client, body in zip(
            clients,
            [b'{"user_id": "innocent"}', b'{"user_id": "evil", "payload": "\\ud800"}'],
            strict=True,
        ):
            client.send(
                b"POST /api/v1/task HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            )
        for client in clients:
            await client.closed.addTimeout(NEVER_A_HANG_S, reactor)
    finally:
        globalLogPublisher.removeObserver(observe)
    innocent, evil = (client.received for client in clients)
    assert innocent.startswith(b"HTTP/1.1 202 Accepted"), innocent[:200]
    assert evil.startswith(b"HTTP/1.1 400 Bad Request"), evil[:200]
    assert b'"error":"invalid_json"' in evil
    assert failures == []


# ------------------------------------------------------------------ slow, idle and many clients


@pytest_twisted.ensureDeferred
async def test_a_request_that_trickles_in_gets_408_and_others_are_served(
    start_server: Callable[..., RunningServer],
) -> None:
    """Over loopback; the deadline itself is tested on a Clock (no wall-clock bound here)."""
    server = start_server(request_timeout_s=0.5, idle_timeout_s=600.0)
    slow = await RawClient().connect(server.port)
    slow.send(b"POST /api/v1/task HTTP/1.1\r\nHost: x\r\n")
    for _ in range(3):  # a byte now and then: the idle timeout alone would never fire
        await sleep(0.2)
        slow.send(b"X")
        response = await treq.get(server.url + "/healthz")
        assert response.code == 200, "others are served meanwhile"
    await slow.closed.addTimeout(30, reactor)
    assert slow.received.startswith(b"HTTP/1.1 408 Request Timeout")
    assert b'"error":"request_timeout"' in slow.received


@pytest_twisted.ensureDeferred
async def test_an_idle_keep_alive_connection_is_closed(
    start_server: Callable[..., RunningServer],
) -> None:
    server = start_server(idle_timeout_s=1.0)
    client = await RawClient().connect(server.port)
    client.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    await client.closed.addTimeout(NEVER_A_HANG_S, reactor)
    assert client.received.startswith(b"HTTP/1.1 200 OK")


@pytest_twisted.ensureDeferred
async def test_a_child_holds_at_most_max_connections_and_the_rest_wait(
    start_server: Callable[..., RunningServer],
) -> None:
    server = start_server(max_connections=3)
    clients = [await RawClient().connect(server.port) for _ in range(5)]
    for client in clients:
        client.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")

    def answered() -> list[bool]:
        return [client.received.endswith(b"}\n") for client in clients]

    await eventually(lambda: defer.succeed(sum(answered()) == 3))
    assert len(server.child.site.channels) == 3  # type: ignore[union-attr]
    waiting = [client for client, done in zip(clients, answered(), strict=True) if not done]
    served = [client for client, done in zip(clients, answered(), strict=True) if done]
    served[0].protocol.transport.loseConnection()  # type: ignore[union-attr]
    await eventually(lambda: defer.succeed(sum(answered()) == 4))
    assert sum(client.received.endswith(b"}\n") for client in waiting) == 1
    for client in clients:
        client.protocol.transport.loseConnection()  # type: ignore[union-attr]


@pytest_twisted.ensureDeferred
async def test_the_per_address_tier_stops_a_client_rotating_user_ids(
    start_server: Callable[..., RunningServer],
) -> None:
    server = start_server(ip_rate_limits=(RateTier("ip-60s", 3, 60_000),))
    codes = [
        (await post(server, f'{{"user_id": "rotating-{n}"}}'.encode()))[0].code for n in range(5)
    ]
    assert codes == [202, 202, 202, 429, 429]
    _, problem = await post(server, b'{"user_id": "rotating-9"}')
    assert problem["violated-policies"] == ["ip-60s"]


@pytest_twisted.ensureDeferred
async def test_a_client_that_hangs_up_while_redis_is_paused_leaves_no_error_behind(
    start_server: Callable[..., RunningServer], redis: Any, keys: Any
) -> None:
    """The hang-up is seen while the admission waits in a paused Redis (checked, not hoped)."""
    from twisted.logger import globalLogPublisher

    server = start_server(redis_timeout_s=NEVER_A_HANG_S)  # no deadline fires meanwhile
    assert (await post(server, b'{"user_id": "warm-up"}'))[0].code == 202
    statuses = keys.status_prefix + "*"
    failures: list[Any] = []

    def observe(event: dict[str, Any]) -> None:
        if "log_failure" in event or event.get("isError"):
            failures.append(event)

    site = server.child.site
    assert site is not None
    globalLogPublisher.addObserver(observe)
    await redis.execute_command("CLIENT", "PAUSE", "60000", "WRITE")  # ended below, not by time
    try:
        client = await RawClient().connect(server.port)
        client.send(
            b"POST /api/v1/task HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 17\r\n\r\n{"user_id": "hu"}'
        )
        waiting = await eventually(
            lambda: defer.succeed([channel for channel in site.channels if channel.busy])
        )
        client.protocol.transport.loseConnection()  # type: ignore[union-attr]
        await eventually(lambda: defer.succeed(waiting[0] not in site.channels))  # seen
        info = await redis.execute_command("INFO", "clients")
        assert "paused_actions:write" in info, "Redis was still paused at the hang-up"
        assert len(await redis.keys(statuses)) == 1, "the admission had not run yet"
    finally:
        await redis.execute_command("CLIENT", "UNPAUSE")
        globalLogPublisher.removeObserver(observe)
    # It had been sent (an item withdrawn before its send never runs): it runs now.
    await eventually(lambda: redis.keys(statuses).addCallback(lambda found: len(found) == 2))
    assert (await treq.get(server.url + "/readyz")).code == 200
    assert failures == []


# ------------------------------------------------------------------ a reply that never comes


class ReplyHoldingProxy:
    """A TCP proxy to Redis that withholds the replies of the first connection carrying ``marker``.

    Commands still reach Redis (the script runs); what Redis answers on that
    connection never comes back, as when a reply is lost or late. The
    deterministic way to make the server's deadline fire after the script ran.
    ``held`` fires when the marked command has gone to Redis, ``released``
    when the server gave up on that connection (closed it).
    """

    def __init__(self, redis: RedisAddress, marker: bytes) -> None:
        from twisted.protocols import portforward

        proxy = self
        self.held: defer.Deferred[None] = defer.Deferred()
        self.released: defer.Deferred[None] = defer.Deferred()
        self._armed = True

        class Client(portforward.ProxyClient):
            def dataReceived(self, data: bytes) -> None:
                if not getattr(self.peer, "holding", False):
                    super().dataReceived(data)

        class ClientFactory(portforward.ProxyClientFactory):
            protocol = Client

        class Server(portforward.ProxyServer):
            clientProtocolFactory = ClientFactory
            holding = False
            _tail = b""

            def dataReceived(self, data: bytes) -> None:
                seen, self._tail = self._tail + data, data[-len(marker) :]
                super().dataReceived(data)
                if proxy._armed and marker in seen:
                    proxy._armed, self.holding = False, True
                    proxy.held.callback(None)

            def connectionLost(self, reason: object) -> None:
                super().connectionLost(reason)
                if self.holding:
                    proxy.released.callback(None)

        factory = portforward.ProxyFactory(redis.host, redis.port)
        factory.protocol = Server
        factory.noisy = False
        self.port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.address = RedisAddress("127.0.0.1", self.port.getHost().port)


@pytest.fixture
def holding_proxy(redis_server: RedisAddress) -> Any:
    proxy = ReplyHoldingProxy(redis_server, b"reply-lost")
    yield proxy
    pytest_twisted.blockon(defer.maybeDeferred(proxy.port.stopListening))


@pytest.mark.parametrize("failure", ["deadline", "hang-up"])
@pytest_twisted.ensureDeferred
async def test_a_key_is_kept_when_the_script_may_have_run(
    start_server: Callable[..., RunningServer],
    holding_proxy: ReplyHoldingProxy,
    redis: Any,
    keys: Any,
    failure: str,
) -> None:
    """The admission's reply is lost (503, or the client hung up): a retry finds that task."""
    server = start_server(redis=holding_proxy.address, redis_timeout_s=0.5, rate_limits=())
    body = b'{"user_id": "unlucky", "payload": "reply-lost"}'
    if failure == "deadline":
        response, document = await post_with_key(server, body, "order-9")
        assert (response.code, document["error"]) == (503, "redis_unavailable")
    else:
        client = await RawClient().connect(server.port)
        client.send(
            b"POST /api/v1/task HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Idempotency-Key: order-9\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        await holding_proxy.held  # the script is on its way to Redis, its reply will not come
        client.protocol.transport.loseConnection()  # type: ignore[union-attr]
        await client.closed
    await holding_proxy.released  # the server gave up on that reply
    created = await redis.keys(keys.status_prefix + "*")
    assert len(created) == 1, "the script ran: the task exists"
    task_id = created[0].removeprefix(keys.status_prefix)

    retried, replayed = await post_with_key(server, body, "order-9")
    assert (retried.code, replayed["task_id"]) == (200, task_id), "the same task, not a second"
    assert len(await redis.keys(keys.status_prefix + "*")) == 1


# ------------------------------------------------------------------ logs a person can read


@pytest_twisted.ensureDeferred
async def test_an_outage_writes_one_readable_warning_not_one_per_request(
    start_server: Callable[..., RunningServer], redis: Any
) -> None:
    from twisted.logger import formatEvent, globalLogPublisher

    server = start_server(redis_timeout_s=0.5)
    assert (await post(server, b'{"user_id": "warm"}'))[0].code == 202  # connected
    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == TaskAPI.log.namespace:
            lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    await redis.execute_command("CLIENT", "PAUSE", "60000", "WRITE")  # ended below, not by time
    try:
        answers = await defer.gatherResults(
            [
                defer.Deferred.fromCoroutine(post(server, f'{{"user_id": "o{n}"}}'.encode()))
                for n in range(20)
            ]
        )
        info = await redis.execute_command("INFO", "clients")
        assert "paused_actions:write" in info, "Redis was still paused when the 503s came"
    finally:
        await redis.execute_command("CLIENT", "UNPAUSE")
        globalLogPublisher.removeObserver(observe)
    assert [response.code for response, _ in answers] == [503] * 20
    assert lines == ["answered 503: Redis did not answer within 0.5 s"]


@pytest_twisted.ensureDeferred
async def test_replays_are_not_charged_to_the_per_address_tier(
    start_server: Callable[..., RunningServer], redis: Any, keys: Any
) -> None:
    server = start_server(rate_limits=(), ip_rate_limits=(RateTier("ip-60s", 2, 60_000),))
    first, created = await post_with_key(server, b'{"user_id": "replayer"}', "once")
    assert first.code == 202
    for _ in range(3):
        again, replayed = await post_with_key(server, b'{"user_id": "replayer"}', "once")
        assert (again.code, replayed["task_id"]) == (200, created["task_id"])
    assert (await post(server, b'{"user_id": "second"}'))[0].code == 202, "1 of 2 was used"
    limited, problem = await post_with_key(server, b'{"user_id": "third"}', "third-key")
    assert (limited.code, problem["violated-policies"]) == (429, ["ip-60s"])
    assert await redis.get(keys.idempotency("third", "third-key")) is None, "a 429 keeps no key"
