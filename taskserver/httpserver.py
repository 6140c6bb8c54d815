# -*- test-case-name: tests.test_web -*-
"""The HTTP transport: the site, its connections and bounded requests; JSON answers.

What twisted.web needs to serve the API of :mod:`taskserver.api` the way a
cluster child must: connections the site counts and can drain (for the
balancer and a graceful stop), a deadline for a request to arrive (408),
bodies never buffered past :data:`MAX_BODY_BYTES` (413), and every answer,
the channel's own 400 and 408 included, written by :func:`respond` or
:func:`json_body` as ``{"error": code, "message": text}``. Nothing here
knows about tasks or Redis.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from http import HTTPStatus
from io import BytesIO
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.iweb import IRequest

from taskserver.metrics import CLIENT_CLOSED_REQUEST, Tally, route_label

MAX_BODY_BYTES = 64 * 1024
#: The cap of the paths a site allows larger bodies (TaskSite.body_limits): batches.
BATCH_BODY_MAX_BYTES = 1024 * 1024
#: What every JSON answer says it is: the body is always UTF-8 (:func:`json_body`).
JSON_CONTENT_TYPE = "application/json; charset=utf-8"

Headers = Iterable[tuple[str, str]]


class ApiError(Exception):
    """An error answer: status, machine-readable code, human-readable message."""

    def __init__(self, status: int, code: str, message: str, headers: Headers = ()) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = list(headers)

    def document(self) -> dict[str, Any]:
        """The JSON body of every error answer."""
        return {"error": self.code, "message": self.message}


def json_body(document: dict[str, Any]) -> bytes:
    """A document as the server sends it: compact UTF-8 JSON and a newline."""
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode("utf-8") + b"\n"


def respond(
    request: IRequest,
    status: int,
    document: dict[str, Any],
    headers: Headers = (),
    content_type: str = JSON_CONTENT_TYPE,
) -> bytes:
    """Set the status and headers of a JSON answer; returns its body."""
    request.setResponseCode(status, HTTPStatus(status).phrase.encode("ascii"))
    request.setHeader(b"content-type", content_type.encode("ascii"))
    request.setHeader(b"cache-control", b"no-store")
    for name, value in headers:
        request.setHeader(name.encode("ascii"), value.encode("ascii"))
    body = json_body(document)
    # With a length, twisted.web sends the body as it is instead of in chunks.
    request.setHeader(b"content-length", b"%d" % len(body))
    return body


def read_body(request: IRequest, limit: int = MAX_BODY_BYTES) -> bytes:
    """The request body; ApiError 413 if it is over ``limit`` bytes.

    A BoundedRequest has dropped such a body as it arrived (its own limit is
    the one its site gives its path); any other request (a test double's) is
    measured here.
    """
    if isinstance(request, BoundedRequest) and request.body_too_large:
        limit = request.body_limit  # the cap it was held to (its path as sent decides)
    else:
        body = request.content.read()
        if len(body) <= limit:
            return body
    raise ApiError(413, "body_too_large", f"the body must be at most {limit} bytes")


class BoundedRequest(server.Request):
    """A request that stops buffering its body past its limit.

    twisted.web reads the whole body before the resource runs; this keeps
    the bytes it stores bounded and lets the handler answer 413. The limit
    is MAX_BODY_BYTES unless the site allows its path more
    (:meth:`CountingChannel.lineReceived` tells it the path).
    """

    body_too_large = False
    _body_bytes = 0
    body_limit = MAX_BODY_BYTES

    def set_target(self, target: bytes) -> None:
        """The request line's target is known (before its headers): choose the limit."""
        site = getattr(self.channel, "site", None)
        limits: dict[bytes, int] = getattr(site, "body_limits", {})
        self.body_limit = limits.get(target.partition(b"?")[0], MAX_BODY_BYTES)

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self.body_limit:
            self.body_too_large = True
            length = 0
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self.body_too_large:
            return
        self._body_bytes += len(data)
        if self._body_bytes > self.body_limit:
            self.body_too_large = True
            self.content = BytesIO()  # type: ignore[assignment]  # drop what was kept
            return
        super().handleContentChunk(data)


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
    #: A whole request has arrived and its answer is not finished (from
    #: allContentReceived to requestDone, the two public hooks around it).
    busy = False

    def connectionMade(self) -> None:
        super().connectionMade()
        self.site.connection_opened(self)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self._cancel_read_deadline()
        try:
            for request in self.requests:
                if not request.finished:  # finish() sets it before requestDone counts
                    self.site.abandoned(request)
        finally:  # counting must never keep a closed connection in the site's set
            super().connectionLost(reason)
            self.site.connection_closed(self)

    def lineReceived(self, line: bytes) -> None:
        """A line of a request's head; the request line gives its request its target.

        Public API only (HTTPChannel makes the Request when the request line
        arrives): so a path allowed a larger body (batches) is known before
        any of its body, and every other path keeps MAX_BODY_BYTES.
        """
        before = len(self.requests)
        super().lineReceived(line)
        if len(self.requests) > before:
            request = self.requests[-1]
            parts = line.split(b" ")
            if len(parts) == 3 and isinstance(request, BoundedRequest):
                request.set_target(parts[1])

    def dataReceived(self, data: bytes) -> None:
        self._bytes_since_answer += len(data)
        if self._read_deadline is None and not self.busy:
            self._read_deadline = self.callLater(self.site.request_timeout_s, self._too_slow)
        super().dataReceived(data)

    def allContentReceived(self) -> None:
        self._cancel_read_deadline()
        self.busy = True  # before: the answer may be finished within this call
        super().allContentReceived()

    def _cancel_read_deadline(self) -> None:
        if self._read_deadline is not None and self._read_deadline.active():
            self._read_deadline.cancel()
        self._read_deadline = None

    def _too_slow(self) -> None:
        """The request did not arrive in time (a slow or stuck client): 408, then close."""
        self._read_deadline = None
        self._answer_and_close(
            ApiError(408, "request_timeout", "the request took too long to arrive")
        )

    # The one private hook of twisted.web used here: HTTPChannel calls it for
    # every request it cannot parse and writes a bare "400 Bad Request" there;
    # there is no public way to make that answer JSON. tests/test_web.py
    # (test_the_channel_s_private_400_hook_still_exists) breaks if it goes away.
    def _respondToBadRequestAndDisconnect(self) -> None:
        """Not HTTP we can parse: a JSON 400, then close."""
        self._answer_and_close(ApiError(400, "bad_request", "malformed HTTP request"))

    def _answer_and_close(self, error: ApiError) -> None:
        """An error answer written directly: there is no Request to answer through."""
        self.site.tally.request("other", error.status)  # no route, no request to time
        body = json_body(error.document())
        phrase = HTTPStatus(error.status).phrase.encode("ascii")
        self.transport.write(  # type: ignore[union-attr]
            b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nCache-Control: no-store\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n%s"
            % (error.status, phrase, JSON_CONTENT_TYPE.encode("ascii"), len(body), body)
        )
        self.loseConnection()

    def allHeadersReceived(self) -> None:
        super().allHeadersReceived()
        self.requests[-1].headers_at = self.site.clock.seconds()
        if self.site.draining:
            self.persistent = False
            self.requests[-1].setHeader(b"connection", b"close")

    def requestDone(self, request: http.Request) -> None:
        self.site.answered(request)
        self._served += 1
        self._bytes_since_answer = 0
        self.busy = False  # before: this call may start on a pipelined request
        super().requestDone(request)

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

    def __init__(self, resource: Any, **kwargs: Any) -> None:
        super().__init__(resource, **kwargs)
        self.channels: set[CountingChannel] = set()
        self.draining = False
        self.request_timeout_s = 10.0
        #: Paths (no query) whose bodies may be larger than MAX_BODY_BYTES, and their caps.
        self.body_limits: dict[bytes, int] = {}
        self.on_open: Callable[[], None] = lambda: None
        self.on_close: Callable[[], None] = lambda: None
        self._closed_waiters: dict[CountingChannel, list[Callable[[], None]]] = {}
        #: Counts and times every answer (TaskAPI.site hands it the process's Tally and clock).
        self.tally = Tally()
        self.clock: IReactorTime = self.reactor

    def log(self, request: http.Request) -> None:
        pass

    def answered(self, request: http.Request) -> None:
        """Count an answered request, timed from the end of its headers to its last byte."""
        now = self.clock.seconds()
        started = getattr(request, "headers_at", now)
        self.tally.request(route_label(request.method, request.path), request.code, now - started)

    def abandoned(self, request: http.Request) -> None:
        """Count a request whose connection closed before its answer: 499, timed until now.

        The client went away; a request whose headers never all arrived is
        not counted. One cut off in its body has no path yet (twisted.web sets
        it once the body is in): it counts as route ``other``.
        """
        started = getattr(request, "headers_at", None)
        if started is not None:
            route = "other" if request.path is None else route_label(request.method, request.path)
            self.tally.request(route, CLIENT_CLOSED_REQUEST, self.clock.seconds() - started)

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
