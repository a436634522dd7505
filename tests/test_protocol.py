"""Tests of agent.contract.protocol: topics, every encoder/decoder, every rejection, the docs."""

from __future__ import annotations

import ast
import base64
import contextlib
import functools
import hashlib
import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.contract import protocol as p
from agent.errors import (
    ERROR_TYPES,
    BadRequest,
    DeploymentRejected,
    FunctionTimeout,
    error_to_dict,
)
from agent.models import state_checksum

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"
TS_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
SOURCE = "def handle(event, context=None):\n    return event\n"
SHA = hashlib.sha256(SOURCE.encode()).hexdigest()
ID_PATTERN = p.ID_RE.pattern


def spec_dict(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": "f1",
        "name": "Echo",
        "version": "1.0.0",
        "entrypoint": "pkg.mod:handle",
        "code": {"format": "source", "data": SOURCE, "sha256": SHA},
        "memory_mb": 64,
        "timeout_seconds": 5,
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not ...}


def raw(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def rejects(exc: type[Exception], message: str) -> Any:
    return pytest.raises(exc, match=re.escape(message))


# --------------------------------------------------------------------------- ids and time


@pytest.mark.parametrize("good", ["a", "A9", "node-1", "gw_berlin-01", "x" * 64, "0"])
def test_valid_ids(good: str) -> None:
    assert p.is_valid_id(good)


@pytest.mark.parametrize(
    "bad", ["", "-a", "_a", "a.b", "a b", "a/b", "a+", "a#", "x" * 65, "é", "a\x00", None, 5]
)
def test_invalid_ids(bad: object) -> None:
    assert not p.is_valid_id(bad)


def test_id_with_trailing_newline_is_invalid() -> None:
    """`$` matches before a final newline, so ID_RE.match('node1\\n') passed: use fullmatch."""
    assert p.ID_RE.match("node1\n")  # the trap the helper must avoid
    assert not p.is_valid_id("node1\n")


ID_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


@given(st.text(max_size=70))
def test_id_rule_property(s: str) -> None:
    expected = 1 <= len(s) <= 64 and s[0] in ID_ALPHABET and all(c in ID_ALPHABET + "_-" for c in s)
    assert p.is_valid_id(s) == expected


ids = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_-]{0,63}\Z")


@given(ids)
def test_generated_ids_are_valid(s: str) -> None:
    assert p.is_valid_id(s)


def test_now_ts_format() -> None:
    assert p.now_ts(0) == "1970-01-01T00:00:00.000Z"
    assert p.now_ts(1795754532.1234) == "2026-11-27T04:42:12.123Z"
    assert TS_RE.fullmatch(p.now_ts())
    assert p.parse_ts(p.now_ts(1795754532.1234)).timestamp() == pytest.approx(1795754532.123)


@pytest.mark.parametrize("bad", ["2026-11-27", "2026-13-01T00:00:00Z", "2026-11-27 04:42:12Z", 5])
def test_parse_ts_rejects(bad: Any) -> None:
    with pytest.raises(ValueError):
        p.parse_ts(bad)


# --------------------------------------------------------------------------- topics

T = p.Topics("edge", "n1")


def test_node_topics() -> None:
    assert T.status == "edge/nodes/n1/status"
    assert T.heartbeat == "edge/nodes/n1/heartbeat"
    assert T.invoke == "edge/nodes/n1/invoke"
    assert T.replies == "edge/nodes/n1/replies"
    assert T.sync_delta == "edge/nodes/n1/sync/delta"
    assert T.sync_desired == "edge/nodes/n1/sync/desired"
    assert T.sync_request == "edge/nodes/n1/sync/request"
    assert T.sync_snapshot == "edge/nodes/n1/sync/snapshot"
    assert T.node_function("f1") == "edge/nodes/n1/functions/f1"
    assert T.fleet_function("f1") == "edge/fleet/functions/f1"
    assert T.function_state("f1") == "edge/nodes/n1/functions/f1/state"
    assert T.subscriptions() == [
        "edge/fleet/functions/+",
        "edge/nodes/n1/functions/+",
        "edge/nodes/n1/invoke",
        "edge/nodes/n1/sync/desired",
        "edge/nodes/n1/sync/request",
    ]


@pytest.mark.parametrize(
    ("topic", "expected"),
    [
        ("edge/fleet/functions/f1", ("fleet_spec", "f1")),
        ("edge/nodes/n1/functions/f1", ("node_spec", "f1")),
        ("edge/nodes/n1/invoke", ("invoke", None)),
        ("edge/nodes/n1/sync/desired", ("sync_desired", None)),
        ("edge/nodes/n1/sync/request", ("sync_request", None)),
        ("edge/nodes/n1/functions/f1/state", ("unknown", None)),
        ("edge/nodes/n2/functions/f1", ("unknown", None)),
        ("edge/nodes/n2/invoke", ("unknown", None)),
        ("edge/nodes/n11/invoke", ("unknown", None)),
        ("edge/nodes/n1/status", ("unknown", None)),
        ("edge/nodes/n1/replies", ("unknown", None)),
        ("edge/nodes/n1/sync/delta", ("unknown", None)),
        ("edge/fleet/functions/bad.id", ("unknown", None)),
        ("edge/fleet/functions/", ("unknown", None)),
        ("edge/fleet/functions/f1/state", ("unknown", None)),
        ("edgex/fleet/functions/f1", ("unknown", None)),
        ("other/nodes/n1/invoke", ("unknown", None)),
        ("edge/nodes/n1/invoke/extra", ("unknown", None)),
    ],
)
def test_classify(topic: str, expected: tuple[str, str | None]) -> None:
    assert T.classify(topic) == expected


@given(node=ids, fid=ids)
def test_classify_round_trips_built_topics(node: str, fid: str) -> None:
    topics = p.Topics("acme/edge", node)
    assert topics.classify(topics.fleet_function(fid)) == ("fleet_spec", fid)
    assert topics.classify(topics.node_function(fid)) == ("node_spec", fid)
    assert topics.classify(topics.function_state(fid)) == ("unknown", None)
    assert topics.classify(topics.invoke) == ("invoke", None)


@pytest.mark.parametrize(
    ("prefix", "node"),
    [
        ("", "n1"),
        ("edge/", "n1"),
        ("/edge", "n1"),
        ("a//b", "n1"),
        ("a+b", "n1"),
        ("a#", "n1"),
        ("a\x00", "n1"),
        ("$SYS", "n1"),
        ("edge", "n.1"),
    ],
)
def test_topics_reject_bad_prefix_or_node(prefix: str, node: str) -> None:
    with pytest.raises(ValueError):
        p.Topics(prefix, node)


