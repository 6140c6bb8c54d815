"""The dashboard's HTTP side over loopback against real Redis: routes, guard, CSRF, actions."""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet import defer, reactor

from conftest import RunningServer, eventually, unused_port
from harness import Twistd
from taskserver import deadletters
from taskserver.api import TaskAPI
from taskserver.config import RateTier, RedisAddress, Settings
from taskserver.dashboard import (
    LOGIN_MESSAGE_SLOT,
    SECURITY_HEADERS,
    DashboardRoutes,
    derived_secret,
    session_cookie,
)
from taskserver.idempotency import IdempotencyKeys
from taskserver.keys import Keys
from taskserver.queue import TaskQueue
from taskserver.ratelimit import RatePolicy
from taskserver.redisclient import connect
from taskserver.stats import address_label
from taskserver.task import Task

XSS = ["<script>alert(1)</script>", '"><img src=x onerror=alert(1)>']
TOKEN = "s3cret-admin-token"
PAGE = (
    b"<!doctype html><title>taskserver</title><script src=/dashboard/static/dashboard.js></script>"
)
LOGIN = f"<!doctype html><form method=post>{LOGIN_MESSAGE_SLOT}<input name=token></form>".encode()
FILES = {"dashboard.html": PAGE, "dashboard.js": b"'use strict';\n", "dashboard.css": b"body{}\n"}


@pytest.fixture
def static(tmp_path: Path) -> Path:
    """The page's files (the real ones are the browser test's business)."""
    folder = tmp_path / "static"
    folder.mkdir()
    for name, content in {**FILES, "login.html": LOGIN}.items():
        (folder / name).write_bytes(content)
    (folder / "secret.txt").write_bytes(b"not on the allow-list")
    return folder


class Dashboard:
    """A TaskAPI with its dashboard on a loopback port, wired to real Redis."""

    def __init__(self, settings: Settings, redis: Any, static: Path, address: RedisAddress):
        keys = Keys(settings.key_prefix)
        self.queue = TaskQueue(redis, keys, 3600, settings.redis_timeout_s, reactor, 1)
        self.routes = DashboardRoutes(
            redis,
            keys,
            self.queue,
            settings,
            reactor,
            redis_label=address_label(address),
            embedded=False,
            cluster_secret="cluster-secret",
            static=static,
        )
        api = TaskAPI(
            RatePolicy(keys, settings.rate_limits),
            self.queue,
            IdempotencyKeys(redis, keys, 1.0, reactor, 3600),
            reactor,
            dashboard=self.routes,
        )
        self.port = reactor.listenTCP(0, api.site(), interface="127.0.0.1")
        self.url = f"http://127.0.0.1:{self.port.getHost().port}"
        self.csrf = derived_secret(settings.admin_token or "cluster-secret", "csrf")

    async def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[Any, bytes]:
        response = await treq.get(self.url + path, headers=headers, allow_redirects=False)
        return response, await response.content()

    async def post(
        self, path: str, headers: dict[str, str] | None = None, body: bytes = b""
    ) -> tuple[Any, bytes]:
        response = await treq.post(
            self.url + path, data=body, headers=headers, allow_redirects=False
        )
        return response, await response.content()

    async def act(self, path: str, **headers: str) -> tuple[int, Any]:
        """An action as the page sends it (its CSRF token, same-origin), ``headers`` on top."""
        sent = {"X-CSRF-Token": self.csrf, "Sec-Fetch-Site": "same-origin", "Origin": self.url}
        sent.update({name.replace("_", "-"): value for name, value in headers.items()})
        response, body = await self.post(path, {k: v for k, v in sent.items() if v})
        return response.code, json.loads(body)


@pytest.fixture
def dashboard(
    settings: Settings, redis: Any, static: Path, redis_server: RedisAddress
) -> Iterator[Callable[..., Dashboard]]:
    """Start dashboards: ``dashboard(**setting_overrides)``."""
    started: list[Dashboard] = []

    def start(**overrides: Any) -> Dashboard:
        server = Dashboard(replace(settings, **overrides), redis, static, redis_server)
        started.append(server)
        return server

    yield start
    for server in started:
        pytest_twisted.blockon(defer.maybeDeferred(server.port.stopListening))


def assert_security_headers(response: Any) -> None:
    for name, value in SECURITY_HEADERS:
        assert response.headers.getRawHeaders(name.decode()) == [value.decode()], name


async def dead_letter(redis: Any, keys: Keys, user_id: str, payload: Any, error: str) -> Task:
    """A dead-letter entry exactly as lua/lib/dead_letter.lua writes it."""
    task = Task.new(user_id, payload, reactor.seconds())
    entry = f'{{"error":{json.dumps(error)},"attempts":3,"failed_at_ms":1700000000000,"task":'
    await redis.lpush(keys.dead, entry + task.to_json() + "}")
    return task


async def really_dead(queue: TaskQueue, redis: Any, user_id: str) -> Task:
    """A task that failed its one attempt, through the queue's own scripts."""
    task = Task.new(user_id, {"user": user_id}, reactor.seconds())
    await queue.enqueue(task)
    consumer = "h:1:a#0"
    raw = await queue.fetch(redis, queue.keys.pending, queue.keys.processing(consumer), 1)
    await queue.mark_started(task, "t")
    assert await queue.fail(consumer, raw, task, 1, "boom", 1, "t", 1) == "dead"
    return task


def json_of(body: bytes) -> Any:
    return json.loads(body)


# ------------------------------------------------------------------ pages and files


@pytest_twisted.ensureDeferred
async def test_root_redirects_to_the_dashboard(dashboard: Callable[..., Dashboard]) -> None:
    server = dashboard()
    response, body = await server.get("/")
    assert response.code == 303
    assert response.headers.getRawHeaders("Location") == ["/dashboard"]
    assert json_of(body) == {"location": "/dashboard"}
    assert_security_headers(response)


