"""The one rule table for the names on the wire: ids, versions, request ids, topic prefixes.

Every module that checks one of these names asks this one (``protocol`` for the wire
contract, ``config`` for ``node.id`` and ``mqtt.topic_prefix``, ``bundles`` before a
version names a directory), so the rules cannot drift apart again. The rules are the wire
contract's (docs/protocol.md)::

    kind            rule                                            predicate / check
    node id,        ^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$                is_valid_id /
    function id,                                                    check_id, check_node_id,
    controller id                                                   check_function_id
    version         ^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$ (it names    is_valid_version /
                    a directory: no "/", never "." or "..")         version_problem, check_version
    request id      1 to 128 printable characters                   is_valid_request_id /
                                                                    check_request_id
    publish topic   non-empty UTF-8 of at most 65535 bytes, no      is_valid_publish_topic
                    "+", "#" or NUL, no leading "$"
    topic prefix    a publish topic with no empty level             is_valid_prefix /
                    ("edge", "acme/edge")                           prefix_problem, check_prefix
    topic charset   "any", or "portable": no "." nor whitespace     topic_charset_problem
                    (brokers that map topics to subjects: NATS)
    sha256          64 hex digits (either case)                     is_valid_sha256
    signing key id  16 lowercase hex digits                         KEY_ID_RE

Predicates answer True/False for any object (a trailing newline never passes: every regex is
used with ``fullmatch``); ``check_*`` return the value or raise ``ValueError`` whose message
names the kind, the value and the rule; ``*_problem`` say why in a few words (None: valid),
for callers that frame their own message (a config key, a wire field).

Pure: the standard library only (the worker may import it).
"""

from __future__ import annotations

import json
import re
from typing import Final, TypeGuard

__all__ = [
    "HEX64_RE",
    "ID_PATTERN",
    "ID_RE",
    "ID_RULE",
    "KEY_ID_RE",
    "MAX_ID_CHARS",
    "MAX_REQUEST_ID_CHARS",
    "MAX_TOPIC_BYTES",
    "MAX_VERSION_CHARS",
    "TOPIC_CHARSETS",
    "VERSION_PATTERN",
    "VERSION_RE",
    "VERSION_RULE",
    "check_function_id",
    "check_id",
    "check_node_id",
    "check_prefix",
    "check_request_id",
    "check_version",
    "is_valid_id",
    "is_valid_prefix",
    "is_valid_publish_topic",
    "is_valid_request_id",
    "is_valid_sha256",
    "is_valid_version",
    "prefix_problem",
    "topic_charset_problem",
    "version_problem",
]

MAX_ID_CHARS: Final = 64
#: Node, function and controller ids. Test with ``ID_RE.fullmatch`` or :func:`is_valid_id`,
#: never ``ID_RE.match``: ``$`` also matches before a trailing newline.
ID_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
ID_RE: Final = re.compile(ID_PATTERN)
ID_RULE: Final = "1-64 letters, digits, '_' or '-' starting with a letter or digit"

MAX_VERSION_CHARS: Final = 64
#: Versions name a directory on disk (``<version>-<sha12>``): no ``/``, never ``.`` or ``..``.
VERSION_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$"
VERSION_RE: Final = re.compile(VERSION_PATTERN)
VERSION_RULE: Final = "may only use letters, digits and . _ + - (starting with a letter or digit)"

MAX_REQUEST_ID_CHARS: Final = 128
MAX_TOPIC_BYTES: Final = 65535

#: ``mqtt.topic_charset``: "any" (what MQTT allows) or "portable" (no ``.`` or whitespace,
#: for brokers that map topics to subjects: NATS closes the connection on a ``.``).
TOPIC_CHARSETS: Final = ("any", "portable")

HEX64_RE: Final = re.compile(r"^[0-9a-fA-F]{64}$")
#: ``signature.key_id``: the first 16 hex digits of the SHA-256 of the raw ed25519 public key.
KEY_ID_RE: Final = re.compile(r"^[0-9a-f]{16}$")


