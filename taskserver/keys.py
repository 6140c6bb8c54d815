# -*- test-case-name: tests.test_keys -*-
"""Redis key names: one prefix for everything, a hash tag per script's keys.

The queue's keys (pending list, processing lists, status records, consumer
registry, heartbeats) and the users' rate-limit counters share the hash tag
``{q}``, because one script checks the counters and enqueues, and others
touch several queue keys at once. User ids appear in keys only as a hash.
Per-address counters and idempotency claims are checked in calls of their
own, with a slot per address or user.

What is true on Redis Cluster: every script touches one slot, so it runs;
but the whole queue is in the one slot of ``{q}``, on one node (no sharding).
Five scripts, FETCH_BATCH, PROMOTE, RECLAIM, REQUEUE_DEAD and USER_TASKS, build
status keys (:attr:`Keys.status_prefix`, passed in ARGV) from the ids of the tasks
they pop or list, which cannot be declared in KEYS beforehand; READ_STATS reads the
processing list and heartbeat of each registered consumer. That works only
because those keys are in the slot of the declared ones.
"""

from __future__ import annotations

import base64
import functools
import hashlib
from dataclasses import dataclass


@functools.lru_cache(maxsize=4096)
def user_hash(user_id: str) -> str:
    """22 URL-safe characters of SHA-256: stable, key-safe, not reversible.

    Cached: every tier's counter and a user's next requests need the same hash.
    """
    digest = hashlib.sha256(user_id.encode("utf-8")).digest()
    return base64.urlsafe_b64encode(digest).decode("ascii")[:22]


@dataclass(frozen=True)
class Keys:
    """Key names under ``prefix``."""

    prefix: str

    @property
    def _queue_tag(self) -> str:
        return f"{self.prefix}:{{q}}"

    @property
    def durability_probe(self) -> str:
        """A key written only to be waited for: a replay's WAIT/WAITAOF covers what came before."""
        return f"{self._queue_tag}:durability-probe"

    @property
    def pending(self) -> str:
        """The list tasks wait in: LPUSH on enqueue, RPOPLPUSH by consumers."""
        return f"{self._queue_tag}:pending"

    @property
    def suspects(self) -> str:
        """Tasks that were running when their process died: each runs alone next time."""
        return f"{self._queue_tag}:suspects"

    @property
    def delayed(self) -> str:
        """Sorted set of tasks waiting to be retried, scored by due time (ms, Redis clock)."""
        return f"{self._queue_tag}:delayed"

    @property
    def dead(self) -> str:
        """List of tasks that used up their attempts, newest first, capped."""
        return f"{self._queue_tag}:dead"

    @property
    def dead_removed(self) -> str:
        """How many entries requeue by id ever removed from the list's middle (an integer).

        A scan over several calls moves back by its growth: those removals move
        the entries it has not read yet toward the head (lua/requeue_dead.lua).
        """
        return f"{self._queue_tag}:dead_removed"

    @property
    def consumers(self) -> str:
        """Set of registered consumer ids, so a reaper can find dead ones."""
        return f"{self._queue_tag}:consumers"

    def processing(self, consumer_id: str) -> str:
        """One consumer's in-flight list."""
        return f"{self._queue_tag}:processing:{consumer_id}"

    def heartbeat(self, process_id: str) -> str:
        """Exists while the process is alive (short TTL, refreshed)."""
        return f"{self._queue_tag}:heartbeat:{process_id}"

    @property
    def status_prefix(self) -> str:
        return f"{self._queue_tag}:task:"

    def status(self, task_id: str) -> str:
        """A task's status record (a hash with a TTL)."""
        return f"{self.status_prefix}{task_id}"

    @property
    def finished(self) -> str:
        """Pub/Sub channel: the id of each task that became completed, dead or cancelled."""
        return f"{self._queue_tag}:finished"

    def user_tasks(self, user_id: str) -> str:
        """A user's recent task ids, newest first, capped (USER_TASKS_MAX), expiring."""
        return f"{self._queue_tag}:user:{user_hash(user_id)}"

    @property
    def metrics(self) -> str:
        """Hash of the cluster's metric totals: field (name and labels) -> integer."""
        return f"{self._queue_tag}:metrics"

    @property
    def metrics_history(self) -> str:
        """Periodic samples of some totals, newest first, capped: the dashboard's history."""
        return f"{self._queue_tag}:metrics:history"

    @property
    def metrics_sampled(self) -> str:
        """Exists (short TTL) while the latest history sample is recent: one sampler at a time."""
        return f"{self._queue_tag}:metrics:sampled"

    def metrics_applied(self, flusher_id: str) -> str:
        """The number of one flusher's last applied batch (one a process, expiring when idle)."""
        return f"{self.metrics}:applied:{flusher_id}"

    @property
    def workers(self) -> str:
        """Hash of live processes: process id -> JSON (pid, host, uptime, in flight, ...)."""
        return f"{self._queue_tag}:workers"

    def idempotency(self, user_id: str, key: str) -> str:
        """A user's claim on an idempotency key (the key is hashed too)."""
        digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:32]
        return f"{self.prefix}:idem:{{{user_hash(user_id)}}}:{digest}"

    def rate(self, user_id: str, tier_name: str) -> str:
        """A user's counter for one rate-limit tier.

        In the queue's slot: one script checks the counters and enqueues.
        """
        return f"{self._queue_tag}:rl:{user_hash(user_id)}:{tier_name}"

    def ip_rate(self, address: str, tier_name: str) -> str:
        """A client address's counter for one tier (apart from users: no collisions)."""
        return f"{self.prefix}:rlip:{{{user_hash(address)}}}:{tier_name}"
