# -*- test-case-name: tests.test_openapi -*-
"""The OpenAPI 3.1 document of every route: what ``GET /openapi.json`` serves.

Written by hand (no Klein plugin exists) as one dict built once.
tests/test_openapi.py holds it to the server: its paths and methods are
exactly the routes :class:`taskserver.api.TaskAPI` and the dashboard answer,
and schemathesis fuzzes a live cluster against it. The limits it states are
the code's own constants, imported, not copied.
"""

from __future__ import annotations

import functools
from typing import Any

from taskserver.api import (
    DELAY_MAX_S,
    RUN_AT_PATTERN,
    USER_ID_MAX_CHARS,
    USER_TASKS_DEFAULT_LIMIT,
    WAIT_MAX_S,
)
from taskserver.config import Settings
from taskserver.dashboard import (
    DEAD_PAGE_DEFAULT_LIMIT,
    DEAD_PAGE_MAX_LIMIT,
    SESSION_MAX_AGE_S,
    STATIC_FILES,
)
from taskserver.httpserver import BATCH_BODY_MAX_BYTES, MAX_BODY_BYTES, json_body
from taskserver.ratelimit import QUOTA_EXCEEDED_TYPE

JSON = "application/json"
PROBLEM_JSON = "application/problem+json"
HTML = "text/html"
TASK_ID_PATTERN = "^[0-9a-f]{32}$"
STATUSES = ["queued", "scheduled", "processing", "retrying", "completed", "dead", "cancelled"]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _header(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/headers/{name}"}


def _answer(
    description: str,
    schema: dict[str, Any] | None = None,
    media: str = JSON,
    headers: dict[str, Any] | None = None,
) -> dict[str, Any]:
    answer: dict[str, Any] = {"description": description}
    if schema is not None:
        answer["content"] = {media: {"schema": schema}}
    if headers:
        answer["headers"] = headers
    return answer


def _error(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    """An error answer: ``{"error": code, "message": text}`` as JSON."""
    return _answer(description, _ref("Error"), headers=headers)


RATE_HEADERS = {
    "RateLimit-Policy": _header("RateLimit-Policy"),
    "RateLimit": _header("RateLimit"),
    "X-RateLimit-Limit": _header("X-RateLimit-Limit"),
    "X-RateLimit-Remaining": _header("X-RateLimit-Remaining"),
    "X-RateLimit-Reset": _header("X-RateLimit-Reset"),
}
RETRY_AFTER = {"Retry-After": _header("Retry-After")}
UNAVAILABLE = _error(
    "Redis is unavailable or did not answer in time (`redis_unavailable`), or the task was "
    "written but not confirmed durable in time (`durability_timeout`); retry after Retry-After.",
    RETRY_AFTER,
)
METHOD_NOT_ALLOWED = _error(
    "Wrong method; `Allow` lists the right ones.", {"Allow": _header("Allow")}
)
#: Answers of the body-taking task routes (the single POST and the batch).
BODY_ERRORS = {
    "400": _error(
        "The body or the Idempotency-Key is not valid (`invalid_json`, `not_an_object`, "
        "`missing_user_id`, `invalid_user_id`, `unknown_field`, `invalid_task_type`, "
        "`unknown_task_type`, `invalid_delay`, `invalid_run_at`, `invalid_idempotency_key`, ...)."
    ),
    "405": METHOD_NOT_ALLOWED,
    "409": _error(
        "The first request with this Idempotency-Key is still being handled.", RETRY_AFTER
    ),
    "413": _error(f"The body is over {MAX_BODY_BYTES} bytes."),
    "415": _error("The body is not `application/json` (UTF-8)."),
    "422": _error("This Idempotency-Key came with a different body before."),
    "503": UNAVAILABLE,
}
IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": "A retry with the same key and body returns the first request's answer.",
    "schema": {"type": "string", "pattern": "^[!-~][ -~]{0,254}$"},
}
TASK_ID_PARAMETER = {
    "name": "task_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": TASK_ID_PATTERN},
}
CSRF_TOKEN = {"$ref": "#/components/parameters/X-CSRF-Token"}
#: Who may call the operator routes: a loopback client, or one with the route's bearer token.
OPERATOR_SECURITY: list[dict[str, list[str]]] = [{}, {"bearer": []}]


