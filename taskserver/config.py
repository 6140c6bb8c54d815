# -*- test-case-name: tests.test_config -*-
"""Settings: one table of options, read from the command line, the environment and ``.env``.

Every setting has a twistd option (``--port``) and an environment variable
(``PORT``). The command line beats the environment, which beats ``.env``
(python-dotenv never overrides a variable that is already set). Invalid
values raise :class:`ConfigError` with one line that names the setting.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import re
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, cast, get_args, get_origin, get_type_hints
from urllib.parse import unquote, urlsplit

from taskserver.clientip import parse_networks

DEFAULT_HANDLER = "taskserver.handlers:complete"


class ConfigError(ValueError):
    """A setting has an invalid value; the message is one line, fit for users."""


@dataclass(frozen=True)
class SentinelAddress:
    """One Redis Sentinel (REDIS_SENTINELS lists them)."""

    host: str
    port: int = 26379

    def display(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class RedisAddress:
    """Where an external Redis lives. Never printed with its password.

    With ``sentinels``, ``host`` and ``port`` are unused: the primary of
    ``sentinel_master`` is asked of the sentinels before every connection
    (taskserver/redisclient.py); ``username``, ``password``, ``db`` and
    ``tls`` are the data nodes', and ``tls`` the sentinels' too.
    """

    host: str
    port: int = 6379
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    db: int = 0
    tls: bool = False
    sentinels: tuple[SentinelAddress, ...] = ()
    sentinel_master: str = "mymaster"
    sentinel_password: str | None = field(default=None, repr=False)

    def display(self) -> str:
        """A URL safe for logs: the password is replaced by ``***``."""
        scheme = "rediss" if self.tls else "redis"
        auth = ""
        if self.username or self.password:
            auth = (self.username or "") + (":***" if self.password else "") + "@"
        if self.sentinels:
            nodes = ",".join(s.display() for s in self.sentinels)
            return f"{scheme}+sentinel://{auth}{nodes}/{self.sentinel_master}/{self.db}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{auth}{host}:{self.port}/{self.db}"


@dataclass(frozen=True)
class RateTier:
    """One fixed-window tier: at most ``limit`` accepted requests per ``window_ms``."""

    name: str
    limit: int
    window_ms: int


# ---------------------------------------------------------------- parsers


def _int_in(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise ConfigError(f"expected a whole number, got {text!r}") from None
        if not low <= value <= high:
            raise ConfigError(f"expected a number from {low} to {high}, got {value}")
        return value

    return parse


def _seconds(low: float, high: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text.strip())
        except ValueError:
            raise ConfigError(f"expected a number of seconds, got {text!r}") from None
        if not (math.isfinite(value) and low <= value <= high):
            raise ConfigError(f"expected seconds from {low:g} to {high:g}, got {text.strip()}")
        return value

    return parse


def _durability(text: str) -> str:
    value = text.strip().lower()
    if value not in ("write", "fsync"):
        raise ConfigError(f"expected write or fsync, got {text!r}")
    return value


def _text(text: str) -> str:
    return text.strip()


def _optional_text(text: str) -> str | None:
    return text.strip() or None


def _path(text: str) -> Path:
    if not text.strip():
        raise ConfigError("expected a folder, got an empty value")
    return Path(text.strip())


def _flag(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("", "0", "false", "no", "off"):
        return False
    raise ConfigError(f"expected true or false, got {text!r}")


_KEY_PREFIX = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def usable_cpus() -> int:
    """The cores this process may run on (its CPU affinity), not all the host has."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def _workers(text: str) -> int:
    """``auto`` (or empty): one per usable core; a container pinned to 2 of 64 gets 2."""
    if text.strip().lower() in ("", "auto"):
        return usable_cpus()
    return _int_in(1, 256)(text)


def _networks(text: str) -> tuple[str, ...]:
    try:
        return tuple(str(network) for network in parse_networks(text))
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _key_prefix(text: str) -> str:
    value = text.strip()
    if not _KEY_PREFIX.match(value):
        raise ConfigError(f"expected 1-64 characters of A-Z a-z 0-9 _ . -, got {text!r}")
    return value


_HANDLER = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def _handler(text: str) -> str:
    value = text.strip()
    if not _HANDLER.match(value):
        raise ConfigError(f"expected module:function, got {text!r}")
    return value


#: A task type's name (what a POST's ``"type"`` names; openapi.py's TaskRequest says the same).
TASK_TYPE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")


