# -*- test-case-name: tests.test_ratelimit -*-
"""Fixed-window rate limits, all tiers checked and charged in one Lua call.

Each tier is a counter whose window starts at the user's first counted
request: the key is created with its TTL in the same ``SET ... PX`` command,
so no key ever lives without one, and a key at PTTL <= 0 counts as a new
window. The script reads every tier first and commits only if every tier
admits the request, so a request rejected by one tier costs nothing in any
tier (a client retrying too fast does not burn its minute budget).

A :class:`RatePolicy` is pure: which counters an identity has, the script's
tier arguments, and what the script's reply means. The per-user policy is
applied by the queue's one admission script (``TaskQueue.admit``); a
:class:`RateLimiter` also checks its policy on its own, in a script call of
its own (the per-address backstop, before a request is anything else).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet.interfaces import IReactorTime

from taskserver.config import RateTier
from taskserver.keys import Keys
from taskserver.redisclient import within
from taskserver.scripts import load

#: KEYS: counter_1..counter_n. ARGV: as lib/limit.lua's read_tiers().
CHECK_AND_CHARGE = load("check_and_charge")


def tier_arguments(tiers: Sequence[RateTier]) -> list[int]:
    """The leading ARGV of lib/limit.lua's read_tiers(): the count, then each limit and window."""
    arguments = [len(tiers)]
    for tier in tiers:
        arguments += [tier.limit, tier.window_ms]
    return arguments


@functools.lru_cache(maxsize=16)
def policy_header(tiers: tuple[RateTier, ...]) -> str:
    """The RateLimit-Policy value: the same for every request of a limiter."""
    return ", ".join(
        f'"{tier.name}";q={tier.limit};w={max(1, math.ceil(tier.window_ms / 1000))}'
        for tier in tiers
    )


QUOTA_EXCEEDED_TYPE = "https://iana.org/assignments/http-problem-types#quota-exceeded"


@dataclass(frozen=True)
class TierState:
    """One tier's counter as the script saw it."""

    tier: RateTier
    used: int
    reset_ms: int

    @property
    def remaining(self) -> int:
        return max(0, self.tier.limit - self.used)

    @property
    def reset_s(self) -> int:
        """Whole seconds until the window ends, rounded up."""
        return math.ceil(self.reset_ms / 1000)


@dataclass(frozen=True)
class Decision:
    """Whether a request is admitted, and everything its headers need."""

    allowed: bool
    tiers: tuple[TierState, ...]

    @property
    def violated(self) -> tuple[TierState, ...]:
        """The tiers that rejected the request (empty when allowed)."""
        if self.allowed:
            return ()
        return tuple(state for state in self.tiers if state.used + 1 > state.tier.limit)

    @property
    def retry_after_s(self) -> int:
        """Seconds until every violated tier admits again: rounded up, at least 1."""
        return max([1, *(state.reset_s for state in self.violated)])

    def headers(self, now: float) -> list[tuple[str, str]]:
        """RateLimit-Policy/RateLimit (draft-ietf-httpapi-ratelimit-headers-11) and X-RateLimit-*.

        The X- headers describe the binding tier: the one with the fewest
        requests left (on a tie, the one that resets last).
        """
        if not self.tiers:
            return []
        policy = policy_header(tuple(s.tier for s in self.tiers))
        current = ", ".join(f'"{s.tier.name}";r={s.remaining};t={s.reset_s}' for s in self.tiers)
        binding = min(self.tiers, key=lambda s: (s.remaining, -s.reset_ms))
        headers = [
            ("RateLimit-Policy", policy),
            ("RateLimit", current),
            ("X-RateLimit-Limit", str(binding.tier.limit)),
            ("X-RateLimit-Remaining", str(binding.remaining)),
            ("X-RateLimit-Reset", str(math.ceil(now + binding.reset_ms / 1000))),
        ]
        if not self.allowed:
            headers.append(("Retry-After", str(self.retry_after_s)))
        return headers

    def problem(self) -> dict[str, Any]:
        """The application/problem+json body of a 429."""
        names = [state.tier.name for state in self.violated]
        message = f"rate limit exceeded ({', '.join(names)}); retry in {self.retry_after_s} s"
        return {
            "type": QUOTA_EXCEEDED_TYPE,
            "title": "Too Many Requests",
            "status": 429,
            "detail": message,
            "violated-policies": names,
            "error": "rate_limited",
            "message": message,
        }


class RatePolicy:
    """Tiers applied to one kind of identity. Never talks to Redis.

    Everything a request needs that does not depend on the request (the
    script's tier arguments, the policy header) is computed once.
    """

    def __init__(
        self,
        keys: Keys,
        tiers: Sequence[RateTier],
        key_of: Callable[[Keys, str, str], str] = Keys.rate,
    ) -> None:
        """``key_of(keys, identity, tier name)``: the counter's key (per user by default)."""
        self._keys = keys
        self._key_of = key_of
        self.tiers = tuple(tiers)
        #: The leading ARGV of the limit's read_tiers(): the same for every request.
        self.arguments = tuple(tier_arguments(self.tiers))

    @property
    def active(self) -> bool:
        return bool(self.tiers)

    def counters(self, identity: str) -> list[str]:
        """The keys of ``identity``'s counters, one per tier, in the order of the tiers."""
        return [self._key_of(self._keys, identity, tier.name) for tier in self.tiers]

    def decide(self, reply: Sequence[Any]) -> Decision:
        """Turn the script's flat reply ({allowed, used_1, ttl_ms_1, ...}) into a Decision."""
        states = tuple(
            TierState(tier, int(reply[1 + 2 * i]), int(reply[2 + 2 * i]))
            for i, tier in enumerate(self.tiers)
        )
        return Decision(allowed=int(reply[0]) == 1, tiers=states)


class RateLimiter(RatePolicy):
    """A policy that is also checked on its own: one script call, one round trip."""

    def __init__(
        self,
        redis: Any,
        keys: Keys,
        tiers: Sequence[RateTier],
        timeout_s: float,
        clock: IReactorTime,
        key_of: Callable[[Keys, str, str], str] = Keys.rate,
    ) -> None:
        super().__init__(keys, tiers, key_of)
        self._redis = redis
        self._timeout_s = timeout_s
        self._clock = clock

    async def check(self, identity: str) -> Decision:
        """Admit or reject one request by ``identity``; raises RedisUnavailable."""
        if not self.tiers:
            return Decision(allowed=True, tiers=())
        reply = await within(
            CHECK_AND_CHARGE(self._redis, self.counters(identity), self.arguments),
            self._timeout_s,
            self._clock,
        )
        return self.decide(reply)