def _task_routes(user_tasks_max: int) -> dict[str, Any]:
    return {
        "/api/v1/task": {
            "post": {
                "summary": "Submit a task",
                "operationId": "createTask",
                "parameters": [IDEMPOTENCY_KEY],
                "requestBody": {
                    "required": True,
                    "content": {JSON: {"schema": _ref("TaskRequest")}},
                },
                "responses": {
                    "202": _answer(
                        "Accepted: the task is queued (or scheduled).",
                        _ref("TaskAccepted"),
                        headers={"Location": _header("Location"), **RATE_HEADERS},
                    ),
                    "200": _answer(
                        "A replay of an earlier request with the same Idempotency-Key.",
                        _ref("TaskAccepted"),
                        headers={
                            "Location": _header("Location"),
                            "Idempotent-Replayed": _header("Idempotent-Replayed"),
                        },
                    ),
                    **BODY_ERRORS,
                    "429": _answer(
                        "A rate-limit tier is exhausted.",
                        _ref("Problem"),
                        PROBLEM_JSON,
                        {**RETRY_AFTER, **RATE_HEADERS},
                    ),
                },
            }
        },
        "/api/v1/tasks": {
            "post": {
                "summary": "Submit a batch of tasks (each rate-limited for its own user)",
                "operationId": "createTasks",
                "parameters": [IDEMPOTENCY_KEY],
                "requestBody": {
                    "required": True,
                    "content": {JSON: {"schema": _ref("BatchRequest")}},
                },
                "responses": {
                    "200": _answer(
                        "One result per item, in the items' order (also the replay of an "
                        "earlier batch with the same Idempotency-Key: Idempotent-Replayed).",
                        _ref("BatchResults"),
                        headers={
                            "Idempotent-Replayed": {
                                "description": "`true` on a replay (absent on a first answer).",
                                "required": False,
                                "schema": {"const": "true"},
                            }
                        },
                    ),
                    **BODY_ERRORS,
                    "400": _error(
                        "The batch as a whole is not valid (`invalid_json`, `invalid_batch`, "
                        "`empty_batch`, `batch_too_large`, `invalid_idempotency_key`); a bad "
                        "item is a 400 result in a 200, not this."
                    ),
                    "413": _error(f"The body is over {BATCH_BODY_MAX_BYTES} bytes."),
                    "429": _answer(
                        "The per-address tier refused the request.",
                        _ref("Problem"),
                        PROBLEM_JSON,
                        {**RETRY_AFTER, **RATE_HEADERS},
                    ),
                },
            },
            "get": {
                "summary": "A user's recent tasks, newest first",
                "operationId": "listTasks",
                "parameters": [
                    {
                        "name": "user_id",
                        "in": "query",
                        "required": True,
                        "schema": _ref("UserId"),
                    },
                    {
                        "name": "limit",
                        "in": "query",
                        "required": False,
                        "schema": {
                            "type": "integer",
                            "minimum": 1,
                            "maximum": max(1, user_tasks_max),
                            "default": min(USER_TASKS_DEFAULT_LIMIT, max(1, user_tasks_max)),
                        },
                        "description": "At most USER_TASKS_MAX, this server's "
                        f"{user_tasks_max} (100 by default).",
                    },
                ],
                "responses": {
                    "200": _answer(
                        "The user's latest tasks still on record, newest first, each "
                        "without its `result` (GET the task for it).",
                        _ref("TaskList"),
                    ),
                    "400": _error("`user_id` or `limit` is missing or invalid."),
                    "404": _error("USER_TASKS_MAX is 0: no recent tasks are kept."),
                    "405": METHOD_NOT_ALLOWED,
                    "503": UNAVAILABLE,
                },
            },
        },
        "/api/v1/task/{task_id}": {
            "parameters": [TASK_ID_PARAMETER],
            "get": {
                "summary": "A task's status (optionally waiting until it is finished)",
                "operationId": "getTask",
                "parameters": [
                    {
                        "name": "wait",
                        "in": "query",
                        "required": False,
                        "description": "Answer once the task is finished, or after this many s.",
                        "schema": {
                            "type": "number",
                            "exclusiveMinimum": 0,
                            "maximum": WAIT_MAX_S,
                        },
                    }
                ],
                "responses": {
                    "200": _answer("The task's record.", _ref("Task")),
                    "400": _error(
                        "`wait` is not one number in (0, 60] (`invalid_wait`), or the query "
                        "has another parameter (`unknown_parameter`)."
                    ),
                    "404": _error("No such task (unknown, or its status expired)."),
                    "405": METHOD_NOT_ALLOWED,
                    "503": _error(
                        "Redis is unavailable, or this child has MAX_WAITERS waiters "
                        "(`too_many_waiters`).",
                        RETRY_AFTER,
                    ),
                },
            },
            "delete": {
                "summary": "Cancel a task that has not started",
                "operationId": "cancelTask",
                "responses": {
                    "200": _answer("Cancelled (or cancelled already): its record.", _ref("Task")),
                    "404": _error("No such task (unknown, or its status expired)."),
                    "405": METHOD_NOT_ALLOWED,
                    "409": _answer(
                        "The task is processing or finished (`task_not_cancellable`).",
                        _ref("NotCancellable"),
                    ),
                    "503": UNAVAILABLE,
                },
            },
        },
    }


