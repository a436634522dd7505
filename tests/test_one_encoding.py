"""One encoding for results (issue 15): the worker writes a JSON result as the reply does,
the pool checks those bytes are one JSON value the reply may carry, and the daemon frames
them into the success reply as they are (``protocol.encode_ok_reply_raw``), byte for byte
what ``encode_reply`` makes of the parsed value."""

from __future__ import annotations

import json
import select
import time
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


def test_now_ts_is_the_datetime_rendering_to_the_millisecond() -> None:
    """``now_ts`` formats the part up to the second once per second (issue 15); its text
    must stay datetime's, rounding included (microseconds half-even, then truncated)."""
    import random
    from datetime import UTC, datetime

    from agent.contract.fields import now_ts

    def reference(t: float) -> str:
        when = datetime.fromtimestamp(t, UTC)
        return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")

    rng = random.Random(15)
    edges = [0.9995, 0.9999995, 0.9999994, 0.0000005, 0.0000004999, 0.5, 0.0015, 0.0]
    cases = [rng.uniform(0, 4e9) for _ in range(20_000)]
    cases += [base + edge for base in (0, 1, 1_700_000_000, 1e9) for edge in edges]
    cases += [-1.5, -0.0000004, -0.9999996, -86_400.25]
    wrong = [(t, now_ts(t), reference(t)) for t in cases if now_ts(t) != reference(t)]
    assert wrong == []
    assert now_ts().endswith("Z")


@pytest.mark.parametrize("rid", ["rid-1", 'q"uote\\back', "ünïcødé-ß", "</script>"])
@pytest.mark.parametrize("duration_ms", [0.0, 1e-7, 0.1, 2.5, 123456789.123])
def test_the_framed_reply_matches_byte_for_byte_whatever_the_request_id_and_duration(
    rid: str, duration_ms: float, fixed_ts: None
) -> None:
    """The framed reply writes its scalars with json's own encoders (issue 15): a request id
    that needs escaping and any duration must come out exactly as ``encode_reply`` writes."""
    framed = protocol.encode_ok_reply_raw(
        rid, "echo", b'{"a":[1,2]}', duration_ms=duration_ms, cold_start=False, node_id="gw-1"
    )
    encoded = protocol.encode_reply(
        rid, "echo", ok=True, result={"a": [1, 2]}, duration_ms=duration_ms,
        cold_start=False, node_id="gw-1",
    )  # fmt: skip
    assert framed == encoded


def test_a_framed_reply_refuses_a_bad_node_id_and_a_duration_that_is_not_finite() -> None:
    with pytest.raises(ValueError, match="node_id"):
        protocol.encode_ok_reply_raw(
            "r", "echo", b"1", duration_ms=1.0, cold_start=False, node_id="bad node"
        )
    with pytest.raises(ValueError, match="finite"):
        protocol.encode_ok_reply_raw(
            "r", "echo", b"1", duration_ms=float("nan"), cold_start=False, node_id="gw-1"
        )


ECHO_PAYLOAD = """\
def handler(event):
    return event


def with_context(event, context):
    return {"event": event, "state_version": context.state_version}
"""


@pytest.mark.parametrize("entrypoint", ["echo_payload:handler", "echo_payload:with_context"])
def test_the_request_json_reaches_the_handler_as_its_payload_without_a_pickle(
    tmp_path: Path, entrypoint: str
) -> None:
    """Issue 15, one encoding: the daemon sends the invoke request's own bytes (checked by
    decode_invoke) and the worker hands the handler their ``payload``: the same value the
    agent decoded, through the blocking path, the non-blocking one, and a handler taking
    a context (its JSON header carries the flag)."""
    (tmp_path / "echo_payload.py").write_text(ECHO_PAYLOAD)
    payload = {"é": ["ü", 1, 2.5, None, True, 10**30], "nested": {"a": [{}]}, "s": 'q"\\'}
    raw = protocol.encode_invoke("rid-1", "f", payload)
    assert protocol.decode_invoke(raw, 1 << 20).payload == payload
    pool = WorkerPool(codec="json", prestart=0, sys_path=[])
    pool.start()
    try:
        pool.register(
            FunctionConfig(
                function_id="f", memory_mb=64, timeout_s=5, kind="package",
                path=str(tmp_path), entrypoint=entrypoint,
            )
        )  # fmt: skip
        blocking = pool.invoke("f", ("not this",), request_id="rid-1", request_json=raw)
        started = pool.try_start("f", ("not this",), "rid-2", raw)
        direct = None
        if started is not None:  # a handler taking a context is never started this way
            waiter = select.poll()
            waiter.register(started.fd, select.POLLIN)
            deadline = time.monotonic() + 10
            while not started.poll():
                assert time.monotonic() < deadline, "the worker never answered"
                waiter.poll(1000)
            direct = started.finish().value
    finally:
        pool.close()
    got = blocking.value if entrypoint.endswith("handler") else blocking.value["event"]
    assert got == payload
    if entrypoint.endswith("handler"):
        assert direct == payload
    else:
        assert started is None


def test_the_invoke_header_says_when_its_blob_is_the_request_json() -> None:
    from agent.exec import pipe

    for flag in (False, True):
        frame = pipe.encode_frame(pipe.invoke_header("rid-é", flag), b"{}")
        head_len, _ = pipe.parse_prefix(frame)
        header, blob = pipe.decode_body(frame[pipe.PREFIX_SIZE :], head_len)
        assert header.get("request_json", False) is flag
        assert (header["op"], header["request_id"], blob) == ("invoke", "rid-é", b"{}")
