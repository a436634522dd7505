"""Invocations on the wire: the request (``<p>/nodes/<node>/invoke``) and its reply.

Owns :class:`InvokeRequest` and the JSON of requests and replies. :func:`decode_invoke`
raises ``InvokeDecodeError`` carrying the request_id / function_id / reply_to it could
salvage, so the error reply can still be sent; :func:`encode_reply` raises ``TypeError`` when
a handler's result is not JSON (the daemon answers ``handler_error`` then);
:func:`encode_ok_reply_raw` frames a result that is JSON already (a worker's bytes, checked
by the pool) into the same success reply, so a result is encoded once, in the worker. Where a
reply may go is :func:`agent.contract.topics.reply_address_problem`'s.

Must never: do I/O, or import anything beyond the stdlib, ``agent.errors`` and
``agent.contract``'s pure modules.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from json.encoder import encode_basestring, encode_basestring_ascii
from typing import Any, NoReturn

from agent.contract.fields import (
    ErrorType,
    Fields,
    dumps,
    load_object,
    merge_extra,
    now_ts,
    request_id_field,
    require_id,
    shallow_copy,
    show,
)
from agent.contract.ids import (
    ID_RE,
    MAX_REQUEST_ID_CHARS,
    is_valid_id,
    is_valid_publish_topic,
    is_valid_request_id,
)
from agent.errors import BadRequest, InvokeDecodeError


@dataclass(frozen=True)
class InvokeRequest:
    """One invocation request: ``payload`` is any JSON value, passed to the handler."""

    request_id: str
    function_id: str
    payload: Any
    reply_to: str | None = None


def decode_invoke(payload: bytes, max_bytes: int) -> InvokeRequest:
    """Parse an invocation; InvokeDecodeError carries the valid fields of a half-valid one."""
    if len(payload) > max_bytes:
        raise InvokeDecodeError(
            f"invoke: payload is {len(payload)} bytes, over the {max_bytes} limit"
        )
    obj = load_object(payload, "invoke", InvokeDecodeError)
    raw_rid, raw_fid, raw_reply_to = (obj.get(k) for k in ("request_id", "function_id", "reply_to"))
    # Salvage every valid field first: the error reply needs whichever of them exist.
    request_id = raw_rid if is_valid_request_id(raw_rid) else None
    function_id = raw_fid if is_valid_id(raw_fid) else None
    reply_to = raw_reply_to if is_valid_publish_topic(raw_reply_to) else None

    def fail(key: str, problem: str) -> NoReturn:
        raise InvokeDecodeError(
            f"invoke: {key}: {problem}",
            request_id=request_id,
            function_id=function_id,
            reply_to=reply_to,
        )

    if request_id is None:
        fail(
            "request_id",
            f"expected 1 to {MAX_REQUEST_ID_CHARS} printable characters, "
            f"got {show(raw_rid) if 'request_id' in obj else 'nothing'}",
        )
    if function_id is None:
        fail(
            "function_id",
            f"expected an id matching {ID_RE.pattern}, "
            f"got {show(raw_fid) if 'function_id' in obj else 'nothing'}",
        )
    if "payload" not in obj:
        fail("payload", "required field missing (null is a valid payload)")
    if raw_reply_to is not None and reply_to is None:
        fail(
            "reply_to",
            f"expected a topic to publish to (no +, #, NUL or leading $), got {show(raw_reply_to)}",
        )
    return InvokeRequest(request_id, function_id, obj["payload"], reply_to)


def encode_invoke(
    request_id: str, function_id: str, payload: Any, reply_to: str | None = None
) -> bytes:
    """The cloud side's invocation message."""
    msg: dict[str, Any] = {"request_id": request_id, "function_id": function_id, "payload": payload}
    if reply_to is not None:
        msg["reply_to"] = reply_to
    encoded = dumps(msg)
    try:
        decode_invoke(encoded, len(encoded))
    except InvokeDecodeError as exc:
        raise ValueError(str(exc)) from exc
    return encoded


