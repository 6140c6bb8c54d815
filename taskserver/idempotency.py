# -*- test-case-name: tests.test_idempotency,tests.test_web -*-
"""Idempotency keys: a retried POST returns the task it created, not a second task.

A client sends ``Idempotency-Key: <key>``; the first request claims the key
(per user) with the task id it is about to create, in one Redis call that
either claims or returns the existing claim. A claim is kept
:data:`IDEMPOTENCY_TTL_S`, or ``STATUS_TTL`` if that is shorter: a retry reads
"no status record" as "the task was never created" and takes the key over,
so a claim must never outlive the status record of its task (it is set
before the record, with the same TTL, so it expires first).
A request is "the same" when its user id, payload and delay (``delay_s`` or
``run_at``, as sent) are equal as JSON (key order and spacing do not matter).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from typing import Any

from twisted.internet.interfaces import IReactorTime

from taskserver.keys import Keys
from taskserver.redisclient import within
from taskserver.scripts import load

#: The longest a claim is kept (shorter when STATUS_TTL is).
IDEMPOTENCY_TTL_S = 24 * 3600
#: A claim whose task never appeared is taken over once it is this old (or 5 x the
#: Redis timeout, if longer): its request must have died between claim and enqueue.
ABANDONED_AFTER_S = 10.0
#: Printable ASCII, 1 to 255 characters (what Stripe and the IETF draft allow in practice).
VALID_KEY = re.compile(r"^[\x21-\x7e][\x20-\x7e]{0,254}$")

CLAIM = load("claim")
TAKE_OVER = load("take_over")
RELEASE = load("release")


def fingerprint(
    user_id: str,
    payload: Any,
    task_type: str | None = None,
    when: tuple[str, Any] | None = None,
) -> str:
    """What makes two requests the same: their user id, payload, type and ``when`` (the
    delay as sent: ``("delay_s", 60)`` or ``("run_at", "...")``), as canonical JSON.

    Without a type or a delay the text is what it was before tasks had them, so claims
    made by an older version still match their retries.
    """
    parts: list[Any] = [user_id, payload]
    if task_type is not None:
        parts.append(task_type)
    if when is not None:
        parts.append(list(when))
    canonical = json.dumps(parts, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Claim:
    """Who holds an idempotency key: the task it created and the request's fingerprint."""

    task_id: str
    fingerprint: str
    queued_at: str

    def to_json(self) -> str:
        """As stored in Redis (TAKE_OVER compares claims by this text)."""
        return json.dumps(asdict(self))


class IdempotencyKeys:
    """Claims and releases idempotency keys in Redis (one round trip each)."""

    def __init__(
        self, redis: Any, keys: Keys, timeout_s: float, clock: IReactorTime, status_ttl_s: int
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._timeout_s = timeout_s
        self._clock = clock
        self.ttl_ms = min(IDEMPOTENCY_TTL_S, status_ttl_s) * 1000

    async def claim(self, user_id: str, key: str, claim: Claim) -> Claim | None:
        """Claim ``key`` for ``claim``; returns the earlier claim if there is one."""
        existing = await within(
            CLAIM(
                self._redis,
                [self._keys.idempotency(user_id, key)],
                [claim.to_json(), self.ttl_ms],
            ),
            self._timeout_s,
            self._clock,
        )
        return Claim(**json.loads(existing)) if existing else None

    async def take_over(self, user_id: str, key: str, abandoned: Claim, claim: Claim) -> bool:
        """Replace ``abandoned`` (a claim whose task never appeared) if it is old enough.

        The request that made it died between its claim and its enqueue (a
        crash, a lost connection to Redis); without this, every retry with
        its key would be told "in flight" until the key expired.
        """
        abandoned_after_ms = int(max(ABANDONED_AFTER_S, 5 * self._timeout_s) * 1000)
        taken = await within(
            TAKE_OVER(
                self._redis,
                [self._keys.idempotency(user_id, key)],
                [
                    abandoned.to_json(),
                    claim.to_json(),
                    self.ttl_ms,
                    abandoned_after_ms,
                ],
            ),
            self._timeout_s,
            self._clock,
        )
        return bool(taken)

    async def release(self, user_id: str, key: str, claim: Claim) -> bool:
        """Give the key up (the request it was claimed for did not create a task).

        Only if the key still holds ``claim`` (the request's own): a claim
        taken over meanwhile belongs to another request. Returns whether it
        deleted.
        """
        deleting = RELEASE(self._redis, [self._keys.idempotency(user_id, key)], [claim.to_json()])
        return bool(await within(deleting, self._timeout_s, self._clock))

    async def store_answer(self, user_id: str, key: str, answer: str) -> None:
        """Keep the answer of the request holding ``key`` (a batch's), as long as a claim.

        A batch's items are partly admitted and partly refused, so its key is
        never released: a replay answers with this text instead.
        """
        setting = self._redis.set(self._answer_key(user_id, key), answer, pexpire=self.ttl_ms)
        await within(setting, self._timeout_s, self._clock)

    async def stored_answer(self, user_id: str, key: str) -> str | None:
        """The answer :meth:`store_answer` kept, or None (not yet, or never)."""
        answer = await within(
            self._redis.get(self._answer_key(user_id, key)), self._timeout_s, self._clock
        )
        if isinstance(answer, bytes):
            return answer.decode("utf-8")
        return answer if isinstance(answer, str) else None

    def _answer_key(self, user_id: str, key: str) -> str:
        return self._keys.idempotency(user_id, key) + ":answer"
