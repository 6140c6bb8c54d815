# -*- test-case-name: tests.test_web -*-
"""The HTTP API (Klein): enqueue tasks, read their status, health checks.

Every answer is JSON, errors included (``{"error": code, "message": text}``);
the mapping from failures to status codes lives in
:meth:`TaskAPI.answer_error`, nowhere else.
"""

from __future__ import annotations

import hmac
import json
import math
import os
import sys
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from http import HTTPStatus
from io import BytesIO
from typing import Any, cast

from klein import Klein
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from werkzeug.exceptions import MethodNotAllowed, NotFound

from taskserver.clientip import Network, client_address, is_loopback_request
from taskserver.idempotency import VALID_KEY, Claim, IdempotencyKeys, fingerprint
from taskserver.logthrottle import WarningThrottle
from taskserver.queue import TaskQueue
from taskserver.ratelimit import Decision, RateLimiter
from taskserver.redisclient import RedisUnavailable
from taskserver.task import TASK_ID, Task

MAX_BODY_BYTES = 64 * 1024
USER_ID_MAX_CHARS = 128
#: Retry-After sent with 503 while Redis is unreachable.
UNAVAILABLE_RETRY_AFTER_S = 2
#: Unicode categories a user_id may not contain: controls, surrogates, line/paragraph separators.
_FORBIDDEN_CATEGORIES = frozenset({"Cc", "Cs", "Zl", "Zp"})
_ALLOWED_FIELDS = frozenset({"user_id", "payload"})

Headers = Iterable[tuple[str, str]]
#: /kill waits for its answer to be sent, but not longer than this.
KILL_FLUSH_TIMEOUT_S = 1.0


def _peer_host(request: IRequest) -> str:
    """The socket peer's address ("" for a peer without one, such as a UNIX socket)."""
    return str(getattr(request.getClientAddress(), "host", ""))


class ApiError(Exception):
    """An error answer: status, machine-readable code, human-readable message."""

    def __init__(self, status: int, code: str, message: str, headers: Headers = ()) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = list(headers)


class BoundedRequest(server.Request):
    """A request that stops buffering its body past MAX_BODY_BYTES.

    twisted.web reads the whole body before the resource runs; this keeps
    the bytes it stores bounded and lets the handler answer 413.
    """

    body_too_large = False
    _body_bytes = 0

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > MAX_BODY_BYTES:
            self.body_too_large = True
            length = 0
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self.body_too_large:
            return
        self._body_bytes += len(data)
        if self._body_bytes > MAX_BODY_BYTES:
            self.body_too_large = True
            self.content = BytesIO()  # type: ignore[assignment]  # drop what was kept
            return
        super().handleContentChunk(data)

    def body(self) -> bytes:
        """The request body (empty once it was found too large)."""
        return self.content.read()  # type: ignore[attr-defined]