def test_topic_builders_reject_bad_function_id() -> None:
    with rejects(ValueError, "function id: expected an id matching"):
        T.node_function("a/b")
    with pytest.raises(ValueError):
        T.fleet_function("+")


def test_reply_topic_selection() -> None:
    assert T.reply_topic("resp/t", "cloud/r") == "resp/t"
    assert T.reply_topic(None, "cloud/r") == "cloud/r"
    # Either address refused refuses the request: the reply goes to the default topic
    # (tests/test_reply_topics.py has the whole rule).
    assert T.reply_topic("bad/+", "cloud/r") == "edge/nodes/n1/replies"
    assert T.reply_topic(None, None) == "edge/nodes/n1/replies"
    assert T.reply_topic("", "bad/#") == "edge/nodes/n1/replies"
    assert T.reply_topic(None, "edge/fleet/functions/f") == "edge/nodes/n1/replies"


@pytest.mark.parametrize("bad", ["", "a/+", "a/#", "a\x00b", "$SYS/x", "\ud800", "x" * 65536, 3])
def test_invalid_publish_topics(bad: Any) -> None:
    assert not p.is_valid_publish_topic(bad)


def test_fleet_topics() -> None:
    fleet = p.Topics.for_fleet("edge")
    assert fleet.subscriptions() == [
        "edge/nodes/+/status",
        "edge/nodes/+/heartbeat",
        "edge/nodes/+/functions/+/state",
        "edge/nodes/+/sync/delta",
        "edge/nodes/+/sync/snapshot",
        "edge/nodes/+/replies",
    ]
    assert fleet.node("n2").invoke == "edge/nodes/n2/invoke"
    assert fleet.fleet_function("f1") == "edge/fleet/functions/f1"
    assert fleet.classify("edge/nodes/n2/status") == ("status", "n2", None)
    assert fleet.classify("edge/nodes/n2/heartbeat") == ("heartbeat", "n2", None)
    assert fleet.classify("edge/nodes/n2/functions/f1/state") == ("function_state", "n2", "f1")
    assert fleet.classify("edge/nodes/n2/sync/delta") == ("sync_delta", "n2", None)
    assert fleet.classify("edge/nodes/n2/sync/snapshot") == ("sync_snapshot", "n2", None)
    assert fleet.classify("edge/nodes/n2/replies") == ("replies", "n2", None)
    for topic in [
        "edge/nodes/n2/functions/f1",
        "edge/nodes/n2/functions/a.b/state",
        "edge/nodes/a.b/status",
        "edge/fleet/functions/f1",
        "edge/nodes/n2",
    ]:
        assert fleet.classify(topic) == ("unknown", None, None)


def test_parse_node_topic() -> None:
    assert p.parse_node_topic("edge", "edge/nodes/n2/functions/f1/state") == (
        "n2",
        "functions/f1/state",
    )
    assert p.parse_node_topic("edge", "edge/nodes/n2/") is None
    assert p.parse_node_topic("edge", "edge/nodes/n2") is None
    assert p.parse_node_topic("edge", "edge/nodes/a.b/status") is None
    assert p.parse_node_topic("edge", "edge2/nodes/n2/status") is None


# --------------------------------------------------------------------------- function specs


def test_spec_round_trip_with_defaults_and_extra() -> None:
    spec = p.decode_spec(raw(spec_dict(description="kept")))
    assert spec.environment == {} and spec.requires == [] and spec.concurrency == 1
    assert spec.signature is None and spec.timeout_seconds == 5.0
    assert spec.extra == {"description": "kept"}
    assert p.decode_spec(p.encode_spec(spec)) == spec
    assert p.spec_to_dict(spec)["description"] == "kept"


def test_spec_optional_nulls_mean_defaults() -> None:
    spec = p.decode_spec(
        raw(spec_dict(environment=None, requires=None, concurrency=None, signature=None))
    )
    assert (spec.environment, spec.requires, spec.concurrency, spec.signature) == ({}, [], 1, None)


def test_spec_uppercase_sha256_is_normalised() -> None:
    spec = p.decode_spec(
        raw(spec_dict(code={"format": "source", "data": "x", "sha256": "AB" * 32}))
    )
    assert spec.code.sha256 == "ab" * 32


def test_spec_repr_leaves_out_code_data() -> None:
    """A spec logged with repr() dumped megabytes of base64 into the journal."""
    spec = p.decode_spec(raw(spec_dict()))
    assert SOURCE not in repr(spec)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"", "function spec: payload is empty"),
        (b"\xff{}", "function spec: payload is not UTF-8 (byte 0: b'\\xff{}')"),
        (b"{", "function spec: payload is not JSON: Expecting property name"),
        (b"[]", "function spec: expected a JSON object, got []"),
        (b'{"timeout_seconds": NaN}', "function spec: payload is not usable JSON: NaN is not JSON"),
    ],
)
def test_spec_rejects_unparseable(payload: bytes, message: str) -> None:
    with rejects(DeploymentRejected, message):
        p.decode_spec(payload)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"id": ...}, "function spec: id: required field missing"),
        (
            {"id": "a.b"},
            f'function spec: id: expected an id matching {ID_PATTERN}, got "a.b"',
        ),
        ({"name": 3}, 'function spec "f1": name: expected a string, got 3'),
        ({"version": 1}, 'function spec "f1": version: expected a version matching'),
        ({"version": "../x"}, 'got "../x"'),
        ({"entrypoint": "mod"}, 'function spec "f1": entrypoint: expected "module:attr"'),
        ({"entrypoint": "a..b:c"}, 'got "a..b:c"'),
        ({"entrypoint": "a.b:c.d"}, 'got "a.b:c.d"'),
        ({"entrypoint": "1a:b"}, 'got "1a:b"'),
        ({"code": "print(1)"}, 'function spec "f1": code: expected an object, got "print(1)"'),
        (
            {"code": {"format": "tar", "data": "", "sha256": SHA}},
            'code.format: expected one of source, zip, got "tar"',
        ),
        (
            {"code": {"format": "source", "sha256": SHA}},
            'function spec "f1": code.data: required field missing',
        ),
        (
            {"code": {"format": "source", "data": "", "sha256": "abc"}},
            'code.sha256: expected 64 hex characters (a SHA-256), got "abc"',
        ),
        (
            {"code": {"format": "source", "data": "", "sha256": "g" * 64}},
            "code.sha256: expected 64 hex",
        ),
        ({"memory_mb": 0}, 'function spec "f1": memory_mb: expected an integer >= 1, got 0'),
        ({"memory_mb": "ten"}, 'memory_mb: expected an integer >= 1, got "ten"'),
        ({"memory_mb": True}, "memory_mb: expected an integer >= 1, got true"),
        ({"memory_mb": 1.5}, "memory_mb: expected an integer >= 1, got 1.5"),
        ({"timeout_seconds": 0}, "timeout_seconds: expected a finite number > 0, got 0"),
        ({"timeout_seconds": "5"}, 'timeout_seconds: expected a finite number > 0, got "5"'),
        ({"environment": []}, "environment: expected an object, got []"),
        ({"environment": {"1X": "v"}}, "environment.1X: not an environment variable name"),
        ({"environment": {"A=B": "v"}}, "environment.A=B: not an environment variable name"),
        ({"environment": {"X": 1}}, "environment.X: expected a UTF-8 string without NUL, got 1"),
        ({"environment": {"X": "a\x00b"}}, "environment.X: expected a UTF-8 string without NUL"),
        ({"environment": {"X": "\ud800"}}, "environment.X: expected a UTF-8 string without NUL"),
        ({"requires": "gpio"}, 'requires: expected a list, got "gpio"'),
        ({"requires": ["gpio", ""]}, 'requires[1]: expected a non-empty string, got ""'),
        ({"concurrency": 0}, "concurrency: expected an integer >= 1, got 0"),
        ({"signature": 5}, "signature: expected a string or null, got 5"),
    ],
)
def test_spec_rejections_name_field_and_value(changes: dict[str, Any], message: str) -> None:
    with rejects(DeploymentRejected, message):
        p.decode_spec(raw(spec_dict(**changes)))


