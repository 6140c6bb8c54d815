"""Key names: one prefix, Cluster hash tags, no raw user ids."""

from test_scripts import SCRIPTS

from taskserver import keys as keys_module
from taskserver.keys import Keys, user_hash


def test_every_key_starts_with_the_prefix() -> None:
    keys = Keys("app")
    names = [
        keys.pending,
        keys.consumers,
        keys.processing("h:1:a#0"),
        keys.heartbeat("h:1:a"),
        keys.status("f" * 32),
        keys.rate("user", "1s"),
    ]
    assert all(name.startswith("app:") for name in names)


def test_queue_keys_share_one_hash_tag() -> None:
    keys = Keys("app")
    for name in (keys.pending, keys.processing("c"), keys.status("t"), keys.consumers):
        assert "{q}" in name


def test_rate_keys_share_the_queue_slot_without_the_user_id() -> None:
    """One script checks a user's counters and enqueues: they must share the queue's tag."""
    keys = Keys("app")
    one, sixty = keys.rate("alice@example.com", "1s"), keys.rate("alice@example.com", "60s")
    assert "{q}" in one and "{q}" in sixty
    assert user_hash("alice@example.com") in one
    assert "alice" not in one
    assert "{" + user_hash("10.0.0.1") + "}" in keys.ip_rate("10.0.0.1", "ip-60s")
    assert user_hash("a") != user_hash("b")
    assert len(user_hash("x" * 1000)) == 22


def hash_tag(key: str) -> str:
    """What Redis Cluster hashes: the text inside the first non-empty ``{...}``, else the key."""
    start = key.find("{")
    end = key.find("}", start + 1)
    return key[start + 1 : end] if start >= 0 and end > start + 1 else key


def test_every_script_touches_one_slot() -> None:
    """The queue's scripts (rate counters, status records included) and the others' keys."""
    keys = Keys("app")
    queue_keys = [
        keys.pending,
        keys.suspects,
        keys.delayed,
        keys.dead,
        keys.consumers,
        keys.processing("h:1:a#0"),
        keys.heartbeat("h:1:a"),
        keys.status("f" * 32),
        keys.status_prefix + "f" * 32,
        keys.rate("alice", "1s"),
        keys.rate("bob", "60s"),
        keys.dead_removed,
        keys.metrics,
        keys.metrics_history,
        keys.metrics_sampled,
        keys.metrics_applied("f" * 32),
        keys.workers,
    ]
    assert {hash_tag(name) for name in queue_keys} == {"q"}
    assert hash_tag(keys.idempotency("alice", "k")) == user_hash("alice")
    assert hash_tag(keys.ip_rate("10.0.0.1", "ip-60s")) == user_hash("10.0.0.1")


def test_the_scripts_that_build_status_keys_are_the_five_the_docs_name() -> None:
    """Keys built from ARGV work on Cluster only in the declared keys' slot: know which."""
    building = {script.name for script in SCRIPTS.values() if "status key prefix" in script.source}
    assert building == {"fetch_batch", "promote", "reclaim", "requeue_dead", "user_tasks"}
    named = " ".join((keys_module.__doc__ or "").split())
    assert "FETCH_BATCH, PROMOTE, RECLAIM, REQUEUE_DEAD and USER_TASKS" in named