def _task_handlers(text: str) -> tuple[tuple[str, str], ...]:
    """``name=module:function,...`` as ``((name, spec), ...)``; empty: no typed tasks."""
    routes: list[tuple[str, str]] = []
    for part in text.split(","):
        if not part.strip():
            continue
        name, equals, spec = part.partition("=")
        name = name.strip()
        if not equals or not TASK_TYPE.match(name):
            raise ConfigError(
                f"expected name=module:function entries (a name is 1-64 of a-z 0-9 _ . -, "
                f"starting with a letter or digit), got {part.strip()!r}"
            )
        if any(name == known for known, _ in routes):
            raise ConfigError(f"the task type {name!r} is named twice")
        try:
            routes.append((name, _handler(spec)))
        except ConfigError as e:
            raise ConfigError(f"{name}: {e}") from None
    return tuple(routes)


_TIER = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*(ms|s|m|h)?\s*$")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, None: 1000}


def parse_rate_limits(text: str) -> tuple[RateTier, ...]:
    """Parse ``"1/1s,20/60s"``: comma-separated ``limit/window`` tiers.

    The window unit is ``ms``, ``s`` (default), ``m`` or ``h``. Each tier is
    named after its window as written (``"1s"``, ``"60s"``), the name clients
    see in the ``RateLimit`` headers. An empty value turns rate limiting off.
    """
    tiers: list[RateTier] = []
    for part in text.split(","):
        if not part.strip():
            continue
        match = _TIER.match(part)
        if not match:
            raise ConfigError(f"expected tiers like '1/1s,20/60s', got {part.strip()!r}")
        limit, amount, unit = int(match[1]), int(match[2]), match[3]
        window_ms = amount * _UNIT_MS[unit]
        if limit < 1 or window_ms < 1:
            raise ConfigError(f"a tier needs a limit and a window of at least 1, got {part!r}")
        tiers.append(RateTier(f"{amount}{unit or 's'}", limit, window_ms))
    if len({tier.window_ms for tier in tiers}) != len(tiers):
        raise ConfigError("two tiers have the same window")
    return tuple(sorted(tiers, key=lambda tier: tier.window_ms))


def _ip_rate_limits(text: str) -> tuple[RateTier, ...]:
    """Per-address tiers are named ``ip-<window>`` so clients can tell them from their own."""
    return tuple(
        RateTier(f"ip-{tier.name}", tier.limit, tier.window_ms) for tier in parse_rate_limits(text)
    )


def _sentinels(text: str) -> tuple[SentinelAddress, ...]:
    """``host:port,host:port`` (``[v6]:port``; the port defaults to 26379)."""
    found = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        try:
            parts = urlsplit(f"//{item}")
            port = parts.port
        except ValueError as e:
            raise ConfigError(f"{item!r} is not host:port ({e})") from None
        # "?" and "#" split off a query or fragment that urlsplit would drop silently.
        if (
            not parts.hostname
            or parts.path
            or parts.username
            or parts.password
            or "?" in item
            or "#" in item
        ):
            raise ConfigError(f"{item!r} is not host:port")
        if port == 0:
            raise ConfigError(f"{item!r} has port 0")
        found.append(SentinelAddress(parts.hostname, 26379 if port is None else port))
    if text.strip() and not found:
        # Set but empty must not fall back to the embedded Redis.
        raise ConfigError(f"{text!r} names no sentinel")
    return tuple(found)


def _sentinel_master(text: str) -> str:
    """Sentinel's own rule for a master's name: letters, digits and ``.-_``."""
    value = text.strip()
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,128}", value):
        raise ConfigError(f"expected a name of letters, digits and . - _, got {text!r}")
    return value


def parse_redis_url(text: str) -> RedisAddress:
    """Parse ``redis://[user[:password]@]host[:port][/db]`` (``rediss://`` for TLS)."""
    try:
        parts = urlsplit(text.strip())
        port = parts.port or 6379
    except ValueError as e:
        raise ConfigError(f"not a valid Redis URL ({e})") from None
    if parts.scheme not in ("redis", "rediss"):
        raise ConfigError("expected a redis:// or rediss:// URL")
    if not parts.hostname:
        raise ConfigError("the Redis URL has no host")
    db_text = parts.path.lstrip("/") or "0"
    if not db_text.isdigit():
        raise ConfigError(f"the Redis URL's database must be a number, got {db_text!r}")
    return RedisAddress(
        host=parts.hostname,
        port=port,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
        db=int(db_text),
        tls=parts.scheme == "rediss",
    )


# ---------------------------------------------------------------- the table