def test_spec_rejection_truncates_long_values() -> None:
    with pytest.raises(DeploymentRejected) as info:
        p.decode_spec(raw(spec_dict(name=["x" * 10_000])))
    assert len(str(info.value)) < 200 and str(info.value).endswith("...")


def test_spec_id_must_match_topic() -> None:
    with rejects(DeploymentRejected, 'function spec "f1": id: does not match the topic\'s id "f2"'):
        p.decode_spec(raw(spec_dict()), expected_id="f2")
    assert p.decode_spec(raw(spec_dict()), expected_id="f1").id == "f1"


def test_code_bytes() -> None:
    assert p.code_bytes(p.CodeSpec("source", "é", SHA)) == "é".encode()
    zipped = b"PK\x03\x04 not really a zip"
    data = base64.b64encode(zipped).decode()
    assert p.code_bytes(p.CodeSpec("zip", data, SHA)) == zipped
    with rejects(DeploymentRejected, "function spec: code.data: expected base64 of a zip"):
        p.code_bytes(p.CodeSpec("zip", data[:-1] + "!", SHA))
    with rejects(DeploymentRejected, "code.data: expected base64"):
        p.code_bytes(p.CodeSpec("zip", data[:4] + "\n" + data[4:], SHA))
    with rejects(DeploymentRejected, "function spec: code.data: source is not UTF-8"):
        p.code_bytes(p.CodeSpec("source", "\ud800", SHA))


def test_spec_fingerprint() -> None:
    spec = p.decode_spec(raw(spec_dict()))
    same = p.decode_spec(raw(spec_dict(timeout_seconds=5.0, description="ignored")))
    assert p.spec_fingerprint(spec) == p.spec_fingerprint(same)
    assert p.spec_fingerprint(spec) == p.spec_fingerprint(p.decode_spec(p.encode_spec(spec)))
    changed = p.decode_spec(raw(spec_dict(memory_mb=128)))
    assert p.spec_fingerprint(changed) != p.spec_fingerprint(spec)
    assert re.fullmatch(r"[0-9a-f]{64}", p.spec_fingerprint(spec))


def test_spec_fingerprint_ignores_int_or_float_timeout() -> None:
    """A spec built in Python with timeout 5 looked changed after a JSON round trip (5.0)."""
    spec = p.decode_spec(raw(spec_dict()))
    built = p.FunctionSpec(**{**spec.__dict__, "timeout_seconds": 5})
    assert p.spec_fingerprint(built) == p.spec_fingerprint(spec)


def test_encode_spec_validates() -> None:
    spec = p.decode_spec(raw(spec_dict()))
    with rejects(ValueError, 'function spec "f1": memory_mb: expected an integer >= 1, got 0'):
        p.encode_spec(p.FunctionSpec(**{**spec.__dict__, "memory_mb": 0}))
    with rejects(ValueError, "extra field 'id'"):
        p.encode_spec(p.FunctionSpec(**{**spec.__dict__, "extra": {"id": "x"}}))


def test_removal_and_requires() -> None:
    assert p.is_removal(b"") and not p.is_removal(b"{}")
    spec = p.decode_spec(raw(spec_dict(requires=["gpio", "camera"])))
    assert p.requires_met(spec, ["camera", "gpio", "lte"])
    assert not p.requires_met(spec, ["gpio"])


# Any text JSON can carry, lone surrogates ("\ud800" is valid JSON) included.
json_text = st.text(alphabet=st.characters(exclude_categories=())) | st.sampled_from(
    ["\ud800", "a\udc80b"]
)
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | json_text
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(json_text, children, max_size=4)
    ),
    max_leaves=12,
)
env_names = st.from_regex(r"\A[A-Za-z_][A-Za-z0-9_]{0,15}\Z")
utf8_text = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\x00"))

SPEC_KEYS = frozenset(spec_dict()) | {"environment", "requires", "concurrency", "signature"}
specs = st.builds(
    p.FunctionSpec,
    id=ids,
    name=st.text(),
    version=st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._+-]{0,63}\Z"),
    entrypoint=st.from_regex(
        r"\A[a-z_][a-z0-9_]{0,8}(\.[a-z_][a-z0-9_]{0,8}){0,3}:[A-Za-z_][A-Za-z0-9_]{0,8}\Z"
    ),
    code=st.builds(
        p.CodeSpec,
        format=st.sampled_from(["source", "zip"]),
        data=st.text(),
        sha256=st.from_regex(r"\A[0-9a-f]{64}\Z"),
    ),
    memory_mb=st.integers(min_value=1, max_value=1 << 20),
    timeout_seconds=st.floats(min_value=0.001, max_value=1e6),
    environment=st.dictionaries(env_names, utf8_text, max_size=4),
    requires=st.lists(st.text(min_size=1), max_size=4),
    concurrency=st.integers(min_value=1, max_value=64),
    signature=st.none() | st.text(),
    extra=st.dictionaries(st.text().filter(lambda k: k not in SPEC_KEYS), json_values, max_size=3),
)


@given(specs)
def test_spec_round_trip_property(spec: p.FunctionSpec) -> None:
    decoded = p.decode_spec(p.encode_spec(spec))
    assert decoded == spec
    assert p.spec_fingerprint(decoded) == p.spec_fingerprint(spec)


# --------------------------------------------------------------------------- invocations