def _operator_routes() -> dict[str, Any]:
    return {
        "/openapi.json": {
            "get": {
                "summary": "This document",
                "operationId": "openapi",
                "responses": {
                    "200": _answer("The OpenAPI document.", {"type": "object"}),
                    "405": METHOD_NOT_ALLOWED,
                },
            }
        },
        "/healthz": {
            "get": {
                "summary": "Liveness of the child that answers",
                "operationId": "healthz",
                "responses": {
                    "200": _answer(
                        "This child runs.",
                        {
                            "type": "object",
                            "required": ["status", "pid"],
                            "properties": {
                                "status": {"const": "ok"},
                                "pid": {"type": "integer"},
                            },
                        },
                    ),
                    "405": METHOD_NOT_ALLOWED,
                },
            }
        },
        "/readyz": {
            "get": {
                "summary": "Readiness: Redis answers and tasks are being fetched",
                "operationId": "readyz",
                "responses": {
                    "200": _answer(
                        "Ready.",
                        {
                            "type": "object",
                            "required": ["status"],
                            "properties": {"status": {"const": "ready"}},
                        },
                    ),
                    "405": METHOD_NOT_ALLOWED,
                    "503": _error(
                        "Redis is unavailable, or the task log cannot be written "
                        "(`task_log_unwritable`).",
                        RETRY_AFTER,
                    ),
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics of the whole cluster",
                "operationId": "metrics",
                "security": OPERATOR_SECURITY,
                "responses": {
                    "200": _answer(
                        "The Prometheus text format.",
                        {"type": "string"},
                        "text/plain",
                    ),
                    "401": _error(
                        "METRICS_TOKEN is set and this request does not carry it.",
                        {"WWW-Authenticate": _header("WWW-Authenticate")},
                    ),
                    "404": _error("Metrics are turned off."),
                    "405": METHOD_NOT_ALLOWED,
                },
            }
        },
        "/kill": {
            "get": {
                "summary": "Crash the answering child on purpose (the cluster replaces it)",
                "operationId": "kill",
                "security": OPERATOR_SECURITY,
                "responses": {
                    "200": _answer(
                        "This child exits once the answer is sent.",
                        {
                            "type": "object",
                            "required": ["pid", "status"],
                            "properties": {
                                "pid": {"type": "integer"},
                                "status": {"const": "exiting"},
                            },
                        },
                    ),
                    "403": _error("Not loopback, wrong KILL_TOKEN, or sent by a web page."),
                    "404": _error("The route is turned off."),
                    "405": METHOD_NOT_ALLOWED,
                },
            }
        },
    }


def _redirect(description: str) -> dict[str, Any]:
    return _answer(
        description,
        {
            "type": "object",
            "required": ["location"],
            "properties": {"location": {"type": "string"}},
        },
        headers={"Location": _header("Location")},
    )


def _dashboard_get(summary: str, schema: dict[str, Any], **more: Any) -> dict[str, Any]:
    """A guarded JSON read of the dashboard: 401 for a stranger, 403 for a wrong token."""
    responses = {
        "200": _answer(summary, schema),
        "401": _error("Neither a loopback client nor the ADMIN_TOKEN (bearer or login)."),
        "403": _error("A wrong bearer token."),
        "405": METHOD_NOT_ALLOWED,
        "429": _error("Too many wrong tokens from this address.", RETRY_AFTER),
        "503": UNAVAILABLE,
        **more.pop("responses", {}),
    }
    return {"summary": summary, "security": OPERATOR_SECURITY, "responses": responses, **more}


def _dashboard_action(summary: str, schema: dict[str, Any], **more: Any) -> dict[str, Any]:
    """A dashboard action: a guarded POST with the session's CSRF token, from its own page."""
    operation = _dashboard_get(summary, schema, **more)
    operation["parameters"] = [*operation.get("parameters", []), CSRF_TOKEN]
    operation["responses"].update(
        {
            "400": _error("An action takes no body, or `{}`."),
            "403": _error("Wrong token or CSRF token, another site's request, or read-only mode."),
            "413": _error(f"The body is over {MAX_BODY_BYTES} bytes."),
        }
    )
    operation["requestBody"] = {
        "required": False,
        "content": {JSON: {"schema": {"type": "object", "maxProperties": 0}}},
    }
    return operation


def _dashboard_routes() -> dict[str, Any]:
    html_page = {"type": "string"}
    counted = {
        "type": "object",
        "required": ["requeued"],
        "properties": {
            "requeued": {"type": "integer", "minimum": 0},
            "complete": {"type": "boolean"},
        },
    }
    not_found = {"404": _error("The dashboard is turned off.")}
    return {
        "/": {
            "get": {
                "summary": "To the dashboard",
                "operationId": "home",
                "responses": {
                    "303": _redirect("See /dashboard."),
                    "405": METHOD_NOT_ALLOWED,
                    **not_found,
                },
            }
        },
        "/dashboard": {
            "get": {
                "summary": "The dashboard's page (to the login form for a stranger)",
                "operationId": "dashboard",
                "security": OPERATOR_SECURITY,
                "responses": {
                    "200": _answer("The page.", html_page, HTML),
                    "303": _redirect("To /dashboard/login."),
                    "403": _error("A wrong bearer token."),
                    "405": METHOD_NOT_ALLOWED,
                    "429": _error("Too many wrong tokens from this address.", RETRY_AFTER),
                    "503": UNAVAILABLE,
                    **not_found,
                },
            }
        },
        "/dashboard/": {
            "get": {
                "summary": "The page's one URL is the one without the slash",
                "operationId": "dashboardSlash",
                "responses": {
                    "303": _redirect("See /dashboard."),
                    "405": METHOD_NOT_ALLOWED,
                    **not_found,
                },
            }
        },
        "/dashboard/static/{name}": {
            "get": {
                "summary": "The page's script and style",
                "operationId": "dashboardStatic",
                "parameters": [
                    {
                        "name": "name",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string", "enum": sorted(STATIC_FILES)},
                    }
                ],
                "responses": {
                    "200": {
                        "description": "The file.",
                        "content": {
                            media.partition(";")[0]: {"schema": {"type": "string"}}
                            for media in sorted(set(STATIC_FILES.values()))
                        },
                    },
                    "404": _error("No such file."),
                    "405": METHOD_NOT_ALLOWED,
                },
            }
        },
        "/dashboard/login": {
            "get": {
                "summary": "The login form",
                "operationId": "loginForm",
                "responses": {
                    "200": _answer("The form.", html_page, HTML),
                    "405": METHOD_NOT_ALLOWED,
                    **not_found,
                },
            },
            "post": {
                "summary": "Log in with ADMIN_TOKEN (sets the session cookie)",
                "operationId": "login",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/x-www-form-urlencoded": {
                            "schema": {
                                "type": "object",
                                "required": ["token"],
                                "properties": {"token": {"type": "string"}},
                            }
                        }
                    },
                },
                "responses": {
                    "303": _answer(
                        f"Logged in for {SESSION_MAX_AGE_S} s: on to /dashboard.",
                        headers={
                            "Location": _header("Location"),
                            "Set-Cookie": _header("Set-Cookie"),
                        },
                    ),
                    "403": _answer(
                        "A wrong token, or another site's form: the form.", html_page, HTML
                    ),
                    "413": _error(f"The body is over {MAX_BODY_BYTES} bytes."),
                    "429": _answer(
                        "Too many wrong tokens from this address: the form.",
                        html_page,
                        HTML,
                        RETRY_AFTER,
                    ),
                    "405": METHOD_NOT_ALLOWED,
                    **not_found,
                },
            },
        },
        "/dashboard/logout": {
            "post": {
                "summary": "Log out (clears the cookie)",
                "operationId": "logout",
                "parameters": [CSRF_TOKEN],
                "responses": {
                    "200": _answer(
                        "Logged out.",
                        {"type": "object", "properties": {"logged_out": {"const": True}}},
                        headers={"Set-Cookie": _header("Set-Cookie")},
                    ),
                    "403": _error("Wrong CSRF token, or another site's request."),
                    "405": METHOD_NOT_ALLOWED,
                    **not_found,
                },
            }
        },
        "/dashboard/api/session": {
            "get": {
                **_dashboard_get(
                    "Who is looking, and the CSRF token of the page's actions",
                    {
                        "type": "object",
                        "required": ["csrf_token", "read_only", "auth", "poll_interval_s"],
                        "properties": {
                            "csrf_token": {"type": "string"},
                            "read_only": {"type": "boolean"},
                            "auth": {"enum": ["loopback", "token", "cookie"]},
                            "poll_interval_s": {"type": "number"},
                        },
                    },
                    responses=not_found,
                ),
                "operationId": "dashboardSession",
            }
        },
        "/dashboard/api/overview": {
            "get": {
                **_dashboard_get(
                    "The cluster's numbers (queue, totals, rates, workers, Redis, history)",
                    {"type": "object", "required": ["queue", "totals"]},
                    responses=not_found,
                ),
                "operationId": "dashboardOverview",
            }
        },
        "/dashboard/api/dead": {
            "get": {
                **_dashboard_get(
                    "A page of the dead letters, newest first",
                    _ref("DeadPage"),
                    responses={
                        "400": _error("`offset` or `limit` is not one integer in range."),
                        **not_found,
                    },
                    parameters=[
                        {
                            "name": "offset",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "integer", "minimum": 0, "maximum": 10**15},
                        },
                        {
                            "name": "limit",
                            "in": "query",
                            "required": False,
                            "schema": {
                                "type": "integer",
                                "minimum": 1,
                                "maximum": DEAD_PAGE_MAX_LIMIT,
                                "default": DEAD_PAGE_DEFAULT_LIMIT,
                            },
                        },
                    ],
                ),
                "operationId": "dashboardDead",
            }
        },
        "/dashboard/api/task/{task_id}": {
            "parameters": [TASK_ID_PARAMETER],
            "get": {
                **_dashboard_get(
                    "A task's record, as GET /api/v1/task/{task_id} answers it",
                    _ref("Task"),
                    responses={"404": _error("No such task, or the dashboard is off.")},
                ),
                "operationId": "dashboardTask",
            },
        },
        "/dashboard/api/dead/{task_id}/requeue": {
            "parameters": [TASK_ID_PARAMETER],
            "post": {
                **_dashboard_action(
                    "Requeue one dead letter",
                    counted,
                    responses={"404": _error("Not in the dead letters, or the dashboard is off.")},
                ),
                "operationId": "dashboardRequeue",
            },
        },
        "/dashboard/api/dead/requeue-all": {
            "post": {
                **_dashboard_action(
                    "Requeue every dead letter (`complete: false` if a call failed midway)",
                    counted,
                    responses=not_found,
                ),
                "operationId": "dashboardRequeueAll",
            }
        },
        "/dashboard/api/dead/purge": {
            "post": {
                **_dashboard_action(
                    "Delete every dead letter",
                    {
                        "type": "object",
                        "required": ["purged"],
                        "properties": {"purged": {"type": "integer", "minimum": 0}},
                    },
                    responses=not_found,
                ),
                "operationId": "dashboardPurge",
            }
        },
    }