class CountingChannel(http.HTTPChannel):
    """An HTTP/1.1 connection that tells its site when it opens and closes, and can drain.

    A connection is idle only between requests: it has answered at least one
    and received nothing since. A brand-new connection is not idle (its first
    request may be on the way); while draining, it gets that request answered
    with ``Connection: close``.
    """

    site: TaskSite
    _served = 0
    _bytes_since_answer = 0
    _read_deadline: Any = None

    def connectionMade(self) -> None:
        super().connectionMade()
        self.site.connection_opened(self)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self._cancel_read_deadline()
        super().connectionLost(reason)
        self.site.connection_closed(self)

    def dataReceived(self, data: bytes) -> None:
        self._bytes_since_answer += len(data)
        if self._read_deadline is None and not self._handlingRequest:
            self._read_deadline = self.callLater(self.site.request_timeout_s, self._too_slow)
        super().dataReceived(data)

    def allContentReceived(self) -> None:
        self._cancel_read_deadline()
        super().allContentReceived()

    def _cancel_read_deadline(self) -> None:
        if self._read_deadline is not None and self._read_deadline.active():
            self._read_deadline.cancel()
        self._read_deadline = None

    def _too_slow(self) -> None:
        """The request did not arrive in time (a slow or stuck client): 408, then close."""
        self._read_deadline = None
        self._answer_and_close(408, "request_timeout", "the request took too long to arrive")

    def _respondToBadRequestAndDisconnect(self) -> None:
        """Not HTTP we can parse (twisted.web answers a bare 400): a JSON 400, then close."""
        self._answer_and_close(400, "bad_request", "malformed HTTP request")

    def _answer_and_close(self, status: int, code: str, message: str) -> None:
        """An error answer written directly: there is no Request to answer through."""
        body = json.dumps({"error": code, "message": message}).encode()
        phrase = HTTPStatus(status).phrase.encode("ascii")
        self.transport.write(  # type: ignore[union-attr]
            b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (status, phrase, len(body), body)
        )
        self.loseConnection()

    def allHeadersReceived(self) -> None:
        super().allHeadersReceived()
        if self.site.draining:
            self.persistent = False
            self.requests[-1].setHeader(b"connection", b"close")

    def requestDone(self, request: http.Request) -> None:
        self._served += 1
        self._bytes_since_answer = 0
        super().requestDone(request)

    @property
    def busy(self) -> bool:
        """A whole request has arrived and its answer is not finished."""
        return bool(self._handlingRequest)

    def close_when_idle(self) -> None:
        """Close now if idle, else right after the next answer.

        Only a request being handled may be marked here: twisted.web drops
        a request that *arrives* on a non-persistent connection. Requests
        still arriving are marked by allHeadersReceived (the site drains).
        """
        if self._served and not self.busy and not self._bytes_since_answer:
            self.loseConnection()
        elif self.busy:
            self.persistent = False
            for request in self.requests:
                if not request.startedWriting:
                    request.setHeader(b"connection", b"close")


class TaskSite(server.Site):
    """The Site of one process: tracks its connections, so it can drain and be balanced.

    No per-request access-log lines: they would cost more than the request.
    """

    protocol = CountingChannel  # type: ignore[assignment]  # HTTP/1.1 only, no wrapper

    def __init__(
        self,
        resource: Any,
        shortcuts: Mapping[tuple[bytes, bytes], Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """``shortcuts``: resources for exact ``(method, path)`` pairs, found without traversal."""
        super().__init__(resource, **kwargs)
        self.shortcuts = dict(shortcuts or {})
        self.channels: set[CountingChannel] = set()
        self.draining = False
        self.request_timeout_s = 10.0
        self.on_open: Callable[[], None] = lambda: None
        self.on_close: Callable[[], None] = lambda: None
        self._closed_waiters: dict[CountingChannel, list[Callable[[], None]]] = {}

    def log(self, request: http.Request) -> None:
        pass

    def getResourceFor(self, request: server.Request) -> Any:
        shortcut = self.shortcuts.get((request.method, request.path))
        if shortcut is None:
            return super().getResourceFor(request)
        # What Site.getResourceFor sets before traversing (prepath is still empty here).
        request.site = self
        request.sitepath = []  # type: ignore[attr-defined]
        return shortcut

    def connection_opened(self, channel: CountingChannel) -> None:
        self.channels.add(channel)
        self.on_open()

    def connection_closed(self, channel: CountingChannel) -> None:
        self.channels.discard(channel)
        for waiter in self._closed_waiters.pop(channel, []):
            waiter()
        self.on_close()

    def when_closed(self, channel: CountingChannel, callback: Callable[[], None]) -> None:
        """Call ``callback`` once ``channel`` has closed (its last bytes are sent)."""
        self._closed_waiters.setdefault(channel, []).append(callback)

    def drain(self) -> None:
        """Close idle connections now and the others after their next answer."""
        self.draining = True
        for channel in list(self.channels):
            channel.close_when_idle()


# ------------------------------------------------------------------ input


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]} is out of range")
    return value