def test_invoke_round_trip() -> None:
    req = p.decode_invoke(p.encode_invoke("r1", "f1", {"x": [1, 2]}, reply_to="cloud/r"), 1024)
    assert req == p.InvokeRequest("r1", "f1", {"x": [1, 2]}, "cloud/r")
    assert p.decode_invoke(p.encode_invoke("r1", "f1", None), 1024).payload is None


def test_invoke_size_limit_is_checked_before_parsing() -> None:
    payload = p.encode_invoke("r1", "f1", "x" * 100)
    assert p.decode_invoke(payload, len(payload)).request_id == "r1"
    with rejects(
        p.InvokeDecodeError, f"invoke: payload is {len(payload)} bytes, over the 50 limit"
    ):
        p.decode_invoke(payload, 50)
    with pytest.raises(p.InvokeDecodeError) as info:
        p.decode_invoke(b"\xff" * 100, 50)  # never decoded: the size error wins
    assert "over the 50 limit" in str(info.value)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"", "invoke: payload is empty"),
        (b"\xc3(", "invoke: payload is not UTF-8 (byte 0: b'\\xc3(')"),
        (
            b"{'a': 1}",
            "invoke: payload is not JSON: Expecting property name enclosed in double quotes",
        ),
        (b'"hi"', 'invoke: expected a JSON object, got "hi"'),
        (b"[" * 100_000 + b"]" * 100_000, "invoke: payload is not usable JSON"),
        (b'{"n": ' + b"9" * 5000 + b"}", "invoke: payload is not usable JSON"),
        (b"\xef\xbb\xbf{}", "invoke: payload is not JSON: Unexpected UTF-8 BOM"),
    ],
)
def test_invoke_unparseable_salvages_nothing(payload: bytes, message: str) -> None:
    with rejects(p.InvokeDecodeError, message) as info:
        p.decode_invoke(payload, 10_000_000)
    err = info.value
    assert isinstance(err, p.InvokeDecodeError) and isinstance(err, BadRequest)
    assert err.type == "bad_request"
    assert (err.request_id, err.function_id, err.reply_to) == (None, None, None)


@pytest.mark.parametrize(
    ("obj", "message", "salvaged"),
    [
        (
            {"function_id": "f1", "payload": 1, "reply_to": "c/r"},
            "invoke: request_id: expected 1 to 128 printable characters, got nothing",
            (None, "f1", "c/r"),
        ),
        (
            {"request_id": "", "function_id": "f1", "payload": 1},
            'request_id: expected 1 to 128 printable characters, got ""',
            (None, "f1", None),
        ),
        (
            {"request_id": "r" * 129, "function_id": "f1", "payload": 1},
            "request_id: expected 1 to 128",
            (None, "f1", None),
        ),
        (
            {"request_id": "a\nb", "function_id": "f1", "payload": 1},
            'got "a\\nb"',
            (None, "f1", None),
        ),
        (
            {"request_id": 7, "function_id": "f1", "payload": 1, "reply_to": "c/r"},
            "request_id: expected 1 to 128 printable characters, got 7",
            (None, "f1", "c/r"),
        ),
        (
            {"request_id": "r1", "payload": 1, "reply_to": "c/r"},
            f"invoke: function_id: expected an id matching {ID_PATTERN}, got nothing",
            ("r1", None, "c/r"),
        ),
        (
            {"request_id": "r1", "function_id": "a/b", "payload": 1},
            'function_id: expected an id matching ^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$, got "a/b"',
            ("r1", None, None),
        ),
        (
            {"request_id": "r1", "function_id": "f1", "reply_to": "c/r"},
            "invoke: payload: required field missing (null is a valid payload)",
            ("r1", "f1", "c/r"),
        ),
        (
            {"request_id": "r1", "function_id": "f1", "payload": 1, "reply_to": "c/+"},
            "invoke: reply_to: expected a topic to publish to "
            '(no +, #, NUL or leading $), got "c/+"',
            ("r1", "f1", None),
        ),
        (
            {"request_id": "r1", "function_id": "f1", "payload": 1, "reply_to": ""},
            'reply_to: expected a topic to publish to (no +, #, NUL or leading $), got ""',
            ("r1", "f1", None),
        ),
        (
            {"request_id": "r1", "function_id": "f1", "payload": 1, "reply_to": 5},
            "reply_to: expected a topic",
            ("r1", "f1", None),
        ),
        (
            {"request_id": "r1", "function_id": "f1", "payload": 1, "reply_to": "a\x00b"},
            "reply_to: expected a topic",
            ("r1", "f1", None),
        ),
    ],
)
def test_invoke_half_valid_salvages_valid_fields(
    obj: dict[str, Any], message: str, salvaged: tuple[str | None, ...]
) -> None:
    with rejects(p.InvokeDecodeError, message) as info:
        p.decode_invoke(raw(obj), 10_000)
    err = info.value
    assert (err.request_id, err.function_id, err.reply_to) == salvaged


def test_invoke_reply_to_null_is_absent() -> None:
    assert (
        p.decode_invoke(
            raw({"request_id": "r", "function_id": "f", "payload": 0, "reply_to": None}), 99
        ).reply_to
        is None
    )


def test_encode_invoke_validates() -> None:
    with rejects(ValueError, "invoke: function_id: expected an id"):
        p.encode_invoke("r1", "a.b", 1)


# --------------------------------------------------------------------------- replies


def test_reply_ok_round_trip() -> None:
    msg = p.decode_reply(
        p.encode_reply(
            "r1",
            "f1",
            ok=True,
            result=[1, "é"],
            duration_ms=1.5,
            cold_start=True,
            node_id="n1",
            extra={"worker_pid": 7},
        )
    )
    assert {k: v for k, v in msg.items() if k != "ts"} == {
        "request_id": "r1",
        "function_id": "f1",
        "ok": True,
        "result": [1, "é"],
        "duration_ms": 1.5,
        "cold_start": True,
        "node_id": "n1",
        "worker_pid": 7,
    }
    assert TS_RE.fullmatch(msg["ts"])


def test_reply_error_round_trip() -> None:
    err = error_to_dict(FunctionTimeout("timed out after 5s"))
    msg = p.decode_reply(
        p.encode_reply("r1", "f1", ok=False, error=err, duration_ms=5000, cold_start=False)
    )
    assert msg["ok"] is False and msg["error"] == {
        "type": "timeout",
        "message": "timed out after 5s",
    }
    assert "result" not in msg


def test_reply_bad_request_may_have_null_ids() -> None:
    err = {"type": "bad_request", "message": "invoke: payload is empty"}
    msg = p.decode_reply(
        p.encode_reply(None, None, ok=False, error=err, duration_ms=0, cold_start=False)
    )
    assert msg["request_id"] is None and msg["function_id"] is None