@pytest_twisted.ensureDeferred
async def test_the_page_and_its_files_with_their_types(
    dashboard: Callable[..., Dashboard],
) -> None:
    server = dashboard()
    served = {
        "/dashboard": ("dashboard.html", "text/html; charset=utf-8"),
        "/dashboard/static/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
        "/dashboard/static/dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
    }
    for path, (name, content_type) in served.items():
        response, body = await server.get(path)
        assert response.code == 200, path
        assert response.headers.getRawHeaders("Content-Type") == [content_type]
        assert body == FILES[name]
        assert_security_headers(response)


@pytest.mark.parametrize(
    "name", ["secret.txt", "login.html", "dashboard.html", "..%2Fsecret.txt", "%2E%2E"]
)
@pytest_twisted.ensureDeferred
async def test_only_the_allow_listed_files_are_served(
    dashboard: Callable[..., Dashboard], name: str
) -> None:
    response, body = await dashboard().get(f"/dashboard/static/{name}")
    assert (response.code, json_of(body)["error"]) == (404, "not_found")
    assert response.headers.getRawHeaders("Content-Type") == ["application/json; charset=utf-8"]
    assert_security_headers(response)


@pytest_twisted.ensureDeferred
async def test_unknown_dashboard_paths_and_methods_are_json_errors(
    dashboard: Callable[..., Dashboard],
) -> None:
    server = dashboard()
    response, body = await server.get("/dashboard/api/nothing")
    assert (response.code, json_of(body)["error"]) == (404, "not_found")
    assert_security_headers(response)
    response, body = await server.get("/dashboard/api/dead/purge")
    assert (response.code, json_of(body)["error"]) == (405, "method_not_allowed")
    response, body = await server.post("/dashboard/api/session")
    assert (response.code, json_of(body)["error"]) == (405, "method_not_allowed")


def test_the_package_ships_every_file_it_serves() -> None:
    """The allow-list names the files of taskserver/static/ (the browser branch writes them)."""
    from importlib.resources import files

    from taskserver.dashboard import LOGIN_FILE, PAGE_FILE, STATIC_FILES

    folder = files("taskserver") / "static"
    if not folder.is_dir():
        pytest.skip("taskserver/static/ is not there yet (the page's files come with the page)")
    for name in (*STATIC_FILES, PAGE_FILE, LOGIN_FILE):
        assert (folder / name).is_file(), name


# ------------------------------------------------------------------ the guard


@pytest_twisted.ensureDeferred
async def test_loopback_is_let_in_without_a_token(dashboard: Callable[..., Dashboard]) -> None:
    server = dashboard()
    response, body = await server.get("/dashboard/api/session")
    assert response.code == 200
    assert json_of(body) == {
        "csrf_token": server.csrf,
        "read_only": False,
        "auth": "loopback",
        "poll_interval_s": 2,
    }
    assert_security_headers(response)


@pytest_twisted.ensureDeferred
async def test_a_forwarded_client_is_no_loopback_client(
    dashboard: Callable[..., Dashboard],
) -> None:
    """Behind a trusted proxy on this host, a remote client: 303 for pages, 401 for JSON."""
    server = dashboard(trusted_proxies=("127.0.0.1",))
    remote = {"X-Forwarded-For": "203.0.113.9"}
    response, body = await server.get("/dashboard", remote)
    assert response.code == 303
    assert response.headers.getRawHeaders("Location") == ["/dashboard/login"]
    assert_security_headers(response)
    for path in (
        "/dashboard/api/session",
        "/dashboard/api/dead",
        "/dashboard/api/task/" + "a" * 32,
    ):
        response, body = await server.get(path, remote)
        assert (response.code, json_of(body)["error"]) == (401, "unauthorized"), path
        assert_security_headers(response)
    code, document = await server.act("/dashboard/api/dead/purge", X_Forwarded_For="203.0.113.9")
    assert (code, document["error"]) == (401, "unauthorized")
    local, _ = await server.get("/dashboard/api/session", {"X-Forwarded-For": "127.0.0.1"})
    assert local.code == 200, "the proxy forwards for a loopback client"


@pytest_twisted.ensureDeferred
async def test_a_foreign_host_name_is_no_loopback_request(
    dashboard: Callable[..., Dashboard],
) -> None:
    """A DNS-rebound page reaches 127.0.0.1 with its own name as Host."""
    response, body = await dashboard().get("/dashboard/api/session", {"Host": "evil.example"})
    assert (response.code, json_of(body)["error"]) == (401, "unauthorized")


@pytest_twisted.ensureDeferred
async def test_with_a_token_loopback_is_not_enough(dashboard: Callable[..., Dashboard]) -> None:
    server = dashboard(admin_token=TOKEN)
    response, _ = await server.get("/dashboard")
    assert (response.code, response.headers.getRawHeaders("Location")) == (
        303,
        ["/dashboard/login"],
    )
    response, body = await server.get("/dashboard/api/session")
    assert (response.code, json_of(body)["error"]) == (401, "unauthorized")
    response, body = await server.get("/dashboard/api/session", {"Authorization": "Bearer nope"})
    assert (response.code, json_of(body)["error"]) == (403, "forbidden")
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    response, body = await server.get("/dashboard/api/session", bearer)
    assert response.code == 200
    assert json_of(body)["auth"] == "token"
    assert json_of(body)["csrf_token"] == derived_secret(TOKEN, "csrf")
    response, body = await server.get("/dashboard", bearer)
    assert (response.code, body) == (200, PAGE)


