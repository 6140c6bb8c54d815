# -*- test-case-name: tests.test_web -*-
"""The HTTP API: its routes, what a valid request is, and the answer to every failure.

Every answer is JSON, errors included (``{"error": code, "message": text}``);
the mapping from failures to status codes lives in
:meth:`TaskAPI.answer_error`, nowhere else. ``POST /api/v1/task``, the route
every task comes through, is answered by :class:`TaskResource` itself;
Klein routes the rest. The transport (site, connections, bounded bodies)
is :mod:`taskserver.httpserver`.
"""

from __future__ import annotations

import hmac
import json
import math
import os
import re
import sys
import unicodedata
import uuid
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, cast

from klein import Klein
from prometheus_client import CONTENT_TYPE_LATEST
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound
from werkzeug.routing import RoutingException

from taskserver.batch import BATCH_IDENTITY, accepted, batch_items, invalid, item_task_id, refused
from taskserver.clientip import Network, client_address, is_cross_site, is_loopback_request
from taskserver.durability import AdmissionsRefused, DurabilityTimeout
from taskserver.exposition import exposition
from taskserver.httpserver import (
    BATCH_BODY_MAX_BYTES,
    ApiError,
    BoundedRequest,
    CountingChannel,
    TaskSite,
    read_body,
    respond,
)
from taskserver.idempotency import VALID_KEY, Claim, IdempotencyKeys, fingerprint
from taskserver.logthrottle import WarningThrottle
from taskserver.metrics import IP_TIER, TASKS_CANCELLED, TASKS_ENQUEUED, Tally
from taskserver.queue import TaskQueue
from taskserver.ratelimit import Decision, RateLimiter, RatePolicy
from taskserver.redisclient import RedisUnavailable
from taskserver.stats import ClusterStats
from taskserver.task import TASK_ID, Task, iso_utc
from taskserver.waiters import TOO_MANY_WAITERS_RETRY_AFTER_S, TooManyWaiters, Waiters

if TYPE_CHECKING:
    from taskserver.dashboard import DashboardResource, DashboardRoutes

USER_ID_MAX_CHARS = 128
#: Retry-After sent with 503 while Redis is unreachable.
UNAVAILABLE_RETRY_AFTER_S = 2
#: Unicode categories a user_id may not contain: controls, surrogates, line/paragraph separators.
_FORBIDDEN_CATEGORIES = frozenset({"Cc", "Cs", "Zl", "Zp"})
#: How far ahead a task may be delayed (the OpenAPI document reads it from here).
DELAY_MAX_S = 30 * 24 * 3600
_ALLOWED_FIELDS = frozenset({"user_id", "payload", "type", "delay_s", "run_at"})
#: The longest ``?wait=`` of GET /api/v1/task/<id> (the OpenAPI document reads it from here).
WAIT_MAX_S = 60
#: A decimal number, as JSON spells one (so "1e-3" too; not "nan", "inf", "0x10", " 1").
_DECIMAL = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?", re.ASCII)

#: /kill waits for its answer to be sent, but not longer than this.
KILL_FLUSH_TIMEOUT_S = 1.0
#: GET /api/v1/tasks without a limit (at most USER_TASKS_MAX).
USER_TASKS_DEFAULT_LIMIT = 20
_LIMIT_DIGITS = re.compile(r"[0-9]{1,6}")


def _peer_host(request: IRequest) -> str:
    """The socket peer's address ("" for a peer without one, such as a UNIX socket)."""
    return str(getattr(request.getClientAddress(), "host", ""))


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
    # Printable ASCII holds none of them (the common case, without a look at each character).
    if not (value.isascii() and value.isprintable()) and any(
        unicodedata.category(ch) in _FORBIDDEN_CATEGORIES for ch in value
    ):
        raise ApiError(400, "invalid_user_id", "user_id must not contain control characters")
    return value


#: The only way a lone surrogate gets into a document decoded from UTF-8: an escape.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _require_utf8(payload: Any) -> None:
    """400 if a string of the payload (key or value) holds a lone surrogate (``"\\ud800"``).

    Valid JSON, but no UTF-8 encodes it: Redis could never receive the task
    (the queue would refuse it, UnencodableTask, and the client would get a
    500 for its own bad input). Checked only for bodies with such an escape
    (a valid pair passes).
    """
    try:
        json.dumps(payload, ensure_ascii=False).encode("utf-8")
    except (UnicodeEncodeError, RecursionError):
        raise ApiError(
            400,
            "invalid_json",
            "the body cannot be stored as UTF-8: a string holds a lone surrogate"
            " (such as \\ud800 without its pair)",
        ) from None