def test_reply_result_not_json_is_a_clear_type_error() -> None:
    with rejects(
        TypeError, "reply to 'r1': the result of 'f1' is not JSON-serialisable: Object of type set"
    ):
        p.encode_reply("r1", "f1", ok=True, result={1, 2}, duration_ms=1, cold_start=False)
    with rejects(
        TypeError, "reply to 'r1': the result of 'f1' is not JSON-serialisable: Out of range float"
    ):
        p.encode_reply("r1", "f1", ok=True, result=float("nan"), duration_ms=1, cold_start=False)
    with rejects(TypeError, "extra or error is not JSON-serialisable"):
        p.encode_reply(
            "r1", "f1", ok=True, result=1, duration_ms=1, cold_start=False, extra={"x": object()}
        )


def test_reply_with_lone_surrogate_is_still_valid_utf8() -> None:
    """A handler returning '\\ud800' made encode() raise UnicodeEncodeError instead of replying."""
    data = p.encode_reply("r1", "f1", ok=True, result="\ud800", duration_ms=1, cold_start=False)
    assert p.decode_reply(data)["result"] == "\ud800"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"ok": True, "error": {"type": "timeout", "message": "x"}},
            "pass error exactly when ok is False",
        ),
        ({"ok": False}, "pass error exactly when ok is False"),
        (
            {"ok": False, "error": {"type": "nope", "message": "x"}},
            "reply: error.type: expected one of bad_request",
        ),
        (
            {"ok": False, "error": {"type": "timeout"}},
            "reply: error.message: required field missing",
        ),
        (
            {"ok": True, "request_id": None},
            "reply: request_id: expected 1 to 128 printable characters, got null",
        ),
        (
            {"ok": False, "request_id": None, "error": {"type": "timeout", "message": "x"}},
            "reply: request_id: null is only allowed in bad_request replies",
        ),
        (
            {"ok": True, "duration_ms": -1},
            "reply: duration_ms: expected a finite number >= 0, got -1",
        ),
        ({"ok": True, "cold_start": 1}, "reply: cold_start: expected true or false, got 1"),
        ({"ok": True, "extra": {"ok": False}}, "extra field 'ok'"),
        ({"ok": True, "node_id": "a.b"}, "reply node_id: expected an id"),
    ],
)
def test_encode_reply_rejects(kwargs: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = {
        "request_id": "r1",
        "function_id": "f1",
        "duration_ms": 1.0,
        "cold_start": False,
    }
    args.update(kwargs)
    with rejects(ValueError, message):
        p.encode_reply(**args)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"ok": "yes"}, 'reply: ok: expected true or false, got "yes"'),
        ({"result": ...}, "reply: result: required field missing"),
        ({"function_id": "a b"}, "reply: function_id: expected an id"),
        ({"ts": "yesterday"}, 'reply: ts: expected an RFC 3339 timestamp, got "yesterday"'),
        ({"ts": ...}, "reply: ts: required field missing"),
    ],
)
def test_decode_reply_rejects(changes: dict[str, Any], message: str) -> None:
    msg = json.loads(p.encode_reply("r1", "f1", ok=True, result=1, duration_ms=1, cold_start=False))
    msg.update(changes)
    with rejects(BadRequest, message):
        p.decode_reply(raw({k: v for k, v in msg.items() if v is not ...}))


@given(
    request_id=st.text(min_size=1, max_size=128).filter(str.isprintable),
    function_id=ids,
    result=json_values,
    duration=st.floats(min_value=0, max_value=1e9),
    cold=st.booleans(),
)
def test_reply_round_trip_property(
    request_id: str, function_id: str, result: Any, duration: float, cold: bool
) -> None:
    msg = p.decode_reply(
        p.encode_reply(
            request_id, function_id, ok=True, result=result, duration_ms=duration, cold_start=cold
        )
    )
    assert (msg["request_id"], msg["function_id"], msg["result"]) == (
        request_id,
        function_id,
        result,
    )
    assert (msg["duration_ms"], msg["cold_start"]) == (duration, cold)


@given(kind=st.sampled_from(sorted(ERROR_TYPES)), message=st.text())
def test_error_reply_round_trip_property(kind: str, message: str) -> None:
    err = {"type": kind, "message": message}
    msg = p.decode_reply(
        p.encode_reply("r", "f", ok=False, error=err, duration_ms=0, cold_start=False)
    )
    assert msg["error"] == err


# ------------------------------------------------------------------ status, heartbeat, state

SYSTEM = {
    "cpu_percent": 1.0,
    "memory_used_mb": 2,
    "memory_total_mb": 3,
    "disk_free_mb": 4,
    "load_1m": 0.5,
}
FN = {
    "id": "f1",
    "version": "1",
    "state": "active",
    "invocations": 3,
    "errors": 1,
    "timeouts": 0,
    "p50_ms": 1.0,
    "p95_ms": None,
}