@pytest_twisted.ensureDeferred
async def test_the_login_form_sets_the_cookie(dashboard: Callable[..., Dashboard]) -> None:
    server = dashboard(admin_token=TOKEN, trusted_proxies=("127.0.0.1",))
    remote = {"X-Forwarded-For": "203.0.113.9"}
    form, body = await server.get("/dashboard/login", remote)
    assert form.code == 200
    assert body == LOGIN, "no message"
    assert form.headers.getRawHeaders("Content-Type") == ["text/html; charset=utf-8"]
    assert_security_headers(form)

    as_form = {**remote, "Content-Type": "application/x-www-form-urlencoded"}
    wrong, body = await server.post("/dashboard/login", as_form, b"token=guess")
    assert wrong.code == 403
    assert wrong.headers.getRawHeaders("Set-Cookie") is None
    assert b'<p id="login-message">Wrong token.</p>' in body and b"<form" in body

    crowded, body = await server.post("/dashboard/login", as_form, b"&".join([b"a=1"] * 50))
    assert crowded.code == 403 and b"Wrong token." in body

    right, _ = await server.post("/dashboard/login", as_form, f"token={TOKEN}".encode())
    assert right.code == 303
    assert right.headers.getRawHeaders("Location") == ["/dashboard"]
    [set_cookie] = right.headers.getRawHeaders("Set-Cookie")
    cookie = re.fullmatch(
        r"taskserver_admin=([0-9]+\.[0-9a-f]{64}); Max-Age=43200; HttpOnly; SameSite=Strict; "
        r"Path=/dashboard",
        set_cookie,
    )[1]  # type: ignore[index]
    assert abs(int(cookie.partition(".")[0]) - reactor.seconds()) < 5, "signed: issued now"
    with_cookie = {**remote, "Cookie": f"taskserver_admin={cookie}"}
    response, body = await server.get("/dashboard/api/session", with_cookie)
    assert (response.code, json_of(body)["auth"]) == (200, "cookie")
    response, body = await server.get("/dashboard", with_cookie)
    assert (response.code, body) == (200, PAGE)
    stale = {**remote, "Cookie": "taskserver_admin=" + "0" * 64}
    response, _ = await server.get("/dashboard/api/session", stale)
    assert response.code == 401, "a wrong cookie is no login: the page goes to the form"


@pytest_twisted.ensureDeferred
async def test_the_login_cookie_expires_is_secure_behind_https_and_logout_clears_it(
    dashboard: Callable[..., Dashboard],
) -> None:
    server = dashboard(admin_token=TOKEN, trusted_proxies=("127.0.0.1",))
    now = int(reactor.seconds())
    fresh, old = session_cookie(TOKEN, now - 60), session_cookie(TOKEN, now - 12 * 3600 - 1)
    relabelled = f"{now}.{old.partition('.')[2]}"  # an old signature with a new time
    for cookie, code in [(fresh, 200), (old, 401), (relabelled, 401), ("x." + "0" * 64, 401)]:
        response, _ = await server.get(
            "/dashboard/api/session", {"Cookie": f"taskserver_admin={cookie}"}
        )
        assert response.code == code, cookie
    assert derived_secret(TOKEN, "session") not in fresh, "not one constant value forever"

    form = {"Content-Type": "application/x-www-form-urlencoded", "X-Forwarded-Proto": "https"}
    response, _ = await server.post("/dashboard/login", form, f"token={TOKEN}".encode())
    assert response.headers.getRawHeaders("Set-Cookie")[0].endswith("; Secure")
    untrusted = dashboard(admin_token=TOKEN)
    response, _ = await untrusted.post("/dashboard/login", form, f"token={TOKEN}".encode())
    assert not response.headers.getRawHeaders("Set-Cookie")[0].endswith("; Secure")

    csrf = derived_secret(TOKEN, "csrf")
    response, body = await server.post("/dashboard/logout", {"X-CSRF-Token": "0" * 64})
    assert (response.code, json_of(body)["error"]) == (403, "invalid_csrf_token")
    assert response.headers.getRawHeaders("Set-Cookie") is None
    response, body = await server.post("/dashboard/logout", {"X-CSRF-Token": csrf})
    assert (response.code, json_of(body)) == (200, {"logged_out": True})
    assert response.headers.getRawHeaders("Set-Cookie") == [
        "taskserver_admin=; Max-Age=0; HttpOnly; SameSite=Strict; Path=/dashboard"
    ]
    assert_security_headers(response)


@pytest_twisted.ensureDeferred
async def test_the_login_form_refuses_another_site(dashboard: Callable[..., Dashboard]) -> None:
    server = dashboard(admin_token=TOKEN)
    response, body = await server.post(
        "/dashboard/login",
        {"Content-Type": "application/x-www-form-urlencoded", "Origin": "http://evil.example"},
        f"token={TOKEN}".encode(),
    )
    assert response.code == 403
    assert response.headers.getRawHeaders("Content-Type") == ["text/html; charset=utf-8"]
    assert b"<form" in body and b"the Origin is not this server&#x27;s" in body, body
    assert response.headers.getRawHeaders("Set-Cookie") is None


#: What nginx's ``proxy_pass http://127.0.0.1:PORT`` sends for https://tasks.example.com.
BEHIND_NGINX = [
    {"X-Forwarded-Host": "tasks.example.com", "X-Forwarded-Proto": "https"},
    {"Forwarded": "for=203.0.113.9;host=tasks.example.com;proto=https"},
]


@pytest.mark.parametrize("forwarded", BEHIND_NGINX)
@pytest_twisted.ensureDeferred
async def test_behind_a_trusted_proxy_its_forwarded_host_is_the_origin(
    dashboard: Callable[..., Dashboard], forwarded: dict[str, str]
) -> None:
    """The browser's Origin is the public name; the Host the proxy sends is its upstream."""
    origin = {"Origin": "https://tasks.example.com", **forwarded}
    form = {**origin, "Content-Type": "application/x-www-form-urlencoded"}
    token = f"token={TOKEN}".encode()
    server = dashboard(admin_token=TOKEN, trusted_proxies=("127.0.0.1",))
    response, _ = await server.post("/dashboard/login", form, token)
    assert response.code == 303
    bearer = {"Authorization": f"Bearer {TOKEN}", "X-Forwarded-For": "203.0.113.9"}
    code, document = await server.act("/dashboard/api/dead/purge", **bearer, **origin)
    assert (code, document) == (200, {"purged": 0})
    evil = {**origin, "Origin": "https://evil.example"}
    code, document = await server.act("/dashboard/api/dead/purge", **bearer, **evil)
    assert (code, document["error"]) == (403, "cross_site"), "the forwarded host, no other"
    untrusted = dashboard(admin_token=TOKEN)
    response, _ = await untrusted.post("/dashboard/login", form, token)
    assert response.code == 403, "from anyone but a trusted proxy the header means nothing"
    code, document = await untrusted.act("/dashboard/api/dead/purge", **bearer, **origin)
    assert (code, document["error"]) == (403, "cross_site")


