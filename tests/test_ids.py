"""agent.contract.ids: the one rule table for ids, versions, request ids and topic prefixes."""

from __future__ import annotations

import pytest

from agent import config
from agent.contract import ids, protocol
from agent.exec import bundles


@pytest.mark.parametrize("value", ["a", "A", "0", "gw-01", "f_1", "a" * 64, "x-_9"])
def test_id_accepted(value: str) -> None:
    assert ids.is_valid_id(value)
    assert ids.check_id(value) == value
    assert ids.check_node_id(value) == value
    assert ids.check_function_id(value) == value


@pytest.mark.parametrize(
    "value", ["", "-a", "_a", "a.b", "a/b", "a b", "a" * 65, "gw-01\n", "é", "a~b", 7, None]
)
def test_id_refused(value: object) -> None:
    assert not ids.is_valid_id(value)
    with pytest.raises(ValueError, match=r"^invalid function id .*: expected 1-64 letters"):
        ids.check_function_id(value)
    with pytest.raises(ValueError, match=r"^invalid node id "):
        ids.check_node_id(value)


@pytest.mark.parametrize(
    "value", ["1", "1.0.0", "2024-01-01", "1.0.0-rc.1+build.5", "v_2", "x" * 64, "1..2"]
)
def test_version_accepted(value: str) -> None:
    assert ids.is_valid_version(value)
    assert ids.version_problem(value) is None
    assert ids.check_version(value) == value


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("", "is empty"),
        ("x" * 65, "is longer than 64 characters"),
        ("a\x00b", "contains NUL"),
        ("a/b", "contains a path separator"),
        ("a\\b", "contains a path separator"),
        ("..", 'starts with "."'),
        (".hidden", 'starts with "."'),
        ("1~2", "may only use letters"),  # the contract's rule: bundles once accepted "~"
        ("1 0", "may only use letters"),
        ("1\n", "may only use letters"),
        ("-1", "may only use letters"),
        (1, "is not a string"),
    ],
)
def test_version_refused(value: object, problem: str) -> None:
    assert not ids.is_valid_version(value)
    assert (ids.version_problem(value) or "").startswith(problem)
    with pytest.raises(ValueError, match=r"^invalid version .*: " + problem[:10]):
        ids.check_version(value)


@pytest.mark.parametrize("value", ["r", "r-1", "a b/c:d", "x" * 128, "é€"])
def test_request_id_accepted(value: str) -> None:
    assert ids.is_valid_request_id(value)
    assert ids.check_request_id(value) == value


@pytest.mark.parametrize("value", ["", "x" * 129, "a\nb", "a\x00", "\ud800", 5, None])
def test_request_id_refused(value: object) -> None:
    assert not ids.is_valid_request_id(value)
    with pytest.raises(ValueError, match="expected 1 to 128 printable characters"):
        ids.check_request_id(value)


@pytest.mark.parametrize("value", ["edge", "acme/edge", "a.b", "a b", "é", "x" * 65535])
def test_prefix_accepted(value: str) -> None:
    assert ids.is_valid_publish_topic(value)
    assert ids.prefix_problem(value) is None
    assert ids.is_valid_prefix(value)
    assert ids.check_prefix(value) == value


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("", "expected a non-empty topic prefix"),
        (None, "expected a non-empty topic prefix"),
        ("a/+", 'must not contain the wildcards "+" or "#"'),
        ("a/#", 'must not contain the wildcards "+" or "#"'),
        ("a\x00b", "must not contain NUL"),
        ("/edge", 'must not start or end with "/"'),
        ("edge/", 'must not start or end with "/"'),
        ("a//b", 'must not contain an empty level ("//")'),
        ("$SYS", 'must not start with "$" (reserved for the broker)'),
        ("\ud800", "must be UTF-8 of at most 65535 bytes"),
        ("x" * 65536, "must be UTF-8 of at most 65535 bytes"),
    ],
)
def test_prefix_refused(value: object, problem: str) -> None:
    assert ids.prefix_problem(value) == problem
    assert not ids.is_valid_prefix(value)
    with pytest.raises(ValueError, match=r"^invalid topic prefix"):
        ids.check_prefix(value)


@pytest.mark.parametrize("topic", ["", "$SYS/x", "a/+", "a/#", "a\x00", "\udc80", "x" * 65536])
def test_publish_topic_refused(topic: str) -> None:
    assert not ids.is_valid_publish_topic(topic)


def test_topic_charset() -> None:
    assert ids.TOPIC_CHARSETS == ("any", "portable")
    assert ids.topic_charset_problem("a.b c", "any") is None
    assert ids.topic_charset_problem("acme/edge-1", "portable") is None
    assert 'contains "."' in (ids.topic_charset_problem("a.b", "portable") or "")
    assert "contains spaces" in (ids.topic_charset_problem("a b", "portable") or "")
    assert "contains spaces" in (ids.topic_charset_problem("a\tb", "portable") or "")


def test_digests_and_key_ids() -> None:
    assert ids.is_valid_sha256("0" * 64)
    assert ids.is_valid_sha256("aB" * 32)
    for bad in ["", "0" * 63, "0" * 65, "g" * 64, "0" * 64 + "\n", 0]:
        assert not ids.is_valid_sha256(bad)
    assert ids.KEY_ID_RE.fullmatch("0123456789abcdef")
    for bad in ["0123456789ABCDEF", "0123456789abcde", "0123456789abcdef0"]:
        assert not ids.KEY_ID_RE.fullmatch(bad)


def test_one_home() -> None:
    """protocol and config re-export the rules instead of keeping copies."""
    assert protocol.ID_RE is ids.ID_RE is config.ID_RE
    assert config.ID_PATTERN == ids.ID_PATTERN
    assert protocol.VERSION_RE is ids.VERSION_RE
    assert protocol.KEY_ID_RE is ids.KEY_ID_RE
    assert protocol.MAX_REQUEST_ID_CHARS == ids.MAX_REQUEST_ID_CHARS
    assert protocol.is_valid_id is ids.is_valid_id
    assert protocol.is_valid_prefix is ids.is_valid_prefix
    assert protocol.is_valid_request_id is ids.is_valid_request_id
    assert protocol.topic_charset_problem is ids.topic_charset_problem
    assert not hasattr(bundles, "_VERSION_RE")