@dataclass(frozen=True)
class Option:
    """One setting: its twistd option, environment variable, default and parser."""

    name: str
    env: str
    default: str
    doc: str
    parse: Callable[[str], Any]
    flag: bool = False  # a command-line switch (--disable-kill); "true"/"false" in the environment
    #: The :class:`Settings` field it sets: ``name`` unless given. The options of
    #: the Redis address all name ``redis``, which :func:`load_settings` combines.
    field: str = ""

    def __post_init__(self) -> None:
        if not self.field:
            object.__setattr__(self, "field", self.name)

    @property
    def option(self) -> str:
        return self.name.replace("_", "-")

    def parse_default(self) -> Any:
        """The default, through the same parser as a given value: one truth for both."""
        return self.parse(self.default)


OPTIONS: tuple[Option, ...] = (
    Option("port", "PORT", "8000", "TCP port to listen on (0 picks a free one)", _int_in(0, 65535)),
    Option("interface", "INTERFACE", "", "address to listen on (empty: all interfaces)", _text),
    Option("log_dir", "LOG_DIR", "./logs", "folder for tasks.log and twistd.log", _path),
    Option("data_dir", "DATA_DIR", "./data", "folder for the embedded Redis's data", _path),
    Option(
        "redis_url",
        "REDIS_URL",
        "",
        "redis://[user[:password]@]host[:port][/db] or rediss:// (TLS); empty: embedded Redis",
        _optional_text,
        field="redis",
    ),
    Option(
        "redis_host",
        "REDIS_HOST",
        "",
        "Redis host (instead of REDIS_URL)",
        _optional_text,
        field="redis",
    ),
    Option(
        "redis_port",
        "REDIS_PORT",
        "6379",
        "Redis port, with REDIS_HOST",
        _int_in(1, 65535),
        field="redis",
    ),
    Option(
        "redis_username",
        "REDIS_USERNAME",
        "",
        "Redis ACL user, with REDIS_HOST or REDIS_SENTINELS",
        _text,
        field="redis",
    ),
    Option(
        "redis_password",
        "REDIS_PASSWORD",
        "",
        "Redis password, with REDIS_HOST or REDIS_SENTINELS",
        _text,
        field="redis",
    ),
    Option(
        "redis_db",
        "REDIS_DB",
        "0",
        "Redis database number, with REDIS_HOST or REDIS_SENTINELS",
        _int_in(0, 1 << 16),
        field="redis",
    ),
    Option(
        "redis_tls",
        "REDIS_TLS",
        "false",
        "use TLS to REDIS_HOST, or to the sentinels and the nodes they name (verified)",
        _flag,
        flag=True,
        field="redis",
    ),
    Option(
        "redis_sentinels",
        "REDIS_SENTINELS",
        "",
        "host:port,host:port,... of Redis Sentinels that name the primary (instead of REDIS_URL)",
        _sentinels,
        field="redis",
    ),
    Option(
        "redis_sentinel_master",
        "REDIS_SENTINEL_MASTER",
        "mymaster",
        "the primary's name at the sentinels, with REDIS_SENTINELS",
        _sentinel_master,
        field="redis",
    ),
    Option(
        "redis_sentinel_password",
        "REDIS_SENTINEL_PASSWORD",
        "",
        "the sentinels' password, with REDIS_SENTINELS (REDIS_PASSWORD is the data nodes')",
        _text,
        field="redis",
    ),
    Option(
        "redis_server_bin",
        "REDIS_SERVER_BIN",
        "",
        "redis-server/valkey-server binary for the embedded Redis",
        _optional_text,
    ),
    Option(
        "redis_timeout",
        "REDIS_TIMEOUT",
        "1.0",
        "seconds a request waits for Redis before answering 503",
        _seconds(0.05, 30),
        field="redis_timeout_s",
    ),
    Option(
        "durability",
        "DURABILITY",
        "write",
        "what a 202 waits for: write (Redis applied it) or fsync (in its AOF on disk)",
        _durability,
    ),
    Option(
        "wait_replicas",
        "WAIT_REPLICAS",
        "0",
        "replicas that must have a task before its 202 (WAIT / WAITAOF)",
        _int_in(0, 64),
    ),
    Option(
        "handler",
        "TASK_HANDLER",
        DEFAULT_HANDLER,
        "module:function run for each task without a type",
        _handler,
    ),
    Option(
        "task_handlers",
        "TASK_HANDLERS",
        "",
        "name=module:function,... run for tasks of that type (POST's type)",
        _task_handlers,
    ),
    Option(
        "result_max_bytes",
        "RESULT_MAX_BYTES",
        "65536",
        "largest handler result (JSON, bytes) kept in the status record",
        _int_in(0, 16 << 20),
    ),
    Option(
        "concurrency",
        "CONCURRENCY",
        "16",
        "tasks in flight at the same time per child",
        _int_in(1, 256),
    ),
    Option(
        "rate_limits",
        "RATE_LIMITS",
        "1/1s,20/60s",
        "per-user tiers, limit/window, comma-separated (empty: no limit)",
        parse_rate_limits,
    ),
    Option("workers", "WORKERS", "auto", "child processes (auto: one per CPU core)", _workers),
    Option(
        "ip_rate_limits",
        "IP_RATE_LIMITS",
        "",
        "per-client-address tiers, like RATE_LIMITS (empty: off)",
        _ip_rate_limits,
    ),
    Option(
        "trusted_proxy",
        "TRUSTED_PROXY",
        "",
        "proxies (addresses or networks, comma-separated) whose forwarding headers are believed",
        _networks,
        field="trusted_proxies",
    ),
    Option("kill_token", "KILL_TOKEN", "", "bearer token required by GET /kill", _optional_text),
    Option("disable_kill", "DISABLE_KILL", "false", "turn GET /kill off (404)", _flag, flag=True),
    Option(
        "metrics_token",
        "METRICS_TOKEN",
        "",
        "bearer token required by GET /metrics (open to anyone if empty)",
        _optional_text,
    ),
    Option(
        "admin_token",
        "ADMIN_TOKEN",
        "",
        "token for the dashboard (bearer or login form); if empty, loopback clients only",
        _optional_text,
    ),
    Option(
        "dashboard_read_only",
        "DASHBOARD_READ_ONLY",
        "false",
        "the dashboard shows, but hides and refuses its actions (requeue, purge)",
        _flag,
        flag=True,
    ),
    Option("key_prefix", "KEY_PREFIX", "taskserver", "prefix of every Redis key", _key_prefix),
    Option(
        "status_ttl",
        "STATUS_TTL",
        "86400",
        "seconds a task's status record is kept",
        _int_in(1, 365 * 86400),
        field="status_ttl_s",
    ),
    Option(
        "heartbeat_ttl",
        "HEARTBEAT_TTL",
        "10",
        "seconds after which a silent consumer's tasks go back to the queue",
        _seconds(0.2, 3600),
        field="heartbeat_ttl_s",
    ),
    Option(
        "shutdown_timeout",
        "SHUTDOWN_TIMEOUT",
        "10",
        "seconds running tasks get to finish on stop",
        _seconds(0, 3600),
        field="shutdown_timeout_s",
    ),
    Option(
        "task_timeout",
        "TASK_TIMEOUT",
        "30",
        "seconds a handler may run before it is cancelled (and the attempt fails)",
        _seconds(0.01, 86400),
        field="task_timeout_s",
    ),
    Option(
        "max_attempts",
        "MAX_ATTEMPTS",
        "3",
        "attempts before a failing task goes to the dead-letter list",
        _int_in(1, 100),
    ),
    Option(
        "retry_backoff",
        "RETRY_BACKOFF",
        "1",
        "seconds before the first retry; doubles each attempt, with jitter, up to 5 min",
        _seconds(0.01, 3600),
        field="retry_backoff_s",
    ),
    Option(
        "dead_letter_max",
        "DEAD_LETTER_MAX",
        "10000",
        "dead-letter list length kept (oldest dropped)",
        _int_in(1, 10_000_000),
    ),
    Option(
        "user_tasks_max",
        "USER_TASKS_MAX",
        "100",
        "recent task ids kept per user for GET /api/v1/tasks (0: none kept, route off)",
        _int_in(0, 10_000),
    ),
    Option(
        "max_connections",
        "MAX_CONNECTIONS",
        "1000",
        "open connections per child; more wait in the shared accept queue",
        _int_in(1, 1_000_000),
    ),
    Option(
        "idle_timeout",
        "IDLE_TIMEOUT",
        "60",
        "seconds an idle keep-alive connection is kept open",
        _seconds(1, 3600),
        field="idle_timeout_s",
    ),
    Option(
        "request_timeout",
        "REQUEST_TIMEOUT",
        "10",
        "seconds a client gets to send a whole request, from its first byte",
        _seconds(0.1, 3600),
        field="request_timeout_s",
    ),
    Option(
        "max_waiters",
        "MAX_WAITERS",
        "10000",
        "requests per child waiting for a task to finish (GET ...?wait=); more get 503",
        _int_in(1, 1_000_000),
    ),
    Option(
        "task_log_max_bytes",
        "TASK_LOG_MAX_BYTES",
        "10000000",
        "rotate tasks.log at this size",
        _int_in(1024, 1 << 40),
    ),
    Option(
        "batch_max",
        "BATCH_MAX",
        "500",
        "most tasks in one POST /api/v1/tasks",
        _int_in(1, 10_000),
    ),
)