def test_status_round_trip() -> None:
    from agent.models import EdgeNodeStatus

    msg = p.decode_status(
        p.encode_status(
            "n1",
            EdgeNodeStatus.DEGRADED,
            agent_version="0.1.0",
            name="N",
            location="",
            capabilities=("gpio",),
            extra={"pid": 1},
        )
    )
    assert msg["status"] == "degraded" and msg["capabilities"] == ["gpio"] and msg["pid"] == 1
    assert TS_RE.fullmatch(msg["ts"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"node_id": "a.b"},
            'status: node_id: expected an id matching ^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$, got "a.b"',
        ),
        (
            {"status": "sleeping"},
            'status: status: expected one of degraded, offline, online, syncing, got "sleeping"',
        ),
        ({"capabilities": [1]}, "status: capabilities[0]: expected a non-empty string, got 1"),
        ({"name": None}, "status: name: expected a string, got null"),
        ({"extra": {"ts": "x"}}, "extra field 'ts'"),
    ],
)
def test_encode_status_rejects(kwargs: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = {
        "node_id": "n1",
        "status": "online",
        "agent_version": "1",
        "name": "n",
        "location": "",
        "capabilities": [],
    }
    args.update(kwargs)
    with rejects(ValueError, message):
        p.encode_status(args.pop("node_id"), args.pop("status"), **args)


def test_decode_status_rejects() -> None:
    msg = json.loads(
        p.encode_status("n1", "online", agent_version="1", name="n", location="", capabilities=[])
    )
    del msg["agent_version"]
    with rejects(BadRequest, "status: agent_version: required field missing"):
        p.decode_status(raw(msg))
    with rejects(BadRequest, "status: payload is empty"):
        p.decode_status(b"")


def test_heartbeat_round_trip() -> None:
    msg = p.decode_heartbeat(
        p.encode_heartbeat(
            "n1", 0, 1.5, "online", {**SYSTEM, "temp_c": 40}, [FN], extra={"boot_id": "b"}
        )
    )
    assert msg["system"]["temp_c"] == 40 and msg["functions"] == [FN] and msg["boot_id"] == "b"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"seq": -1}, "heartbeat: seq: expected an integer >= 0, got -1"),
        ({"uptime_s": "1"}, 'heartbeat: uptime_s: expected a finite number >= 0, got "1"'),
        (
            {"status": "up"},
            'heartbeat: status: expected one of degraded, offline, online, syncing, got "up"',
        ),
        (
            {"system": {k: v for k, v in SYSTEM.items() if k != "load_1m"}},
            "heartbeat: system.load_1m: required field missing",
        ),
        (
            {"system": {**SYSTEM, "cpu_percent": float("inf")}},
            "heartbeat: system.cpu_percent: expected a finite number >= 0, got Infinity",
        ),
        (
            {"functions": [{**FN, "p95_ms": -1}]},
            "heartbeat: functions[0].p95_ms: expected a finite number >= 0, got -1",
        ),
        ({"functions": [FN, {**FN, "id": "x/y"}]}, "heartbeat: functions[1].id: expected an id"),
        (
            {"functions": [{k: v for k, v in FN.items() if k != "timeouts"}]},
            "heartbeat: functions[0].timeouts: required field missing",
        ),
        (
            {"functions": [{**FN, "state": ""}]},
            'heartbeat: functions[0].state: expected a non-empty string, got ""',
        ),
        ({"functions": ["f1"]}, 'heartbeat: functions[0]: expected an object, got "f1"'),
    ],
)
def test_encode_heartbeat_rejects(args: dict[str, Any], message: str) -> None:
    full: dict[str, Any] = {
        "node_id": "n1",
        "seq": 1,
        "uptime_s": 1.0,
        "status": "online",
        "system": SYSTEM,
        "functions": [FN],
    }
    full.update(args)
    with rejects(ValueError, message):
        p.encode_heartbeat(**full)


def test_decode_heartbeat_rejects_bool_counter() -> None:
    msg = json.loads(p.encode_heartbeat("n1", 1, 1, "online", SYSTEM, [FN]))
    msg["functions"][0]["errors"] = False
    with rejects(BadRequest, "heartbeat: functions[0].errors: expected an integer >= 0, got false"):
        p.decode_heartbeat(raw(msg))


def test_function_state_round_trips() -> None:
    active = p.decode_function_state(p.encode_function_state("f1", "1", SHA, "active", None))
    assert active["error"] is None and active["sha256"] == SHA
    err = {"type": "deployment_rejected", "message": "not JSON"}
    rejected = p.decode_function_state(
        p.encode_function_state("f1", None, None, "rejected", err, extra={"node_id": "n1"})
    )
    assert rejected["error"] == err and rejected["version"] is None and rejected["node_id"] == "n1"
    removed = p.decode_function_state(p.encode_function_state("f1", "1", SHA, "removed", None))
    assert removed["state"] == "removed"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("f1", "1", SHA, "running", None),
            "function state: state: expected one of active, failed, rejected, removed, "
            'got "running"',
        ),
        (("f1", "1", SHA, "failed", None), "function state: error: expected an object, got null"),
        (("f1", None, SHA, "active", None), "function state: version: expected a string, got null"),
        (
            ("f1", "1", "abc", "active", None),
            'function state: sha256: expected 64 hex characters (a SHA-256), got "abc"',
        ),
        (
            ("f1", "1", None, "failed", {"type": "timeout", "message": "x"}),
            "function state: sha256: expected 64 hex",
        ),
        (
            ("f1", "1", SHA, "rejected", {"type": "oops", "message": "x"}),
            "function state: error.type: expected one of",
        ),
        (("a.b", "1", SHA, "active", None), "function state: function_id: expected an id"),
    ],
)
def test_encode_function_state_rejects(args: tuple[Any, ...], message: str) -> None:
    with rejects(ValueError, message):
        p.encode_function_state(*args)


# --------------------------------------------------------------------------- sync

STATE = {"a": 1, "b": [1, 2], "é": None}
SUM = state_checksum(STATE)


def test_sync_round_trips() -> None:
    delta = p.decode_sync_delta(p.encode_sync_delta(1, 2, {"a": 1, "gone": None}, SUM))
    assert delta["changes"] == {"a": 1, "gone": None} and delta["checksum"] == SUM
    snap = p.decode_sync_snapshot(p.encode_sync_snapshot("r1", 2, STATE, SUM.upper()))
    assert snap["data"] == STATE and snap["request_id"] == "r1"
    assert p.decode_sync_desired(p.encode_sync_desired(3, STATE)) == (3, STATE)
    assert p.decode_sync_desired(raw({"version": 3, "data": {}})) == (3, {})
    assert p.decode_sync_request(p.encode_sync_request("r9")) == "r9"


@pytest.mark.parametrize(
    ("decode", "obj", "message"),
    [
        (
            p.decode_sync_delta,
            {"from_version": 2, "to_version": 2, "changes": {}, "checksum": SUM},
            "sync delta: to_version: expected an integer > from_version (2), got 2",
        ),
        (
            p.decode_sync_delta,
            {"from_version": -1, "to_version": 2, "changes": {}, "checksum": SUM},
            "sync delta: from_version: expected an integer >= 0, got -1",
        ),
        (
            p.decode_sync_delta,
            {"from_version": 1, "to_version": 2, "changes": [], "checksum": SUM},
            "sync delta: changes: expected an object, got []",
        ),
        (
            p.decode_sync_delta,
            {"from_version": 1, "to_version": 2, "changes": {}},
            "sync delta: checksum: required field missing",
        ),
        (
            p.decode_sync_snapshot,
            {"request_id": "r", "version": 1, "data": STATE, "checksum": "0" * 64},
            "sync snapshot: checksum: expected the SHA-256 of the canonical JSON of data",
        ),
        (
            p.decode_sync_snapshot,
            {"request_id": "", "version": 1, "data": {}, "checksum": SUM},
            'sync snapshot: request_id: expected 1 to 128 printable characters, got ""',
        ),
        (
            p.decode_sync_desired,
            {"version": "1", "data": {}},
            'sync desired: version: expected an integer >= 0, got "1"',
        ),
        (
            p.decode_sync_desired,
            {"version": 1, "data": None},
            "sync desired: data: expected an object, got null",
        ),
        (
            p.decode_sync_desired,
            {"version": 1, "data": {"a": 1}, "checksum": SUM},
            "sync desired: checksum: expected the SHA-256",
        ),
        (p.decode_sync_request, {}, "sync request: request_id: required field missing"),
        (
            p.decode_sync_request,
            {"request_id": 5},
            "sync request: request_id: expected 1 to 128 printable characters, got 5",
        ),
    ],
)
def test_sync_decoders_reject(
    decode: Callable[[bytes], Any], obj: dict[str, Any], message: str
) -> None:
    with rejects(BadRequest, message):
        decode(raw(obj))