#: The largest magnitude a double holds (about 1.8e308): what any JSON reader can represent.
_LARGEST_DOUBLE_INT = int(sys.float_info.max)
#: Integers with fewer digits than this are below it, and need no comparison.
_SAFE_DIGITS = len(str(_LARGEST_DOUBLE_INT))


def _bounded_int(text: str) -> int:
    """Integers are kept exactly (12345678901234567890 stays itself), up to what a double holds.

    Beyond that no reader that parses numbers as doubles can represent the
    value at all; such a task could never be handled as it was sent.
    """
    value = int(text)
    if len(text) >= _SAFE_DIGITS and abs(value) > _LARGEST_DOUBLE_INT:
        raise ValueError(f"number {text[:20]}... is too large (beyond what a double holds)")
    return value


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key[:40]!r}")
        result[key] = value
    return result


#: Built once: json.loads with options builds a new decoder for every call.
_STRICT_JSON = json.JSONDecoder(
    parse_constant=_reject_constant,
    parse_float=_finite_float,
    parse_int=_bounded_int,
    object_pairs_hook=_no_duplicate_keys,
)


def is_json_media_type(content_type: bytes | None) -> bool:
    """``application/json``, optionally with ``charset=utf-8``."""
    if not content_type:
        return False
    media, _, parameters = content_type.decode("latin-1").partition(";")
    if media.strip().lower() != "application/json":
        return False
    for parameter in parameters.split(";"):
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "charset" and value.strip().strip('"').lower() not in (
            "utf-8",
            "utf8",
        ):
            return False
    return True


def validate_user_id(value: Any) -> str:
    if not isinstance(value, str):
        raise ApiError(400, "invalid_user_id", "user_id must be a string")
    if not 1 <= len(value) <= USER_ID_MAX_CHARS:
        raise ApiError(
            400, "invalid_user_id", f"user_id must be 1 to {USER_ID_MAX_CHARS} characters long"
        )
    if any(unicodedata.category(ch) in _FORBIDDEN_CATEGORIES for ch in value):
        raise ApiError(400, "invalid_user_id", "user_id must not contain control characters")
    return value


def parse_task_body(content_type: bytes | None, body: bytes) -> tuple[str, Any]:
    """Validate a POST body; returns ``(user_id, payload)`` or raises ApiError."""
    if not is_json_media_type(content_type):
        raise ApiError(415, "unsupported_media_type", "send the task as application/json")
    try:
        document = _STRICT_JSON.decode(body.decode("utf-8"))
    except (ValueError, RecursionError) as e:
        raise ApiError(400, "invalid_json", f"the body is not valid JSON: {e}"[:300]) from None
    if not isinstance(document, dict):
        raise ApiError(
            400, "not_an_object", 'the body must be a JSON object like {"user_id": "..."}'
        )
    unknown = sorted(set(document) - _ALLOWED_FIELDS)
    if unknown:
        raise ApiError(
            400, "unknown_field", f"unknown field(s): {', '.join(map(repr, unknown))}"[:300]
        )
    if "user_id" not in document:
        raise ApiError(400, "missing_user_id", "user_id is required")
    return validate_user_id(document["user_id"]), document.get("payload")


def idempotency_key(header: bytes | None) -> str | None:
    """The Idempotency-Key header, validated; None if absent."""
    if header is None:
        return None
    key = header.decode("latin-1")
    if not VALID_KEY.match(key):
        raise ApiError(
            400,
            "invalid_idempotency_key",
            "Idempotency-Key must be 1 to 255 printable ASCII characters",
        )
    return key


def status_document(task_id: str, record: dict[str, str]) -> dict[str, Any]:
    """The public view of a status record."""
    document: dict[str, Any] = {"task_id": task_id}
    for name in ("user_id", "status", "queued_at", "started_at", "finished_at", "error"):
        if name in record:
            document[name] = record[name]
    document["attempts"] = int(record.get("attempts", "0"))
    if "duration_ms" in record:
        document["duration_ms"] = float(record["duration_ms"])
    return document