def _check_reply(msg: Mapping[str, Any], err: ErrorType) -> None:
    f = Fields(msg, "reply", err)
    ok = f.boolean("ok")
    if ok:
        request_id_field(f)
        f.id("function_id")
        f.raw("result")
    else:
        kind = f.error()["type"]
        if f.raw("request_id") is not None:
            request_id_field(f)
        elif kind != BadRequest.type:
            f.fail("request_id", "null is only allowed in bad_request replies")
        if f.raw("function_id") is not None:
            f.id("function_id")
    f.number("duration_ms")
    f.boolean("cold_start")
    f.ts()


def encode_reply(
    request_id: str | None,
    function_id: str | None,
    *,
    ok: bool,
    result: Any = None,
    error: Mapping[str, Any] | None = None,
    duration_ms: float,
    cold_start: bool,
    node_id: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> bytes:
    """A reply; TypeError when ``result`` is not JSON (the daemon answers handler_error then).

    ``request_id``/``function_id`` may be None only in a ``bad_request`` reply to a request
    whose fields could not be salvaged.
    """
    if ok == (error is not None):
        raise ValueError("encode_reply: pass error exactly when ok is False")
    msg: dict[str, Any] = {"request_id": request_id, "function_id": function_id, "ok": ok}
    if ok:
        msg["result"] = result
    else:
        msg["error"] = shallow_copy(error)
    msg.update(duration_ms=duration_ms, cold_start=cold_start, ts=now_ts())
    if node_id is not None:
        msg["node_id"] = require_id("reply node_id", node_id)
    _check_reply(merge_extra(msg, extra), ValueError)
    try:
        return dumps(msg)
    except (TypeError, ValueError, RecursionError) as exc:
        try:
            dumps({"result": result})
        except (TypeError, ValueError, RecursionError):
            raise TypeError(
                f"reply to {request_id!r}: the result of {function_id!r} "
                f"is not JSON-serialisable: {exc}"
            ) from exc
        raise TypeError(
            f"reply to {request_id!r}: extra or error is not JSON-serialisable: {exc}"
        ) from exc


def encode_ok_reply_raw(
    request_id: str,
    function_id: str,
    result_json: bytes,
    *,
    duration_ms: float,
    cold_start: bool,
    node_id: str,
) -> bytes:
    """The success reply of :func:`encode_reply`, byte for byte, around a result that is
    JSON already (the worker's own encoding, passed through: one encoding end to end).

    ``result_json`` must be exactly one JSON value, UTF-8, without NaN or Infinity: the
    caller has checked it (``WorkerPool`` parses what a worker sends before it is used).
    ``request_id`` and ``function_id`` come from :func:`decode_invoke` (valid), so the
    field checks of :func:`encode_reply` cannot fail here and are not repeated; ``node_id``
    is checked. Differs from :func:`encode_reply` only for a message holding lone
    surrogates, where only the value holding them is ``\\u``-escaped (still the same JSON).
    """
    node_json = _node_json.get(node_id)
    if node_json is None:
        node_json = _dumps_value(require_id("reply node_id", node_id))
        if len(_node_json) < 64:
            _node_json[node_id] = node_json
    if not math.isfinite(duration_ms):
        raise ValueError(f"duration_ms {duration_ms} is not a finite number")
    return b"".join(
        (
            b'{"request_id":',
            _dumps_value(request_id),
            b',"function_id":',
            _dumps_value(function_id),
            b',"ok":true,"result":',
            result_json,
            b',"duration_ms":',
            float.__repr__(float(duration_ms)).encode(),  # json.dumps' text for a float
            b',"cold_start":',
            b"true" if cold_start else b"false",
            b',"ts":"',
            now_ts().encode(),
            b'","node_id":',
            node_json,
            b"}",
        )
    )


#: Node id -> its JSON in a reply (checked once per node id, not per reply).
_node_json: dict[str, bytes] = {}


def _dumps_value(value: str) -> bytes:
    """A string as :func:`agent.contract.fields.dumps` writes it inside a message (json's
    own ``ensure_ascii=False`` encoder, without a ``json.dumps`` call)."""
    try:
        return encode_basestring(value).encode()
    except UnicodeEncodeError:  # lone surrogates: \u escapes
        return encode_basestring_ascii(value).encode()


def decode_reply(payload: bytes) -> dict[str, Any]:
    """A validated reply (cloud side)."""
    msg = load_object(payload, "reply", BadRequest)
    _check_reply(msg, BadRequest)
    return msg