def test_sync_encoders_reject() -> None:
    with rejects(ValueError, "sync snapshot: checksum: expected the SHA-256"):
        p.encode_sync_snapshot("r1", 1, STATE, "0" * 64)
    with rejects(ValueError, "sync delta: checksum: expected 64 hex"):
        p.encode_sync_delta(1, 2, {}, "nope")
    with rejects(BadRequest, "sync desired: payload is not UTF-8"):
        p.decode_sync_desired(b"\x80")


# --------------------------------------------------------------------------- purity


CONTRACT_DIR = Path(__file__).resolve().parent.parent / "agent" / "contract"
#: Every module of the wire contract, the package itself included.
CONTRACT_MODULES = sorted(
    "agent.contract" if path.stem == "__init__" else f"agent.contract.{path.stem}"
    for path in CONTRACT_DIR.glob("*.py")
)
#: What the contract may import besides the standard library.
CONTRACT_MAY_IMPORT = ("agent", "agent.errors", "agent.models")


def _allowed_import(name: str) -> bool:
    return (
        name.split(".")[0] in sys.stdlib_module_names
        or name in CONTRACT_MAY_IMPORT
        or name == "agent.contract"
        or name.startswith("agent.contract.")
    )


def test_every_contract_module_is_listed() -> None:
    assert {"agent.contract.protocol", "agent.contract.ids", "agent.contract.sync"} <= set(
        CONTRACT_MODULES
    ), CONTRACT_MODULES