@dataclass(frozen=True)
class TaskRequest:
    """One validated task submission: a single POST's body, or one item of a batch."""

    user_id: str
    payload: Any
    #: TASK_HANDLERS name, or None for TASK_HANDLER.
    type: str | None = None
    #: How long after admission it becomes due; 0 runs it now.
    delay_ms: int = 0
    #: When it becomes due (RFC 3339, from the ``now`` it was parsed at), "" if now: the
    #: one time the 202 and the status record both show.
    run_at: str = ""
    #: The delay as sent (``("delay_s", 60)`` or ``("run_at", "...")``), for the
    #: Idempotency-Key fingerprint; None without one.
    when: tuple[str, Any] | None = None


def parse_json_body(content_type: bytes | None, body: bytes) -> Any:
    """The body as JSON (strict: no NaN, no duplicate keys), or ApiError (415, 400)."""
    if not is_json_media_type(content_type):
        raise ApiError(415, "unsupported_media_type", "send the task as application/json")
    try:
        return _STRICT_JSON.decode(body.decode("utf-8"))
    except (ValueError, RecursionError) as e:
        raise ApiError(400, "invalid_json", f"the body is not valid JSON: {e}"[:300]) from None


def parse_task_document(
    document: Any,
    surrogates: bool = True,
    *,
    now: float,
    task_types: Collection[str] = frozenset(),
) -> TaskRequest:
    """Validate one task document (the one validator, for single POSTs and batch items).

    ``surrogates`` is False when the raw text shows no ``\\u`` escape, so no
    lone surrogate can be in it and the payload need not be walked. ``now`` (the
    injected clock's seconds) is what a delay is measured from. ``task_types``: the
    TASK_HANDLERS names a ``type`` may name.
    """
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
    user_id, payload = validate_user_id(document["user_id"]), document.get("payload")
    if surrogates:
        _require_utf8(payload)
    task_type = parse_task_type(document, task_types)
    delay_ms = parse_delay(document, now)
    run_at = iso_utc(now + delay_ms / 1000) if delay_ms else ""
    when = next(
        ((name, document[name]) for name in ("delay_s", "run_at") if name in document), None
    )
    return TaskRequest(user_id, payload, task_type, delay_ms, run_at, when)


def parse_task_type(document: dict[str, Any], task_types: Collection[str]) -> str | None:
    """``type``: one of ``task_types`` (TASK_HANDLERS), or None (absent: TASK_HANDLER).

    Checked here, at submission, so a task is never accepted that no handler would run.
    """
    if "type" not in document:
        return None
    task_type = document["type"]
    if not isinstance(task_type, str) or not task_type:
        raise ApiError(400, "invalid_task_type", "type must be a non-empty string")
    if task_type not in task_types:
        known = ", ".join(sorted(task_types)) or "none (TASK_HANDLERS is empty)"
        raise ApiError(
            400,
            "unknown_task_type",
            f"unknown task type {json.dumps(task_type[:64])}; the known types: {known}"[:300],
        )
    return task_type


#: RFC 3339 date-time (what datetime.fromisoformat would take more loosely), with a
#: space allowed for the T and no leap second (:60); the OpenAPI document's pattern.
RUN_AT_PATTERN = (
    r"^\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])[Tt ]([01]\d|2[0-3]):[0-5]\d:[0-5]\d"
    r"(\.\d{1,9})?([Zz]|[+-]([01]\d|2[0-3]):[0-5]\d)$"
)
_RFC3339 = re.compile(RUN_AT_PATTERN, re.ASCII)


def parse_delay(document: dict[str, Any], now: float) -> int:
    """``delay_s`` or ``run_at`` (not both) as ms from ``now``; 0 when due now.

    At most DELAY_MAX_S ahead: a delayed task's record and its place in the delayed
    set are kept until it is due, so the bound bounds Redis memory. A past run_at is due now.
    """
    if "delay_s" in document and "run_at" in document:
        raise ApiError(400, "invalid_delay", "give delay_s or run_at, not both")
    if "delay_s" in document:
        delay = document["delay_s"]
        if (
            isinstance(delay, bool)
            or not isinstance(delay, int | float)
            or not 0 <= delay <= DELAY_MAX_S
        ):
            raise ApiError(
                400, "invalid_delay", f"delay_s must be a number of seconds from 0 to {DELAY_MAX_S}"
            )
        return math.ceil(delay * 1000)
    if "run_at" not in document:
        return 0
    run_at = document["run_at"]
    try:
        if not isinstance(run_at, str) or not _RFC3339.fullmatch(run_at):
            raise ValueError
        due = datetime.fromisoformat(run_at.upper().replace("Z", "+00:00")).timestamp()
    except (ValueError, OverflowError):
        raise ApiError(
            400, "invalid_run_at", "run_at must be an RFC 3339 time like 2026-12-07T10:00:00Z"
        ) from None
    if due - now > DELAY_MAX_S:
        raise ApiError(400, "invalid_run_at", "run_at is more than 30 days ahead")
    return max(0, math.ceil((due - now) * 1000))