def _default(field_name: str) -> Any:
    """A Settings field's default: its option's default text, parsed."""
    (option,) = (o for o in OPTIONS if o.field == field_name)
    return option.parse_default()


@dataclass(frozen=True)
class Settings:
    """Everything a taskserver process needs to know, validated.

    Each field but ``redis`` is set by the option of :data:`OPTIONS` that names
    it, and defaults to that option's parsed default, so ``Settings()`` is
    what an empty command line and environment give (``tests/test_config.py``
    checks both). ``redis`` is None (the embedded Redis) unless the Redis
    options say otherwise.
    """

    port: int = _default("port")
    interface: str = _default("interface")
    log_dir: Path = _default("log_dir")  # noqa: RUF009 (a Path is immutable)
    data_dir: Path = _default("data_dir")  # noqa: RUF009
    redis: RedisAddress | None = None
    redis_server_bin: str | None = _default("redis_server_bin")
    handler: str = _default("handler")
    task_handlers: tuple[tuple[str, str], ...] = _default("task_handlers")
    result_max_bytes: int = _default("result_max_bytes")
    concurrency: int = _default("concurrency")
    rate_limits: tuple[RateTier, ...] = _default("rate_limits")
    kill_token: str | None = field(default=_default("kill_token"), repr=False)
    key_prefix: str = _default("key_prefix")
    status_ttl_s: int = _default("status_ttl_s")
    redis_timeout_s: float = _default("redis_timeout_s")
    durability: str = _default("durability")
    wait_replicas: int = _default("wait_replicas")
    heartbeat_ttl_s: float = _default("heartbeat_ttl_s")
    shutdown_timeout_s: float = _default("shutdown_timeout_s")
    task_log_max_bytes: int = _default("task_log_max_bytes")
    workers: int = _default("workers")
    disable_kill: bool = _default("disable_kill")
    metrics_token: str | None = field(default=_default("metrics_token"), repr=False)
    admin_token: str | None = field(default=_default("admin_token"), repr=False)
    dashboard_read_only: bool = _default("dashboard_read_only")
    task_timeout_s: float = _default("task_timeout_s")
    max_attempts: int = _default("max_attempts")
    retry_backoff_s: float = _default("retry_backoff_s")
    dead_letter_max: int = _default("dead_letter_max")
    user_tasks_max: int = _default("user_tasks_max")
    max_connections: int = _default("max_connections")
    ip_rate_limits: tuple[RateTier, ...] = _default("ip_rate_limits")
    trusted_proxies: tuple[str, ...] = _default("trusted_proxies")
    idle_timeout_s: float = _default("idle_timeout_s")
    request_timeout_s: float = _default("request_timeout_s")
    max_waiters: int = _default("max_waiters")
    batch_max: int = _default("batch_max")


