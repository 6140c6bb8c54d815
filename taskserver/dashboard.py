# -*- test-case-name: tests.test_dashboard -*-
"""The dashboard's HTTP side: its page and files, its JSON endpoints, its guard and its actions.

Who may look: a loopback client (:func:`clientip.is_loopback_request`, the
guard of ``/kill``), or, when ADMIN_TOKEN is set, whoever sends it as
``Authorization: Bearer`` or holds the login cookie, and nobody else, loopback
included. The cookie and the CSRF token are HMACs of the token (or, without
one, of a secret the master hands every child); the cookie signs its issue time
and lasts SESSION_MAX_AGE_S (POST /dashboard/logout clears it): every child of a
cluster, and every host with the same ADMIN_TOKEN, agrees on them without
shared state.

What may act (requeue, purge): POST only, with the session's CSRF token in
``X-CSRF-Token``, and no sign that another site's page sent it (an
``Origin`` other than this server's own, a ``Sec-Fetch-Site`` other than
same-origin or none); never in read-only mode (DASHBOARD_READ_ONLY).

Every answer under /dashboard (and of ``/``), errors included, carries the
security headers (no inline script or style, no framing, no sniffing, no
referrer, no caching). Errors are JSON, answered by
the API's one mapping (:meth:`TaskAPI.answer_error`); the login page is the
only HTML error.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import json
import math
import re
from collections.abc import Awaitable, Callable, Sequence
from importlib.resources import files
from importlib.resources.abc import Traversable
from typing import Any
from urllib.parse import parse_qs

from klein import Klein
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource

from taskserver import deadletters
from taskserver.api import is_json_media_type, status_document
from taskserver.clientip import (
    Network,
    client_address,
    is_loopback_request,
    parse_address,
    parse_networks,
)
from taskserver.config import RateTier, Settings
from taskserver.httpserver import ApiError, Headers, read_body, respond
from taskserver.keys import Keys
from taskserver.metrics import configured_tiers
from taskserver.queue import TaskQueue
from taskserver.ratelimit import RateLimiter
from taskserver.redisclient import within
from taskserver.stats import read_stats
from taskserver.task import TASK_ID

#: On every dashboard answer, errors and redirects included.
SECURITY_HEADERS = (
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        b"connect-src 'self'; frame-ancestors 'none'; form-action 'self'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
)
#: The files under /dashboard/static/ (nothing else there is served), with their types.
STATIC_FILES = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}
PAGE_FILE = "dashboard.html"
LOGIN_FILE = "login.html"
#: Where the server writes the login page's message (the file's empty paragraph).
LOGIN_MESSAGE_SLOT = '<p id="login-message"></p>'
COOKIE_NAME = b"taskserver_admin"
#: How long a login lasts: the cookie's Max-Age, and the oldest issue time it is taken with.
SESSION_MAX_AGE_S = 12 * 3600
#: How far ahead of this host's clock an issue time may be (another host of the cluster).
SESSION_CLOCK_SKEW_S = 60
DASHBOARD_PATH = "/dashboard"
LOGIN_PATH = "/dashboard/login"
#: Wrong tokens (login form or bearer) a client address may send: a guess a second at
#: most, and ADMIN_TOKEN should be long and random anyway (the README says so).
AUTH_TIERS = (RateTier("dashboard-auth", 10, 60_000),)
#: How often the page polls (what /dashboard/api/session tells it).
POLL_INTERVAL_S = 2
DEAD_PAGE_DEFAULT_LIMIT = 50
DEAD_PAGE_MAX_LIMIT = 200
_DIGITS = re.compile(rb"[0-9]{1,15}")
_ALL_DIGITS = re.compile(rb"[0-9]+")

AnswerError = Callable[[IRequest, Failure], bytes]


def derived_secret(key: str, purpose: str) -> str:
    """HMAC-SHA256 of ``purpose`` under ``key``, hex: the cookie and the CSRF token."""
    return hmac.new(key.encode("utf-8"), purpose.encode("utf-8"), hashlib.sha256).hexdigest()


def session_cookie(token: str, issued_s: int) -> str:
    """The login cookie's value: its issue time, signed (``<issued>.<HMAC>``).

    Any host with the same ADMIN_TOKEN checks it, and its age, without shared state.
    """
    return f"{issued_s}.{derived_secret(token, f'session:{issued_s}')}"


class DashboardRoutes:
    """The routes under /dashboard (and ``/``, which redirects there). Dependencies passed in."""

    app = Klein()
    app.url_map.merge_slashes = False
    log = Logger()

    def __init__(
        self,
        redis: Any,
        keys: Keys,
        queue: TaskQueue,
        settings: Settings,
        clock: IReactorTime,
        *,
        redis_label: str,
        embedded: bool,
        cluster_secret: str,
        static: Traversable | None = None,
    ) -> None:
        """``redis_label`` and ``embedded`` describe the Redis for the overview
        (:func:`taskserver.stats.address_label`); ``cluster_secret`` keys the
        CSRF token when there is no ADMIN_TOKEN.

        ``static`` is the folder of the page's files (``taskserver/static``
        by default); they are read here, once, not on the request path.
        """
        self._redis = redis
        self._keys = keys
        self._queue = queue
        self._clock = clock
        self._timeout_s = settings.redis_timeout_s
        self._read_only = settings.dashboard_read_only
        self._token = settings.admin_token
        self._trusted_proxies: Sequence[Network] = parse_networks(
            ",".join(settings.trusted_proxies)
        )
        self._tiers = configured_tiers(settings)
        self._auth_limiter = RateLimiter(
            redis, keys, AUTH_TIERS, settings.redis_timeout_s, clock, Keys.ip_rate
        )
        self._redis_label = redis_label
        self._embedded = embedded
        self._csrf = derived_secret(self._token or cluster_secret, "csrf")
        folder = static if static is not None else files("taskserver") / "static"
        self._files = {name: _read(folder, name) for name in (*STATIC_FILES, PAGE_FILE, LOGIN_FILE)}
        self._answer_error: AnswerError | None = None

    def resource(self, answer_error: AnswerError) -> DashboardResource:
        """What the API serves ``/`` and ``/dashboard...`` with; errors go to ``answer_error``."""
        self._answer_error = answer_error
        return DashboardResource(self.app.resource())

    # ---------------------------------------------------------- pages and files

    @app.route("/", methods=["GET"])
    def home(self, request: IRequest) -> bytes:
        return _redirect(request, DASHBOARD_PATH)

    @app.route(f"{DASHBOARD_PATH}/", methods=["GET"])
    def slash(self, request: IRequest) -> bytes:
        """``/dashboard/`` is the page too: one URL for it, the one without the slash."""
        return _redirect(request, DASHBOARD_PATH)

    @app.route(DASHBOARD_PATH, methods=["GET"])
    async def page(self, request: IRequest) -> bytes:
        if await self._who(request) is None:
            return _redirect(request, LOGIN_PATH)
        return self._file(request, PAGE_FILE, "text/html; charset=utf-8")

    @app.route(f"{DASHBOARD_PATH}/static/<name>", methods=["GET"])
    def static(self, request: IRequest, name: str) -> bytes:
        """The page's script and style: public files of the package, open to anyone
        (the login page uses the style too)."""
        if name not in STATIC_FILES:
            raise ApiError(404, "not_found", "no such resource")
        return self._file(request, name, STATIC_FILES[name])

    @app.route(LOGIN_PATH, methods=["GET"])
    def login_form(self, request: IRequest) -> bytes:
        if self._token is None:
            return self._login_page(request, 200, _NO_TOKEN_NEEDED)
        return self._login_page(request, 200, "")

    @app.route(LOGIN_PATH, methods=["POST"])
    async def login(self, request: IRequest) -> bytes:
        """The form's token, right: the cookie, and on to the page; wrong: 403 and the form
        (refused as another site's too, with the reason)."""
        try:
            self._refuse_cross_site(request)
        except ApiError as refused:
            return self._login_page(request, refused.status, refused.message)
        if self._token is None:
            return self._login_page(request, 403, _NO_TOKEN_NEEDED)
        try:
            form = parse_qs(read_body(request).decode("utf-8", "replace"), max_num_fields=10)
        except ValueError:  # more fields than any login form has
            form = {}
        given = (form.get("token") or [""])[0].encode("utf-8")
        try:
            await self._refuse_if_guessing(request)
            if not hmac.compare_digest(given, self._token.encode("utf-8")):
                await self._charge_failure(request)
                return self._login_page(request, 403, "Wrong token.")
        except ApiError as refused:
            return self._login_page(request, refused.status, refused.message, refused.headers)
        cookie = session_cookie(self._token, int(self._clock.seconds()))
        self._set_cookie(request, cookie, SESSION_MAX_AGE_S)
        return _redirect(request, DASHBOARD_PATH)

    @app.route(f"{DASHBOARD_PATH}/logout", methods=["POST"])
    def logout(self, request: IRequest) -> bytes:
        """The login cookie cleared (an action of the page: its CSRF token, same-origin)."""
        self._refuse_cross_site(request)
        self._check_csrf(request)
        self._set_cookie(request, "", 0)
        return respond(request, 200, {"logged_out": True})

    def _set_cookie(self, request: IRequest, value: str, max_age_s: int) -> None:
        """``Secure`` when the browser's connection is https: ours, or a trusted proxy's."""
        https = request.isSecure() or (
            self._from_trusted_proxy(request)
            and "https" in self._forwarded(request, b"x-forwarded-proto", "proto")
        )
        request.setHeader(
            b"set-cookie",
            f"{COOKIE_NAME.decode()}={value}; Max-Age={max_age_s}; HttpOnly; SameSite=Strict; "
            f"Path={DASHBOARD_PATH}{'; Secure' if https else ''}".encode("ascii"),
        )

    # ---------------------------------------------------------- JSON: reads

    @app.route(f"{DASHBOARD_PATH}/api/session", methods=["GET"])
    async def session(self, request: IRequest) -> bytes:
        auth = await self._guard(request)
        return respond(
            request,
            200,
            {
                "csrf_token": self._csrf,
                "read_only": self._read_only,
                "auth": auth,
                "poll_interval_s": POLL_INTERVAL_S,
            },
        )

    @app.route(f"{DASHBOARD_PATH}/api/overview", methods=["GET"])
    async def overview(self, request: IRequest) -> bytes:
        """The cluster's numbers: the one reading admin ``stats`` and /metrics make too.

        Counts by LLEN and ZCARD in one script call, whatever the queue's
        length; 503 when Redis does not answer (the page says "Redis down").
        """
        await self._guard(request)
        stats = await read_stats(
            self._redis,
            self._keys,
            self._clock,
            self._timeout_s,
            redis_label=self._redis_label,
            embedded=self._embedded,
            history=True,
        )
        return respond(request, 200, stats.overview(read_only=self._read_only, tiers=self._tiers))

    @app.route(f"{DASHBOARD_PATH}/api/dead", methods=["GET"])
    async def dead(self, request: IRequest) -> bytes:
        """A page of the dead letters, newest first: one bounded LRANGE, whatever the length."""
        await self._guard(request)
        offset = _int_argument(request, b"offset", 0, 0, 10**15)
        limit = _int_argument(request, b"limit", DEAD_PAGE_DEFAULT_LIMIT, 1, DEAD_PAGE_MAX_LIMIT)
        reading = deadletters.page(self._redis, self._keys, offset, limit)
        total, items = await within(
            defer.Deferred.fromCoroutine(reading), self._timeout_s, self._clock
        )
        return respond(
            request, 200, {"total": total, "offset": offset, "limit": limit, "items": items}
        )

    @app.route(f"{DASHBOARD_PATH}/api/task/<task_id>", methods=["GET"])
    async def task(self, request: IRequest, task_id: str) -> bytes:
        """The document ``GET /api/v1/task/<task_id>`` answers."""
        await self._guard(request)
        record = await self._queue.status(task_id) if TASK_ID.match(task_id) else None
        if record is None:
            raise ApiError(404, "task_not_found", "no such task (unknown, or its status expired)")
        return respond(request, 200, status_document(task_id, record))

    # ---------------------------------------------------------- JSON: actions

    @app.route(f"{DASHBOARD_PATH}/api/dead/<task_id>/requeue", methods=["POST"])
    async def requeue_one(self, request: IRequest, task_id: str) -> bytes:
        await self._authorise_action(request)
        moved = 0
        if TASK_ID.match(task_id):
            moved = await self._requeue([task_id])
        if not moved:
            raise ApiError(404, "not_dead", "this task is not in the dead letters")
        return respond(request, 200, {"requeued": moved})

    @app.route(f"{DASHBOARD_PATH}/api/dead/requeue-all", methods=["POST"])
    async def requeue_all(self, request: IRequest) -> bytes:
        await self._authorise_action(request)
        try:
            moved = await self._requeue([])
        except deadletters.RequeueIncomplete as e:
            return respond(request, 200, {"requeued": e.requeued, "complete": False})
        return respond(request, 200, {"requeued": moved})

    @app.route(f"{DASHBOARD_PATH}/api/dead/purge", methods=["POST"])
    async def purge(self, request: IRequest) -> bytes:
        await self._authorise_action(request)
        purging = deadletters.purge(self._redis, self._keys)
        purged = await within(defer.Deferred.fromCoroutine(purging), self._timeout_s, self._clock)
        return respond(request, 200, {"purged": purged})

    async def _requeue(self, task_ids: list[str]) -> int:
        """A requeue, each of its calls with a request's deadline.

        What a failed call means for the answer: when earlier calls moved
        tasks, a 200 with their count and ``"complete": false`` (those are
        back in the queue; the list shows what is left); when the first call
        fails, 503 as any Redis failure (it may have run: a retry never moves
        a task twice).
        """
        return await deadletters.requeue(self._redis, self._keys, task_ids, self._bound)

    def _bound(self, call: defer.Deferred[Any]) -> Awaitable[Any]:
        """Each Redis call of a requeue (there are many) gets the deadline of one request."""
        return within(call, self._timeout_s, self._clock)

    # ---------------------------------------------------------- errors

    @app.handle_errors(Exception)
    def error(self, request: IRequest, failure: Failure) -> bytes:
        assert self._answer_error is not None, "served only through resource()"
        return self._answer_error(request, failure)

    # ---------------------------------------------------------- the guard

    async def _who(self, request: IRequest) -> str | None:
        """How this request is let in ("loopback", "token", "cookie"); None: it is not.

        A wrong bearer token is an error (403), not a stranger: the client
        meant to authenticate and should hear that it failed.
        """
        if self._token is None:
            headers = request.requestHeaders.getRawHeaders
            peer = str(getattr(request.getClientAddress(), "host", ""))
            return "loopback" if is_loopback_request(peer, headers, self._trusted_proxies) else None
        given = request.getHeader(b"authorization")
        if given is not None:
            await self._refuse_if_guessing(request)
            if hmac.compare_digest(given, f"Bearer {self._token}".encode()):
                return "token"
            await self._charge_failure(request)
            raise ApiError(
                403, "forbidden", "wrong token: send Authorization: Bearer <ADMIN_TOKEN>"
            )
        cookie = request.getCookie(COOKIE_NAME)
        if cookie is not None and self._is_valid_cookie(cookie):
            return "cookie"
        return None

    def _is_valid_cookie(self, cookie: bytes) -> bool:
        """Signed with ADMIN_TOKEN, issued less than SESSION_MAX_AGE_S ago."""
        assert self._token is not None
        issued, _, _ = cookie.partition(b".")
        if not _DIGITS.fullmatch(issued):
            return False
        age = self._clock.seconds() - int(issued)
        if not -SESSION_CLOCK_SKEW_S <= age <= SESSION_MAX_AGE_S:
            return False
        expected = session_cookie(self._token, int(issued)).encode("ascii")
        return hmac.compare_digest(cookie, expected)

    async def _refuse_if_guessing(self, request: IRequest) -> None:
        """429 while this client's failed attempts at the token are over AUTH_TIERS.

        Checked before the token is: over the limit, a right guess is refused
        like a wrong one, or the answers would still tell them apart.
        """
        for key, tier in zip(
            self._auth_limiter.counters(self._client(request)), AUTH_TIERS, strict=True
        ):
            used = await within(self._redis.get(key), self._timeout_s, self._clock)
            if used is not None and int(used) >= tier.limit:
                pttl = self._redis.execute_command("PTTL", key)
                left_ms = await within(pttl, self._timeout_s, self._clock)
                if int(left_ms) > 0:
                    raise _too_many_attempts(math.ceil(int(left_ms) / 1000))

    async def _charge_failure(self, request: IRequest) -> None:
        """A wrong token, counted against its client's address; 429 if that is one too many."""
        decision = await self._auth_limiter.check(self._client(request))
        if not decision.allowed:
            raise _too_many_attempts(decision.retry_after_s)

    def _client(self, request: IRequest) -> str:
        headers = request.requestHeaders.getRawHeaders
        return client_address(_peer(request), headers, self._trusted_proxies)

    async def _guard(self, request: IRequest) -> str:
        """The guard of every JSON endpoint: 401 for a stranger."""
        who = await self._who(request)
        if who is None:
            needs = "ADMIN_TOKEN (bearer or login)" if self._token else "a loopback client"
            raise ApiError(401, "unauthorized", f"the dashboard needs {needs}")
        return who

    async def _authorise_action(self, request: IRequest) -> None:
        """An action: a guarded, same-origin request with the CSRF token, not in read-only mode."""
        await self._guard(request)
        if self._read_only:
            raise ApiError(403, "read_only", "the dashboard is read-only (DASHBOARD_READ_ONLY)")
        self._refuse_cross_site(request)
        self._check_csrf(request)
        body = read_body(request)
        if body.strip() and not _is_empty_object(request.getHeader(b"content-type"), body):
            raise ApiError(400, "invalid_body", "an action takes no body, or {}")

    def _check_csrf(self, request: IRequest) -> None:
        given = request.getHeader(b"x-csrf-token") or b""
        if not hmac.compare_digest(given, self._csrf.encode("ascii")):
            raise ApiError(
                403, "invalid_csrf_token", "send X-CSRF-Token from /dashboard/api/session"
            )

    def _refuse_cross_site(self, request: IRequest) -> None:
        """403 unless every sign says this server's own page (or no browser) sent the request."""
        headers = request.requestHeaders.getRawHeaders
        fetch_site = headers(b"sec-fetch-site")
        if fetch_site is not None and any(
            value.strip().lower() not in (b"same-origin", b"none") for value in fetch_site
        ):
            raise ApiError(403, "cross_site", "refused: another site's page sent this request")
        origins = headers(b"origin")
        if origins is not None and not self._is_own_origin(request, origins):
            raise ApiError(403, "cross_site", "refused: the Origin is not this server's")

    def _is_own_origin(self, request: IRequest, origins: Sequence[bytes]) -> bool:
        """Is the one Origin this server's own: the scheme and the host of the request?

        Behind a trusted proxy (TRUSTED_PROXY) the scheme and host it forwards
        count too (X-Forwarded-Proto and -Host, Forwarded's proto= and host=,
        the right-most value: the one that proxy wrote): nginx's ``proxy_pass
        http://127.0.0.1:8000`` sends that as Host, not the browser's.
        """
        hosts = request.requestHeaders.getRawHeaders(b"host")
        if len(origins) != 1 or hosts is None or len(hosts) != 1:
            return False
        schemes, names = {"https" if request.isSecure() else "http"}, {_lower(hosts[0])}
        if self._from_trusted_proxy(request):
            schemes |= self._forwarded(request, b"x-forwarded-proto", "proto")
            names |= self._forwarded(request, b"x-forwarded-host", "host")
        origin = _lower(origins[0])
        return origin in {f"{scheme}://{name}" for scheme in schemes for name in names}

    def _from_trusted_proxy(self, request: IRequest) -> bool:
        return any(_in(_peer(request), network) for network in self._trusted_proxies)

    @staticmethod
    def _forwarded(request: IRequest, header: bytes, parameter: str) -> set[str]:
        """What the nearest proxy says in ``header`` and in Forwarded's ``parameter=``.

        The last value of each (a proxy appends its own after the client's); a
        quote or anything unreadable is no value at all.
        """
        found = set()
        values = request.requestHeaders.getRawHeaders(header)
        if values:
            found.add(_lower(values[-1].split(b",")[-1]))
        for line in (request.requestHeaders.getRawHeaders(b"forwarded") or [])[-1:]:
            for pair in _lower(line.split(b",")[-1]).split(";"):
                name, _, value = pair.partition("=")
                if name.strip() == parameter:
                    found.add(value.strip().strip('"'))
        return {value for value in found if value and '"' not in value and " " not in value}

    # ---------------------------------------------------------- answers

    def _file(self, request: IRequest, name: str, content_type: str) -> bytes:
        body = self._files[name]
        if body is None:
            raise ApiError(404, "not_found", f"{name} is missing from this installation")
        return _answer(request, 200, content_type, body)

    def _login_page(
        self, request: IRequest, status: int, message: str, headers: Headers = ()
    ) -> bytes:
        form = self._files[LOGIN_FILE]
        if form is None:
            raise ApiError(404, "not_found", f"{LOGIN_FILE} is missing from this installation")
        slot = LOGIN_MESSAGE_SLOT.encode()
        filled = f'<p id="login-message">{html.escape(message)}</p>'.encode()
        for name, value in headers:
            request.setHeader(name.encode("ascii"), value.encode("ascii"))
        return _answer(request, status, "text/html; charset=utf-8", form.replace(slot, filled, 1))


def _too_many_attempts(retry_after_s: int) -> ApiError:
    return ApiError(
        429,
        "too_many_attempts",
        f"too many wrong tokens from this address; retry in {retry_after_s} s",
        [("Retry-After", str(max(1, retry_after_s)))],
    )


_NO_TOKEN_NEEDED = (
    "No ADMIN_TOKEN is set: there is nothing to log in with. "
    "The dashboard is open to loopback clients only."
)


class DashboardResource(Resource):
    """The dashboard's routes as the API mounts them, with the security headers on every answer.

    The API routes ``/`` and ``/dashboard...`` here; the path is given back
    whole, so that the dashboard's routes read as the URLs they answer.
    """

    isLeaf = True

    def __init__(self, routes: Resource) -> None:
        super().__init__()
        self._routes = routes

    @staticmethod
    def secure(request: IRequest) -> None:
        """The security headers, if the request is the dashboard's (``/`` or under /dashboard).

        The API calls it before anything else answers, so that its own
        errors (a path that is not UTF-8, say) carry them too.
        """
        path = request.path
        if path in (b"/", DASHBOARD_PATH.encode()) or path.startswith(
            b"%s/" % DASHBOARD_PATH.encode()
        ):
            for name, value in SECURITY_HEADERS:
                request.setHeader(name, value)

    def render(self, request: server.Request) -> Any:
        request.postpath = (request.prepath or []) + (request.postpath or [])
        request.prepath = []
        return self._routes.render(request)


def _read(folder: Traversable, name: str) -> bytes | None:
    try:
        return (folder / name).read_bytes()
    except OSError:
        return None


def _answer(request: IRequest, status: int, content_type: str, body: bytes) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", content_type.encode("ascii"))
    request.setHeader(b"content-length", b"%d" % len(body))
    return body


def _redirect(request: IRequest, location: str) -> bytes:
    """A 303 whose body is JSON like every other non-page answer."""
    return respond(request, 303, {"location": location}, [("Location", location)])


def _int_argument(request: IRequest, name: bytes, default: int, least: int, most: int) -> int:
    """A query argument that must be one integer from ``least`` to ``most``; 400 otherwise."""
    values = (request.args or {}).get(name)
    if values is None:
        return default
    # No more digits than ``most`` has (int() of a long string costs), and no fewer: found by
    # schemathesis, 10**15 itself was refused as "not from 0 to 1000000000000000".
    if (
        len(values) == 1
        and len(values[0]) <= len(str(most))
        and _ALL_DIGITS.fullmatch(values[0])
        and least <= int(values[0]) <= most
    ):
        return int(values[0])
    raise ApiError(
        400, "invalid_paging", f"{name.decode()} must be one integer from {least} to {most}"
    )


def _is_empty_object(content_type: bytes | None, body: bytes) -> bool:
    try:
        return is_json_media_type(content_type) and json.loads(body) == {}
    except ValueError:
        return False


def _lower(value: bytes) -> str:
    return value.decode("latin-1").strip().lower()


def _peer(request: IRequest) -> str:
    return str(getattr(request.getClientAddress(), "host", ""))


def _in(peer: str, network: Network) -> bool:
    address = parse_address(peer)
    return address is not None and address in network