def parse_task_body(
    content_type: bytes | None,
    body: bytes,
    *,
    now: float,
    task_types: Collection[str] = frozenset(),
) -> TaskRequest:
    """Validate a POST body; returns the TaskRequest or raises ApiError."""
    document = parse_json_body(content_type, body)
    surrogates = b"\\u" in body and _SURROGATE_ESCAPE.search(body) is not None
    return parse_task_document(document, surrogates, now=now, task_types=task_types)


def parse_wait(values: list[bytes] | None) -> float | None:
    """The ``wait`` query parameter in seconds, None if absent; 0 < wait <= WAIT_MAX_S."""
    if values is None:
        return None
    text = values[0].decode("latin-1") if len(values) == 1 else ""
    seconds = float(text) if _DECIMAL.fullmatch(text) else math.nan
    if not 0 < seconds <= WAIT_MAX_S:  # NaN fails too
        raise ApiError(
            400,
            "invalid_wait",
            f"wait must be one number of seconds, more than 0 and at most {WAIT_MAX_S}",
        )
    return seconds


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


def task_not_found() -> ApiError:
    """The 404 of every route that names a task (GET, DELETE): unknown, or expired."""
    return ApiError(404, "task_not_found", "no such task (unknown, or its status expired)")


def _one_query_value(request: IRequest, name: str, code: str) -> str | None:
    """A query parameter as text, None if absent; 400 ``code`` if repeated or not UTF-8."""
    values = request.args.get(name.encode("ascii"), [])
    if not values:
        return None
    if len(values) > 1:
        raise ApiError(400, code, f"{name} must be given once")
    try:
        return values[0].decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, code, f"{name} must be UTF-8") from None


def parse_user_tasks_query(request: IRequest, most: int) -> tuple[str, int]:
    """GET /api/v1/tasks's ``user_id`` and ``limit`` (1 to ``most``, default 20 or ``most``)."""
    user_id = _one_query_value(request, "user_id", "invalid_user_id")
    if user_id is None:
        raise ApiError(400, "missing_user_id", "the query must name a user_id")
    validate_user_id(user_id)
    text = _one_query_value(request, "limit", "invalid_limit")
    if text is None:
        return user_id, min(USER_TASKS_DEFAULT_LIMIT, most)
    if not _LIMIT_DIGITS.fullmatch(text) or not 1 <= int(text) <= most:
        raise ApiError(400, "invalid_limit", f"limit must be an integer from 1 to {most}")
    return user_id, int(text)


def key_in_use() -> ApiError:
    """409: the first request with this Idempotency-Key is still being handled."""
    return ApiError(
        409,
        "idempotency_key_in_use",
        "the first request with this Idempotency-Key has not finished; retry shortly",
        [("Retry-After", "1")],
    )


def key_reused() -> ApiError:
    """422: this Idempotency-Key came with another body before."""
    return ApiError(
        422, "idempotency_key_reused", "this Idempotency-Key was used with a different body"
    )


def replayed_document(task_id: str, user_id: str, record: dict[str, str]) -> dict[str, Any]:
    """What a replay answers for a task its first request created: the 202's fields,
    with the status the record has now."""
    replayed = {
        "task_id": task_id,
        "user_id": user_id,
        "status": record.get("status", "queued"),
        "queued_at": record.get("queued_at", ""),
    }
    for name in ("type", "run_at"):  # as the first answer said them
        if name in record:
            replayed[name] = record[name]
    return replayed


def status_document(task_id: str, record: dict[str, str]) -> dict[str, Any]:
    """The public view of a status record."""
    document: dict[str, Any] = {"task_id": task_id}
    for name in (
        "user_id",
        "type",
        "status",
        "queued_at",
        "run_at",
        "started_at",
        "finished_at",
        "cancelled_at",
        "error",
    ):
        if name in record:
            document[name] = record[name]
    document["attempts"] = int(record.get("attempts", "0"))
    if "duration_ms" in record:
        document["duration_ms"] = float(record["duration_ms"])
    if "result" in record:
        try:
            document["result"] = json.loads(record["result"])
        except ValueError:  # never written so by the consumer; said, not a 500
            document["result_note"] = "result not readable: not JSON"
    elif "result_note" in record:
        document["result_note"] = record["result_note"]
    return document