def _schemas(batch_max: int) -> dict[str, Any]:
    timestamp = {"type": "string", "description": "ISO-8601 UTC with milliseconds"}
    error: dict[str, Any] = {
        "type": "object",
        "required": ["error", "message"],
        "properties": {"error": {"type": "string"}, "message": {"type": "string"}},
    }
    return {
        "UserId": {
            "type": "string",
            "minLength": 1,
            "maxLength": USER_ID_MAX_CHARS,
            "pattern": "^[^\\u0000-\\u001f\\u007f-\\u009f\\u2028\\u2029]*$",
            "description": "No control characters, no line or paragraph separators.",
        },
        "TaskRequest": {
            "type": "object",
            "required": ["user_id"],
            "additionalProperties": False,
            "not": {"required": ["delay_s", "run_at"]},
            "properties": {
                "user_id": _ref("UserId"),
                "payload": {"description": "Any JSON value, handed to the handler as is."},
                "type": {
                    "type": "string",
                    "pattern": "^[a-z0-9][a-z0-9_.-]{0,63}$",
                    "description": "One of TASK_HANDLERS' names (else 400 unknown_task_type).",
                },
                "delay_s": {"type": "number", "minimum": 0, "maximum": DELAY_MAX_S},
                "run_at": {
                    "type": "string",
                    "pattern": RUN_AT_PATTERN,
                    "description": "RFC 3339 (`T` or a space between date and time, no leap "
                    "second), at most 30 days ahead; not with delay_s. A date that does not "
                    "exist (February 30, year 0000) is 400 `invalid_run_at` too.",
                },
            },
        },
        "TaskAccepted": {
            "type": "object",
            "required": ["task_id", "user_id", "status", "queued_at"],
            "properties": {
                "task_id": {"type": "string", "pattern": TASK_ID_PATTERN},
                "user_id": {"type": "string"},
                "status": {"enum": STATUSES},
                "queued_at": timestamp,
                "run_at": timestamp,
                "type": {"type": "string"},
            },
        },
        "Task": {
            "type": "object",
            "required": ["task_id", "attempts"],
            "properties": {
                "task_id": {"type": "string", "pattern": TASK_ID_PATTERN},
                "user_id": {"type": "string"},
                "status": {"enum": STATUSES},
                "type": {"type": "string"},
                "queued_at": timestamp,
                "run_at": timestamp,
                "started_at": timestamp,
                "finished_at": timestamp,
                "cancelled_at": timestamp,
                "attempts": {"type": "integer", "minimum": 0},
                "duration_ms": {"type": "number"},
                "error": {"type": "string", "description": "The last attempt's error."},
                "result": {
                    "description": "The handler's return value (any JSON), kept with the "
                    "record when it is JSON of at most RESULT_MAX_BYTES; absent when the "
                    "handler returned None."
                },
                "result_note": {
                    "type": "string",
                    "description": "Why the handler's return value is not kept (over "
                    "RESULT_MAX_BYTES, or not JSON).",
                },
            },
        },
        "TaskList": {
            "type": "object",
            "required": ["user_id", "tasks"],
            "properties": {
                "user_id": {"type": "string"},
                "tasks": {"type": "array", "items": _ref("Task")},
            },
        },
        "BatchRequest": {
            "type": "object",
            "required": ["tasks"],
            "additionalProperties": False,
            "properties": {
                "tasks": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": batch_max,
                    "items": {
                        "description": "A task as POST /api/v1/task takes it (TaskRequest); "
                        "an item that is not one is refused alone, as a 400 result."
                    },
                    "description": f"At most BATCH_MAX, this server's {batch_max} "
                    "(500 by default) items.",
                }
            },
        },
        "BatchResults": {
            "type": "object",
            "required": ["results"],
            "properties": {
                "results": {
                    "type": "array",
                    "items": {
                        "oneOf": [
                            {
                                "type": "object",
                                "required": ["status", "task"],
                                "properties": {
                                    "status": {"const": 202},
                                    "task": _ref("TaskAccepted"),
                                },
                            },
                            {
                                "type": "object",
                                "required": ["status", "error", "message"],
                                "properties": {
                                    "status": {"enum": [400, 429]},
                                    "error": {"type": "string"},
                                    "message": {"type": "string"},
                                    "retry_after_s": {
                                        "type": "integer",
                                        "minimum": 1,
                                        "description": "With a 429: seconds to wait.",
                                    },
                                    "violated-policies": {
                                        "type": "array",
                                        "items": {"type": "string"},
                                    },
                                },
                            },
                        ]
                    },
                }
            },
        },
        "Error": error,
        "NotCancellable": {
            **error,
            "required": ["error", "message", "status"],
            "properties": {**error["properties"], "status": {"enum": STATUSES}},
        },
        "Problem": {
            "type": "object",
            "description": "RFC 9457 problem details, with the `error`/`message` of every error.",
            "required": ["type", "title", "status", "detail", "error", "message"],
            "properties": {
                "type": {"const": QUOTA_EXCEEDED_TYPE},
                "title": {"type": "string"},
                "status": {"const": 429},
                "detail": {"type": "string"},
                "violated-policies": {"type": "array", "items": {"type": "string"}},
                "error": {"const": "rate_limited"},
                "message": {"type": "string"},
            },
        },
        "DeadPage": {
            "type": "object",
            "required": ["total", "offset", "limit", "items"],
            "properties": {
                "total": {"type": "integer", "minimum": 0},
                "offset": {"type": "integer", "minimum": 0},
                "limit": {"type": "integer", "minimum": 1},
                "items": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["task_id", "user_id", "attempts", "error", "failed_at_ms"],
                        "properties": {
                            "task_id": {"type": "string"},
                            "user_id": {"type": "string"},
                            "attempts": {"type": "integer"},
                            "error": {"type": "string"},
                            "failed_at_ms": {"type": "integer"},
                            "payload_excerpt": {"type": "string"},
                        },
                    },
                },
            },
        },
    }


