"""Key names: one prefix, Cluster hash tags, no raw user ids."""

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


def test_rate_keys_of_a_user_share_a_tag_without_the_user_id() -> None:
    keys = Keys("app")
    one, sixty = keys.rate("alice@example.com", "1s"), keys.rate("alice@example.com", "60s")
    tag = "{" + user_hash("alice@example.com") + "}"
    assert tag in one and tag in sixty
    assert "alice" not in one
    assert user_hash("a") != user_hash("b")
    assert len(user_hash("x" * 1000)) == 22