def _raw_value(option: Option, cli: Mapping[str, str | None], environ: Mapping[str, str]) -> str:
    given = cli.get(option.name)
    if given is not None:
        return given
    return environ.get(option.env, option.default)


def load_settings(cli: Mapping[str, str | None], environ: Mapping[str, str]) -> Settings:
    """Build validated settings from command-line values and an environment.

    ``cli`` maps option names to strings or ``None`` (not given); ``environ``
    already holds the ``.env`` values underneath the real environment. Each
    option's value goes to the field it names; the Redis options are combined
    into one address.
    """
    values: dict[str, Any] = {}
    given: dict[str, bool] = {}
    for option in OPTIONS:
        raw = _raw_value(option, cli, environ)
        given[option.name] = cli.get(option.name) is not None or option.env in environ
        try:
            values[option.name] = option.parse(raw)
        except ConfigError as e:
            raise ConfigError(f"{option.env} (--{option.option}): {e}") from None
    fields = {o.field: values[o.name] for o in OPTIONS if o.field != "redis"}
    return Settings(redis=_redis_address(values, given), **fields)


def settings_to_json(settings: Settings) -> str:
    """Settings as one line of JSON: how the master hands them to its children."""
    return json.dumps(asdict(settings), separators=(",", ":"), default=_to_json_value)