class TaskAPI:
    """Routes of one taskserver process. Dependencies are passed in."""

    app = Klein()
    # Before any route is added (rules copy it then): "//" is not "/" here. Merging
    # would answer such a path with a redirect, and a path names one thing.
    app.url_map.merge_slashes = False
    log = Logger()

    def __init__(
        self,
        limiter: RatePolicy,
        queue: TaskQueue,
        idempotency: IdempotencyKeys,
        clock: IReactorTime,
        kill: Callable[[], None] | None = None,
        kill_token: str | None = None,
        *,
        ip_limiter: RateLimiter | None = None,
        trusted_proxies: Sequence[Network] = (),
        read_stats: Callable[..., Awaitable[ClusterStats]] | None = None,
        metrics_token: str | None = None,
        tally: Tally | None = None,
        dashboard: DashboardRoutes | None = None,
        not_ready: Callable[[], ApiError | None] = lambda: None,
        task_types: Collection[str] = frozenset(),
        waiters: Waiters | None = None,
        batch_max: int = 500,
    ) -> None:
        """``kill`` ends this process abruptly (GET /kill); None turns the route off.

        ``ip_limiter`` is the optional per-client-address backstop tier; the
        address comes from a forwarding header only when the peer is a trusted proxy
        (:mod:`taskserver.clientip`, which also decides what a loopback request is).
        ``dashboard`` answers ``/`` and ``/dashboard...``; None: they are 404s.
        ``read_stats()`` reads the cluster's numbers (:func:`taskserver.stats.read_stats`
        with its Redis, keys and labels bound); None turns GET /metrics off.
        ``tally`` counts the process's requests, admissions and refusals.
        ``not_ready()`` is why /readyz should fail though Redis answers, or None.
        ``task_types``: the TASK_HANDLERS names a task's ``type`` may be.
        ``waiters`` holds the requests that wait for a task to finish (``?wait=``); None:
        such a request is answered at once, with the record as it is.
        ``batch_max``: most tasks in one POST /api/v1/tasks (BATCH_MAX).
        """
        self._task_types = frozenset(task_types)
        self._batch_max = batch_max
        #: None unless it has tiers: the request path then does not even call it.
        self._ip_limiter = ip_limiter if ip_limiter is not None and ip_limiter.active else None
        self._trusted_proxies = tuple(trusted_proxies)
        self._limiter = limiter
        self._queue = queue
        self._idempotency = idempotency
        self._clock = clock
        self._kill = kill
        self._kill_token = kill_token
        self._read_stats = read_stats
        self._not_ready = not_ready
        self._waiters = waiters
        self._metrics_token = metrics_token
        self._warnings = WarningThrottle(self.log, clock)
        self.tally = tally if tally is not None else Tally()
        self._dashboard: DashboardResource | None = (
            dashboard.resource(self.answer_error) if dashboard is not None else None
        )

    def resource(self) -> TaskResource:
        """The root resource of these routes (what a Site, or treq's StubTreq, serves)."""
        return TaskResource(self)

    def site(self, idle_timeout_s: float = 60.0, request_timeout_s: float = 10.0) -> TaskSite:
        """The Site serving these routes; idle connections close after ``idle_timeout_s``."""
        site = TaskSite(
            self.resource(),
            requestFactory=BoundedRequest,
            timeout=idle_timeout_s,
            # Bodies are JSON, read by the handler: twisted.web's form parsing (which
            # runs the email package's header parser on every POST) would be wasted.
            parsePOSTFormSubmission=False,
        )
        site.request_timeout_s = request_timeout_s
        site.body_limits = {BATCH_PATH: BATCH_BODY_MAX_BYTES}
        site.tally, site.clock = self.tally, self._clock
        site.displayTracebacks = False
        site.noisy = False
        return site

    async def create_task(self, request: IRequest) -> bytes:
        """``POST /api/v1/task`` (answered by TaskResource, not routed by Klein)."""
        body = read_body(request)
        now = self._clock.seconds()  # one reading: queued_at and run_at are a delay apart
        submitted = parse_task_body(
            request.getHeader(b"content-type"), body, now=now, task_types=self._task_types
        )
        user_id, payload = submitted.user_id, submitted.payload
        key = idempotency_key(request.getHeader(b"idempotency-key"))
        task = Task.new(user_id, payload, now, submitted.type, submitted.run_at or None)
        # Before the claim: a sure refusal (replicas missing) must not hold the key.
        self._queue.check_admissions()
        if key is not None:
            claim = Claim(
                task.id, fingerprint(user_id, payload, task.type, submitted.when), task.queued_at
            )
            earlier = await self._idempotency.claim(user_id, key, claim)
            if earlier is not None:
                replayed = await self._replay(request, user_id, key, claim, earlier)
                if replayed is not None:
                    return replayed  # charged to no tier
                # The request that claimed the key died before its task existed: ours replaces it.
        decision: Decision | None = None
        if self._ip_limiter is not None:  # the per-address tier first (charged if it admits)
            decision = await self._ip_limiter.check(self._client_address(request))
        by_address = decision is not None and not decision.allowed
        if decision is None or decision.allowed:
            # No release on failure: the script may have run (see _release).
            decision = await self._queue.admit(
                task, self._limiter, submitted.delay_ms, submitted.run_at
            )
        headers = decision.headers(self._clock.seconds())
        if not decision.allowed:
            self._count_refusal(decision, by_address)
            if key is not None:
                await self._release(user_id, key, claim)
            return respond(
                request, 429, decision.problem(), headers, content_type="application/problem+json"
            )
        headers.append(("Location", f"/api/v1/task/{task.id}"))
        self.tally.count(TASKS_ENQUEUED)
        return respond(request, 202, self._accepted_document(task, submitted.run_at), headers)

    @app.route("/api/v1/tasks", methods=["POST"])
    async def create_tasks(self, request: IRequest) -> bytes:
        """``POST /api/v1/tasks``: many tasks, each validated and rate-limited as a single
        POST's, admitted in one ADMIT call (:meth:`TaskQueue.admit_all`); 200 with a
        result per item, in order (:mod:`taskserver.batch`)."""
        body = read_body(request, BATCH_BODY_MAX_BYTES)
        document = parse_json_body(request.getHeader(b"content-type"), body)
        items = batch_items(document, self._batch_max)
        key = idempotency_key(request.getHeader(b"idempotency-key"))
        now = self._clock.seconds()
        surrogates = b"\\u" in body and _SURROGATE_ESCAPE.search(body) is not None
        parsed: list[TaskRequest | ApiError] = []
        for item in items:
            try:
                parsed.append(
                    parse_task_document(item, surrogates, now=now, task_types=self._task_types)
                )
            except ApiError as e:
                parsed.append(e)
        self._queue.check_admissions()
        batch_id, queued_at = uuid.uuid4().hex, iso_utc(now)
        if key is not None:
            claim = Claim(batch_id, fingerprint(BATCH_IDENTITY, document), queued_at)
            earlier = await self._idempotency.claim(BATCH_IDENTITY, key, claim)
            if earlier is not None:
                replayed = await self._replay_batch(request, key, claim, earlier, parsed)
                if replayed is not None:
                    return replayed
        if self._ip_limiter is not None:  # the per-address tier: once, for the request
            by_address = await self._ip_limiter.check(self._client_address(request))
            if not by_address.allowed:
                self._count_refusal(by_address, True)
                if key is not None:
                    await self._release(BATCH_IDENTITY, key, claim)
                return respond(
                    request,
                    429,
                    by_address.problem(),
                    by_address.headers(now),
                    content_type="application/problem+json",
                )
        tasks = [
            (
                Task(
                    item_task_id(batch_id, i),
                    p.user_id,
                    p.payload,
                    queued_at,
                    type=p.type,
                    run_at=p.run_at or None,
                ),
                p.delay_ms,
                p.run_at,
            )
            for i, p in enumerate(parsed)
            if isinstance(p, TaskRequest)
        ]
        decisions, durable = (
            await self._queue.admit_all(tasks, self._limiter) if tasks else ([], True)
        )
        admitted = iter(zip(tasks, decisions, strict=True))
        results: list[dict[str, Any]] = []
        for submitted in parsed:
            if isinstance(submitted, ApiError):
                results.append(invalid(submitted))
                continue
            (task, _, run_at), decision = next(admitted)
            if not decision.allowed:
                self._count_refusal(decision, False)
                results.append(refused(decision))
                continue
            results.append(accepted(self._accepted_document(task, run_at)))
        enqueued = sum(decision.allowed for decision in decisions)
        if enqueued:
            self.tally.count(TASKS_ENQUEUED, enqueued)
        answer = {"results": results}
        if key is not None:  # never released: some items may exist
            await self._idempotency.store_answer(BATCH_IDENTITY, key, json.dumps(answer))
        if not durable:
            raise DurabilityTimeout(
                f"batch {batch_id} was written, but not confirmed durable in time"
            )
        return respond(request, 200, answer)

    def _accepted_document(self, task: Task, run_at: str) -> dict[str, Any]:
        """The body of a 202, and of a batch's accepted item: the task's id, user, status
        and times (one builder, so the two cannot drift apart)."""
        document = {
            "task_id": task.id,
            "user_id": task.user_id,
            "status": "queued",
            "queued_at": task.queued_at,
        }
        if task.type is not None:
            document["type"] = task.type
        if run_at:
            document.update(status="scheduled", run_at=run_at)
        return document

    async def _replay_batch(
        self,
        request: IRequest,
        key: str,
        claim: Claim,
        earlier: Claim,
        parsed: Sequence[TaskRequest | ApiError],
    ) -> bytes | None:
        """A retried batch: its first answer again (200), 422 if the body differs, 409
        while the first is in flight; None if that one died first (the key is ours now).

        With no stored answer, the first request may still have admitted its items
        (its answer was lost after the script ran: a hang-up, a late reply, a crash):
        then the answer is rebuilt from its items' records, never admitted again.
        """
        if earlier.fingerprint != claim.fingerprint:
            raise key_reused()
        stored = await self._idempotency.stored_answer(BATCH_IDENTITY, key)
        if stored is not None:
            answer = json.loads(stored)
        else:
            rebuilt = await self._batch_answer_from_records(earlier.task_id, parsed)
            if rebuilt is None:
                if await self._idempotency.take_over(BATCH_IDENTITY, key, earlier, claim):
                    return None
                raise key_in_use()
            answer = rebuilt
            await self._idempotency.store_answer(BATCH_IDENTITY, key, json.dumps(answer))
        first = next((r for r in answer["results"] if r["status"] == 202), None)
        if first is not None:  # its own answer may have been 503 durability_timeout
            await self._queue.confirm_durable(first["task"]["task_id"])
        return respond(request, 200, answer, [("Idempotent-Replayed", "true")])

    async def _batch_answer_from_records(
        self, batch_id: str, parsed: Sequence[TaskRequest | ApiError]
    ) -> dict[str, Any] | None:
        """The answer of batch ``batch_id`` as its items' records tell it, or None if none
        of them exists (its admission never ran, or refused every item).

        One script admitted all its items, so once one exists, a valid item without a
        record was refused by its user's rate limit.
        """
        ids = [item_task_id(batch_id, i) for i in range(len(parsed))]
        records = await defer.gatherResults(
            [
                defer.ensureDeferred(self._queue.status(task_id))
                for task_id, item in zip(ids, parsed, strict=True)
                if isinstance(item, TaskRequest)
            ],
            consumeErrors=True,
        )
        if not any(records):
            return None
        found = iter(records)
        results: list[dict[str, Any]] = []
        for task_id, item in zip(ids, parsed, strict=True):
            if isinstance(item, ApiError):
                results.append(invalid(item))
                continue
            record = next(found)
            if record is None:
                results.append(
                    {
                        "status": 429,
                        "error": "rate_limited",
                        "message": "its user's rate limit refused it when this batch was "
                        "first sent",
                    }
                )
            else:
                results.append(accepted(replayed_document(task_id, item.user_id, record)))
        return {"results": results}

    def _count_refusal(self, decision: Decision, by_address: bool) -> None:
        """A 429: once as ``ip`` from the per-address tiers, else once per violated user tier."""
        if by_address:
            self.tally.rate_limited(IP_TIER)
            return
        for state in decision.violated:
            self.tally.rate_limited(state.tier.name)

    def _client_address(self, request: IRequest) -> str:
        """The address the per-address tier counts (forwarding headers from trusted proxies)."""
        return client_address(
            _peer_host(request), request.requestHeaders.getRawHeaders, self._trusted_proxies
        )

    async def _replay(
        self, request: IRequest, user_id: str, key: str, claim: Claim, earlier: Claim
    ) -> bytes | None:
        """A retried request: the task it created (200), 422 if the body differs, 409 if
        that task does not exist yet; None if it never will (the key is ours now).

        The 200 waits as a 202 would (DURABILITY, WAIT_REPLICAS): a 503
        durability_timeout again while the task is still not confirmed durable.
        """
        if earlier.fingerprint != claim.fingerprint:
            raise key_reused()
        record = await self._queue.status(earlier.task_id)
        if record is None:
            if await self._idempotency.take_over(user_id, key, earlier, claim):
                return None
            raise key_in_use()
        # Its own admission may have answered 503 durability_timeout: 200 only once durable.
        await self._queue.confirm_durable(earlier.task_id)
        replayed = replayed_document(earlier.task_id, user_id, record)
        return respond(
            request,
            200,
            replayed,
            [("Location", f"/api/v1/task/{earlier.task_id}"), ("Idempotent-Replayed", "true")],
        )

    async def _release(self, user_id: str, key: str, claim: Claim) -> None:
        """Give up the key of a request whose admission surely did not happen: a 429.

        Nothing else is sure. A deadline (RedisUnavailable) fires both while
        txredisapi waits for a connection (never written) and after it wrote
        the script (which may have run); a lost connection fails replies in
        flight; a client that hangs up (CancelledError) may do so after the
        turn's batch went out (the Coalescer withdraws only items not yet
        sent). Such a claim stays: a retry finds the task if it exists, and
        takes the key over once the claim is abandoned (ABANDONED_AFTER_S).
        A failed per-address check comes before the admission and is sure
        too, but it means Redis is failing: a release would most likely fail
        as well and hold the 503 up by another deadline, so the take-over
        frees that key too. Only our own ``claim`` is deleted, never one that
        another request took over meanwhile.
        """
        try:
            await self._idempotency.release(user_id, key, claim)
        except RedisUnavailable as e:
            self._warnings.warn(f"could not release an idempotency key: {e}")

    @app.route("/api/v1/task/<task_id>", methods=["GET"])
    async def get_task(self, request: IRequest, task_id: str) -> bytes:
        """The task's record; with ``?wait=<s>``, once it is finished or the time is up.

        The wait holds no Redis connection and polls nothing: the process's one
        subscription wakes it (:mod:`taskserver.waiters`). A client that hangs up
        cancels it (Klein cancels the handler), which frees its place.
        """
        arguments = request.args or {}
        unknown = sorted(name.decode("latin-1") for name in arguments if name != b"wait")
        if unknown:
            raise ApiError(
                400,
                "unknown_parameter",
                f"unknown query parameter(s): {', '.join(map(repr, unknown))}"[:300],
            )
        wait_s = parse_wait(arguments.get(b"wait"))
        if not TASK_ID.match(task_id):
            record = None
        elif wait_s is None or self._waiters is None:
            record = await self._queue.status(task_id)
        else:
            try:
                record = await self._waiters.wait(task_id, wait_s)
            except TooManyWaiters as e:
                raise ApiError(
                    503,
                    "too_many_waiters",
                    f"{e}; retry shortly, or without wait",
                    [("Retry-After", str(TOO_MANY_WAITERS_RETRY_AFTER_S))],
                ) from None
        if record is None:
            raise task_not_found()
        return respond(request, 200, status_document(task_id, record))

    @app.route("/api/v1/tasks", methods=["GET"])
    async def user_tasks(self, request: IRequest) -> bytes:
        """A user's latest tasks, newest first, as GET /api/v1/task/<id> shows each (no result)."""
        most = self._queue.user_tasks_max
        if most == 0:
            raise ApiError(404, "user_tasks_off", "USER_TASKS_MAX is 0: no recent tasks are kept")
        user_id, limit = parse_user_tasks_query(request, most)
        found = await self._queue.user_tasks(user_id, limit)
        tasks = [status_document(task_id, record) for task_id, record in found]
        return respond(request, 200, {"user_id": user_id, "tasks": tasks})

    @app.route("/api/v1/task/<task_id>", methods=["DELETE"])
    async def cancel_task(self, request: IRequest, task_id: str) -> bytes:
        """A queued or scheduled task becomes cancelled and never runs (CANCEL)."""
        if not TASK_ID.match(task_id):
            raise task_not_found()
        state, changed = await self._queue.cancel(task_id, iso_utc(self._clock.seconds()))
        if changed:  # counted once: a second DELETE finds it cancelled already
            self.tally.count(TASKS_CANCELLED)
        record = await self._queue.status(task_id) if state is not None else None
        if state is None or record is None:
            raise task_not_found()
        if state != "cancelled":
            refusal = ApiError(
                409,
                "task_not_cancellable",
                f"the task is {state}: only a queued or scheduled task can be cancelled",
            )
            return respond(request, 409, {**refusal.document(), "status": state})
        return respond(request, 200, status_document(task_id, record))

    @app.route("/openapi.json", methods=["GET"])
    def openapi(self, request: IRequest) -> bytes:
        """The OpenAPI document of every route (:mod:`taskserver.openapi`)."""
        from taskserver import openapi  # here: it imports this module for its limits

        body = openapi.body(self._queue.user_tasks_max, self._batch_max)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"content-length", b"%d" % len(body))
        return body

    @app.route("/healthz", methods=["GET"])
    def healthz(self, request: IRequest) -> bytes:
        return respond(request, 200, {"status": "ok", "pid": os.getpid()})

    @app.route("/readyz", methods=["GET"])
    async def readyz(self, request: IRequest) -> bytes:
        refusal = self._not_ready()
        if refusal is not None:
            raise refusal
        await self._queue.ping()
        return respond(request, 200, {"status": "ready"})

    @app.route("/", methods=["GET"], endpoint="home")
    @app.route("/dashboard", branch=True, endpoint="dashboard")
    @app.route("/dashboard/", endpoint="dashboard_slash")
    def dashboard(self, request: IRequest) -> Resource:
        """The dashboard's own routes (:mod:`taskserver.dashboard`), if this server has one."""
        if self._dashboard is None:
            raise ApiError(404, "not_found", "no such resource")
        return self._dashboard

    @app.route("/metrics", methods=["GET"])
    async def metrics(self, request: IRequest) -> bytes:
        """Prometheus text: the cluster's totals and the queue now, whichever child answers.

        Not rate limited. With METRICS_TOKEN set, only with ``Authorization:
        Bearer <token>``. Redis down is a 200 with ``taskserver_redis_up 0``.
        """
        if self._read_stats is None:
            raise ApiError(404, "not_found", "no such resource")
        if self._metrics_token is not None:
            given = request.getHeader(b"authorization") or b""
            if not hmac.compare_digest(given, f"Bearer {self._metrics_token}".encode()):
                raise ApiError(
                    401,
                    "unauthorized",
                    "GET /metrics needs Authorization: Bearer <METRICS_TOKEN>",
                    [("WWW-Authenticate", 'Bearer realm="metrics"')],
                )
        try:
            stats: ClusterStats | None = await self._read_stats()
        except RedisUnavailable as e:
            self._warnings.warn(f"GET /metrics without Redis: {e}")
            stats = None
        body = exposition(stats)
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"content-length", b"%d" % len(body))
        return body

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
        is trusted and forwards for a loopback client. A request a web page
        made (:func:`clientip.is_cross_site`) is refused either way: these
        routes act on a GET, and every page a local user opens can send one.
        """
        if is_cross_site(request.requestHeaders.getRawHeaders):
            raise ApiError(403, "forbidden", f"{route} does not answer requests made by web pages")
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
            return respond(request, error.status, error.document(), error.headers)
        if isinstance(error, DurabilityTimeout):
            # The one ambiguous answer: the task was written, its durability is unknown.
            self._warnings.warn(f"answered 503 durability_timeout: {error}")
            return respond(
                request,
                503,
                {
                    "error": "durability_timeout",
                    "message": "the task may or may not exist: it was written, but not confirmed "
                    "durable in time; retry with the same Idempotency-Key",
                },
                [("Retry-After", str(UNAVAILABLE_RETRY_AFTER_S))],
            )
        if isinstance(error, AdmissionsRefused):  # nothing written; the watch logged why
            return respond(
                request,
                503,
                {"error": "redis_unavailable", "message": f"{error}; retry shortly"},
                [("Retry-After", str(UNAVAILABLE_RETRY_AFTER_S))],
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
        if isinstance(error, NotFound | RoutingException):  # a redirect is a routing answer
            return respond(request, 404, {"error": "not_found", "message": "no such resource"})
        if isinstance(error, MethodNotAllowed):
            allowed = ", ".join(sorted(error.valid_methods or []))
            return respond(
                request,
                405,
                {"error": "method_not_allowed", "message": f"allowed methods: {allowed}"},
                [("Allow", allowed)],
            )
        if isinstance(error, HTTPException) and error.code is not None and error.code < 500:
            phrase = HTTPStatus(error.code).phrase
            return respond(
                request,
                error.code,
                {"error": re.sub(r"[^a-z]+", "_", phrase.lower()), "message": phrase.lower()},
            )
        self.log.failure(
            "unhandled error in {method} {path}", failure, method=request.method, path=request.path
        )
        return respond(
            request, 500, {"error": "internal_error", "message": "internal server error"}
        )


def _utf8_url(request: server.Request) -> bool:
    """Is the decoded path, and the Host, UTF-8? (What Klein decodes before it routes.)"""
    try:
        b"/".join((request.prepath or []) + (request.postpath or [])).decode("utf-8")
        request.getRequestHostname().decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


#: The path of the route every task comes through.
ENQUEUE_PATH = b"/api/v1/task"
#: The path of batches (bodies up to BATCH_BODY_MAX_BYTES).
BATCH_PATH = b"/api/v1/tasks"


class TaskResource(Resource):
    """The root resource: ``POST /api/v1/task`` answered here, everything else by Klein.

    Klein binds a werkzeug map, matches the path and wraps the handler in
    several Deferreds for every request; skipping that for this route took
    the benchmark from 0.86 to 1.11 x its floor and p99 from 39 to 13 ms. A
    leaf, so twisted.web hands it every request untraversed, which is also
    what Klein's resource expects of a root; one route, one handler
    (:meth:`TaskAPI.create_task`), the same error answers
    (:meth:`TaskAPI.answer_error`).
    """

    isLeaf = True

    def __init__(self, api: TaskAPI) -> None:
        super().__init__()
        self._api = api
        self._klein = api.app.resource()

    def render(self, request: server.Request) -> Any:
        if request.path != ENQUEUE_PATH:
            if self._api._dashboard is not None:  # its headers on all its answers, errors too
                self._api._dashboard.secure(request)
            if not _utf8_url(request):  # Klein would answer it in HTML, and log a traceback
                error = ApiError(400, "bad_request", "the path and Host must be UTF-8")
                return self._answer_now(request, Failure(error))
            return self._klein.render(request)
        if request.method != b"POST":
            return self._answer_now(request, Failure(MethodNotAllowed(valid_methods=["POST"])))
        answer = defer.ensureDeferred(self._api.create_task(request))
        gone = request.notifyFinish()  # fails first if the client goes away
        gone.addErrback(lambda _: answer.cancel())
        answer.addBoth(self._write, request, gone)
        return NOT_DONE_YET

    def _answer_now(self, request: server.Request, failure: Failure) -> Any:
        """An error answer written here, not returned: a body returned to a HEAD is
        dropped by twisted.web with a logged warning for every request."""
        request.write(self._api.answer_error(request, failure))
        request.finish()
        return NOT_DONE_YET

    def _write(self, result: bytes | Failure, request: server.Request, gone: Any) -> None:
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