@pytest.mark.parametrize("module", CONTRACT_MODULES)
def test_module_is_pure(module: str) -> None:
    """Imported alone, a contract module loads no paho, socket, sqlite3, subprocess or
    threading, and nothing beyond the stdlib, agent.errors, agent.models and agent.contract."""
    code = (
        f"import sys; before = set(sys.modules); import {module}; "
        "bad = {'paho', 'socket', 'sqlite3', 'subprocess', 'threading'} & set(sys.modules); "
        "new = sorted(set(sys.modules) - before); "
        "print('\\n'.join(new)); "
        "sys.exit(', '.join(sorted(bad)) or 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, f"{module} imported {result.stderr or result.stdout}"
    loaded = result.stdout.split()
    assert module in loaded, f"{module} was already loaded at start-up: {loaded}"
    outside = [name for name in loaded if not _allowed_import(name)]
    assert outside == [], f"{module} pulled in {outside}"


@pytest.mark.parametrize("module", CONTRACT_MODULES)
def test_module_imports_only_the_contracts_dependencies(module: str) -> None:
    """Every import statement of a contract module, under TYPE_CHECKING too, names the
    stdlib, agent.errors, agent.models or agent.contract."""
    stem = "__init__" if module == "agent.contract" else module.rpartition(".")[2]
    tree = ast.parse((CONTRACT_DIR / f"{stem}.py").read_text(encoding="utf-8"))
    named: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            named += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{module}: relative import at line {node.lineno}"
            base = node.module or ""
            # `from agent import errors` names agent.errors, not the package.
            named += [f"{base}.{a.name}" if base == "agent" else base for a in node.names]
    outside = [name for name in named if not _allowed_import(name)]
    assert outside == [], f"{module} imports {outside}"


# --------------------------------------------------------------------------- docs/protocol.md


def _without_ts(msg: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in msg.items() if k != "ts"}


def _rest(msg: dict[str, Any], *known: str) -> dict[str, Any]:
    return {k: v for k, v in msg.items() if k not in {*known, "ts"}}


STATUS_KEYS = ("node_id", "status", "agent_version", "name", "location", "capabilities")
HEARTBEAT_KEYS = ("node_id", "seq", "uptime_s", "status", "system", "functions")
STATE_KEYS = ("function_id", "version", "sha256", "state", "error")
REPLY_KEYS = (
    "request_id",
    "function_id",
    "ok",
    "result",
    "error",
    "duration_ms",
    "cold_start",
    "node_id",
)


def _status(m: dict[str, Any]) -> bytes:
    return p.encode_status(
        m["node_id"],
        m["status"],
        agent_version=m["agent_version"],
        name=m["name"],
        location=m["location"],
        capabilities=m["capabilities"],
        extra=_rest(m, *STATUS_KEYS),
    )


def _heartbeat(m: dict[str, Any]) -> bytes:
    args = {k: m[k] for k in HEARTBEAT_KEYS}
    return p.encode_heartbeat(**args, extra=_rest(m, *HEARTBEAT_KEYS))


def _state(m: dict[str, Any]) -> bytes:
    args = {k: m[k] for k in STATE_KEYS}
    return p.encode_function_state(**args, extra=_rest(m, *STATE_KEYS))


def _reply(m: dict[str, Any]) -> bytes:
    return p.encode_reply(
        m["request_id"],
        m["function_id"],
        ok=m["ok"],
        result=m.get("result"),
        error=m.get("error"),
        duration_ms=m["duration_ms"],
        cold_start=m["cold_start"],
        node_id=m.get("node_id"),
        extra=_rest(m, *REPLY_KEYS),
    )


# name -> (decoder of the wire bytes, re-encoder from the example's fields)
DOC_EXAMPLES: dict[str, tuple[Callable[[bytes], Any], Callable[[dict[str, Any]], bytes]]] = {
    "status": (p.decode_status, _status),
    "status_offline": (p.decode_status, _status),
    "heartbeat": (p.decode_heartbeat, _heartbeat),
    "fleet_spec": (p.decode_spec, lambda m: p.encode_spec(p.decode_spec(raw(m)))),
    "node_spec": (p.decode_spec, lambda m: p.encode_spec(p.decode_spec(raw(m)))),
    "function_state": (p.decode_function_state, _state),
    "function_state_rejected": (p.decode_function_state, _state),
    "invoke": (
        lambda b: p.decode_invoke(b, len(b)),
        lambda m: p.encode_invoke(
            m["request_id"], m["function_id"], m["payload"], m.get("reply_to")
        ),
    ),
    "reply": (p.decode_reply, _reply),
    "reply_error": (p.decode_reply, _reply),
    "reply_bad_request": (p.decode_reply, _reply),
    "reply_conflict": (p.decode_reply, _reply),
    "sync_delta": (
        p.decode_sync_delta,
        lambda m: p.encode_sync_delta(
            m["from_version"], m["to_version"], m["changes"], m["checksum"]
        ),
    ),
    "sync_desired": (
        p.decode_sync_desired,
        lambda m: p.encode_sync_desired(m["version"], m["data"]),
    ),
    "sync_request": (p.decode_sync_request, lambda m: p.encode_sync_request(m["request_id"])),
    "sync_snapshot": (
        p.decode_sync_snapshot,
        lambda m: p.encode_sync_snapshot(m["request_id"], m["version"], m["data"], m["checksum"]),
    ),
    "spec_index": (p.decode_spec_index, lambda m: p.encode_spec_index(m["functions"])),
    "node_catalog": (p.decode_node_catalog, lambda m: p.encode_node_catalog(m["nodes"])),
    "rollcall": (p.decode_rollcall, lambda m: p.encode_rollcall(m["request_id"], m["window_s"])),
}


def _doc_examples() -> dict[str, str]:
    text = DOC.read_text(encoding="utf-8")
    found = re.findall(r"<!-- example: (\w+) -->\n```json\n(.*?)\n```", text, re.S)
    names = [name for name, _ in found]
    assert len(names) == len(set(names)), f"duplicate example names in {DOC}: {names}"
    assert text.count("<!-- example:") == len(found), "an example marker is not followed by ```json"
    return dict(found)


def test_doc_has_every_example() -> None:
    assert set(_doc_examples()) == set(DOC_EXAMPLES)


@pytest.mark.parametrize("name", sorted(DOC_EXAMPLES))
def test_doc_example_decodes_and_matches_encoder(name: str) -> None:
    example = json.loads(_doc_examples()[name])
    decode, encode = DOC_EXAMPLES[name]
    decode(json.dumps(example, separators=(",", ":"), ensure_ascii=False).encode())
    rebuilt = json.loads(encode(example))
    assert _without_ts(rebuilt) == _without_ts(example), f"{name}: the doc differs from the encoder"
    assert list(rebuilt) == list(example), f"{name}: field order differs from the encoder"


def test_doc_mentions_every_topic_and_error_type() -> None:
    text = DOC.read_text(encoding="utf-8")
    for topic in [
        "<p>/nodes/<node>/status",
        "<p>/nodes/<node>/heartbeat",
        "<p>/fleet/functions/<fid>",
        "<p>/nodes/<node>/functions/<fid>",
        "<p>/nodes/<node>/functions/<fid>/state",
        "<p>/nodes/<node>/invoke",
        "<p>/nodes/<node>/replies",
        "<p>/nodes/<node>/sync/delta",
        "<p>/nodes/<node>/sync/desired",
        "<p>/nodes/<node>/sync/request",
        "<p>/nodes/<node>/sync/snapshot",
    ]:
        assert f"`{topic}`" in text, topic
    for kind, cls in ERROR_TYPES.items():
        assert f"| `{kind}` | `{cls.__name__}`" in text, kind


@functools.cache
def _doc_messages() -> dict[str, dict[str, Any]]:
    return {name: json.loads(text) for name, text in _doc_examples().items()}


@given(
    name=st.sampled_from(sorted(DOC_EXAMPLES)),
    index=st.integers(min_value=0),
    value=json_values | st.just(...),
)
def test_decoders_raise_only_contract_errors(name: str, index: int, value: Any) -> None:
    """Mutated messages (one field replaced or dropped) raise BadRequest/DeploymentRejected only."""
    msg = dict(_doc_messages()[name])
    key = sorted(msg)[index % len(msg)]
    if value is ...:
        del msg[key]
    else:
        msg[key] = value
    decode, _ = DOC_EXAMPLES[name]
    with contextlib.suppress(BadRequest, DeploymentRejected):
        decode(raw(msg))


@given(payload=st.binary(max_size=64))
def test_decoders_survive_arbitrary_bytes(payload: bytes) -> None:
    """Arbitrary bytes raise the contract's errors, never an unexpected exception."""
    for decode, _ in DOC_EXAMPLES.values():
        with contextlib.suppress(BadRequest, DeploymentRejected):
            decode(payload)


@pytest.mark.parametrize(
    ("decode", "obj", "message"),
    [
        (p.decode_status, {"node_id": "n1", "status": []}, "status: status: expected one of"),
        (p.decode_function_state, {"function_id": "f1", "state": {}}, "state: expected one of"),
        (
            p.decode_spec,
            {"id": "f1", "name": "", "version": "1", "entrypoint": "m:h", "code": {"format": []}},
            'function spec "f1": code.format: expected one of source, zip, got []',
        ),
    ],
)
def test_unhashable_enum_value_is_rejected_not_crashing(
    decode: Callable[[bytes], Any], obj: dict[str, Any], message: str
) -> None:
    """`[] in frozenset(...)` raised TypeError instead of the contract's error."""
    with pytest.raises((BadRequest, DeploymentRejected), match=re.escape(message)):
        decode(raw(obj))


def test_sync_data_with_lone_surrogate_is_rejected_not_crashing() -> None:
    """'\\ud800' is valid JSON but state_checksum() raised UnicodeEncodeError on it."""
    obj = {"version": 1, "data": {"a": "\ud800"}, "checksum": SUM}
    with rejects(BadRequest, "sync desired: data: holds a string that is not valid UTF-8"):
        p.decode_sync_desired(raw(obj))
    with rejects(BadRequest, "sync snapshot: data: holds a string that is not valid UTF-8"):
        p.decode_sync_snapshot(raw({**obj, "request_id": "r1"}))
    with rejects(ValueError, "sync desired: data: holds a string that is not valid UTF-8"):
        p.encode_sync_desired(1, {"a": "\ud800"})


def test_spec_fingerprint_of_lone_surrogate_name() -> None:
    """A spec named '\\ud800' (valid JSON) made spec_fingerprint raise UnicodeEncodeError."""
    spec = p.decode_spec(raw(spec_dict(name="\ud800")))
    assert p.spec_fingerprint(spec) == p.spec_fingerprint(p.decode_spec(p.encode_spec(spec)))
    assert p.spec_fingerprint(spec) != p.spec_fingerprint(p.decode_spec(raw(spec_dict())))


def test_doc_rejection_message_is_real() -> None:
    example = _doc_messages()["fleet_spec"]
    with pytest.raises(DeploymentRejected) as info:
        p.decode_spec(raw({**example, "memory_mb": 0}))
    assert f"`{info.value}`" in DOC.read_text(encoding="utf-8")


@pytest.mark.parametrize("prefix", ["edge", "acme/edge", "acme.edge", "my edge", "é"])
def test_prefixes_the_config_accepts_work(prefix: str) -> None:
    """Topics() refused prefixes that agent.config accepted, crashing the agent at startup."""
    topics = p.Topics(prefix, "n1")
    assert topics.classify(topics.invoke) == ("invoke", None)
    assert topics.classify(topics.fleet_function("f1")) == ("fleet_spec", "f1")