# ------------------------------------------------------------------ output


def respond(
    request: IRequest,
    status: int,
    document: dict[str, Any],
    headers: Headers = (),
    content_type: str = "application/json",
) -> bytes:
    request.setResponseCode(status, HTTPStatus(status).phrase.encode("ascii"))
    request.setHeader(b"content-type", content_type.encode("ascii"))
    request.setHeader(b"cache-control", b"no-store")
    for name, value in headers:
        request.setHeader(name.encode("ascii"), value.encode("ascii"))
    body = json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode("utf-8") + b"\n"
    # With a length, twisted.web sends the body as it is instead of in chunks.
    request.setHeader(b"content-length", b"%d" % len(body))
    return body


class TaskAPI:
    """Routes of one taskserver process. Dependencies are passed in."""

    app = Klein()
    log = Logger()

    def __init__(
        self,
        limiter: RateLimiter,
        queue: TaskQueue,
        idempotency: IdempotencyKeys,
        clock: IReactorTime,
        kill: Callable[[], None] | None = None,
        kill_token: str | None = None,
        *,
        ip_limiter: RateLimiter | None = None,
        trusted_proxies: Sequence[Network] = (),
    ) -> None:
        """``kill`` ends this process abruptly (GET /kill); None turns the route off.

        ``ip_limiter`` is the optional per-client-address backstop tier; the
        address comes from X-Forwarded-For only when the peer is a trusted proxy.
        """
        self._ip_limiter = ip_limiter
        self._trusted_proxies = tuple(trusted_proxies)
        self._limiter = limiter
        self._queue = queue
        self._idempotency = idempotency
        self._clock = clock
        self._kill = kill
        self._kill_token = kill_token
        self._warnings = WarningThrottle(self.log, clock)

    def site(self, idle_timeout_s: float = 60.0, request_timeout_s: float = 10.0) -> TaskSite:
        """The Site serving these routes; idle connections close after ``idle_timeout_s``."""
        site = TaskSite(
            self.app.resource(),
            shortcuts={(b"POST", b"/api/v1/task"): EnqueueResource(self)},
            requestFactory=BoundedRequest,
            timeout=idle_timeout_s,
            # Bodies are JSON, read by the handler: twisted.web's form parsing (which
            # runs the email package's header parser on every POST) would be wasted.
            parsePOSTFormSubmission=False,
        )
        site.request_timeout_s = request_timeout_s
        site.displayTracebacks = False
        site.noisy = False
        return site

    @app.route("/api/v1/task", methods=["POST"])
    async def create_task(self, request: BoundedRequest) -> bytes:
        if request.body_too_large:
            raise ApiError(
                413, "body_too_large", f"the body must be at most {MAX_BODY_BYTES} bytes"
            )
        user_id, payload = parse_task_body(request.getHeader(b"content-type"), request.body())
        key = idempotency_key(request.getHeader(b"idempotency-key"))
        task = Task.new(user_id, payload, self._clock.seconds())
        if key is not None:
            claim = Claim(task.id, fingerprint(user_id, payload), task.queued_at)
            earlier = await self._idempotency.claim(user_id, key, claim)
            if earlier is not None:
                replayed = await self._replay(request, user_id, key, claim, earlier)
                if replayed is not None:
                    return replayed  # charged to no tier
                # The request that claimed the key died before its task existed: ours replaces it.
        by_address = await self._check_address(request)
        if by_address is not None and not by_address.allowed:
            decision = by_address
        else:
            # No release on failure: the script may have run (see _release).
            decision = await self._limiter.admit(task, self._queue)
        headers = decision.headers(self._clock.seconds())
        if not decision.allowed:
            if key is not None:
                await self._release(user_id, key)
            return respond(
                request, 429, decision.problem(), headers, content_type="application/problem+json"
            )
        headers.append(("Location", f"/api/v1/task/{task.id}"))
        return respond(
            request,
            202,
            {
                "task_id": task.id,
                "user_id": task.user_id,
                "status": "queued",
                "queued_at": task.queued_at,
            },
            headers,
        )

    async def _check_address(self, request: IRequest) -> Decision | None:
        """The per-address tier's decision (charged if it admits); None when there is none."""
        if self._ip_limiter is None or not self._ip_limiter.active:
            return None
        address = client_address(
            _peer_host(request), request.requestHeaders.getRawHeaders, self._trusted_proxies
        )
        return await self._ip_limiter.check(address)

    async def _replay(
        self, request: IRequest, user_id: str, key: str, claim: Claim, earlier: Claim
    ) -> bytes | None:
        """A retried request: the task it created (200), 422 if the body differs, 409 if
        that task does not exist yet; None if it never will (the key is ours now)."""
        if earlier.fingerprint != claim.fingerprint:
            raise ApiError(
                422,
                "idempotency_key_reused",
                "this Idempotency-Key was used with a different body",
            )
        record = await self._queue.status(earlier.task_id)
        if record is None:
            if await self._idempotency.take_over(user_id, key, earlier, claim):
                return None
            raise ApiError(
                409,
                "idempotency_key_in_use",
                "the first request with this Idempotency-Key has not finished; retry shortly",
                [("Retry-After", "1")],
            )
        return respond(
            request,
            200,
            {
                "task_id": earlier.task_id,
                "user_id": user_id,
                "status": record.get("status", "queued"),
                "queued_at": earlier.queued_at,
            },
            [("Location", f"/api/v1/task/{earlier.task_id}"), ("Idempotent-Replayed", "true")],
        )

    async def _release(self, user_id: str, key: str) -> None:
        """Give up the key of a request whose admission surely did not happen: a 429.

        Nothing else is sure. A deadline (RedisUnavailable) fires both while
        txredisapi waits for a connection (never written) and after it wrote
        the script (which may have run); a lost connection fails replies in
        flight; a client that hangs up (CancelledError) may do so after the
        turn's batch went out (the Coalescer withdraws only items not yet
        sent). Such a claim stays: a retry finds the task if it exists, and
        takes the key over once the claim is abandoned (ABANDONED_AFTER_S).
        """
        try:
            await self._idempotency.release(user_id, key)
        except RedisUnavailable as e:
            self._warnings.warn(f"could not release an idempotency key: {e}")

    @app.route("/api/v1/task/<task_id>", methods=["GET"])
    async def get_task(self, request: IRequest, task_id: str) -> bytes:
        record = await self._queue.status(task_id) if TASK_ID.match(task_id) else None
        if record is None:
            raise ApiError(404, "task_not_found", "no such task (unknown, or its status expired)")
        return respond(request, 200, status_document(task_id, record))

    @app.route("/healthz", methods=["GET"])
    def healthz(self, request: IRequest) -> bytes:
        return respond(request, 200, {"status": "ok", "pid": os.getpid()})

    @app.route("/readyz", methods=["GET"])
    async def readyz(self, request: IRequest) -> bytes:
        await self._queue.ping()
        return respond(request, 200, {"status": "ready"})

    @app.route("/kill", methods=["GET"])
    def kill(self, request: server.Request) -> bytes:
        """Crash this process on purpose, to watch the cluster replace it.

        Loopback clients only, unless KILL_TOKEN is set: then anyone with
        ``Authorization: Bearer <token>``, and nobody without it.
        """
        if self._kill is None:
            raise ApiError(404, "not_found", "no such resource")
        self._authorise(request, "GET /kill")
        self.log.warn("GET /kill: this process (pid {pid}) exits now", pid=os.getpid())
        channel = cast(CountingChannel, request.channel)
        channel.persistent = False  # close after this answer; the kill follows the close
        request.setHeader(b"connection", b"close")
        kill = self._kill
        channel.site.when_closed(channel, kill)
        self._clock.callLater(KILL_FLUSH_TIMEOUT_S, kill)
        return respond(request, 200, {"pid": os.getpid(), "status": "exiting"})

    def _authorise(self, request: IRequest, route: str) -> None:
        """The guard of every operator route: the token if one is set, else loopback only.

        Loopback is :func:`clientip.is_loopback_request`: a request forwarded
        by a proxy on this host is not a loopback request, unless that proxy
        is trusted and forwards for a loopback client.
        """
        if self._kill_token is not None:
            given = request.getHeader(b"authorization") or b""
            expected = f"Bearer {self._kill_token}".encode()
            if not hmac.compare_digest(given, expected):
                raise ApiError(
                    403, "forbidden", f"{route} needs Authorization: Bearer <KILL_TOKEN>"
                )
        elif not is_loopback_request(
            _peer_host(request), request.requestHeaders.getRawHeaders, self._trusted_proxies
        ):
            raise ApiError(403, "forbidden", f"{route} is only open to loopback clients")

    # -------------------------------------------------------------- errors

    @app.handle_errors(Exception)
    def error(self, request: IRequest, failure: Failure) -> bytes:
        return self.answer_error(request, failure)

    def answer_error(self, request: IRequest, failure: Failure) -> bytes:
        """The answer to a failed request: every failure's status code is chosen here."""
        error = failure.value
        if isinstance(error, ApiError):
            return respond(
                request,
                error.status,
                {"error": error.code, "message": error.message},
                error.headers,
            )
        if isinstance(error, RedisUnavailable):
            self._warnings.warn(f"answered 503: {error}")
            return respond(
                request,
                503,
                {
                    "error": "redis_unavailable",
                    "message": "the queue is unavailable; retry shortly",
                },
                [("Retry-After", str(UNAVAILABLE_RETRY_AFTER_S))],
            )
        if isinstance(error, NotFound):
            return respond(request, 404, {"error": "not_found", "message": "no such resource"})
        if isinstance(error, MethodNotAllowed):
            allowed = ", ".join(sorted(error.valid_methods or []))
            return respond(
                request,
                405,
                {"error": "method_not_allowed", "message": f"allowed methods: {allowed}"},
                [("Allow", allowed)],
            )
        self.log.failure(
            "unhandled error in {method} {path}", failure, method=request.method, path=request.path
        )
        return respond(
            request, 500, {"error": "internal_error", "message": "internal server error"}
        )