def _to_json_value(value: object) -> str:
    """Paths as text; any other type is an error, not a silent ``str()``."""
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"a setting of type {type(value).__name__} has no JSON form")


def _from_json_value(kind: Any, value: Any) -> Any:
    """Rebuild a value of type ``kind`` from its JSON form (the inverse of ``asdict``)."""
    if value is None:
        return None
    if isinstance(kind, types.UnionType):
        (kind,) = (k for k in get_args(kind) if k is not type(None))
    if get_origin(kind) is tuple:
        item_kind = get_args(kind)[0]
        return tuple(_from_json_value(item_kind, item) for item in value)
    if isinstance(kind, type) and is_dataclass(kind):
        hints = get_type_hints(kind)
        build: Callable[..., Any] = kind
        return build(**{name: _from_json_value(hints[name], item) for name, item in value.items()})
    if kind is Path:
        return Path(value)
    return value


def settings_from_json(text: str) -> Settings:
    """The inverse of :func:`settings_to_json`, driven by the fields' types."""
    return cast(Settings, _from_json_value(Settings, json.loads(text)))


def _redis_address(values: Mapping[str, Any], given: Mapping[str, bool]) -> RedisAddress | None:
    """REDIS_SENTINELS, or REDIS_URL (which wins over REDIS_HOST and friends); else None
    (embedded Redis)."""
    if values["redis_sentinels"]:
        return _sentinel_address(values, given)
    if values["redis_url"]:
        try:
            return parse_redis_url(values["redis_url"])
        except ConfigError as e:
            raise ConfigError(f"REDIS_URL (--redis-url): {e}") from None
    if values["redis_host"]:
        return RedisAddress(
            host=values["redis_host"],
            port=values["redis_port"],
            username=values["redis_username"] or None,
            password=values["redis_password"] or None,
            db=values["redis_db"],
            tls=values["redis_tls"],
        )
    orphans = [
        name.upper()
        for name in ("redis_port", "redis_password", "redis_username", "redis_db", "redis_tls")
        if given[name]
    ]
    if orphans:
        raise ConfigError(f"{', '.join(orphans)} set but REDIS_HOST is not")
    sentinel_orphans = [
        name.upper() for name in ("redis_sentinel_master", "redis_sentinel_password") if given[name]
    ]
    if sentinel_orphans:
        raise ConfigError(f"{', '.join(sentinel_orphans)} set but REDIS_SENTINELS is not")
    return None


def _sentinel_address(values: Mapping[str, Any], given: Mapping[str, bool]) -> RedisAddress:
    """The sentinels name the primary: a fixed address of it would be a second truth."""
    clashing = [name.upper() for name in ("redis_url", "redis_host", "redis_port") if given[name]]
    if clashing:
        raise ConfigError(
            f"REDIS_SENTINELS and {', '.join(clashing)} both set: "
            "with sentinels the primary's address comes from them; set one or the other"
        )
    return RedisAddress(
        host="",
        port=0,
        username=values["redis_username"] or None,
        password=values["redis_password"] or None,
        db=values["redis_db"],
        tls=values["redis_tls"],
        sentinels=values["redis_sentinels"],
        sentinel_master=values["redis_sentinel_master"],
        sentinel_password=values["redis_sentinel_password"] or None,
    )


def redis_address_from_json(value: Mapping[str, Any]) -> RedisAddress:
    """A RedisAddress from its ``asdict`` form (how the master hands it to a child)."""
    return cast(RedisAddress, _from_json_value(RedisAddress, dict(value)))


def resolve_handler(spec: str, setting: str = "TASK_HANDLER") -> Callable[[dict[str, Any]], Any]:
    """Import ``module:function``; a ConfigError, naming ``setting``, says what is missing."""
    module_name, _, attribute = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise ConfigError(f"{setting}: cannot import {module_name!r}: {e}") from None
    handler = getattr(module, attribute, None)
    if not callable(handler):
        raise ConfigError(f"{setting}: {module_name!r} has no function {attribute!r}")
    return handler


def resolve_task_handlers(
    routes: Sequence[tuple[str, str]],
) -> dict[str, Callable[[dict[str, Any]], Any]]:
    """Import every TASK_HANDLERS entry (at start-up: a bad one stops it), by type name."""
    return {name: resolve_handler(spec, f"TASK_HANDLERS ({name})") for name, spec in routes}
