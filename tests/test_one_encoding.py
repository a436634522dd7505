"""One encoding for results (issue 15): the worker writes a JSON result as the reply does,
the pool checks those bytes are one JSON value the reply may carry, and the daemon frames
them into the success reply as they are (``protocol.encode_ok_reply_raw``), byte for byte
what ``encode_reply`` makes of the parsed value."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from agent.contract import invoke as invoke_contract
from agent.contract import protocol
from agent.errors import HandlerError
from agent.exec.pool import FunctionConfig, WorkerPool, conversation
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


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    assert len(keys) == len(set(keys)), f"duplicate keys in the reply: {keys}"
    return dict(pairs)


def test_a_result_with_colliding_keys_is_not_framed_with_duplicate_keys(
    tmp_path: Path, fixed_ts: None
) -> None:
    """``{1: "a", "1": "b"}`` is valid for a handler (non-string keys become strings), and
    json.dumps writes ``{"1":"a","1":"b"}``: framed as is, the reply would carry a duplicate
    key that readers resolve differently (first wins, last wins, refused). The reply must
    be what encode_reply makes of the parsed value, as before the one-encoding change."""
    (tmp_path / "collide.py").write_text('def handler(event):\n    return {1: "a", "1": "b"}\n')
    pool = WorkerPool(codec="json", prestart=0, sys_path=[])
    pool.start()
    try:
        pool.register(
            FunctionConfig(
                function_id="collide", memory_mb=64, timeout_s=5, kind="package",
                path=str(tmp_path), entrypoint="collide:handler",
            )
        )  # fmt: skip
        result = pool.invoke("collide", ({},), request_id="rid-1")
    finally:
        pool.close()
    assert result.value == {"1": "b"}
    if result.raw is not None:
        framed = protocol.encode_ok_reply_raw(
            "rid-1", "collide", result.raw, duration_ms=1.0, cold_start=True, node_id="gw-1"
        )
    else:
        framed = protocol.encode_reply(
            "rid-1", "collide", ok=True, result=result.value, duration_ms=1.0,
            cold_start=True, node_id="gw-1",
        )  # fmt: skip
    assert json.loads(framed, object_pairs_hook=_unique_keys)["result"] == {"1": "b"}


@pytest.mark.parametrize("blob", [b'{"a":1,"a":2}', b'[{"x":{"k":1,"k":2}}]'])
def test_a_hostile_result_with_duplicate_keys_is_not_framed_as_is(blob: bytes) -> None:
    value, raw = conversation.result_json("f", blob)
    assert raw is None  # re-encoded from the value: one key each, the last one wins
    assert value == json.loads(blob)