class EnqueueResource(Resource):
    """``POST /api/v1/task`` without Klein's router: the route every task comes through.

    Klein binds a werkzeug map, matches the path and wraps the handler in
    several Deferreds for every request; skipping that for this route took
    the benchmark from 0.86 to 1.11 x its floor and p99 from 39 to 13 ms. The same
    handler and the same error answers as through Klein
    (:meth:`TaskAPI.create_task`, :meth:`TaskAPI.answer_error`); TaskSite
    sends only POSTs to exactly this path here, everything else to Klein.
    """

    isLeaf = True

    def __init__(self, api: TaskAPI) -> None:
        super().__init__()
        self._api = api

    def render_POST(self, request: BoundedRequest) -> int:
        answer = defer.ensureDeferred(self._api.create_task(request))
        gone = request.notifyFinish()  # fails first if the client goes away
        gone.addErrback(lambda _: answer.cancel())
        answer.addBoth(self._write, request, gone)
        return NOT_DONE_YET

    def _write(self, result: bytes | Failure, request: BoundedRequest, gone: Any) -> None:
        if gone.called:  # the client went away: nobody to answer
            if isinstance(result, Failure) and not result.check(defer.CancelledError):
                self._api.log.failure("error after the client went away", result)
            return
        try:
            body = (
                self._api.answer_error(request, result) if isinstance(result, Failure) else result
            )
        except Exception:
            request.processingFailed(Failure())
            return
        request.write(body)
        request.finish()