def _headers() -> dict[str, Any]:
    def header(description: str, required: bool = False, **schema: Any) -> dict[str, Any]:
        return {
            "description": description,
            "required": required,
            "schema": {"type": "string", **schema},
        }

    return {
        "Location": header("Where the task (or the next page) is.", required=True),
        "RateLimit-Policy": header(
            'Each tier: `"<name>";q=<limit>;w=<window s>` (draft-ietf-httpapi-ratelimit-headers).'
        ),
        "RateLimit": header('Each tier now: `"<name>";r=<remaining>;t=<s until reset>`.'),
        "X-RateLimit-Limit": header("The binding tier's limit.", pattern="^[0-9]+$"),
        "X-RateLimit-Remaining": header("Requests left in it.", pattern="^[0-9]+$"),
        "X-RateLimit-Reset": header("When it resets (Unix time, s).", pattern="^[0-9]+$"),
        "Retry-After": header("Seconds to wait before a retry.", required=True, pattern="^[0-9]+$"),
        "Allow": header("The methods of this path.", required=True),
        "Idempotent-Replayed": header("This answer replays an earlier one.", required=True),
        "WWW-Authenticate": header("The scheme to authenticate with.", required=True),
        "Set-Cookie": header("The dashboard's session cookie.", required=True),
    }