def _show(value: object) -> str:
    """A value for a message: JSON-ish, cut short when long."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# --------------------------------------------------------------------------- ids


def is_valid_id(value: object) -> TypeGuard[str]:
    """True when ``value`` is a node, function or controller id (:data:`ID_PATTERN`)."""
    return isinstance(value, str) and ID_RE.fullmatch(value) is not None


def check_id(value: object, kind: str = "id") -> str:
    """``value`` when it is an id; ValueError naming ``kind``, the value and the rule."""
    if not is_valid_id(value):
        raise ValueError(f"invalid {kind} {_show(value)}: expected {ID_RULE} ({ID_PATTERN})")
    return value


def check_node_id(value: object) -> str:
    return check_id(value, "node id")


def check_function_id(value: object) -> str:
    return check_id(value, "function id")


# --------------------------------------------------------------------------- versions


def is_valid_version(value: object) -> TypeGuard[str]:
    """True when ``value`` is a function version (:data:`VERSION_PATTERN`)."""
    return isinstance(value, str) and VERSION_RE.fullmatch(value) is not None


def version_problem(value: object) -> str | None:
    """Why ``value`` is no version, in a few words; None when it is one."""
    if is_valid_version(value):
        return None
    if not isinstance(value, str):
        return "is not a string"
    if not value:
        return "is empty"
    if len(value) > MAX_VERSION_CHARS:
        return f"is longer than {MAX_VERSION_CHARS} characters"
    if "\x00" in value:
        return "contains NUL"
    if "/" in value or "\\" in value:
        return "contains a path separator"
    if value.startswith("."):
        return 'starts with "."'
    return VERSION_RULE


def check_version(value: object, kind: str = "version") -> str:
    """``value`` when it is a version; ValueError saying what is wrong with it."""
    problem = version_problem(value)
    if problem is not None:
        raise ValueError(f"invalid {kind} {_show(value)}: {problem}")
    assert isinstance(value, str)
    return value


# --------------------------------------------------------------------------- request ids


def is_valid_request_id(value: object) -> TypeGuard[str]:
    """True for 1 to 128 printable characters (no control characters, no lone surrogates)."""
    return isinstance(value, str) and 0 < len(value) <= MAX_REQUEST_ID_CHARS and value.isprintable()


def check_request_id(value: object) -> str:
    if not is_valid_request_id(value):
        raise ValueError(
            f"invalid request id {_show(value)}: expected 1 to {MAX_REQUEST_ID_CHARS} "
            "printable characters"
        )
    return value


# --------------------------------------------------------------------------- topics


def is_valid_publish_topic(topic: object) -> TypeGuard[str]:
    """True when ``topic`` can be published to: non-empty UTF-8, no wildcard, NUL or ``$`` start."""
    if not isinstance(topic, str) or not topic or topic.startswith("$"):
        return False
    if "+" in topic or "#" in topic or "\0" in topic:
        return False
    try:
        return len(topic.encode("utf-8")) <= MAX_TOPIC_BYTES
    except UnicodeEncodeError:  # a lone surrogate: not UTF-8, a broker would drop us
        return False


def prefix_problem(value: object) -> str | None:
    """Why ``value`` is no topic prefix (the first problem, in a few words); None when it is.

    A prefix is a publishable topic with no empty level (``edge``, ``acme/edge``): usable as
    a literal prefix of every topic the agent and the controllers use.
    """
    if not isinstance(value, str) or not value:
        return "expected a non-empty topic prefix"
    if "+" in value or "#" in value:
        return 'must not contain the wildcards "+" or "#"'
    if "\x00" in value:
        return "must not contain NUL"
    if value.startswith("/") or value.endswith("/"):
        return 'must not start or end with "/"'
    if "//" in value:
        return 'must not contain an empty level ("//")'
    if value.startswith("$"):
        return 'must not start with "$" (reserved for the broker)'
    if not is_valid_publish_topic(value):  # what is left: not UTF-8, or too long
        return f"must be UTF-8 of at most {MAX_TOPIC_BYTES} bytes"
    return None


def is_valid_prefix(value: object) -> TypeGuard[str]:
    """True for a publishable topic with no empty level (``edge``, ``acme/edge``)."""
    return prefix_problem(value) is None


def check_prefix(value: object) -> str:
    problem = prefix_problem(value)
    if problem is not None:
        raise ValueError(f"invalid topic prefix {_show(value)}: {problem}")
    assert isinstance(value, str)
    return value


def topic_charset_problem(topic: str, charset: str) -> str | None:
    """Why ``topic`` breaks ``charset``; None when it does not (always None for "any")."""
    if charset != "portable":
        return None
    if "." in topic:
        return 'contains ".", which mqtt.topic_charset "portable" forbids'
    if any(ch.isspace() for ch in topic):
        return 'contains spaces, which mqtt.topic_charset "portable" forbids'
    return None


# --------------------------------------------------------------------------- digests


def is_valid_sha256(value: object) -> TypeGuard[str]:
    """True for 64 hex digits, either case (a SHA-256 as the wire carries it)."""
    return isinstance(value, str) and HEX64_RE.fullmatch(value) is not None