@pytest_twisted.ensureDeferred
async def test_without_a_token_the_login_page_says_none_is_needed(
    dashboard: Callable[..., Dashboard],
) -> None:
    response, body = await dashboard().get("/dashboard/login")
    assert response.code == 200
    assert b'<p id="login-message">No ADMIN_TOKEN is set' in body


@pytest_twisted.ensureDeferred
async def test_guessing_the_token_is_limited_per_client_address(
    dashboard: Callable[..., Dashboard],
) -> None:
    """10 wrong tokens a minute (form or bearer) from one address, then 429 with
    Retry-After, even for the right one (or the answers would tell them apart)."""
    server = dashboard(admin_token=TOKEN, trusted_proxies=("127.0.0.1",))
    guesser = {"X-Forwarded-For": "203.0.113.9"}
    form = {**guesser, "Content-Type": "application/x-www-form-urlencoded"}
    for n in range(10):
        if n % 2:
            response, _ = await server.post("/dashboard/login", form, f"token=guess{n}".encode())
        else:
            bearer = {**guesser, "Authorization": f"Bearer guess{n}"}
            response, _ = await server.get("/dashboard/api/session", bearer)
        assert response.code == 403, n
    right = {**guesser, "Authorization": f"Bearer {TOKEN}"}
    response, body = await server.get("/dashboard/api/session", right)
    assert (response.code, json_of(body)["error"]) == (429, "too_many_attempts")
    assert 50 <= int(response.headers.getRawHeaders("Retry-After")[0]) <= 60
    assert_security_headers(response)
    response, body = await server.post("/dashboard/login", form, f"token={TOKEN}".encode())
    assert response.code == 429 and b"too many wrong tokens" in body and b"<form" in body
    assert response.headers.getRawHeaders("Retry-After") is not None
    assert response.headers.getRawHeaders("Set-Cookie") is None
    someone_else = {"X-Forwarded-For": "203.0.113.10", "Authorization": f"Bearer {TOKEN}"}
    response, _ = await server.get("/dashboard/api/session", someone_else)
    assert response.code == 200, "another address is not held up"