@functools.cache
def document(
    user_tasks_max: int = Settings.user_tasks_max, batch_max: int = Settings.batch_max
) -> dict[str, Any]:
    """The OpenAPI document, with this server's bounds (built once; do not mutate it)."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "taskserver",
            "version": "1",
            "description": "An HTTP task queue: per-user rate limits, a reliable Redis queue, "
            "consumers and a task log. Every error is JSON "
            '(`{"error": code, "message": text}`); 429 is also RFC 9457 problem details.',
        },
        "paths": {**_task_routes(user_tasks_max), **_operator_routes(), **_dashboard_routes()},
        "components": {
            "schemas": _schemas(batch_max),
            "headers": _headers(),
            "parameters": {
                "X-CSRF-Token": {
                    "name": "X-CSRF-Token",
                    "in": "header",
                    "required": True,
                    "description": "The csrf_token of GET /dashboard/api/session.",
                    "schema": {"type": "string"},
                }
            },
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "METRICS_TOKEN, KILL_TOKEN or ADMIN_TOKEN, each for its "
                    "routes; without one set, those routes are open to loopback clients "
                    "(/metrics to all).",
                }
            },
        },
    }


@functools.cache
def body(
    user_tasks_max: int = Settings.user_tasks_max, batch_max: int = Settings.batch_max
) -> bytes:
    """The document as ``GET /openapi.json`` sends it."""
    return json_body(document(user_tasks_max, batch_max))
