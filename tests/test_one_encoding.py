"""One encoding for results (issue 15): the worker writes a JSON result as the reply does,
the pool checks those bytes are one JSON value the reply may carry, and the daemon frames
them into the success reply as they are (``protocol.encode_ok_reply_raw``), byte for byte
what ``encode_reply`` makes of the parsed value."""

from __future__ import annotations

import json
from typing import Any

import pytest

from agent.contract import invoke as invoke_contract
from agent.contract import protocol
from agent.errors import HandlerError
from agent.exec.pool import conversation
from agent.exec.worker import WorkerMain

RESULTS: list[Any] = [
    None,
    0,
    -1.5,
    1e300,
    "plain",
    "unicodé ✓ 🚀",
    'quotes " and \\ and \n',
    [1, "two", {"three": [None, True, False]}],
    {"nested": {"deep": [{"k": "v"}] * 3}, "empty": {}, "list": []},
    {"lone": "\ud800"},  # lone surrogate: \u escapes
]


@pytest.fixture
def fixed_ts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(invoke_contract, "now_ts", lambda t=None: "2026-12-01T00:00:00.000Z")


def _check(blob: bytes) -> Any:
    """What the pool makes of a worker's result bytes (JSON codec)."""
    return conversation.result_value("json", "f", {"op": "result", "ok": True}, blob)


def _worker_bytes(value: Any) -> bytes:
    worker = WorkerMain(-1, -1)
    worker.codec = "json"
    return worker.encode_result(value)


@pytest.mark.parametrize("value", RESULTS)
def test_the_framed_reply_is_the_encoded_reply(value: Any, fixed_ts: None) -> None:
    raw = _worker_bytes(value)
    parsed = _check(raw)
    assert parsed == value
    framed = protocol.encode_ok_reply_raw(
        "rid-1", "echo", raw, duration_ms=1.234, cold_start=True, node_id="gw-1"
    )
    decoded = protocol.decode_reply(framed)  # a valid reply by the contract's own decoder
    assert decoded["result"] == value
    encoded = protocol.encode_reply(
        "rid-1", "echo", ok=True, result=parsed, duration_ms=1.234, cold_start=True,
        node_id="gw-1",
    )  # fmt: skip
    if "\ud800" in json.dumps(value, ensure_ascii=False):
        assert json.loads(framed) == json.loads(encoded)  # escaped only where needed
    else:
        assert framed == encoded


@pytest.mark.parametrize(
    "blob",
    [
        b"NaN",
        b'{"a": Infinity}',
        b"[-Infinity]",
        b"1e400",  # a float out of range: inf once parsed
        b'{"a": 1} {"b": 2}',  # two values
        b"",
        b"\xff\xfe1\x00",  # UTF-16: json.loads(bytes) would take it
        b'"\xc3"',  # not UTF-8
        b"\xef\xbb\xbf1",  # a BOM
    ],
)
def test_the_pool_refuses_a_worker_result_the_reply_cannot_carry(blob: bytes) -> None:
    with pytest.raises(HandlerError, match="cannot load"):
        _check(blob)


def test_the_worker_refuses_nan_as_the_reply_would() -> None:
    with pytest.raises(TypeError, match="not JSON"):
        _worker_bytes({"value": float("nan")})


def test_a_non_ascii_result_is_sent_as_utf8_not_escaped() -> None:
    assert _worker_bytes({"t": "é"}) == '{"t":"é"}'.encode()