# ------------------------------------------------------------------ CSRF and read-only


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({"X_CSRF_Token": ""}, "invalid_csrf_token"),
        ({"X_CSRF_Token": "0" * 64}, "invalid_csrf_token"),
        ({"Origin": "http://evil.example"}, "cross_site"),
        ({"Origin": "null"}, "cross_site"),
        ({"Origin": "https://127.0.0.1"}, "cross_site"),
        ({"Sec_Fetch_Site": "cross-site"}, "cross_site"),
        ({"Sec_Fetch_Site": "same-site"}, "cross_site"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_an_action_without_its_csrf_token_or_from_another_site_is_refused(
    dashboard: Callable[..., Dashboard], redis: Any, keys: Keys, headers: dict[str, str], code: str
) -> None:
    server = dashboard()
    await dead_letter(redis, keys, "u", None, "boom")
    for path in ("/dashboard/api/dead/purge", "/dashboard/api/dead/requeue-all"):
        status, document = await server.act(path, **headers)
        assert (status, document["error"]) == (403, code), path
    assert await redis.llen(keys.dead) == 1, "nothing was done"


@pytest_twisted.ensureDeferred
async def test_an_action_from_the_page_itself_or_from_a_program_is_done(
    dashboard: Callable[..., Dashboard], redis: Any, keys: Keys
) -> None:
    server = dashboard()
    await dead_letter(redis, keys, "u", None, "boom")
    assert await server.act("/dashboard/api/dead/purge") == (200, {"purged": 1})
    # curl: no Origin, no Sec-Fetch-Site; the token from /api/session.
    assert await server.act("/dashboard/api/dead/purge", Origin="", Sec_Fetch_Site="") == (
        200,
        {"purged": 0},
    )
    assert await server.act("/dashboard/api/dead/purge", Sec_Fetch_Site="none") == (
        200,
        {"purged": 0},
    )


@pytest_twisted.ensureDeferred
async def test_an_action_takes_no_body_or_an_empty_object(
    dashboard: Callable[..., Dashboard],
) -> None:
    server = dashboard()
    page = {"X-CSRF-Token": server.csrf, "Content-Type": "application/json"}
    response, body = await server.post("/dashboard/api/dead/purge", page, b"{}")
    assert response.code == 200
    response, body = await server.post("/dashboard/api/dead/purge", page, b'{"all": true}')
    assert (response.code, json_of(body)["error"]) == (400, "invalid_body")


@pytest_twisted.ensureDeferred
async def test_read_only_refuses_every_action(
    dashboard: Callable[..., Dashboard], redis: Any, keys: Keys
) -> None:
    server = dashboard(dashboard_read_only=True)
    task = await dead_letter(redis, keys, "u", None, "boom")
    _, body = await server.get("/dashboard/api/session")
    assert json_of(body)["read_only"] is True
    for path in (
        f"/dashboard/api/dead/{task.id}/requeue",
        "/dashboard/api/dead/requeue-all",
        "/dashboard/api/dead/purge",
    ):
        status, document = await server.act(path)
        assert (status, document["error"]) == (403, "read_only"), path
    assert await redis.llen(keys.dead) == 1
    _, body = await server.get("/dashboard/api/dead")
    assert json_of(body)["total"] == 1, "reading is still allowed"


# ------------------------------------------------------------------ the dead letters


@pytest_twisted.ensureDeferred
async def test_requeue_one_all_and_purge_change_the_lists(
    dashboard: Callable[..., Dashboard], redis: Any, keys: Keys
) -> None:
    server = dashboard()
    tasks = [await really_dead(server.queue, redis, f"user-{n}") for n in range(4)]
    assert await server.act(f"/dashboard/api/dead/{tasks[1].id}/requeue") == (200, {"requeued": 1})
    assert await redis.lrange(keys.pending, 0, -1) == [tasks[1].to_json()]
    assert await server.queue.status(tasks[1].id) == {
        "status": "queued",
        "user_id": "user-1",
        "attempts": "0",
        "queued_at": tasks[1].queued_at,
    }
    status, document = await server.act(f"/dashboard/api/dead/{tasks[1].id}/requeue")
    assert (status, document["error"]) == (404, "not_dead"), "it is not dead any more"
    status, document = await server.act("/dashboard/api/dead/not-an-id/requeue")
    assert (status, document["error"]) == (404, "not_dead")

    assert await server.act("/dashboard/api/dead/requeue-all") == (200, {"requeued": 3})
    assert await redis.llen(keys.dead) == 0
    oldest_first = list(reversed(await redis.lrange(keys.pending, 0, -1)))
    assert oldest_first == [t.to_json() for t in (tasks[1], tasks[0], tasks[2], tasks[3])]

    await dead_letter(redis, keys, "again", None, "boom")
    await dead_letter(redis, keys, "again", None, "boom")
    assert await server.act("/dashboard/api/dead/purge") == (200, {"purged": 2})
    assert await redis.llen(keys.dead) == 0
    assert await redis.llen(keys.pending) == 4, "purge leaves the queue alone"


def small_windows(monkeypatch: pytest.MonkeyPatch, chunk: int) -> None:
    """Each scan call one LRANGE of ``chunk`` entries (any byte counts as the budget)."""
    monkeypatch.setattr(deadletters, "SCAN_CHUNK", chunk)
    monkeypatch.setattr(deadletters, "SCAN_BYTES", 1)


def dead_ids(entries: list[str]) -> list[str]:
    return [json.loads(entry)["task"]["id"] for entry in entries]


@pytest_twisted.ensureDeferred
async def test_requeue_by_id_finds_a_task_while_tasks_die_into_a_full_list(
    redis: Any, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At DEAD_LETTER_MAX every death pushes an entry at the head and trims one at the
    tail (lua/lib/dead_letter.lua): a scan counted from the tail skipped one a call."""
    small_windows(monkeypatch, chunk=5)
    queue = TaskQueue(redis, keys, 3600, 1.0, reactor, 1, dead_letter_max=40)
    tasks = [await really_dead(queue, redis, f"u{n}") for n in range(40)]
    target = tasks[17]  # 23rd from the head; from the tail, in the slot the old scan skipped
    calls, died = 0, []

    async def tasks_die_meanwhile(call: defer.Deferred[Any]) -> Any:
        nonlocal calls
        answer = await call
        calls += 1
        if not int(answer[0]):  # not found yet: a task dies before the next call
            died.append(await really_dead(queue, redis, f"meanwhile-{calls}"))
        return answer

    assert await redis.llen(keys.dead) == 40, "the list is at its cap"
    assert await deadletters.requeue(redis, keys, [target.id], tasks_die_meanwhile) == 1
    assert calls >= 4, "several calls, a death between each two"
    assert await redis.lrange(keys.pending, 0, -1) == [target.to_json()]
    assert (await queue.status(target.id) or {})["status"] == "queued"
    newest_first = [t.id for t in reversed(tasks + died)][:40]
    assert dead_ids(await redis.lrange(keys.dead, 0, -1)) == [
        task_id for task_id in newest_first if task_id != target.id
    ], "the rest as they were: nothing lost but what the cap trimmed, nothing twice"


@pytest_twisted.ensureDeferred
async def test_requeue_by_id_survives_another_requeue_by_id_meanwhile(
    redis: Any, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another requeue removes an entry the scan has passed: the rest move up one place,
    and the next call starts one earlier (Keys.dead_removed) so that it still sees it."""
    small_windows(monkeypatch, chunk=5)
    tasks = [await dead_letter(redis, keys, f"u{n}", {"n": n}, "boom") for n in range(30)]
    target = tasks[24]  # 6th from the head: the first entry the second call reads
    others: list[int] = []

    async def another_requeue_meanwhile(call: defer.Deferred[Any]) -> Any:
        answer = await call
        if not others:
            others.append(await deadletters.requeue(redis, keys, [tasks[29].id]))
        return answer

    assert await deadletters.requeue(redis, keys, [target.id], another_requeue_meanwhile) == 1
    assert others == [1]
    assert sorted(await redis.lrange(keys.pending, 0, -1)) == sorted(
        [target.to_json(), tasks[29].to_json()]
    )
    dead = dead_ids(await redis.lrange(keys.dead, 0, -1))
    assert dead == [t.id for t in reversed(tasks) if t not in (target, tasks[29])]


@pytest_twisted.ensureDeferred
async def test_requeue_by_id_takes_several_in_bounded_calls_each_once(
    redis: Any, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    small_windows(monkeypatch, chunk=10)
    tasks = [await dead_letter(redis, keys, f"u{n}", {"n": n}, "boom") for n in range(100)]
    named = [tasks[n] for n in (0, 9, 10, 11, 50, 98, 99)]
    ids = [t.id for t in named]
    assert await deadletters.requeue(redis, keys, [*ids, ids[0], "f" * 32]) == 7
    assert sorted(await redis.lrange(keys.pending, 0, -1)) == sorted(t.to_json() for t in named)
    assert await redis.llen(keys.dead) == 93
    assert await deadletters.requeue(redis, keys, [tasks[0].id]) == 0, "not dead any more"


#: Entries as large as a task gets (a body of MAX_BODY_BYTES is at most a 64 KiB payload).
BIG = "x" * 60_000


@pytest_twisted.ensureDeferred
async def test_a_requeue_call_reads_a_bounded_number_of_bytes(redis: Any, keys: Keys) -> None:
    """40 entries of 60 KB (2.4 MB): no call, scanning or moving, copies much more than
    SCAN_BYTES into Lua (SCAN_BATCH entries per call made it ~320 MB at 5,000)."""
    tasks = [await dead_letter(redis, keys, f"u{n}", BIG, "boom") for n in range(40)]
    entry_bytes = len(await redis.lindex(keys.dead, 0))
    answers: list[Any] = []

    async def recorded(call: defer.Deferred[Any]) -> Any:
        answers.append(await call)
        return answers[-1]

    assert await deadletters.requeue(redis, keys, [tasks[0].id], recorded) == 1
    scans = [a for a in answers if isinstance(a, list)]
    assert len(scans) >= 2, "the oldest is more than one call away"
    for _moved, scanned, *_ in scans:
        assert int(scanned) * entry_bytes <= deadletters.SCAN_BYTES + 16 * entry_bytes
    assert [int(a[2]) for a in scans[:-1]] == [0] * (len(scans) - 1), "the end comes last"
    answers.clear()
    assert await deadletters.requeue(redis, keys, [], recorded) == 39
    moves = [a for a in answers if isinstance(a, list)]
    assert len(moves) >= 2
    for _moved, taken, _at_end in moves:
        assert (int(taken) - 1) * entry_bytes < deadletters.SCAN_BYTES
    oldest_first = list(reversed(await redis.lrange(keys.pending, 0, -1)))
    assert oldest_first == [tasks[0].to_json()] + [t.to_json() for t in tasks[1:]]


@pytest_twisted.ensureDeferred
async def test_requeue_by_id_finds_a_task_after_others_ahead_of_it_were_requeued(
    redis: Any, keys: Keys
) -> None:
    """Entries of 60 KB: a call scans ~18. Between the first two calls another requeue
    by id removes the 10 newest, moving the target 10 places up, in front of where an
    overlap of half the first call's advance resumed: it answered "not dead"."""
    tasks = [await dead_letter(redis, keys, f"u{n}", BIG, "boom") for n in range(100)]
    newest_first = list(reversed(tasks))
    target, others = newest_first[18], newest_first[:10]
    answers: list[Any] = []

    async def another_requeue_meanwhile(call: defer.Deferred[Any]) -> Any:
        answers.append(await call)
        if len(answers) == 1:
            assert await deadletters.requeue(redis, keys, [t.id for t in others]) == 10
        return answers[-1]

    assert await deadletters.requeue(redis, keys, [target.id], another_requeue_meanwhile) == 1
    assert int(answers[0][0]) == 0, "the first call did not reach the target"
    assert len(answers) >= 2
    pending = await redis.lrange(keys.pending, 0, -1)
    assert sorted(pending) == sorted(t.to_json() for t in [*others, target]), "each once"
    assert dead_ids(await redis.lrange(keys.dead, 0, -1)) == [
        t.id for t in newest_first if t not in (target, *others)
    ], "the rest as they were"


@pytest_twisted.ensureDeferred
async def test_requeue_by_id_takes_no_task_named_like_a_number_it_passes(
    redis: Any, keys: Keys
) -> None:
    """Each scan call passes the removal count (0 at first) before the ids: it is no id."""
    task = await dead_letter(redis, keys, "u", {"n": 1}, "boom")
    entry = '{"error":"boom","attempts":3,"failed_at_ms":1,"task":{"id":"0","user_id":"u"}}'
    await redis.lpush(keys.dead, entry)
    assert await deadletters.requeue(redis, keys, [task.id]) == 1
    assert await redis.lrange(keys.pending, 0, -1) == [task.to_json()]
    assert await redis.lrange(keys.dead, 0, -1) == [entry]


class PausedAfterOneScript:
    """Redis that stops answering scripts (CLIENT PAUSE WRITE) after its first one answered."""

    def __init__(self, real: Any, pause_ms: int) -> None:
        self._real = real
        self._pause_ms = pause_ms
        self.paused = False

    async def _evalsha(self, *arguments: Any) -> Any:
        answer = await self._real.evalsha(*arguments)
        if not self.paused:
            self.paused = True
            await self._real.execute_command("CLIENT", "PAUSE", str(self._pause_ms), "WRITE")
        return answer

    def evalsha(self, *arguments: Any) -> defer.Deferred[Any]:
        return defer.Deferred.fromCoroutine(self._evalsha(*arguments))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


@pytest_twisted.ensureDeferred
async def test_a_requeue_all_cut_short_by_a_timeout_says_what_it_did(
    settings: Settings, redis: Any, keys: Keys, static: Path, redis_server: RedisAddress
) -> None:
    """Its first call moved tasks, the next one got no answer in time: a 200 with the
    count of those moved and "complete": false, not a 503 (they are back in the queue)."""
    tasks = [await dead_letter(redis, keys, f"u{n}", BIG, "boom") for n in range(40)]
    paused = PausedAfterOneScript(redis, 1500)
    server = Dashboard(replace(settings, redis_timeout_s=0.3), paused, static, redis_server)
    try:
        status, document = await server.act("/dashboard/api/dead/requeue-all")
        assert status == 200, document
        assert document["complete"] is False
        assert 0 < document["requeued"] < 40
        assert document["requeued"] <= await redis.llen(keys.pending)
    finally:
        await server.port.stopListening()

    async def settled() -> bool:
        return await redis.llen(keys.pending) + await redis.llen(keys.dead) == 40

    await eventually(settled, timeout=5)
    queued = set(await redis.lrange(keys.pending, 0, -1))
    dead = dead_ids(await redis.lrange(keys.dead, 0, -1))
    assert len(queued) + len(set(dead)) == 40, "nothing lost, nothing duplicated"
    assert {t.id for t in tasks} == {json.loads(q)["id"] for q in queued} | set(dead)


@pytest_twisted.ensureDeferred
async def test_the_dead_letters_are_paged_newest_first(
    dashboard: Callable[..., Dashboard], redis: Any, keys: Keys
) -> None:
    server = dashboard()
    tasks = [await dead_letter(redis, keys, f"u{n}", {"n": n}, f"error {n}") for n in range(5)]
    response, body = await server.get("/dashboard/api/dead")
    document = json_of(body)
    assert (document["total"], document["offset"], document["limit"]) == (5, 0, 50)
    assert [item["task_id"] for item in document["items"]] == [t.id for t in reversed(tasks)]
    assert document["items"][0] == {
        "task_id": tasks[4].id,
        "user_id": "u4",
        "attempts": 3,
        "error": "error 4",
        "failed_at_ms": 1700000000000,
        "payload_excerpt": '{"n":4}',
    }
    assert_security_headers(response)
    response, body = await server.get("/dashboard/api/dead?offset=1&limit=2")
    document = json_of(body)
    assert (document["total"], document["offset"], document["limit"]) == (5, 1, 2)
    assert [item["task_id"] for item in document["items"]] == [tasks[3].id, tasks[2].id]
    response, body = await server.get("/dashboard/api/dead?offset=4&limit=200")
    assert [item["task_id"] for item in json_of(body)["items"]] == [tasks[0].id]
    response, body = await server.get("/dashboard/api/dead?offset=5")
    assert json_of(body)["items"] == [] and json_of(body)["total"] == 5


@pytest_twisted.ensureDeferred
async def test_paging_takes_its_bounds_themselves(dashboard: Callable[..., Dashboard]) -> None:
    """The largest offset the 400 names is taken (found by schemathesis: it had one digit
    too many for the check), and one more is not."""
    response, body = await dashboard().get("/dashboard/api/dead?offset=1000000000000000&limit=200")
    assert response.code == 200, body
    assert (json_of(body)["offset"], json_of(body)["limit"]) == (10**15, 200)
    response, body = await dashboard().get("/dashboard/api/dead?offset=1000000000000001")
    assert response.code == 400
    assert "from 0 to 1000000000000000" in json_of(body)["message"]


@pytest.mark.parametrize(
    "query",
    ["limit=0", "limit=201", "limit=-1", "limit=x", "offset=-1", "offset=1.5", "offset=",
     "limit=1&limit=2", "offset=1e3", "limit=%EF%BC%91"],
)  # fmt: skip
@pytest_twisted.ensureDeferred
async def test_bad_paging_is_a_json_400(dashboard: Callable[..., Dashboard], query: str) -> None:
    response, body = await dashboard().get(f"/dashboard/api/dead?{query}")
    assert response.code == 400
    assert json_of(body)["error"] == "invalid_paging"
    assert response.headers.getRawHeaders("Content-Type") == ["application/json; charset=utf-8"]


@pytest.mark.parametrize(
    ("payload", "excerpt"),
    [
        ("x" * 198, '"' + "x" * 198 + '"'),  # 200 characters of JSON: whole
        ("x" * 199, '"' + "x" * 199 + "…"),  # 201: cut at 200
        ("ü" * 300, '"' + "ü" * 199 + "…"),  # characters, not bytes
        ([1, 2], "[1,2]"),
        (None, "null"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_the_payload_excerpt_is_cut_at_200_characters(
    dashboard: Callable[..., Dashboard], redis: Any, keys: Keys, payload: Any, excerpt: str
) -> None:
    await dead_letter(redis, keys, "u", payload, "boom")
    _, body = await dashboard().get("/dashboard/api/dead")
    assert json_of(body)["items"][0]["payload_excerpt"] == excerpt


@pytest_twisted.ensureDeferred
async def test_the_page_script_sends_only_an_excerpt_of_each_payload(
    redis: Any, keys: Keys
) -> None:
    """Listed exactly as the whole entry decoded would be (:func:`deadletters.item`), but
    of a 60 KB payload not much more than the excerpt leaves Redis."""
    payloads = [
        BIG,
        {"a": 1, "queued_at": "x", ',"payload":': 2, "n": [1, 2, 3]},
        "😀" * 199 + "é" * 10,
        "é" * 400,
        "x" * 200,
        [],
        None,
        12345678901234567890,
    ]
    for payload in payloads:
        await dead_letter(redis, keys, 'u","payload":1,"x', payload, 'e","task":{}')
    await redis.lpush(keys.dead, "not an entry " + "z" * 300)
    entries = await redis.lrange(keys.dead, 0, -1)
    reply = await deadletters.DEAD_PAGE(redis, [keys.dead], [0, 50, deadletters.EXCERPT_BYTES])
    assert sum(len(str(part).encode()) for part in reply) < 9 * 1500, "excerpts, not entries"
    total, items = await deadletters.page(redis, keys, 0, 50)
    assert total == len(payloads) + 1
    assert items == [deadletters.item(entry) for entry in entries]


def test_an_entry_taskserver_did_not_write_is_listed_as_such() -> None:
    item = deadletters.item("not json " + "y" * 300)
    assert item["task_id"] == "" and item["error"].startswith("not a dead-letter entry")
    assert item["payload_excerpt"] == ("not json " + "y" * 300)[:200] + "…"
    assert deadletters.item('{"error": "e"}')["task_id"] == ""


@pytest_twisted.ensureDeferred
async def test_client_values_stay_data_in_every_json_answer(
    dashboard: Callable[..., Dashboard], redis: Any, keys: Keys
) -> None:
    """``<script>`` and ``"><img onerror>`` in a user_id, a payload and an error come back
    as the very strings, in application/json (the browser test checks how they render)."""
    server = dashboard()
    tasks = [await dead_letter(redis, keys, xss, {"html": xss}, xss) for xss in XSS]
    _, body = await server.get("/dashboard/api/dead")
    items = json_of(body)["items"]
    for item, xss in zip(items, reversed(XSS), strict=True):
        assert item["user_id"] == xss and item["error"] == xss
        assert json.loads(item["payload_excerpt"]) == {"html": xss}
    for task, xss in zip(tasks, XSS, strict=True):
        await server.queue.enqueue(task)
        response, body = await server.get(f"/dashboard/api/task/{task.id}")
        assert response.headers.getRawHeaders("Content-Type") == ["application/json; charset=utf-8"]
        assert json_of(body)["user_id"] == xss
        assert_security_headers(response)


# ------------------------------------------------------------------ the overview


@pytest_twisted.ensureDeferred
async def test_the_overview_counts_the_queue(
    dashboard: Callable[..., Dashboard], redis: Any, keys: Keys, redis_server: RedisAddress
) -> None:
    server = dashboard(dashboard_read_only=True)
    for n in range(3):
        await server.queue.enqueue(Task.new(f"u{n}", None, reactor.seconds()))
    await really_dead(server.queue, redis, "dead-one")
    await dead_letter(redis, keys, "dead-two", None, "boom")
    response, body = await server.get("/dashboard/api/overview")
    assert response.code == 200
    assert_security_headers(response)
    document = json_of(body)
    assert set(document) == {
        "now", "queue", "totals", "rate_limited", "latency", "throughput", "workers", "redis",
        "read_only",
    }  # fmt: skip
    assert document["queue"]["pending"] == 3
    assert document["queue"]["dead"] == 2
    assert (document["queue"]["processing"], document["queue"]["delayed"]) == (0, 0)
    assert document["queue"]["oldest_pending_age_s"] is not None
    assert document["read_only"] is True
    assert document["rate_limited"] == {"1s": 0, "60s": 0}, "the configured tiers, none refused"
    response, body = await dashboard(ip_rate_limits=(RateTier("ip10s", 5, 10_000),)).get(
        "/dashboard/api/overview"
    )
    assert json_of(body)["rate_limited"] == {"1s": 0, "60s": 0, "ip": 0}
    assert document["redis"]["address"] == f"{redis_server.host}:{redis_server.port}"
    assert (document["redis"]["embedded"], document["redis"]["up"]) == (False, True)


# ------------------------------------------------------------------ task lookup


@pytest_twisted.ensureDeferred
async def test_a_task_is_looked_up_as_the_api_shows_it(
    dashboard: Callable[..., Dashboard],
) -> None:
    server = dashboard()
    task = Task.new("looked-up", {"a": 1}, reactor.seconds())
    await server.queue.enqueue(task)
    response, body = await server.get(f"/dashboard/api/task/{task.id}")
    api, api_body = await server.get(f"/api/v1/task/{task.id}")
    assert (response.code, api.code) == (200, 200)
    assert json_of(body) == json_of(api_body)
    assert json_of(body)["status"] == "queued"
    for unknown in ("b" * 32, "not-an-id"):
        response, body = await server.get(f"/dashboard/api/task/{unknown}")
        assert (response.code, json_of(body)["error"]) == (404, "task_not_found")


# ------------------------------------------------------------------ Redis unreachable


@pytest_twisted.ensureDeferred
async def test_redis_unreachable_is_a_json_503(
    settings: Settings, static: Path, keys: Keys
) -> None:
    nowhere = RedisAddress("127.0.0.1", unused_port())
    pool = connect(nowhere, 1, 0.2)
    server = Dashboard(replace(settings, redis_timeout_s=0.2), pool, static, nowhere)
    try:
        for path in (
            "/dashboard/api/overview",
            "/dashboard/api/dead",
            f"/dashboard/api/task/{'c' * 32}",
        ):
            response, body = await server.get(path)
            assert (response.code, json_of(body)["error"]) == (503, "redis_unavailable"), path
            assert_security_headers(response)
        for action in ("purge", "requeue-all", f"{'c' * 32}/requeue"):
            status, document = await server.act(f"/dashboard/api/dead/{action}")
            assert (status, document["error"]) == (503, "redis_unavailable"), action
    finally:
        await server.port.stopListening()
        await pool.disconnect()


# ------------------------------------------------------------------ in a child, in a cluster


@pytest_twisted.ensureDeferred
async def test_a_child_serves_the_dashboard(start_server: Callable[..., RunningServer]) -> None:
    server = start_server()
    response = await treq.get(server.url + "/", allow_redirects=False)
    assert response.code == 303
    session = await treq.get(server.url + "/dashboard/api/session")
    assert (await session.json())["auth"] == "loopback"


def exchange(sock: socket.socket, path: str) -> bytes:
    """One GET on a kept-alive connection; its body (answers have a Content-Length)."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, "closed before the answer"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: (\d+)", head)[1])  # type: ignore[index]
    while len(body) < length:
        body += sock.recv(4096)
    return body


def test_every_child_of_a_cluster_gives_the_same_csrf_token(
    twistd: Callable[..., Twistd],
) -> None:
    """Without ADMIN_TOKEN the token comes from the master's secret: any child accepts it."""
    server = twistd(WORKERS="2")
    server.wait_until_ready(2)
    port = int(server.url.rpartition(":")[2])
    tokens: dict[int, str] = {}
    for _ in range(50):
        if len(tokens) == 2:
            break
        connections = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(4)]
        for sock in connections:
            with sock:
                pid = json.loads(exchange(sock, "/healthz"))["pid"]
                tokens[pid] = json.loads(exchange(sock, "/dashboard/api/session"))["csrf_token"]
    assert len(tokens) == 2, "both children answered"
    assert len(set(tokens.values())) == 1, tokens
    assert server.stop() == 0


@pytest_twisted.ensureDeferred
async def test_the_trailing_slash_redirects_and_every_answer_has_the_headers(
    dashboard: Callable[..., Dashboard],
) -> None:
    server = dashboard()
    response, _ = await server.get("/dashboard/")
    assert (response.code, response.headers.getRawHeaders("Location")) == (303, ["/dashboard"])
    assert_security_headers(response)
    for path in ("/dashboard//", "/dashboard/api/", "/dashboard/nothing/at/all", "/dashboard/%ff"):
        response, _ = await server.get(path)
        assert response.code in (400, 404), path
        assert_security_headers(response)
    response, _ = await server.post("/dashboard/")
    assert response.code == 405
    assert_security_headers(response)
